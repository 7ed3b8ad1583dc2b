"""A run's output files: summary.json (the contract other tools read), metrics.jsonl, the multi-round
checkpoint, and the provenance of every number. Each is written so that a kill or a full disk never leaves a
half-written file (rundir.write_atomically).
"""

from __future__ import annotations

import functools

import json
import os
from pathlib import Path

import torch

from deepfusion.config import FederationConfig, to_dict
from deepfusion.rundir import write_atomically


def write_json_atomic(path: Path, obj: object) -> None:
    """Write then rename, so a killed run or a full disk never leaves a half-written file (rundir.py)."""
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=False).encode()))


def save_checkpoint(path: Path, state: dict) -> None:
    """One file per run, replaced each round by write-then-rename: a kill or a full disk leaves the previous
    round intact and no temporary file (rundir.write_atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: torch.save(state, f), tmp=path.with_suffix(".tmp"))


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; a run writes one after its first completed round")
    return torch.load(path, weights_only=False, map_location="cpu")


def rewrite_metrics(out_dir: Path, records: list[dict]) -> None:
    """On resume: metrics.jsonl becomes exactly the checkpoint's completed rounds (a kill may leave one more line)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    write_atomically(out_dir / "metrics.jsonl", lambda f: f.write(text.encode()))


def append_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def summary(cfg: FederationConfig, last: dict, comm: dict, peaks: dict, wall: float, extra: dict) -> dict:
    """The run's contract file: other tools read these keys."""
    return {
        "method": cfg.method,
        "global_family": cfg.server.family,
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "ppl": last["ppl"],
        "ppl_by_source": last["ppl_by_source"],
        "comm_bytes": comm,
        "device_peak_mem_bytes": peaks,
        "wall_seconds": round(wall, 2),  # a resumed run: the total over its stretches (extra lists each)
        "wall_seconds_stretches": [round(wall, 2)],
        **extra,
        "provenance": provenance(),
        "config": to_dict(cfg),
    }


@functools.cache
def code_version() -> tuple[str | None, bool | None]:
    """(commit, uncommitted changes?) of the code this process runs, read once, when a run starts (engines call it
    first), not at each summary: a long bench loads its code once, and commits made while it runs are not its."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return commit, dirty


def provenance() -> dict:
    """What a number depends on beyond the config: the code's commit, the command, the library versions and the
    CPU threads (the thread count alone moved a published perplexity by up to 8 %: issue 10)."""
    import platform
    import sys

    import transformers

    from deepfusion import __version__

    commit, dirty = code_version()
    return {"commit": commit, "dirty": dirty, "deepfusion": __version__, "command": " ".join(sys.argv),
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine()}
