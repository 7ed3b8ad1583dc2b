"""fedavg-moe and expert-subset on the Flower engine: weights as ArrayRecords, Flower's FedAvg, the same science
as the local engine.

Fast: a WeightsPacket survives Flower's records bit for bit; Flower's FedAvg of fedavg-moe uploads gives the
weights `hosting.average` gives (float tolerance: the same sum in another order); a host's state survives its
node. Slow: both methods on the smoke federation through the Flower simulation and the local engine, seed 0.

What must agree, and why it does: each node builds its host as the local engine does (same private blocks,
same generator seed) and runs the same `hosting.host_round` on the same WeightsPacket bytes, so every upload is
the local engine's upload, byte for byte (`wire.weights_digest`: the sha256 of the packet's canonical bytes),
as long as the global weights sent down are: in every round for
expert-subset (both engines average with `hosting.average`), in round 1 only for fedavg-moe, whose later rounds
start from Flower's FedAvg, which sums (w_k / W) x_k in numpy where `hosting.average` sums w_k x_k / W in torch
(last-bit differences; perplexities agree to the printed digit, REL_PPL allows 0.1 %).

Payload bytes differ by format, not by content: the local engine counts one safetensors blob (an 8-byte length,
one JSON header naming every tensor, then the fp32 data); Flower carries each tensor as a .npy blob (a 128-byte
header, then the same fp32 data) in an ArrayRecord. The test converts the local engine's very packets and
checks that the counts agree exactly.
"""

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Array, Message
from flwr.serverapp.strategy import FedAvg
from transformers import AutoModelForCausalLM

from deepfusion.baselines import hosting
from deepfusion.config import default_config_path, load_config
from deepfusion.engines.flower.wire import payload_bytes, weights_content, weights_digest, weights_packet
from deepfusion.models import build_global_moe
from deepfusion.engines.flower.node import load_host, save_host
from deepfusion.wire import PacketError
from deepfusion.wire.setup import Setup
from deepfusion.wire.weights import WeightsPacket
from tests.conftest import SHARED_DATA

REL_PPL = 1e-3
OFFLINE = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}  # no network here, nor wait for one
SETTINGS = {"steps": 1, "batch_size": 2, "lr": 1e-3}
# torch threads in this process (the local engine, and the ServerApp) during the slow runs. On this shared
# 2-core machine two OpenMP threads contend with the other processes: a local smoke round of fedavg-moe took
# 13 s with 2 threads and under 1 s with 1 (the whole fixture: 115 s -> 55 s). The Flower simulation's Ray
# actor keeps its 2 threads, so the byte-for-byte comparison also shows the thread count changes no bytes here.
ONE_THREAD = 1


@pytest.fixture
def as_a_task(monkeypatch):
    """Flower stamps every message with the identity of the task that makes it; outside a runtime, set one."""
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)


def moe():
    torch.manual_seed(0)
    return build_global_moe("qwen_moe", "tiny", 300)


def npy_bytes(packet: WeightsPacket) -> int:
    """What Flower counts for a packet's tensors: each one as a .npy blob (Flower's Array)."""
    return sum(len(Array(t.numpy()).data) for t in packet.tensors.values())


# ---- fast ---------------------------------------------------------------------------------------

def test_a_weights_packet_survives_flowers_records_bit_for_bit(as_a_task):
    model = moe()
    sent = hosting.offer(model, "cdc", hosting.HostInfo(experts=2, offset=1), 3, SETTINGS)  # a slice + probes
    msg = Message(weights_content(sent), dst_node_id=7, message_type="train.weights")
    assert weights_digest(weights_packet(msg).to_bytes()) == weights_digest(sent.to_bytes())
    assert payload_bytes(msg) == npy_bytes(sent) == sum(128 + 4 * t.numel() for t in sent.tensors.values())
    up = WeightsPacket("cdc", 3, {k: v for k, v in sent.tensors.items() if not k.startswith("probe.")}, 64, sent.hosted)
    reply = Message(weights_content(up, {"seconds": 1.0}), dst_node_id=7, message_type="train.weights")
    assert weights_packet(reply).tokens == 64 == reply.content.metric_records["metrics"]["num-examples"]
    del reply.content.array_records["weights"]
    with pytest.raises(PacketError, match="not a valid weights message"):
        weights_packet(reply)


def test_flowers_fedavg_equals_hosting_average_for_fedavg_moe(as_a_task):
    """Same uploads -> same global weights: Flower's FedAvg (weighted by num-examples) and hosting.average."""
    model = moe()
    sent = hosting.offer(model, "d", hosting.HostInfo(None), 1, SETTINGS)
    generator = torch.Generator().manual_seed(1)
    trained = lambda: {k: v + torch.randn(v.shape, generator=generator) for k, v in sent.tensors.items()}  # noqa: E731
    uploads = {d: WeightsPacket(d, 1, trained(), tokens, None) for d, tokens in (("a", 64), ("b", 192), ("c", 128))}
    replies = [Message(weights_content(p, {"seconds": 1.0}), dst_node_id=7, message_type="train.weights")
               for p in uploads.values()]
    arrays, _ = FedAvg().aggregate_train(1, replies)
    flower = arrays.to_torch_state_dict()
    hosting.average(model, uploads)
    ours = model.state_dict()
    assert set(flower) == set(ours)
    for name, t in ours.items():
        torch.testing.assert_close(flower[name], t, rtol=1e-6, atol=1e-6)
    expected = sum(p.tokens * p.tensors["lm_head.weight"] for p in uploads.values()) / 384
    torch.testing.assert_close(flower["lm_head.weight"], expected, rtol=1e-6, atol=1e-6)  # token-weighted


def test_a_host_survives_its_node(tmp_path):
    """What a host keeps between rounds on a SuperNode: its generator, tokens trained and what it measured."""
    cfg = load_config(default_config_path("smoke-multiround"))
    cfg.method = "expert-subset"
    model = moe()
    described = json.dumps({**json.loads(model.config.to_json_string()), "experts_implementation": "grouped_mm"})
    setup = Setup(cfg, {}, torch.zeros(1, 4, dtype=torch.long), described)
    host = hosting.Host(cfg.devices[1], torch.randint(300, (16, 8)), torch.Generator().manual_seed(5),
                        torch.device("cpu"), setup.global_config(), 2, 1000, 2000, 512)
    torch.randint(10, (3,), generator=host.generator)  # a used generator
    save_host(host, tmp_path, "1")
    back = load_host(setup, "nhlbi", tmp_path, "1")
    assert (back.experts, back.budget_bytes, back.peak_mem_bytes, back.tokens_trained) == (2, 1000, 2000, 512)
    assert torch.equal(back.private, host.private)
    assert torch.equal(back.generator.get_state(), host.generator.get_state())
    assert back.global_config.to_json_string() == model.config.to_json_string()
    assert back.global_config._experts_implementation == "grouped_mm"
    assert load_host(setup, "cdc", tmp_path, "1") is None


# ---- slow: the smoke federation on both engines -------------------------------------------------------

def local_run(cfg, out: Path) -> dict[str, list[dict]]:
    """The local engine's run; per device, per round, the packets its server received and had sent."""
    import deepfusion.engines.local as local

    seen: dict[str, list[dict]] = {}
    receive = hosting.receive

    def recording(payloads, sent, r):
        for device, up in payloads.items():
            seen.setdefault(device, []).append({"up": WeightsPacket.from_bytes(up), "sha256": weights_digest(up),
                                                "down": sent[device]})
        return receive(payloads, sent, r)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local.hosting, "receive", recording)
        local.run(cfg, out, progress=False)
    return seen


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each hosting method on both engines, seed 0, the smoke federation: {method: (local dir, flower dir,
    the local engine's packets)}. About 55 s here for the four runs."""
    from deepfusion.cli import main

    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA}")
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(ONE_THREAD)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in OFFLINE.items():
                mp.setenv(key, value)
            for method in ("fedavg-moe", "expert-subset"):
                cfg = load_config(default_config_path("smoke-multiround"), method=method)
                cfg.data.dir = str(SHARED_DATA)
                local_dir, flower_dir = tmp_path_factory.mktemp(f"local-{method}"), tmp_path_factory.mktemp(method)
                packets = local_run(cfg, local_dir)
                assert main(["run", "--engine", "flower", "--method", method, "--config",
                             str(default_config_path("smoke-multiround")), "--data-dir", str(SHARED_DATA), "--out",
                             str(flower_dir), "--no-progress"]) == 0
                out[method] = local_dir, flower_dir, packets
    finally:
        torch.set_num_threads(threads)
    return out


def read(run_dir: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run_dir / "summary.json").read_text()), lines


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedavg-moe", "expert-subset"])
def test_hosting_method_on_flower_is_the_local_engines_science(runs, method):
    local_dir, flower_dir, packets = runs[method]
    (mine, my_lines), (theirs, their_lines) = read(flower_dir), read(local_dir)

    # the contract: summary.json, metrics.jsonl, model/
    assert mine["engine"] == "flower" and mine["method"] == method and mine["rounds"] == 2
    assert set(mine) == set(theirs) | {"engine"}
    assert [x["round"] for x in my_lines] == [1, 2] and my_lines[-1]["ppl"] == mine["ppl"]
    assert AutoModelForCausalLM.from_pretrained(flower_dir / "model").config.model_type == "qwen2_moe"
    assert "privacy" not in mine and set(mine["device_peak_mem_bytes"]) == {"cdc", "nhlbi", "finance"}
    for device, info in theirs["devices"].items():  # what each host measured and did (peaks: CPU measure, ~KB)
        assert mine["devices"][device] == info
        assert mine["device_peak_mem_bytes"][device] == pytest.approx(theirs["device_peak_mem_bytes"][device], rel=1e-3)

    # the same devices accepted, the same experts hosted, every round
    everyone = ["cdc", "finance", "nhlbi"]
    assert [x["accepted"] for x in my_lines] == [x["accepted"] for x in their_lines] == [everyone, everyone]
    assert [x["hosted"] for x in my_lines] == [x["hosted"] for x in their_lines]

    # the same uploads: bit for bit where the weights sent down are (see the module's docstring)
    per = mine["comm_bytes"]["per_device"]
    for device, rounds in packets.items():
        for r, (entry, local) in enumerate(zip(per[device]["rounds"], rounds, strict=True), start=1):
            assert (entry["down"], entry["up"]) == (npy_bytes(local["down"]), npy_bytes(local["up"]))
            assert entry["down"] < entry["down_message"] and entry["up"] < entry["up_message"]
            if method == "expert-subset" or r == 1:
                assert entry["sha256"] == local["sha256"], (device, r)
        assert per[device]["up"] == sum(e["up"] for e in per[device]["rounds"])

    for key in ("ppl", "ppl_by_source", "validation_ppl"):
        for name, ppl in theirs[key].items():
            assert mine[key][name] == pytest.approx(ppl, rel=REL_PPL), (key, name)
