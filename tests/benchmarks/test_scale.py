"""The scale projection: shipped configs build the published models, wire bytes are exact, rows are consistent."""

import csv
import json

import pytest
import safetensors.torch
import torch

from deepfusion.benchmarks.scale import cards, project
from deepfusion.models import build_global_moe
from deepfusion.wire.knowledge import KnowledgePacket, id_dtype


def _census(name: str) -> cards.Census:
    return cards.census(cards.build_on_meta(*cards.transformers_config(cards.read_config(name))))


@pytest.mark.parametrize("card", [*cards.GLOBAL_MODELS, *cards.DEVICE_MODELS], ids=lambda c: c.name)
def test_every_shipped_config_builds_its_published_size(card):
    c = _census(card.name)
    assert abs(c.total / card.published_total - 1) < 0.01, f"{card.title}: built {c.total:,} vs published {card.published_total:,.0f}"
    if card.published_activated:  # published to 0.1 B, so agree to within its rounding
        assert abs(c.activated - card.published_activated) <= 0.05e9


def test_moe_layouts_are_the_cards():
    qwen, deepseek = _census("qwen1.5-moe-a2.7b"), _census("deepseek-moe-16b-base")
    assert (qwen.num_experts, qwen.top_k, qwen.moe_layers) == (60, 4, 24)
    assert (deepseek.num_experts, deepseek.top_k, deepseek.moe_layers) == (64, 6, 27)  # first layer dense
    assert 14.3e9 * 0.99 < qwen.total < 14.3e9 * 1.01
    # hosting every expert is the whole model; hosting none leaves exactly the non-expert part
    assert sum(map(lambda s: torch.Size(s).numel(), qwen.hosted_shapes(60).values())) == qwen.total
    assert sum(map(lambda s: torch.Size(s).numel(), qwen.hosted_shapes(0).values())) == qwen.non_expert


def test_safetensors_bytes_are_the_librarys_to_the_byte():
    model = build_global_moe("qwen_moe", "tiny", 512)
    c = cards.census(model)
    for dtype in (torch.float32, torch.bfloat16):
        tensors = {n: p.detach().to(dtype) for n, p in model.named_parameters()}
        assert project.safetensors_bytes(c.shapes, dtype) == len(safetensors.torch.save(tensors))
        hosted = {n: (t[:2] if n in c.expert_names else t).contiguous() for n, t in tensors.items()}
        assert project.safetensors_bytes(c.hosted_shapes(2), dtype) == len(safetensors.torch.save(hosted))


def test_packet_bytes_grow_exactly_linearly_with_positions():
    k, vocab = 8, 151936
    per_position = k * id_dtype(vocab).itemsize + k * 2 + 2  # ids, fp16 probs, one fp16 tail
    assert per_position == 50  # a vocabulary over 65,536 needs uint32 ids
    for n in (1_000, 4_000):
        blob = project.knowledge_packet(n, k, vocab, sample=8).to_bytes()
        header = int.from_bytes(blob[:8], "little")
        assert len(blob) - 8 - header == n * per_position
        assert header < 1024
    assert KnowledgePacket.from_bytes(blob).n_positions == 4_000  # a real, parseable packet


def test_unknown_architecture_names_what_is_known():
    with pytest.raises(ValueError, match="'MysteryForCausalLM' has no mapping; known: .*DeepseekForCausalLM"):
        cards.transformers_config({"architectures": ["MysteryForCausalLM"]})
    with pytest.raises(ValueError, match="moe_layer_freq = 2"):
        cards.transformers_config(cards.read_config("deepseek-moe-16b-base") | {"moe_layer_freq": 2})


@pytest.fixture(scope="module")
def projected(tmp_path_factory):
    """One global MoE and one on-device LLM through the whole projection (the full run is the benchmark)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(cards, "GLOBAL_MODELS", cards.GLOBAL_MODELS[:1])
    mp.setattr(cards, "DEVICE_MODELS", cards.DEVICE_MODELS[:1])
    out = tmp_path_factory.mktemp("scale")
    rows = project.project(out)
    mp.undo()
    return out, rows


def test_expert_subset_lies_strictly_between_the_kd_methods_and_fedavg(projected):
    _, rows = projected
    by = lambda method: [r for r in rows if r["method"] == method]
    fedavg, kd = by("fedavg-moe")[0], by("multiround-views")[0]
    assert by("expert-subset")
    for r in by("expert-subset"):
        assert kd["round_bytes"] < r["round_bytes"] < fedavg["round_bytes"]
        assert kd["device_memory_bytes"] < r["device_memory_bytes"] < fedavg["device_memory_bytes"]
    assert fedavg["device_memory_bytes"] > 16 * fedavg["device_params"]  # AdamW state + activations on top
    assert 1.99 < fedavg["round_bytes"] / fedavg["round_bytes_bf16"] <= 2.0


def test_kd_methods_cost_the_same_and_ship_no_weights(projected):
    _, rows = projected
    kd = [r for r in rows if r["method"] in cards.KD_METHODS]
    assert {r["method"] for r in kd} == set(cards.KD_METHODS)
    strip = lambda r: {k: v for k, v in r.items() if k != "method"}
    assert all(strip(r) == strip(kd[0]) for r in kd)
    header = kd[0]["up_bytes"] - 512 * 127 * 50  # the multi-round proxy: 512 blocks x 127 positions, 50 bytes each
    assert 0 < header < 1024 and kd[0]["down_bytes"] < 4096


def test_totals_are_n_times_one_device(projected):
    _, rows = projected
    for r in rows:
        for n in cards.DEVICE_COUNTS:
            assert r[f"total_bytes_{n}"] == n * (r["down_bytes"] + r["up_bytes"])
            assert r[f"total_bytes_bf16_{n}"] == n * r["round_bytes_bf16"]


def test_outputs_are_written(projected):
    out, rows = projected
    doc = json.loads((out / "scale.json").read_text())
    assert doc["rows"] == rows and doc["settings"]["positions"] == 512 * 127
    with open(out / "scale.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    md = (out / "SCALE.md").read_text()
    assert "Command: `deepfusion bench --profile scale --out" in md and "Machine:" in md and "| fedavg-moe |" in md
