"""Figs. 7-8 at the paper's sizes: the shipped configs build the published models, the FedJETS compact MoE sits
between the trunk and the full MoE, upload bytes are the real Upload's, totals scale with N. Meta device only;
the full projection (one training step per model) is the benchmark, not a test."""

import pytest
import torch

from deepfusion.baselines.hosting import hosted_config
from deepfusion.benchmarks import paper_scale as ps
from deepfusion.benchmarks.scale import cards
from deepfusion.benchmarks.scale.project import Measured
from deepfusion.config import load_config
from deepfusion.models import build_device_model
from deepfusion.wire.upload import Upload


def _census(name: str, experts: int | None = None) -> cards.Census:
    cls, config = cards.transformers_config(cards.read_config(name))
    return cards.census(cards.build_on_meta(cls, hosted_config(config, experts)))


@pytest.mark.parametrize("card", [*ps.PAPER_DEVICE_MODELS, *ps.DENSE_BASES], ids=lambda c: c.name)
def test_paper_configs_build_their_published_size(card):
    built = ps.built_params(card)
    assert abs(built / card.published_total - 1) < 0.02, f"{card.title}: built {built:,} vs {card.published_total:,.0f}"


def test_device_classes_are_the_model_cards():
    expected = {"gpt2": "GPT2LMHeadModel", "olmo-1b": "OlmoForCausalLM", "bloom-1b1": "BloomForCausalLM",
                "tinyllama-1.1b": "LlamaForCausalLM", "qwen1.5-1.8b": "Qwen2ForCausalLM"}
    for name, cls in expected.items():
        assert cards.transformers_config(cards.read_config(name))[0].__name__ == cls


@pytest.mark.parametrize("case", ps.CASES, ids=lambda c: c.name)
def test_fedjets_compact_moe_lies_between_trunk_and_full_moe(case):
    full = _census(case.moe.name)
    compact = _census(case.moe.name, full.top_k)
    assert compact.num_experts == full.top_k
    assert full.non_expert < compact.total < full.total
    # the routers shrink to top_k rows; everything else that is not a routed expert is kept
    routers = full.moe_layers * (full.num_experts - full.top_k) * cards.read_config(case.moe.name)["hidden_size"]
    assert compact.total == full.non_expert - routers + full.top_k * full.per_expert


def test_upload_bytes_are_the_real_uploads():
    for family in ("gpt2", "olmo", "bloom"):
        model = build_device_model(family, "tiny", 300)
        tensors = {n: p.detach().half() for n, p in model.named_parameters()}
        real = Upload("device-00001", family, model.config.to_dict(), tensors, b"e" * 34).to_bytes()
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        assert ps.upload_bytes(shapes, model.config.to_dict(), 34, arch=family) == len(real)


@pytest.fixture(scope="module")
def traffic():
    """Fig. 8's rows for the medical case; the compact MoE's census only (its training step is not needed)."""
    cfg, case = load_config(), ps.CASES[0]
    census = _census(case.moe.name, 4)
    compact = Measured(case.moe, "Qwen2MoeForCausalLM", 151936, census.total, census, memory=None)
    s = ps.settings(cfg, (16, 32, 64, 128))
    return ps.traffic_rows(case, compact, 151936, cfg, s), census


def test_totals_scale_linearly_in_n(traffic):
    rows, _ = traffic
    base = rows[0]
    for row in rows[1:]:
        k = row["N"] / base["N"]
        for method in ("deepfusion", "deepfusion_moe_vocab", "fedjets", "fedjets_per_round", "fedmkt"):
            assert abs(row[method] - k * base[method]) <= k, method  # expected bytes, rounded once per N


def test_fedjets_totals_are_rounds_of_the_compact_moe_both_ways(traffic):
    rows, census = traffic
    per_device_round = 2 * ps.safetensors_bytes(census.shapes, torch.float16)
    assert per_device_round > 2 * 2 * census.total  # fp16 data plus headers
    for row in rows:
        assert row["fedjets"] == ps.FEDJETS_ROUNDS * row["N"] * per_device_round
        assert row["fedjets_fp32"] > 1.99 * row["fedjets"]


def test_reduction_is_computed_from_the_two_totals(traffic):
    rows, _ = traffic
    for row in rows:
        assert row["reduction_vs_fedjets_pct"] == pytest.approx(100 * (1 - row["deepfusion"] / row["fedjets"]))
        # the rounds at which the paper's reduction would hold give back exactly that reduction
        at = row["rounds_for_paper_reduction"] * row["fedjets_per_round"]
        assert 100 * (1 - row["deepfusion"] / at) == pytest.approx(ps.PAPER_REDUCTION_PCT["medical"])
    assert ps.reduction_pct(30, 100) == pytest.approx(70.0)


def test_deepfusion_moves_each_device_model_once(traffic):
    rows, _ = traffic
    params = sum(ps.built_params(c) for c in ps.CASES[0].devices) / 3
    per_device = rows[0]["deepfusion"] / rows[0]["N"]
    assert 2 * params < per_device < 2 * params + 200_000  # fp16 weights + headers, e_n and the task's basis


def test_markdown_has_both_tables_and_assumptions():
    result = {"settings": ps.settings(load_config(), (16,)) | {"config": "configs/default.toml"},
              "models": [{"model": "M", "params": 2e9, "published": 2e9, "diff_pct": 0.0},
                         {"model": "C", "params": 1e9, "published": None, "non_expert_params": 5e8,
                          "full_moe_params": 4e9}],
              "memory": [{"case": "medical", "device": "GPT-2", "params": 1.2e8, "peak_bytes": 2**31,
                          "peak_bytes_moe_vocab": 2**32, "fedjets_peak_bytes": 2**34, "ratio": 8.0,
                          "ratio_moe_vocab": 4.0}],
              "traffic": [{"case": "medical", "N": 16, "deepfusion": 10**9, "deepfusion_moe_vocab": 2 * 10**9,
                           "fedjets": 10**11, "fedjets_per_round": 10**10, "fedmkt": 10**8, "fedmkt_per_round": 10**7,
                           "reduction_vs_fedjets_pct": 99.0, "reduction_vs_fedjets_fp32_pct": 99.5,
                           "rounds_for_paper_reduction": 0.34}]}
    text = ps.markdown(result)
    assert "Fig. 7" in text and "Fig. 8" in text
    assert "| medical | GPT-2 | 120.0 M | 2.0 GiB | 4.0 GiB | 16.0 GiB | 8.0x | 4.0x |" in text
    assert "| medical | 16 | 1 GB | 2 GB | 100 GB | 10 GB | 100 MB | 10 MB | -99.0% |" in text
    assert "R = 10 rounds" in text and "medical 0.34" in text
