"""The local engine's baseline rounds on the smoke federation: centralized and local-only."""

import json

import pytest

from deepfusion.engines.local import run

pytestmark = pytest.mark.slow


def test_centralized_trains_on_the_pool_at_the_same_step_budget(smoke_config, tmp_path):
    smoke_config.method = "centralized"
    summary = run(smoke_config, tmp_path, progress=False)
    assert summary["rounds"] == smoke_config.rounds and summary["comm_bytes"]["up"] == 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(x["losses"]["ce"] > 0 and x["losses"]["kd"] == 0 for x in lines)


def test_local_only_reports_each_device_on_its_own_domain(smoke_config, tmp_path):
    smoke_config.method = "local-only"
    summary = run(smoke_config, tmp_path, progress=False)
    assert summary["comm_bytes"] == {"up": 0, "down": 0, "per_device": summary["comm_bytes"]["per_device"]}
    assert not (tmp_path / "model").exists()  # there is no global model
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    by_device = last["ppl_by_device"]
    assert set(by_device["finance"]) == {"finance"} and set(by_device["cdc"]) == {"medical"}
    assert summary["ppl"]["medical"] == pytest.approx((by_device["cdc"]["medical"] + by_device["nhlbi"]["medical"]) / 2, rel=1e-3)
    assert summary["devices"]["cdc"]["ppl_own_domain"] == pytest.approx(by_device["cdc"]["medical"], rel=1e-3)
    assert all(v > 0 for v in summary["device_peak_mem_bytes"].values())
