"""Kill a federation with SIGKILL mid-round, resume it, and get the unbroken run's result."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from deepfusion.config import default_config_path

pytestmark = pytest.mark.slow


def cli(*args):
    return [sys.executable, "-m", "deepfusion.cli", *args]


def test_sigkill_then_resume_matches_an_unbroken_run(tmp_path, data_dir):
    """Kill inside round 3 of 4 after round 2's checkpoint; the resumed run keeps rounds 1-2 as they were and ends
    where an unbroken run ends. Tolerance: none. With the same machine and thread count the arithmetic is
    bit-identical, so the test demands equal perplexities in every round and bit-equal exported weights."""
    config = tmp_path / "c.toml"
    config.write_text(default_config_path("smoke-multiround").read_text().replace("rounds = 2", "rounds = 4")
                      .replace("steps = 4", "steps = 30"))  # long enough rounds to be killed inside one
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count: bit-identical arithmetic
    common = ["--config", str(config), "--data-dir", str(data_dir), "--no-progress"]
    # the unbroken run goes alongside the broken one (one thread each, two cores); it only slows the broken
    # run's rounds, which widens the window for the kill inside round 3
    with open(tmp_path / "whole.log", "w") as log:
        whole = subprocess.Popen(cli("run", *common, "--out", str(tmp_path / "whole")), env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        broken = tmp_path / "broken"
        metrics, ckpt = broken / "metrics.jsonl", broken / "checkpoint" / "state.pt"
        proc = subprocess.Popen(cli("run", *common, "--out", str(broken)), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + 240
            while time.time() < deadline:  # round 2 logged, then its checkpoint renamed into place: kill in round 3
                if (metrics.exists() and len(metrics.read_text().splitlines()) >= 2 and ckpt.exists()
                        and ckpt.stat().st_mtime >= metrics.stat().st_mtime):
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the run never completed round 2")
            time.sleep(0.3)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        before = [json.loads(x) for x in metrics.read_text().splitlines()]
        assert [r["round"] for r in before] == [1, 2] and not (broken / "summary.json").exists()  # killed mid-round 3
        assert torch.load(ckpt, weights_only=False)["round"] == 2

        subprocess.run(cli("run", "--resume", str(broken), "--data-dir", str(data_dir), "--no-progress"),
                       check=True, env=env, capture_output=True, timeout=300)
        assert whole.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    finally:
        if whole.poll() is None:
            os.killpg(whole.pid, signal.SIGKILL)
            whole.wait()
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    resumed = json.loads((broken / "summary.json").read_text())
    rounds = [json.loads(x) for x in metrics.read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[:2] == before  # every completed round kept, as it was written
    for got, ref in zip(rounds, want):
        assert (got["ppl"], got["ppl_by_source"], got["losses"]) == (ref["ppl"], ref["ppl_by_source"], ref["losses"])
    assert resumed["ppl"] == whole["ppl"] and resumed["comm_bytes"]["up"] == whole["comm_bytes"]["up"]
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(broken / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    from deepfusion.cli import main

    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
