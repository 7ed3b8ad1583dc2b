"""Tests for deepfusion.upcycling, in the module's order: the experts' layout, exact upcycling, Eqs. 12-13 with
different students, export, the router from the domains, the frozen parameters, errors. Tiny real models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from deepfusion import upcycling
from deepfusion.errors import ConfigError
from deepfusion.models import build_dense_base, global_moe_config

V = 300
FAMILIES = ["qwen_moe", "deepseek_moe"]


def moe_config(family: str, shared_width_is_F: bool = False, domains: int | None = None):
    """The tiny preset; optionally with a shared expert as wide as the dense FFN (the "mean" rule needs it),
    or with routed experts for `domains` domains."""
    config = global_moe_config(family, "tiny", V)
    g = config.intermediate_size // config.moe_intermediate_size
    if shared_width_is_F and family == "qwen_moe":
        config.shared_expert_intermediate_size = config.intermediate_size  # 64 -> 128
    if shared_width_is_F and family == "deepseek_moe":
        config.n_shared_experts = g  # 1 x 64 -> 2 x 64
    if domains and family == "qwen_moe":
        config.num_experts = domains * g
    if domains and family == "deepseek_moe":
        config.n_routed_experts = domains * g
    return config


def students(config, seeds):
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(build_dense_base(config).eval())
    return out


def test_domains_follow_the_fine_grained_split_of_each_preset():
    for family, size, g, K in [("qwen_moe", "tiny", 2, 2), ("qwen_moe", "small", 2, 4),
                               ("deepseek_moe", "tiny", 2, 4), ("deepseek_moe", "small", 4, 4)]:
        config = global_moe_config(family, size, V)
        assert (upcycling.experts_per_ffn(config), upcycling.num_domains(config)) == (g, K)
        fused = upcycling.fused_config(config)
        assert fused.num_experts_per_tok == g and fused.norm_topk_prob
        assert fused._experts_implementation == config._experts_implementation
        if family == "deepseek_moe":
            assert (fused.n_group, fused.topk_group, fused.routed_scaling_factor) == (K, 1, 1.0)
    assert upcycling.shared_rule(global_moe_config("qwen_moe", "small", V), "auto") == "mean"  # 384 = F
    assert upcycling.shared_rule(global_moe_config("deepseek_moe", "small", V), "auto") == "zero"  # 192 != 384


# ---- upcycling is exact ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shared", ["mean", "zero"])
def test_moe_from_identical_students_computes_the_dense_model(family, shared):
    config = moe_config(family, shared_width_is_F=shared == "mean")
    [dense] = students(config, [0])
    K = upcycling.num_domains(config)
    moe = upcycling.fuse(config, [dense] * K, shared=shared).eval()
    x = torch.randint(V, (3, 24), generator=torch.Generator().manual_seed(1))
    want = dense(input_ids=x).logits

    routers = {"domains": lambda: upcycling.init_router(moe, torch.randint(V, (8, 16)), torch.arange(8) % K),
               "random": lambda: upcycling.random_router(moe, torch.Generator().manual_seed(2))}
    if family == "deepseek_moe":  # group-limited routing takes one whole domain even when every expert ties
        routers = {"zero": lambda: None, **routers}
    for name, set_router in routers.items():
        set_router()
        got = moe(input_ids=x, output_router_logits=True)
        assert (got.logits - want).abs().max() < 1e-5, name
    # Not trivially exact: the tokens went to more than one domain's experts.
    top1_domains = {int(d) for r in got.router_logits for d in r.argmax(-1) // upcycling.experts_per_ffn(config)}
    assert len(top1_domains) > 1


# ---- K different students: Eqs. 12-13 -------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shared", ["mean", "zero"])
def test_expert_i_is_student_i_and_the_rest_is_their_mean(family, shared):
    config = moe_config(family, shared_width_is_F=True)
    K, g, f = upcycling.num_domains(config), upcycling.experts_per_ffn(config), config.moe_intermediate_size
    studs = students(config, range(10, 10 + K))
    moe = upcycling.fuse(config, [s.state_dict() for s in studs], shared=shared)
    scale = g / 2 if shared == "mean" else g
    layer = config.num_hidden_layers - 1  # an MoE layer in both families
    mlp, ffns = moe.model.layers[layer].mlp, [s.model.layers[layer].mlp for s in studs]

    for i, ffn in enumerate(ffns):  # Eq. 12, tensor by tensor
        for s in range(g):
            rows = slice(s * f, (s + 1) * f)
            torch.testing.assert_close(mlp.experts.gate_up_proj[i * g + s, :f], ffn.gate_proj.weight[rows])
            torch.testing.assert_close(mlp.experts.gate_up_proj[i * g + s, f:], ffn.up_proj.weight[rows])
            torch.testing.assert_close(mlp.experts.down_proj[i * g + s], ffn.down_proj.weight[:, rows] * scale)
    with torch.no_grad():  # ... and as a function: domain i's group at weights 1/g is student i's FFN
        x = torch.randn(7, config.hidden_size)
        for i, ffn in enumerate(ffns):
            group = torch.arange(i * g, i * g + g).expand(7, g)
            routed = mlp.experts(x, group, torch.full((7, g), 1 / g))
            torch.testing.assert_close(routed, ffn(x) * (0.5 if shared == "mean" else 1.0), atol=1e-6, rtol=1e-5)

    mean = lambda get: torch.stack([get(s) for s in studs]).mean(0)
    torch.testing.assert_close(moe.model.layers[layer].self_attn.o_proj.weight,  # Eq. 13
                               mean(lambda s: s.model.layers[layer].self_attn.o_proj.weight))
    torch.testing.assert_close(moe.model.embed_tokens.weight, mean(lambda s: s.model.embed_tokens.weight))
    assert not mlp.gate.weight.any()
    shared_ffn = mlp.shared_expert if family == "qwen_moe" else mlp.shared_experts
    if shared == "zero":
        assert not shared_ffn.down_proj.weight.any()
    else:
        half = 1.0 if family == "qwen_moe" else 0.5  # Qwen halves through its gate, DeepSeek in the weights
        want = mean(lambda s: s.model.layers[layer].mlp.down_proj.weight) * half
        torch.testing.assert_close(shared_ffn.down_proj.weight, want)
    if family == "qwen_moe":
        assert not mlp.shared_expert_gate.weight.any()  # sigmoid(0) = 1/2
    else:  # the leading dense layer is shared by every token: the mean
        want = mean(lambda s: s.model.layers[0].mlp.gate_proj.weight)
        torch.testing.assert_close(moe.model.layers[0].mlp.gate_proj.weight, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_moe_round_trips_through_save_pretrained(tmp_path, family):
    config = moe_config(family)
    moe = upcycling.fuse(config, students(config, range(20, 20 + upcycling.num_domains(config)))).eval()
    upcycling.random_router(moe, torch.Generator().manual_seed(0))
    moe.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(loaded) is type(moe) and loaded.config.num_experts_per_tok == upcycling.experts_per_ffn(config)
    x = torch.randint(V, (2, 16))
    torch.testing.assert_close(loaded(input_ids=x).logits, moe(input_ids=x).logits)


# ---- the router ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_router_from_domains_sends_each_domain_to_its_experts(family):
    """Synthetic domains a random model can tell apart: domain i writes only tokens 12i .. 12i+11."""
    config = moe_config(family)
    K = upcycling.num_domains(config)
    moe = upcycling.fuse(config, students(config, [0]) * K)
    gen = torch.Generator().manual_seed(0)
    domain = torch.arange(16 * K) // 16  # (N,): 16 blocks per domain
    blocks = domain[:, None] * 12 + torch.randint(12, (16 * K, 32), generator=gen)  # (N, T)
    report = upcycling.init_router(moe, blocks[::2], domain[::2])
    held = upcycling.routing_accuracy(moe, blocks[1::2], domain[1::2])
    assert report["chance"] == pytest.approx(1 / K)
    assert min(report["layers"].values()) > 0.95 and min(held["layers"].values()) > 0.95
    # A random router (the ablation) does not know the domains.
    upcycling.random_router(moe, torch.Generator().manual_seed(0))
    assert upcycling.routing_accuracy(moe, blocks, domain)["routing_accuracy"] < 0.5 + 1 / K


def test_router_from_domains_tells_medquad_from_tatqa(data_dir, tmp_path):
    """Real text, a dense base trained 300 steps on both corpora (its features then carry the domain), one
    domain each: held-out tokens go to their corpus's experts well above chance (measured 0.72-0.79)."""
    from deepfusion.data import load_medquad, load_tatqa, pack_blocks, train_tokenizer

    med, fin = load_medquad(data_dir, "cdc"), load_tatqa(data_dir, 0, 4)
    tok = train_tokenizer([d.text for d in med + fin], 1000, tmp_path / "tok")
    med, fin = pack_blocks(tok, med, 32), pack_blocks(tok, fin, 32)  # (N, 32) each
    config = moe_config("qwen_moe")
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    dense = build_dense_base(config)
    train = torch.cat([med[64:], fin[64:]])
    opt = torch.optim.AdamW(dense.parameters(), lr=3e-3)
    for _ in range(300):
        batch = train[torch.randint(len(train), (16,))]
        loss = dense(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    moe = upcycling.fuse(config, [dense, dense])  # K = 2: domain 0 medical, 1 finance
    domain = torch.tensor([0] * 32 + [1] * 32)
    fit = upcycling.init_router(moe, torch.cat([med[0:64:2], fin[0:64:2]]), domain)
    held = upcycling.routing_accuracy(moe, torch.cat([med[1:64:2], fin[1:64:2]]), domain)
    assert fit["chance"] == 0.5
    assert held["routing_accuracy"] > 0.65 and min(held["layers"].values()) > 0.6


def test_a_domain_without_public_blocks_gets_no_tokens_and_bad_inputs_are_refused():
    config = moe_config("deepseek_moe")  # K = 4
    moe = upcycling.fuse(config, students(config, [0]) * upcycling.num_domains(config))
    report = upcycling.init_router(moe, torch.randint(V, (6, 8)), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert report["empty_domains"] == [3]
    gate = moe.model.layers[1].mlp.gate.weight  # (K*g, d)
    assert not gate[6:].any() and gate[:6].any()
    with torch.no_grad():
        logits = moe(input_ids=torch.randint(V, (4, 16)), output_router_logits=True).router_logits[0]  # (B*T, E)
    assert not (logits.argmax(-1) // 2 == 3).any()
    with pytest.raises(ValueError, match=r"block domains \[0, 4\]; this MoE holds K = 4"):
        upcycling.init_router(moe, torch.randint(V, (2, 8)), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="one domain per block"):
        upcycling.init_router(moe, torch.randint(V, (6, 8)), torch.arange(4))


# ---- what tuning freezes --------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_expert_parameter_names_are_exactly_the_ffn_weights(family):
    config = moe_config(family)
    moe = upcycling.fuse(config, students(config, [0]) * upcycling.num_domains(config))
    want = set()
    for i, layer in enumerate(moe.model.layers):
        p = f"model.layers.{i}.mlp."
        if hasattr(layer.mlp, "experts"):
            shared = "shared_expert." if family == "qwen_moe" else "shared_experts."
            want |= {p + "experts.gate_up_proj", p + "experts.down_proj"}
            want |= {f"{p}{shared}{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")}
        else:  # DeepSeek's leading dense layer
            want |= {f"{p}{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")}
    frozen = upcycling.expert_parameter_names(moe)
    assert frozen == want
    trainable = {n for n, _ in moe.named_parameters()} - frozen
    assert {n for n in trainable if n.endswith("mlp.gate.weight")}  # the routers stay trainable
    kinds = ("embed_tokens", "self_attn", "layernorm", "model.norm", "lm_head", "mlp.gate.weight", "shared_expert_gate")
    assert all(any(k in n for k in kinds) for n in trainable), sorted(trainable)


# ---- errors ---------------------------------------------------------------------------------------

def test_unsupported_moe_class_is_a_config_error_naming_it():
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # a dense model given as the MoE
    with pytest.raises(ConfigError, match="LlamaConfig.*'llama'.*Qwen2MoeForCausalLM.*MixtralForCausalLM"):
        upcycling.fuse(config, [])
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        upcycling.expert_parameter_names(LlamaForCausalLM(config))


def test_bad_widths_students_and_shared_rules_are_config_errors():
    config = moe_config("qwen_moe")
    config.moe_intermediate_size = 48  # 128 % 48 != 0
    with pytest.raises(ConfigError, match="intermediate_size 128 / moe_intermediate_size 48"):
        upcycling.experts_per_ffn(config)
    config = moe_config("qwen_moe")  # shared expert 64 wide, FFN 128
    with pytest.raises(ConfigError, match="shared expert is 64 wide, the students' FFN 128"):
        upcycling.fuse(config, students(config, [0]) * 2, shared="mean")
    with pytest.raises(ConfigError, match="got 1 students for a MoE of 2 domains"):
        upcycling.fuse(config, students(config, [0]))
    other = moe_config("qwen_moe")
    other.intermediate_size = 192
    with pytest.raises(ConfigError, match=r"student 0 is not this MoE's dense base: .*down_proj.weight is \(64, 192\)"):
        upcycling.fuse(config, students(other, [0]) * 2)
