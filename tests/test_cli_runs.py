"""Runs you can trust and read, through the real command line (issue 13): a run directory is never replaced
or shared without a word, a full disk or Ctrl-C keeps the last complete round and says how to go on, a
resume says what it cannot change and keeps the time of every stretch, eval and generate check what they
are given, stdout carries results only, and the exported model knows its special tokens and length.

Runs use configs/smoke-multiround.toml (seconds each). Item by item:
    1 taken directory, --overwrite     2 two runs at once     3 full disk      4 Ctrl-C
    5 resume arguments, wall seconds   6 failed runs          7 generate       8 eval's config
    9 stdout vs stderr                 10 exported model      13 help, version, warnings, pyproject
"""

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

from deepfusion.cli import main
from deepfusion.config import default_config_path
from tests.conftest import ROOT, SHARED_DATA, smoke_multiround_args

pytestmark = pytest.mark.slow
SMOKE = str(default_config_path("smoke-multiround"))
EXE = Path(sys.executable).parent / "deepfusion"  # the installed console script


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("deepfusion: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_args(out, rounds=2, *extra):
    return ["run", "--config", SMOKE, "--data-dir", SHARED_DATA, "--rounds", rounds, "--no-progress",
            "--out", out, *extra]


def rounds_in(out: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def finished(smoke_multiround):
    """A finished 2-round smoke run (run_args(out), the suite's shared one: tests/conftest.py); tests that change
    it work on a copy."""
    assert smoke_multiround_args(smoke_multiround.out) == [str(a) for a in run_args(smoke_multiround.out)]
    return smoke_multiround.out


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "copy")
    return tmp_path / "copy"


# ---- 1, 2: a run directory is never replaced or shared without a word ------------------------------------

@pytest.mark.parametrize("engine", ["local", "flower"])
def test_a_directory_holding_a_run_is_refused_and_kept(finished, capsys, engine):
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.name != ".lock"}
    rc, out, err = cli(capsys, *run_args(finished), "--engine", engine)
    line = one_line(err)
    assert rc == 2 and out == ""
    for needle in ("already holds a run (summary.json, metrics.jsonl, model/, checkpoint/",
                   f"--resume {finished}", "a new --out", "--overwrite"):
        assert needle in line, (needle, line)
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.name != ".lock"} == before


def test_overwrite_replaces_the_run(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    rc, printed, _ = cli(capsys, *run_args(out, 1), "--overwrite")
    assert rc == 0 and json.loads(printed)["rounds"] == 1
    assert rounds_in(out) == [1] and json.loads((out / "summary.json").read_text())["rounds"] == 1


def test_a_second_run_into_a_running_directory_is_refused(tmp_path, capsys, data_dir):
    """The first run is a real `deepfusion run` process; the second exits 2 naming it, and the first's
    metrics are its own rounds, once each. Its stdout, with stderr apart and its progress bar on, is one
    JSON object (item 9)."""
    out = tmp_path / "shared"
    with_bar = [a for a in map(str, run_args(out)) if a != "--no-progress"]
    first = subprocess.Popen([str(EXE), *with_bar], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / ".lock").is_file() and (out / ".lock").read_text()):  # it holds the lock
            assert first.poll() is None and time.time() < deadline, "the first run never claimed its directory"
            time.sleep(0.05)
        rc, printed, err = cli(capsys, *run_args(out))
        line = one_line(err)
        assert rc == 2 and printed == ""
        assert f"--out {out} is in use by another run (pid {first.pid} on " in line and "deepfusion run" in line
        stdout, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and json.loads(stdout)["rounds"] == 2  # the whole of stdout is the result
    assert rounds_in(out) == [1, 2]


# ---- 3: a full disk ---------------------------------------------------------------------------------------

def test_a_full_disk_keeps_the_last_checkpoint_and_says_how_to_resume(tmp_path, capsys, data_dir, monkeypatch):
    """Simulated: round 2's checkpoint write gets half its bytes out, then ENOSPC (see the tmpfs test below)."""
    real_save = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("round") == 2 and hasattr(f, "write"):
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    rc, printed, err = cli(capsys, *run_args(out))
    assert rc == 2 and printed == ""
    assert one_line(err) == (f"deepfusion: disk full while writing {out / 'checkpoint' / 'state.pt'}; the last complete "
                             f"checkpoint is round 1; free space, then continue with: deepfusion run --resume {out} "
                             f"--data-dir {data_dir}")
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["round"] == 1
    assert os.listdir(out / "checkpoint") == ["state.pt"] and not (out / "summary.json").exists()
    assert json.loads((out / "failed.json").read_text())["last_checkpoint"] == "round 1"


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs of a given size (a real full disk); needs root."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        opts = f"remount,size={size}" if mounted else f"size={size}"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if os.geteuid() != 0 or r.returncode:
            pytest.skip("cannot mount a tmpfs here (needs root); the simulated full disk tests the same path")
        mounted.append(size)
        return where

    yield mount
    if mounted:
        subprocess.run(["umount", str(where)], check=True)


def test_a_real_full_disk_then_resume_after_freeing_space(finished, tmpfs, capsys, data_dir):
    """The issue's own case: a tmpfs as --out. It holds round 1's checkpoint but not round 2's beside it (a
    checkpoint is replaced by write-then-rename: two copies for a moment). After "freeing space" (a bigger
    tmpfs), the printed command resumes, and the summary keeps both stretches' seconds (item 5)."""
    size = (finished / "checkpoint" / "state.pt").stat().st_size
    out = tmpfs(size * 3 // 2) / "run"
    rc, _, err = cli(capsys, *run_args(out))
    line = one_line(err)
    assert rc == 2 and "disk full while writing" in line and "the last complete checkpoint is round 1" in line
    assert os.listdir(out / "checkpoint") == ["state.pt"]
    tmpfs(64 * 2**20)
    command = shlex.split(line.split("continue with: ")[1])
    assert command[:3] == ["deepfusion", "run", "--resume"]
    rc, printed, err = cli(capsys, *command[1:])
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert rounds_in(out) == [1, 2] and summary["rounds"] == 2 and not (out / "failed.json").exists()
    assert len(summary["wall_seconds_stretches"]) == 2
    assert summary["wall_seconds"] == pytest.approx(sum(summary["wall_seconds_stretches"]), abs=0.02)


# ---- 4, 5: Ctrl-C, and what a resume may change --------------------------------------------------------------

def test_ctrl_c_says_what_was_saved_and_the_exact_resume_command(tmp_path, data_dir):
    # Ctrl-C is sent within 0.05 s of round 1's checkpoint; rounds 2-5, the evaluation and the export after them
    # take ~3 s here (a smoke round ~0.15 s), so it lands mid-run
    out, rounds = tmp_path / "run", 5
    # SIGINT as a terminal delivers it: an ignored SIGINT is inherited across exec, and a library in this pytest
    # process (Ray or Flower, after the Flower tests) may leave it ignored, which a user's shell never does
    proc = subprocess.Popen([str(EXE), *map(str, run_args(out, rounds))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 180
        while not (out / "checkpoint" / "state.pt").is_file():  # round 1 is saved: interrupt a later one
            assert proc.poll() is None and time.time() < deadline, "round 1 never completed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = torch.load(out / "checkpoint" / "state.pt", weights_only=False)["round"]
    assert proc.returncode == 130 and stdout == "" and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (f"deepfusion: interrupted; the last complete checkpoint is round {saved}; "
                                               f"continue with: deepfusion run --resume {out} --data-dir {data_dir}")
    command = shlex.split(stderr.strip().splitlines()[-1].split("continue with: ")[1])
    done = subprocess.run([str(EXE), *command[1:], "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rounds"] == rounds  # stdout is the result alone (item 9)
    summary = json.loads((out / "summary.json").read_text())
    assert rounds_in(out) == list(range(1, rounds + 1)) and len(summary["wall_seconds_stretches"]) == 2
    assert summary["wall_seconds"] == pytest.approx(sum(summary["wall_seconds_stretches"]), abs=0.02)


def test_ctrl_c_before_the_first_round_leaves_nothing(tmp_path, capsys, monkeypatch):
    import deepfusion.engines.local as local

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "prepare_data", interrupted)
    rc, printed, err = cli(capsys, *run_args(tmp_path / "new" / "run"))
    assert rc == 130 and printed == ""
    assert one_line(err) == "deepfusion: interrupted; no round was complete, nothing is kept"
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("extra, needles", [
    (["--config", SMOKE], ["--config would be ignored", "drop it", "--out"]),
    (["--method", "plain-fkd"], ["--method would be ignored"]),
    (["--seed", "3", "--config", SMOKE], ["--config and --seed would be ignored", "drop them"]),
    (["--rounds", "1"], ["--rounds 1", "has completed 2 rounds already", "--rounds > 2"]),
    ([], ["has finished (2 rounds, summary.json)", "--rounds > 2"]),
])
def test_resume_refuses_what_it_would_ignore(finished, capsys, extra, needles):
    before = (finished / "summary.json").read_bytes()
    rc, printed, err = cli(capsys, "run", "--resume", finished, *extra)
    line = one_line(err)
    assert rc == 2 and printed == ""
    for needle in needles:
        assert needle in line, (needle, line)
    assert (finished / "summary.json").read_bytes() == before and not (finished / "failed.json").exists()


def test_out_or_resume_is_required_and_not_both(tmp_path, capsys):
    for argv in (["run"], ["run", "--out", tmp_path / "a", "--resume", tmp_path / "b"]):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == 2
        assert re.search(r"--out.*--resume", capsys.readouterr().err)
    assert not (tmp_path / "a").exists()


# ---- 6: a failed run leaves nothing -------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["local", "flower"])
def test_a_run_that_fails_on_its_data_leaves_no_directory(tmp_path, capsys, engine):
    out = tmp_path / "new" / "run"
    rc, _, err = cli(capsys, "run", "--config", SMOKE, "--data-dir", tmp_path / "nowhere", "--out", out,
                     "--engine", engine)
    assert rc == 2 and "nowhere" in one_line(err)
    assert not (tmp_path / "new").exists()


# ---- 7, 8, 9: generate and eval ------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "The heart", "--max-new-tokens", "-5"], "--max-new-tokens -5: must be >= 1"),
    (["--prompt", "The heart", "--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--prompt", "The heart", "--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--prompt", "The heart", "--temperature", "nan"], "--temperature nan: must be >= 0"),
])
def test_generate_refuses_bad_arguments(finished, capsys, extra, needle):
    rc, printed, err = cli(capsys, "generate", "--model", finished / "model", *extra)
    assert rc == 2 and printed == "" and needle in one_line(err)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_truncated_model_is_one_line(finished, tmp_path, capsys, command):
    model = copy_of(finished, tmp_path) / "model"
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    extra = ["--prompt", "The heart"] if command == "generate" else ["--data-dir", SHARED_DATA]
    rc, printed, err = cli(capsys, command, "--model", model, *extra)
    line = one_line(err)
    assert rc == 2 and printed == ""
    assert f"--model {model}: cannot load the exported model" in line and "export it again" in line


def test_eval_reads_the_runs_own_config_and_says_so(finished, capsys):
    rc, printed, err = cli(capsys, "eval", "--model", finished / "model", "--data-dir", SHARED_DATA)
    assert rc == 0
    result = json.loads(printed)  # stdout is the JSON alone
    summary = json.loads((finished / "summary.json").read_text())
    assert set(result["ppl_by_source"]) == set(summary["ppl_by_source"])  # the smoke run's sources, not the default's
    for domain, ppl in summary["ppl"].items():
        assert result["ppl"][domain] == pytest.approx(ppl, rel=1e-3)
    assert f"configfrom{finished / 'summary.json'}" in "".join(err.split())  # the log may wrap it
    assert "Loading weights" not in err  # transformers' progress bar is off


def test_eval_of_a_model_alone_uses_the_checkpoint_then_warns(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    (run / "summary.json").unlink()
    rc, printed, err = cli(capsys, "eval", "--model", run / "model", "--data-dir", SHARED_DATA)
    assert rc == 0 and f"configfrom{run / 'checkpoint' / 'state.pt'}" in "".join(err.split())
    assert set(json.loads(printed)["ppl_by_source"]) == set(json.loads((finished / "summary.json").read_text())
                                                            ["ppl_by_source"])
    alone = tmp_path / "alone"
    shutil.copytree(finished / "model", alone)
    rc, printed, err = cli(capsys, "eval", "--model", alone, "--data-dir", tmp_path / "nowhere")
    assert "no--config,andnorunnextto" in "".join(err.split()) and "usingthedefaultconfig" in "".join(err.split())


def test_eval_stdout_is_json_with_stderr_apart(finished):
    """`deepfusion eval ... 2>/dev/null | python -m json.tool`"""
    done = subprocess.run(f"{EXE} eval --model {finished / 'model'} --data-dir {SHARED_DATA} 2>/dev/null | "
                          f"{sys.executable} -m json.tool", shell=True, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and json.loads(done.stdout)["ppl"]


# ---- 10: the exported model ----------------------------------------------------------------------------------

def test_the_exported_model_knows_its_special_tokens_and_length(finished):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(finished / "model", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(finished / "model", local_files_only=True)
    eos = tok.eos_token_id
    assert eos is not None and model.config.eos_token_id == eos == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id is not None and model.config.bos_token_id == tok.bos_token_id
    assert tok.model_max_length == model.config.max_position_embeddings == 512
    assert len(tok("heart " * 2000, truncation=True)["input_ids"]) == 512
    ids = tok("The heart", return_tensors="pt")
    only_eos = [t for t in range(len(tok)) if t != eos]  # the model can say nothing but end of text
    out = model.generate(**ids, max_new_tokens=20, do_sample=False, suppress_tokens=only_eos)
    assert out.shape[1] == ids["input_ids"].shape[1] + 1  # it stops there


# ---- 13: help, version, warnings, packaging -------------------------------------------------------------------

def test_help_speaks_to_users_and_version_is_the_package(capsys):
    from importlib.metadata import version

    helped = subprocess.run([str(EXE), "--help"], capture_output=True, text=True, timeout=120)
    body = helped.stdout.split("\n\n")
    assert helped.returncode == 0 and body[1].startswith("DeepFusion: train a global Mixture-of-Experts")
    assert "contract" not in helped.stdout and "examples:" in helped.stdout
    shown = subprocess.run([str(EXE), "--version"], capture_output=True, text=True, timeout=120)
    assert shown.stdout.strip() == f"deepfusion {version('deepfusion')}"
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "(--out DIR | --resume DIR)" in capsys.readouterr().out


def test_third_party_notices_a_user_cannot_act_on_are_silenced(capsys):
    import logging

    assert main(["generate", "--model", "x", "--prompt", ""]) == 2  # any command sets up logging
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    flwr = logging.getLogger("flwr")
    flwr.addHandler(handler)
    try:
        flwr.warning("DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be removed")
        flwr.warning("a Flower warning that matters")
    finally:
        flwr.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["a Flower warning that matters"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices",
                      FutureWarning)
    assert not caught


def test_pyproject_licence_is_an_spdx_string():
    """The table form made setuptools print a deprecation notice three times per install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in project["build-system"]["requires"])


def test_a_run_resumes_on_its_own_engine_only(finished, capsys):
    assert main(["run", "--resume", str(finished), "--engine", "flower", "--rounds", "3"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "ran on the local engine" in line and "drop --engine flower" in line
