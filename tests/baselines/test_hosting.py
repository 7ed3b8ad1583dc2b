"""fedavg-moe, expert-subset and fedjets: slicing, hosting, usage, averaging; then on the smoke federation."""

import json

import pytest
import torch

from deepfusion.baselines import hosting
from deepfusion.config import DeviceConfig
from deepfusion.models import build_global_moe, routed_experts
from deepfusion.wire.weights import WeightsPacket

V, T = 300, 16
FAMILIES = ["qwen_moe", "deepseek_moe"]


def moe(family):
    torch.manual_seed(0)
    return build_global_moe(family, "tiny", V)


def host(model, experts, private=None):
    private = private if private is not None else torch.randint(V, (32, T))
    return hosting.Host(DeviceConfig(id="d", source="medquad:cdc"), private, torch.Generator().manual_seed(0),
                        torch.device("cpu"), model.config, experts)


SETTINGS = {"steps": 2, "batch_size": 4, "lr": 1e-3}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_subset_host_holds_exactly_its_experts(family):
    model = moe(family)
    info = hosting.HostInfo(experts=2, offset=1)
    sent = hosting.offer(model, "d", info, 1, SETTINGS)
    layers = hosting.moe_layers(model)
    assert layers and set(sent.hosted) == set(layers)
    state = model.state_dict()
    for layer, ids in sent.hosted.items():
        name = f"model.layers.{layer}.mlp.experts.down_proj"
        assert torch.equal(sent.tensors[name], state[name][ids])  # the hosted rows, nothing else
        assert torch.equal(sent.tensors[f"probe.router.{layer}"], state[f"model.layers.{layer}.mlp.gate.weight"])
    whole = len(hosting.offer(model, "d", hosting.HostInfo(None), 1, SETTINGS).to_bytes())
    assert len(sent.to_bytes()) < whole
    assert 0 < hosting.hosted_share(model, info) < 1 == hosting.hosted_share(model, hosting.HostInfo(None))


def test_first_rounds_spread_experts_then_usage_decides():
    layers, E = [0, 1], 4
    first = [hosting.choose_experts(hosting.HostInfo(2, offset=i), layers, E)[0] for i in range(2)]
    assert sorted(first[0] + first[1]) == [0, 1, 2, 3]  # two devices cover every expert
    usage = {0: torch.tensor([1.0, 9, 0, 7]), 1: torch.tensor([5.0, 0, 6, 0])}
    assert hosting.choose_experts(hosting.HostInfo(2, usage), layers, E) == {0: [1, 3], 1: [0, 2]}
    assert hosting.choose_experts(hosting.HostInfo(None), layers, E) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_host_round_trains_and_counts_router_usage(family):
    model = moe(family)
    sent = hosting.offer(model, "d", hosting.HostInfo(experts=2), 1, SETTINGS)
    up = WeightsPacket.from_bytes(hosting.host_round(host(model, 2), sent.to_bytes()))
    hosting.validate_upload(up, sent, hosting.expected_upload(sent))
    tokens = SETTINGS["steps"] * SETTINGS["batch_size"] * T
    assert up.tokens == tokens
    for layer in sent.hosted:  # every token picks top-k of all experts, hosted or not
        assert up.tensors[f"usage.{layer}"].sum() == tokens * model.config.num_experts_per_tok
    name = "lm_head.weight"
    assert not torch.equal(up.tensors[name], sent.tensors[name])  # it trained


def upload(model, hosted, value, tokens):
    tensors = {k: torch.full_like(v, value) for k, v in hosting.offer(
        model, "d", hosting.HostInfo(None if hosted is None else 1), 1, SETTINGS).tensors.items()
               if not k.startswith("probe.")}
    if hosted is not None:
        tensors = {k: (v[:1] if hosting.routed_layer(k) is not None else v) for k, v in tensors.items()}
    return WeightsPacket("d", 1, tensors, tokens, hosted)


@pytest.mark.parametrize("family", FAMILIES)
def test_average_weighs_by_tokens_and_experts_by_their_hosts(family):
    model = moe(family)
    layers = hosting.moe_layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = upload(model, {l: [0] for l in layers}, 1.0, tokens=100)
    b = upload(model, {l: [1] for l in layers}, 4.0, tokens=300)
    hosting.average(model, {"a": a, "b": b})
    after = model.state_dict()
    layer = layers[0]
    experts = after[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
    assert torch.all(experts[0] == 1.0) and torch.all(experts[1] == 4.0)  # each expert: its one host
    untouched = before[f"model.layers.{layer}.mlp.experts.gate_up_proj"][2:]
    assert torch.equal(experts[2:], untouched)  # nobody held it: unchanged
    assert torch.allclose(after["lm_head.weight"], torch.tensor(0.25 * 1.0 + 0.75 * 4.0))  # token-weighted


def test_fedavg_of_identical_models_is_the_model():
    model = moe("qwen_moe")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sent = hosting.offer(model, "d", hosting.HostInfo(None), 1, SETTINGS)
    same = WeightsPacket("d", 1, dict(sent.tensors), 10, None)
    hosting.average(model, {"a": same, "b": same})
    assert all(torch.allclose(model.state_dict()[k], v) for k, v in state.items())


def test_fit_experts_grows_with_the_budget():
    model = moe("deepseek_moe")
    batch = torch.randint(V, (2, T))
    small, _ = hosting.fit_experts(model.config, 1, batch)
    big, peak = hosting.fit_experts(model.config, 1 << 34, batch)
    assert small == model.config.num_experts_per_tok and big == routed_experts(model.config)
    mid, mid_peak = hosting.fit_experts(model.config, (hosting.fit_experts(model.config, 1, batch)[1] + peak) // 2, batch)
    assert small <= mid <= big and mid_peak <= peak


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedavg-moe", "expert-subset"])
def test_hosting_methods_on_the_smoke_federation(smoke_config, tmp_path, method):
    from deepfusion.engines.local import run

    smoke_config.method = method
    summary = run(smoke_config, tmp_path, progress=False)
    per = summary["comm_bytes"]["per_device"]
    assert set(per) == {"cdc", "nhlbi", "finance"}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["accepted"] for x in lines] == [["cdc", "finance", "nhlbi"]] * 2
    params = summary["global_params"]
    for d, v in per.items():
        for r in v["rounds"]:
            if method == "fedavg-moe":  # the whole model both ways, as fp32
                assert 4 * params < r["down"] < 4 * params + 64 * 1024 and r["up"] >= 4 * params
            else:
                assert r["down"] < 4 * params and r["up"] < 4 * params
    if method == "expert-subset":
        assert all(0 < summary["devices"][d]["hosted_share"] < 1 for d in per)
        assert all(lines[1]["hosted"][d] for d in per)
    assert all(v > 0 for v in summary["device_peak_mem_bytes"].values())
    assert (tmp_path / "model" / "config.json").is_file()


def test_hosts_split_the_matched_budget_unless_given_their_own_steps():
    from deepfusion.config import ServerConfig

    assert hosting.steps_per_host(ServerConfig(steps=50), 6) == 9  # 6 x 9 >= 50 blocks-steps, as one server round
    assert hosting.steps_per_host(ServerConfig(steps=4), 8) == 1
    assert hosting.steps_per_host(ServerConfig(steps=50, host_steps=30), 6) == 30


def test_conclude_skips_below_min_devices_and_when_fedavg_refuses():
    model, calls = torch.nn.Linear(2, 2), []
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def refusing(m, uploads):
        calls.append(sorted(uploads))
        return False

    assert hosting.conclude(model, {}, {}, {"x": "bad shape"}, {}, 1, 1)["skipped"] is True  # 0 valid < 1
    assert calls == []  # nothing averaged below min_devices
    got = hosting.conclude(model, {}, {}, {}, {}, 1, 0, refusing)
    assert got["skipped"] is True and calls == [[]]
    assert "skipped" not in hosting.conclude(model, {}, {}, {}, {}, 1, 0, lambda m, u: True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- fedjets: m fixed by the server, experts chosen by the gate on the client's data from round 1 ----------

def test_fedjets_fixes_m_and_records_its_peak_next_to_the_budget():
    from deepfusion.config import ServerConfig
    from deepfusion.errors import ConfigError

    model = moe("deepseek_moe")  # 8 routed experts, top-2
    batch = torch.randint(V, (2, T))

    def measured(memory_mb, server):
        h = hosting.Host(DeviceConfig(id="d", source="medquad:cdc", memory_mb=memory_mb), torch.randint(V, (4, T)),
                         torch.Generator().manual_seed(0), torch.device("cpu"), model.config, None)
        hosting.measure_host(h, "fedjets", server, V, batch)
        return h

    small = measured(1, ServerConfig())  # 1 MB: too little, yet FedJETS sends top-k experts all the same
    assert small.experts == model.config.num_experts_per_tok and small.budget_bytes == 2**20
    assert small.peak_mem_bytes == pytest.approx(hosting.hosted_peak(model.config, 2, batch), rel=0.01)
    assert small.peak_mem_bytes > small.budget_bytes  # recorded, not refused
    big = measured(1 << 20, ServerConfig(fedjets_experts=3))  # room for all 8: still the server's 3
    assert big.experts == 3 and big.peak_mem_bytes < big.budget_bytes
    assert big.peak_mem_bytes > small.peak_mem_bytes
    for wanted in (1, 9):  # fewer than top-k breaks routing; more than the MoE has does not exist
        with pytest.raises(ConfigError, match="fedjets_experts"):
            hosting.fedjets_experts(model.config, wanted)


def steered_moe(targets: dict[int, list[int]], token: int) -> torch.nn.Module:
    """The tiny qwen MoE whose routers send blocks of `token` to `targets` in each layer. Every expert's output
    is zeroed, so a router's input is the same whichever experts a host holds (and whatever the routers do)."""
    model = moe("qwen_moe")
    state = model.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            if name.endswith(("experts.down_proj", "shared_expert.down_proj.weight")):
                t.zero_()
        inputs = {}

        def keep(layer):  # a hook returning None leaves the router's output as it is
            return lambda module, args, out: inputs.__setitem__(layer, args[0].reshape(-1, args[0].shape[-1]).mean(0))

        hooks = [model.model.layers[l].mlp.gate.register_forward_hook(keep(l)) for l in hosting.moe_layers(model)]
        model(input_ids=torch.full((1, T), token))
        for h in hooks:
            h.remove()
        for layer, x in inputs.items():  # logits +|x|^2 for the targets, -|x|^2 for the rest
            gate = state[f"model.layers.{layer}.mlp.gate.weight"]
            gate.copy_(-x.expand_as(gate))
            gate[targets[layer]] = x
    return model


def test_fedjets_probes_the_gate_on_the_clients_data_before_its_first_round():
    targets = {0: [2, 3], 1: [1, 3]}  # not the first round's spread for offset 0 ([0, 1] in each layer)
    model = steered_moe(targets, token=7)
    device = host(model, 2, torch.full((16, T), 7))
    infos = {"d": hosting.HostInfo(2, offset=0)}
    sent_probes = {}

    def exchange(sent):
        sent_probes.update(sent)
        return {d: hosting.host_round(device, p.to_bytes()) for d, p in sent.items()}

    assert hosting.probe_first("fedjets", model, infos, 1, SETTINGS, exchange) == ["d"]
    probe = sent_probes["d"]
    assert probe.settings["probe"] and probe.hosted == {0: [0, 1], 1: [0, 1]}  # the probe holds the spread
    up = WeightsPacket.from_bytes(exchange({"d": probe})["d"])
    hosting.validate_upload(up, probe, hosting.expected_upload(probe))
    assert set(up.tensors) == {"usage.0", "usage.1"} and device.tokens_trained == 0  # usage only, no training
    assert hosting.offer(model, "d", infos["d"], 1, SETTINGS).hosted == targets  # round 1: the gate's choice
    assert hosting.probe_first("fedjets", model, infos, 1, SETTINGS, exchange) == []  # once, before round 1
    fresh = {"d": hosting.HostInfo(2, offset=0)}
    assert hosting.probe_first("expert-subset", model, fresh, 1, SETTINGS, exchange) == []  # it spreads round 1
    assert not fresh["d"].usage


def test_a_failed_probe_leaves_the_first_round_spread():
    model = moe("qwen_moe")
    infos = {"d": hosting.HostInfo(2, offset=1)}
    assert hosting.probe_first("fedjets", model, infos, 1, SETTINGS, lambda sent: {"d": b"garbage"}) == ["d"]
    assert not infos["d"].usage and hosting.offer(model, "d", infos["d"], 1, SETTINGS).hosted == {0: [2, 3], 1: [2, 3]}
