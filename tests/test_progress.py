"""Seeing a long run (issue 13, item 11): piped, a run writes one progress line per round or phase as it
happens (never one bar at the end), stdout carries the JSON result alone, every log record is one line; on a
terminal, live bars show the stage, its count and an ETA.

Runs are subprocesses of the installed `deepfusion` with stderr a pipe (or a pty), as a user's would be.
"""

import io
import json
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rich.console import Console

from deepfusion import progress
from deepfusion.config import default_config_path
from deepfusion.progress import RunProgress
from tests.conftest import SHARED_DATA

EXE = Path(sys.executable).parent / "deepfusion"
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S")
PROGRESS = re.compile(r"(\[(?:ROUND|PHASE) [^\]]+\]) (?:[\d.hms]+ elapsed, ~\S+ left|done in )")


def deepfusion(*argv, stderr=subprocess.PIPE, timeout=600) -> subprocess.CompletedProcess:
    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip("real corpora not found")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(EXE), *map(str, argv), "--data-dir", str(SHARED_DATA)], stdout=subprocess.PIPE,
                          stderr=stderr, text=True, env=env, timeout=timeout)


def progress_heads(stderr: str) -> list[str]:
    return [m.group(1) for line in stderr.splitlines() if (m := PROGRESS.search(line))]


def assert_records_one_line_each(stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and all(RECORD.match(line) for line in lines), [line for line in lines if not RECORD.match(line)]
    assert "━" not in stderr  # no progress bar drawn into a pipe


def json_only(stdout: str) -> dict:
    assert stdout.count("\n") == 1, stdout  # one line: the result, nothing else
    return json.loads(stdout)


@pytest.fixture(scope="module")
def multiround(tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "multiround"
    done = deepfusion("run", "--config", default_config_path("smoke-multiround"), "--rounds", 3, "--out", out)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def oneshot(tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "oneshot"
    done = deepfusion("run", "--config", default_config_path("smoke"), "--out", out)
    assert done.returncode == 0, done.stderr
    return done


# ---- piped: one line per round or phase, JSON alone on stdout ---------------------------------------------

@pytest.mark.slow
def test_a_piped_multiround_run_prints_one_progress_line_per_round(multiround):
    assert progress_heads(multiround.stderr) == ["[ROUND 1/3]", "[ROUND 2/3]", "[ROUND 3/3]"]
    lines = [line for line in multiround.stderr.splitlines() if PROGRESS.search(line)]
    assert "left" in lines[0] and "left" in lines[1] and "done in" in lines[2]  # an ETA until the last round
    # each as its round ends, after the round's record and before the next round's: never all at the end
    kinds = ["progress" if PROGRESS.search(line) else "record" for line in multiround.stderr.splitlines()
             if "[ROUND " in line]
    assert kinds == ["record", "progress"] * 3
    assert json_only(multiround.stdout)["rounds"] == 3


@pytest.mark.slow
def test_a_piped_oneshot_run_prints_one_progress_line_per_phase_step(oneshot):
    assert progress_heads(oneshot.stderr) == ["[PHASE 0 1/4]", "[PHASE 0 2/4]", "[PHASE 0 3/4]", "[PHASE 0 4/4]",
                                              "[PHASE I]", "[PHASE II 1/2]", "[PHASE II 2/2]",
                                              "[PHASE III 3/6]", "[PHASE III 6/6]"]  # tune: 6 steps, a check every 3
    assert "~" in next(line for line in oneshot.stderr.splitlines() if "[PHASE 0 1/4]" in line)  # an ETA
    assert json_only(oneshot.stdout)["method"] == "deepfusion"


@pytest.mark.slow
def test_log_records_are_one_line_each(multiround, oneshot):
    for done in (multiround, oneshot):
        assert_records_one_line_each(done.stderr)
    # the device list RichHandler wrapped over 14 lines at 80 columns: one line, whole
    [devices] = [line for line in multiround.stderr.splitlines() if "global qwen_moe/tiny" in line]
    assert len(devices) > 200 and all(f"'id': '{d}'" in devices for d in ("cdc", "nhlbi", "finance"))


def test_a_multi_line_message_is_one_record_line(capsys):
    from deepfusion.logs import setup_logging

    setup_logging(False)
    import logging

    logging.getLogger("deepfusion").warning("upload rejected:\n  bad header\n  bad shape")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "upload rejected: |   bad header |   bad shape" in err


@pytest.mark.slow
def test_the_flower_engine_prints_one_progress_line_per_round(tmp_path):
    done = deepfusion("run", "--engine", "flower", "--config", default_config_path("smoke-multiround"), "--out",
                      tmp_path / "flower")
    assert done.returncode == 0, done.stderr
    assert progress_heads(done.stderr) == ["[ROUND 1/2]", "[ROUND 2/2]"]
    assert json_only(done.stdout)["rounds"] == 2
    assert (tmp_path / "flower" / "ppl_per_round.png").is_file()


# ---- on a terminal: live bars with the stage, its count and an ETA --------------------------------------

@pytest.mark.slow
def test_on_a_terminal_live_bars_show_the_round_count(tmp_path):
    main_fd, tty_fd = pty.openpty()
    shown = []
    reader = threading.Thread(target=_drain, args=(main_fd, shown), daemon=True)
    reader.start()
    try:
        done = deepfusion("run", "--config", default_config_path("smoke-multiround"), "--out", tmp_path / "tty",
                          stderr=tty_fd)
    finally:
        os.close(tty_fd)
        reader.join(timeout=10)
        os.close(main_fd)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(shown).decode(errors="replace"))
    assert done.returncode == 0, screen
    assert re.search(r"round +━+ +2/2", screen), screen[-2000:]  # the bar, its count
    assert "[ROUND 2/2] ppl" in screen and not PROGRESS.search(screen)  # records above the bar; no plain lines
    assert json_only(done.stdout)["rounds"] == 2  # a terminal on stderr leaves stdout to the result


def _drain(fd: int, into: list) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        into.append(chunk)


def test_live_bars_show_stage_count_and_eta(tmp_path):
    screen = io.StringIO()
    with RunProgress(tmp_path, console=Console(file=screen, force_terminal=True, color_system=None, width=100)) as shown:
        shown.stage("PHASE II", "Phase II: domain", 4)
        shown.update(2)
        shown.bars.refresh()
        assert re.search(r"Phase II: domain +━+.* 2/4 .*ETA \d", screen.getvalue())


def test_the_eta_counts_only_the_steps_this_stretch_did(tmp_path, monkeypatch, caplog):
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    shown = RunProgress(tmp_path, live=False)
    shown.stage("ROUND", "round", 6, done=2)  # a resumed run: rounds 1-2 were done before, in no time here
    now[0] += 10
    with caplog.at_level("INFO", logger="deepfusion"):
        shown.update(3)
        shown.update(3)  # the same count again: no second line
    assert caplog.messages == ["[ROUND 3/6] 10s elapsed, ~30s left"]  # 10 s per round, 3 to go (not ~10s)


def test_a_stage_that_stops_early_says_so_once(tmp_path, monkeypatch, caplog):
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    shown = RunProgress(tmp_path, live=False)
    shown.stage("PHASE III", "Phase III: tuning step", 300)
    with caplog.at_level("INFO", logger="deepfusion"):
        for step in range(1, 151):  # early stopping after the check at step 150
            now[0] += 0.5
            shown.update(step, line=step % 50 == 0)
        now[0] += 60  # evaluation and export: not the phase's time
        shown.finish()
    assert caplog.messages == ["[PHASE III 50/300] 25s elapsed, ~2m05s left in Phase III (run 25s)",
                               "[PHASE III 100/300] 50s elapsed, ~1m40s left in Phase III (run 50s)",
                               "[PHASE III 150/300] 1m15s elapsed, ~1m15s left in Phase III (run 1m15s)",
                               "[PHASE III 150/300] ended early (early stopping) after 1m15s"]
