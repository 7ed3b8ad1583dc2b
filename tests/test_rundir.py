"""rundir.py on its own: claiming, locking, cleaning up and atomic writes, with no federation run.

The runs themselves, through the command line, are in test_cli_runs.py.
"""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from deepfusion.errors import DataError, RunDirError, RunInterrupted
from deepfusion.rundir import claim, last_round, user_message, write_atomically


def fake_round(out, r):
    """What a run leaves after round r: its checkpoint and metrics line."""
    (out / "checkpoint").mkdir(exist_ok=True)
    torch.save({"round": r, "config": {}}, out / "checkpoint" / "state.pt")
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": r}) + "\n")


def test_a_new_directory_is_made_locked_and_kept_after_success(tmp_path):
    out = tmp_path / "runs" / "a"
    with claim(out, command="deepfusion run x") as run:
        assert run.path == out and out.is_dir()
        assert json.loads((out / ".lock").read_text())["command"] == "deepfusion run x"
        fake_round(out, 1)
    assert (out / "checkpoint" / "state.pt").is_file() and (out / ".lock").read_text() == ""  # holder cleared


@pytest.mark.parametrize("present, needles", [
    (["summary.json", "model/"], ["already holds a run", "summary.json, model/", "--rounds N", "--overwrite"]),
    (["metrics.jsonl", "checkpoint/"], ["metrics.jsonl, checkpoint/", "continue it with --resume"]),
    (["notes.txt"], ["not a run directory", "notes.txt", "choose a new --out"]),
])
def test_a_directory_that_holds_anything_is_refused_and_left_as_it_was(tmp_path, present, needles):
    for name in present:
        (tmp_path / name.rstrip("/")).mkdir() if name.endswith("/") else (tmp_path / name).write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RunDirError) as e:
        with claim(tmp_path):
            pytest.fail("claimed a taken directory")
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == before


def test_overwrite_removes_only_what_a_run_writes_and_refuses_anything_else(tmp_path):
    fake_round(tmp_path, 1)
    (tmp_path / "summary.json").write_text("{}")
    with claim(tmp_path, overwrite=True):
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="mine.txt"):
        with claim(tmp_path, overwrite=True):
            pass
    assert (tmp_path / "mine.txt").read_text() == "keep me" and (tmp_path / "summary.json").is_file()


def test_a_second_claim_is_refused_naming_the_holder(tmp_path):
    """The holder is another process (flock locks are per open file, so this also holds within one)."""
    code = ("import sys, time; from deepfusion.rundir import claim\n"
            f"with claim({str(tmp_path)!r}, command='deepfusion run --out held'):\n"
            "    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError) as e:
            with claim(tmp_path):
                pytest.fail("two runs hold one directory")
        assert f"pid {holder.pid}" in str(e.value) and "deepfusion run --out held" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    with claim(tmp_path):  # the kernel dropped the dead holder's lock
        pass


def test_a_run_that_fails_before_its_first_round_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(DataError):
        with claim(out):
            (out / "metrics.jsonl").write_text("")
            raise DataError("no such source")
    assert not (tmp_path / "new").exists()  # and the parent it made for it
    (tmp_path / "kept").mkdir()
    with pytest.raises(DataError):
        with claim(tmp_path / "kept"):
            (tmp_path / "kept" / "metrics.jsonl").write_text("")
            raise DataError("no such source")
    assert list((tmp_path / "kept").iterdir()) == []  # a directory it did not make: emptied of what it wrote


def test_a_run_that_fails_after_a_round_keeps_it_and_records_why(tmp_path):
    with pytest.raises(RunDirError) as e:
        with claim(tmp_path, resume_with="deepfusion run --resume X"):
            fake_round(tmp_path, 1)
            raise DataError("source 'x' went away")
    assert str(e.value) == ("source 'x' went away (failed.json); the last complete checkpoint is round 1; fix that, "
                            "then continue with: deepfusion run --resume X")
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["error"] == "source 'x' went away" and failed["last_checkpoint"] == "round 1"
    with claim(tmp_path, resume=True):  # a resume that succeeds clears the record
        fake_round(tmp_path, 2)
    assert not (tmp_path / "failed.json").exists() and last_round(tmp_path) == 2


def test_a_bug_keeps_its_traceback_and_still_records_why(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with claim(tmp_path):
            fake_round(tmp_path, 1)
            1 / 0
    assert json.loads((tmp_path / "failed.json").read_text())["type"] == "ZeroDivisionError"


def test_an_interrupt_says_what_was_saved(tmp_path):
    with pytest.raises(RunInterrupted) as e:
        with claim(tmp_path / "a", resume_with="deepfusion run --resume A"):
            fake_round(tmp_path / "a", 1)
            fake_round(tmp_path / "a", 2)
            raise KeyboardInterrupt
    assert str(e.value) == "interrupted; the last complete checkpoint is round 2; continue with: deepfusion run --resume A"
    with pytest.raises(RunInterrupted, match="no round was complete, nothing is kept"):
        with claim(tmp_path / "b"):
            raise KeyboardInterrupt
    assert not (tmp_path / "b").exists()


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "state.pt"
    write_atomically(path, lambda f: f.write(b"round 1"))

    def half_then_full(f):
        f.write(b"round 2, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        write_atomically(path, half_then_full)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)  # named: a bare write error is not
    assert path.read_bytes() == b"round 1" and os.listdir(tmp_path) == ["state.pt"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs: a real full disk (needs root to mount)."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated full disk tests the same path")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_a_real_full_disk_keeps_the_last_checkpoint(tiny_disk):
    """torch.save on a file object reports ENOSPC (on a path it says RuntimeError, without an errno)."""
    from deepfusion.outputs import save_checkpoint

    path = tiny_disk / "checkpoint" / "state.pt"
    save_checkpoint(path, {"round": 1, "w": torch.zeros(1000)})
    with pytest.raises(OSError) as e:
        save_checkpoint(path, {"round": 2, "w": torch.zeros(1_000_000)})  # 4 MB on a 1 MB disk
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert torch.load(path)["round"] == 1 and os.listdir(path.parent) == ["state.pt"]


@pytest.mark.parametrize("err, want", [
    (OSError(errno.EROFS, "Read-only file system", "/x"), "cannot write to /x: read-only file system; choose a path"),
    (PermissionError(errno.EACCES, "Permission denied", "/y"), "cannot use /y: permission denied; check its permissions"),
    (OSError(errno.ENOSPC, "No space left on device", "/z"), "cannot write to /z: no space left on device; free space"),
    (FileNotFoundError("--resume: no checkpoint at d"), "--resume: no checkpoint at d"),  # our own sentence, as is
])
def test_os_errors_in_plain_words(err, want):
    assert user_message(err).startswith(want) and "Errno" not in user_message(err)
