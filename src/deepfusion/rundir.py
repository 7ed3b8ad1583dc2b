"""The run directory: what a run writes into `--out DIR`, and the rules that keep its results from being
lost or mixed. Every protocol and engine runs inside `claim`:

    with claim(out, overwrite=args.overwrite, resume=bool(args.resume)) as run_dir:
        result = run(cfg, run_dir.path, ...)

What a run writes (RUN_OUTPUTS):
    summary.json    the result; written last, so its presence means the run finished
    metrics.jsonl   one JSON line per completed round
    checkpoint/     state.pt: the last completed round, which `--resume DIR` continues from
    model/          the exported global model (AutoModelForCausalLM / AutoTokenizer load it)
    failed.json     why the run stopped, if it failed after completing a round (it can be resumed)
    .lock           who runs in DIR now: pid, host, start time, command

The rules:
    a new run refuses a directory that holds anything, naming what is there and the choices
        (--resume DIR, a new --out, or --overwrite); --overwrite removes only what a run writes, so a
        directory holding anything else is refused even then
    one run at a time: an exclusive flock on DIR/.lock; a second run exits naming the holder. The kernel
        drops the lock when its process dies, however it dies, so a killed run never leaves DIR locked
        (flock is not reliable on some network file systems: there, do not start two runs into one DIR)
    a run that fails or is interrupted before completing a round leaves nothing (DIR is removed if this
        run made it, else emptied of what it wrote); one that fails later keeps its checkpoint and
        writes failed.json, and its error line says how to resume
    a full disk (ENOSPC, EDQUOT) and Ctrl-C end in one line: what was saved and the exact resume command
    files are replaced by write-then-rename (`write_atomically`): a failed write removes its temporary
        file and leaves the previous version, so the last complete checkpoint is always loadable
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
import shlex
import shutil
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from deepfusion.errors import ConfigError, DataError, RunDirError, RunInterrupted

# Names a run writes in DIR (glob patterns): what --overwrite may remove. A protocol writing more names
# passes them to claim(outputs=...).
RUN_OUTPUTS = ("summary.json", "metrics.jsonl", "checkpoint", "model", "failed.json", ".lock", "*.tmp", "*.png")
SHOWN = ("summary.json", "metrics.jsonl", "model", "checkpoint", "failed.json")  # named, in this order, in a refusal
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class RunDir:
    path: Path
    resume: bool
    command: str  # the command line that holds the lock


def resume_command(out: Path) -> str:
    return f"deepfusion run --resume {shlex.quote(str(out))}"


@contextmanager
def claim(out: str | Path, *, overwrite: bool = False, resume: bool = False, command: str | None = None,
          resume_with: str | None = None, outputs: tuple[str, ...] = RUN_OUTPUTS) -> Iterator[RunDir]:
    """Hold `out` for one run: check and lock it, and on the way out turn a failure, a full disk or Ctrl-C
    into one line (RunDirError / RunInterrupted) after cleaning up as the module docstring says.

    resume_with: the command that continues this run ("" if the run cannot be resumed);
    by default `deepfusion run --resume OUT`.
    """
    out = Path(out)
    command = command or shlex.join(["deepfusion", *sys.argv[1:]])
    resume_with = resume_command(out) if resume_with is None else resume_with
    if resume and not out.is_dir():
        raise RunDirError(f"--resume {out}: no run directory there; give the --out DIR of an earlier run")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out}: a file is there, not a directory; choose another --out")
    made = _make_dirs(out)
    lock = None
    try:
        lock = _lock(out, command)
        if not resume:
            _take(out, overwrite, outputs)
    except BaseException:  # refused: DIR is left as it was found
        if lock is not None:
            if made:  # a directory this run made goes again (a refusal of a taken one keeps its lock file)
                (out / ".lock").unlink(missing_ok=True)
            _release(lock)
        _remove_made(made)
        raise
    try:
        yield RunDir(out, resume, command)
    except KeyboardInterrupt:
        saved = last_saved(out)
        if saved is None and not resume:
            _clear(out, outputs, made)
        raise RunInterrupted(_stopped("interrupted", out, saved, resume_with, resume)) from None
    except BaseException as e:
        saved, full = last_saved(out), _disk_full(e)
        if saved is None and not resume:  # nothing worth keeping: leave nothing
            _clear(out, outputs, made)
            if full is not None:
                raise RunDirError(f"disk full while writing {full.filename or out}; no round was complete and "
                                  "nothing is kept; free space and run again") from None
            raise
        _record_failure(out, e, saved, command)
        if full is not None:
            raise RunDirError(_stopped(f"disk full while writing {full.filename or out}", out, saved, resume_with,
                                       resume, free=True)) from None
        if _user_error(e):  # a bug keeps its traceback; a user error becomes one line that says how to go on
            raise RunDirError(_stopped(f"{user_message(e)} (failed.json)", out, saved, resume_with, resume,
                                       fix=True)) from None
        raise
    else:
        (out / "failed.json").unlink(missing_ok=True)
    finally:
        _release(lock)


def write_atomically(path: Path, write: Callable[[BinaryIO], None], tmp: Path | None = None) -> None:
    """Write `path` through a temporary file renamed into place. The data is fsynced before the rename: a
    file system that reports a full disk only at flush (ext4's delayed allocation, NFS) fails here, not
    later. Any failure removes the temporary file and leaves the previous `path` untouched; a full disk
    is re-raised naming `path`, which a bare write error does not."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # a file object: torch.save on a path says RuntimeError, not ENOSPC
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = _disk_full(e)  # torch.save may wrap it: RuntimeError("unexpected pos"), the ENOSPC as its context
        if full is not None:
            raise OSError(full.errno, os.strerror(full.errno), str(path)) from e
        raise


def _disk_full(e: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT error in e's chain of causes, if there is one. Libraries that write from native
    code (safetensors) say it only in words: "No space left on device (os error 28)"."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e
        for code in DISK_FULL:
            if os.strerror(code) in str(e):
                return OSError(code, os.strerror(code), getattr(e, "filename", None))
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def last_saved(out: Path) -> str | None:
    """What the last complete checkpoint holds, in words ("round 3", "Phase II, domain 2 of 4"), or None."""
    progress = out / "checkpoint" / "progress.json"  # the one-shot pipeline's phases (recipes/deepfusion.py)
    if progress.is_file():
        try:
            return json.loads(progress.read_text())["saved"]
        except (ValueError, KeyError, OSError):
            return None
    saved = last_round(out)
    return None if saved is None else f"round {saved}"


def last_round(out: Path) -> int | None:
    """The round of out/checkpoint/state.pt, or None when there is none (or it is unreadable)."""
    path = out / "checkpoint" / "state.pt"
    if not path.is_file():
        return None
    import torch

    try:  # mmap: the round number without reading every tensor of a large checkpoint
        return int(torch.load(path, mmap=True, weights_only=False, map_location="cpu")["round"])
    except Exception:
        return None


# ---- taking the directory --------------------------------------------------------------------------------

def _make_dirs(out: Path) -> list[Path]:
    """mkdir -p, returning the directories it made (deepest last), so a run that leaves nothing removes them."""
    made = [p for p in (out, *out.parents) if not p.exists()][::-1]
    out.mkdir(parents=True, exist_ok=True)
    return made


def _remove_made(made: list[Path]) -> None:
    for p in reversed(made):
        try:
            p.rmdir()
        except OSError:  # not empty: someone else put something there
            return


def _take(out: Path, overwrite: bool, outputs: tuple[str, ...]) -> None:
    """Refuse a directory that holds anything; --overwrite clears one that holds only what a run writes."""
    present = sorted(p.name for p in out.iterdir() if p.name != ".lock")
    if not present:
        return
    ours = [n for n in present if any(fnmatch.fnmatch(n, pat) for pat in outputs)]
    foreign = [n for n in present if n not in ours]
    if foreign:
        raise RunDirError(f"--out {out} is not empty and not a run directory (it holds {_names(out, foreign)}); "
                          "choose a new --out (--overwrite removes only what a run writes, so it does not apply)")
    if not overwrite:
        shown = [n for n in SHOWN if n in ours] + [n for n in ours if n not in SHOWN]
        again = f"--resume {shlex.quote(str(out))}"
        go_on = (f"train it longer with {again} --rounds N" if "summary.json" in ours  # it finished
                 else f"continue it with {again}")
        raise RunDirError(f"--out {out} already holds a run ({_names(out, shown)}); {go_on}, choose a new --out, "
                          "or replace it with --overwrite")
    for name in ours:
        _remove(out / name)


def _names(out: Path, names: list[str], most: int = 5) -> str:
    shown = [f"{n}/" if (out / n).is_dir() else n for n in names[:most]]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _clear(out: Path, outputs: tuple[str, ...], made: list[Path]) -> None:
    """Leave nothing of a run that completed no round: what it wrote, and the directories it made."""
    for p in out.iterdir():
        if p.name != ".lock" and any(fnmatch.fnmatch(p.name, pat) for pat in outputs):
            _remove(p)
    (out / ".lock").unlink(missing_ok=True)  # we hold it; a run that opened this inode re-checks (see _lock)
    _remove_made(made)


# ---- the lock ---------------------------------------------------------------------------------------------

def _lock(out: Path, command: str) -> int:
    """An exclusive flock on out/.lock, with who holds it written inside for the next run's refusal."""
    path = out / ".lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunDirError(f"--out {out} is in use by another run ({holder}); wait for it to end, or choose "
                              "another --out") from None
        try:  # the file we locked is still the one at `path` (a run that leaves nothing removes its lock file)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"), "command": command}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, OSError):  # the holder has locked but not yet written its name
        return "a run that is just starting"


def _release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # no stale holder for a human reading .lock
    except OSError:
        pass
    os.close(fd)  # closing drops the flock


# ---- stopping -------------------------------------------------------------------------------------------

def _stopped(what: str, out: Path, saved: str | None, resume_with: str, resumed: bool, free: bool = False,
             fix: bool = False) -> str:
    """One line: what stopped the run, what is kept, and the command that goes on from there."""
    if saved is None:
        kept = "the resumed run completed no new round" if resumed else "no round was complete, nothing is kept"
        return f"{what}; {kept}" + (f"; continue with: {resume_with}" if resumed and resume_with else "")
    if not resume_with:
        return (f"{what}; the last complete checkpoint is {saved} (in {out}); this run cannot be "
                f"resumed: run it again with --overwrite")
    then = "free space, then continue with" if free else "fix that, then continue with" if fix else "continue with"
    return f"{what}; the last complete checkpoint is {saved}; {then}: {resume_with}"


def _user_error(e: BaseException) -> bool:
    return isinstance(e, (ConfigError, DataError, OSError, RunDirError))


def user_message(e: BaseException) -> str:
    """A user error's one line; an OS error in plain words ("cannot write to /x: read-only file system")
    instead of Python's "[Errno 30] Read-only file system: '/x'"."""
    if not isinstance(e, OSError) or e.errno is None or not e.strerror:
        return str(e)  # our own messages, and OSErrors raised with a sentence
    reason = e.strerror[0].lower() + e.strerror[1:]
    if not e.filename:
        return reason
    what = {errno.EROFS: ("cannot write to", "choose a path on a writable disk"),
            errno.ENOSPC: ("cannot write to", "free space"), errno.EDQUOT: ("cannot write to", "free space"),
            errno.EACCES: ("cannot use", "check its permissions or choose another path"),
            errno.EPERM: ("cannot use", "check its permissions or choose another path"),
            errno.ENOENT: ("cannot find", "check the path"),
            errno.ENOTDIR: ("cannot use", "a part of the path is a file, not a directory"),
            errno.EISDIR: ("cannot use", "it is a directory, a file was expected")}
    verb, do = what.get(e.errno, ("cannot use", ""))
    where = f"{e.filename} -> {e.filename2}" if e.filename2 else f"{e.filename}"
    return f"{verb} {where}: {reason}" + (f"; {do}" if do else "")


def _record_failure(out: Path, e: BaseException, saved: str | None, command: str) -> None:
    """failed.json: why a run that had completed rounds stopped (best effort: the disk may be full)."""
    message = user_message(e) if _user_error(e) else f"{type(e).__name__}: {e}"
    record = {"error": message, "type": type(e).__name__, "last_checkpoint": saved, "command": command,
              "when": datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        write_atomically(out / "failed.json", lambda f: f.write(json.dumps(record, indent=2).encode()))
    except OSError:
        pass
