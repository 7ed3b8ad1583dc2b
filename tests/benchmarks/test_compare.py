"""deepfusion bench --profile quick|full on the smoke multi-round federation: every method, both families, files."""

import csv
import json

import pytest

from deepfusion.config import default_config_path
from deepfusion.benchmarks.compare import ABLATIONS, FAMILIES, HETEROGENEITY, METHODS, aggregate, paired

pytestmark = pytest.mark.slow


def test_paired_differences_pair_by_seed():
    rows = [{"tag": "", "family": "f", "method": m, "seed": s, "lam": 1.0, "ppl": {"medical": p, "finance": p},
             "bytes_total": 1, "bytes_per_device_round": 1, "device_peak_mem_bytes": 1, "wall_seconds": 1}
            for m, s, p in (("a", 0, 90.0), ("b", 0, 100.0), ("a", 1, 200.0), ("b", 1, 200.0), ("b", 2, 5.0))]
    p = paired(rows, "a", "b", "f")
    assert p["seeds"] == [0, 1]  # seed 2 has no partner
    assert p["pct"]["medical"][0] == pytest.approx(-5.0)  # mean of -10% and 0%
    line = next(t for t in aggregate(rows) if t["method"] == "b")
    assert line["ppl_medical"][0] == pytest.approx(305 / 3) and line["seeds"] == [0, 1, 2]


def test_a_probe_counts_with_the_round_it_belongs_to():
    from deepfusion.benchmarks.compare import per_device_round

    per = {"a": {"rounds": [{"round": 1, "up": 300, "down": 600, "probe": True}, {"round": 1, "up": 500, "down": 600},
                            {"round": 2, "up": 500, "down": 600}]},
           "b": {"rounds": [{"round": 1, "up": 500, "down": 600}]}}
    assert sorted((x["up"], x["down"]) for x in per_device_round(per)) == [(500, 600), (500, 600), (800, 1200)]


def test_quick_bench_on_the_smoke_federation(tmp_path, data_dir, monkeypatch, shared_prepare_data):
    from deepfusion.cli import main

    monkeypatch.setenv("DEEPFUSION_DATA", str(data_dir))
    config = tmp_path / "smoke.toml"
    config.write_text(default_config_path("smoke-multiround").read_text().replace("min_devices = 1", "min_devices = 1\nmax_rounds = 3"))
    out = tmp_path / "bench"
    assert main(["bench", "--profile", "quick", "--out", str(out), "--config", str(config)]) == 0
    results = json.loads((out / "results.json").read_text())
    got = {(r["family"], r["method"]) for r in results["rows"]}
    assert got == {(f, m) for f in FAMILIES for m in METHODS}
    with open(out / "results.csv") as f:
        lines = list(csv.DictReader(f))
    assert len([x for x in lines if not x["tag"]]) == len(FAMILIES) * len(METHODS)
    assert {x["method"] for x in lines if x["tag"].startswith("host_steps")} == {"fedavg-moe", "expert-subset", "fedjets"}
    md = (out / "RESULTS.md").read_text()
    assert "## Targets" in md and md.count("| multiround-views |") == len(FAMILIES)
    for png in ("ppl_per_round_qwen_moe", "ppl_per_round_deepseek_moe", "bytes_per_round", "device_peak_memory"):
        assert (out / f"{png}.png").stat().st_size > 5000
    rows = {(r["family"], r["method"]): r for r in results["rows"] if not r["tag"]}
    kd = rows["qwen_moe", "device-kd"]
    assert kd["bytes_per_device_round"] == rows["deepseek_moe", "multiround-views"]["bytes_per_device_round"]  # same uploads
    assert rows["qwen_moe", "fedavg-moe"]["bytes_per_device_round"] > rows["qwen_moe", "expert-subset"]["bytes_per_device_round"] > kd["bytes_per_device_round"]
    # local-only is read off the knowledge run's devices: it equals a real local-only run
    from deepfusion.config import load_config
    from deepfusion.engines.local import run

    cfg = load_config(config)
    cfg.method = "local-only"
    real = run(cfg, tmp_path / "local-only", progress=False)
    assert rows["qwen_moe", "local-only"]["ppl"] == pytest.approx(real["ppl"], rel=1e-3)
    # a second bench over the same directory reuses every run
    mtime = (out / "runs" / "main" / "qwen_moe" / "multiround-views-s0" / "summary.json").stat().st_mtime
    assert main(["bench", "--profile", "quick", "--out", str(out), "--config", str(config)]) == 0
    assert (out / "runs" / "main" / "qwen_moe" / "multiround-views-s0" / "summary.json").stat().st_mtime == mtime


@pytest.mark.parametrize("name", [*ABLATIONS, *HETEROGENEITY])
def test_every_sweep_change_is_a_valid_config_that_changes_something(name):
    import copy

    from deepfusion.config import load_config, to_dict

    base = load_config(default_config_path("bench-quick"))
    change = {**ABLATIONS, **HETEROGENEITY}[name]
    cfg = copy.deepcopy(base)
    if change:
        change(cfg)
        assert to_dict(cfg) != to_dict(base)
    cfg.validate()


def test_lambda_is_tuned_on_validation_text(tmp_path, data_dir, monkeypatch, smoke_config, shared_prepare_data):
    import deepfusion.benchmarks.compare as ex

    monkeypatch.setattr(ex, "LAMBDAS", (0.0, 1.0))
    lam = ex.tune_lambda(smoke_config, tmp_path, "qwen_moe", "device-kd")
    from deepfusion.baselines.centralized import validation_score

    scores = {x: validation_score(json.loads((tmp_path / "runs" / f"tune-lam{x}" / "qwen_moe" / "device-kd-s0" /
                                              "summary.json").read_text())["validation_ppl"]) for x in (0.0, 1.0)}
    assert lam == min(scores, key=scores.get)
