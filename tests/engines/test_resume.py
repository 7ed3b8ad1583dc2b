"""Kill a federation with SIGKILL mid-round, resume it, and get the unbroken run's result."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deepfusion.config import default_config_path

pytestmark = pytest.mark.slow


def cli(*args):
    return [sys.executable, "-m", "deepfusion.cli", *args]


def test_sigkill_then_resume_matches_an_unbroken_run(tmp_path, data_dir):
    config = tmp_path / "c.toml"
    config.write_text(default_config_path("smoke").read_text().replace("rounds = 2", "rounds = 4")
                      .replace("steps = 4", "steps = 30"))  # long enough rounds to be killed inside one
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count: bit-identical arithmetic
    common = ["--config", str(config), "--data-dir", str(data_dir), "--no-progress"]
    subprocess.run(cli("run", *common, "--out", str(tmp_path / "whole")), check=True, env=env,
                   capture_output=True, timeout=300)

    broken = tmp_path / "broken"
    proc = subprocess.Popen(cli("run", *common, "--out", str(broken)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # wait for round 2 to complete, then kill inside round 3
            metrics = broken / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the run never completed round 2")
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    kept = [json.loads(x)["round"] for x in (broken / "metrics.jsonl").read_text().splitlines()]
    assert kept[:2] == [1, 2] and not (broken / "summary.json").exists()

    subprocess.run(cli("run", "--resume", str(broken), "--data-dir", str(data_dir), "--no-progress"),
                   check=True, env=env, capture_output=True, timeout=300)
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    resumed = json.loads((broken / "summary.json").read_text())
    rounds = [json.loads(x) for x in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    # Tolerance: none needed on one machine with one thread count; 1e-6 relative guards float printing.
    for domain, ppl in whole["ppl"].items():
        assert resumed["ppl"][domain] == pytest.approx(ppl, rel=1e-6)
    assert resumed["comm_bytes"]["up"] == whole["comm_bytes"]["up"]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    from deepfusion.cli import main

    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
