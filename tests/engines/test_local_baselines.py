"""The local engine's baseline rounds on the smoke federation: centralized, local-only and fedjets."""

import json

import pytest

from deepfusion.engines.local import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_prepare_data")]  # one tokenisation of the corpora


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


def test_fedjets_gives_each_device_the_gates_top_k_and_counts_every_byte(smoke_config, tmp_path):
    """Round 1: a usage probe, then the experts the gate picks on each device's data; every device holds
    top-k experts per layer, reports the training peak of that compact MoE next to its own budget, and every
    ledger entry is the size of the WeightsPacket it stands for."""
    import torch
    from transformers import AutoModelForCausalLM

    from deepfusion.baselines import hosting
    from deepfusion.wire.weights import WeightsPacket

    smoke_config.method, smoke_config.rounds = "fedjets", 2
    summary = run(smoke_config, tmp_path, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # the shapes the packets carried
    m, experts = model.config.num_experts_per_tok, model.config.num_experts
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(len(ids) == m for x in lines for hosted in x["hosted"].values() for ids in hosted.values())
    settings = hosting.round_settings(smoke_config.server, len(smoke_config.devices))
    tokens = settings["steps"] * settings["batch_size"] * smoke_config.data.seq_len
    for i, (d, mine) in enumerate(summary["comm_bytes"]["per_device"].items()):
        report = summary["devices"][d]
        assert report["experts_per_layer"] == m and report["budget_bytes"] > 0
        peak = summary["device_peak_mem_bytes"][d]  # the compact MoE's, whether or not it fits the device
        assert peak > 0 and report["fits_budget"] == (peak <= report["budget_bytes"])
        assert [(e["round"], e.get("probe", False)) for e in mine["rounds"]] == [(1, True), (1, False), (2, False)]
        first = hosting.HostInfo(m, offset=i)
        probe = hosting.offer(model, d, first, 1, {**settings, "probe": 1})
        usage = {k.replace("probe.router.", "usage."): torch.zeros(experts)
                 for k in probe.tensors if k.startswith("probe.")}
        assert mine["rounds"][0]["down"] == len(probe.to_bytes())
        assert mine["rounds"][0]["up"] == len(WeightsPacket(d, 1, usage, tokens, probe.hosted).to_bytes())
        for r, entry in ((1, mine["rounds"][1]), (2, mine["rounds"][2])):
            chosen = {int(k): v for k, v in lines[r - 1]["hosted"][d].items()}
            info = hosting.HostInfo(m, {l: torch.zeros(experts).index_fill_(0, torch.tensor(ids), 1.0)
                                        for l, ids in chosen.items()})
            down = hosting.offer(model, d, info, r, settings)
            assert down.hosted == chosen and entry["down"] == len(down.to_bytes())
            weights = {k: v for k, v in down.tensors.items() if not k.startswith("probe.")}
            assert entry["up"] == len(WeightsPacket(d, r, {**weights, **usage}, tokens, chosen).to_bytes())
    medical, finance = lines[0]["hosted"]["cdc"], lines[0]["hosted"]["finance"]
    assert medical == lines[0]["hosted"]["nhlbi"] != finance  # round 1 already follows each device's data
    assert all(v > 0 for v in summary["log_ppl"].values())
