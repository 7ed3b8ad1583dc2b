"""Phase III's fusion (paper §IV-D, Eqs. 12-13, Fig. 6): K dense students become one global MoE.

The K students are copies of the MoE's dense base model (models.build_dense_base), each distilled from one
knowledge domain. Fusing them is Branch-Train-MiX's merge with the students as the branches:

- Eq. 12, experts. The paper gives expert i the FFN of student i; our MoEs have fine-grained experts, so we
  split the FFN as Qwen upcycled its MoE: the dense FFN of width F = intermediate_size cuts into g = F / f
  slices of width f = moe_intermediate_size (channels s*f..(s+1)*f: rows of gate_proj and up_proj, columns
  of down_proj). Domain i owns the g routed experts i*g .. i*g+g-1 (domain-major) and expert i*g+s is slice
  s of student i. So K = routed experts / g (qwen_moe small: 8 / 2 = 4; deepseek_moe small: 16 / 4 = 4).
  The FFN is a sum over its channels, so a token whose top-g experts are one domain's whole group, each at
  routing weight 1/g, computes its student's FFN exactly once the slices' down_proj is scaled by g.
- Routing that makes this exact (fused_config): top-k = g with normalised top-k weights (norm_topk_prob) in
  both families, and a domain's g router rows identical, so they tie and top-k takes the whole group. For
  DeepSeek-V3 we also set n_group = K, topk_group = 1: its group-limited routing then picks exactly one
  domain per token by construction, whatever the rows (routed_scaling_factor = 1 keeps weights summing
  to 1). Qwen has no groups: a group is chosen whole only while its rows tie, and with an all-zero router
  every expert ties and torch.topk's tie-break (not a domain group) decides; set the router with init_router
  or random_router before use.
- Eq. 13, the rest: embeddings, attention, norms and lm_head are the element-wise mean over the K students,
  and so are DeepSeek's leading dense layers (first_k_dense_replace): an FFN every token passes through is
  a shared layer, and Eq. 13 is the paper's rule for shared layers.
- Shared experts (Qwen's sigmoid-gated shared expert, DeepSeek's always-on ones), rule `shared`:
  "mean": the shared expert holds the mean of the students' FFNs (Eq. 13 again: every token uses it) and
  carries half of the FFN output, the routed group the other half (down_proj scaled by g / 2). Qwen's
  shared_expert_gate starts at zero (sigmoid = 1/2, still trainable); DeepSeek's shared down_proj is halved.
  "zero": the shared expert's down_proj is zero, so it adds nothing (its other weights keep their random
  init, like LoRA's B = 0: it could learn if ever unfrozen); the routed group carries the whole FFN.
  "auto": "mean" where the shared width equals F, else "zero" (qwen_moe small: 384 = F, mean; deepseek_moe
  small: 2 x 96 = 192 != 384, zero). With K identical students every rule computes the dense model exactly.

Classes (models.MOE_LAYOUTS): Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, OLMoE, Mixtral, found by their shared v5
layout (a block with a router `gate` and fused `experts`), not by attribute paths. OLMoE and Mixtral have no
separate expert width: an expert is a whole FFN (g = 1, sparse upcycling). DeepSeek-V2's top-k weights are the
plain softmax, never renormalised, so its fusion scales each domain's FFN by its routing probability: the one
supported class where upcycling is not exact.

Router initialisation "from the domains" (init_router): layer by layer, in order (a layer's routing changes
the next layer's inputs), the router's inputs on the public blocks give each domain's centroid c_i and the
within-domain covariance S; domain i's g rows are S^-1 (c_i - mean_c) * scale, a linear discriminant. Plain
centroid differences (c_i - mean_c) mix the domain with which token it is (that dominates a router input
and varies within every domain); S^-1 discounts the directions along which a domain's own tokens vary most
(S shrunk 10 % toward isotropic so that rarely used directions are not blown up). Measured (qwen_moe tiny's
dense base trained 150 steps on MedQuAD + TAT-QA, fitted on 64 blocks of 32 tokens per corpus, scored on 64
others): the share of held-out tokens whose top-1 expert is their corpus's went 71.6 -> 72.9 % in layer 0
and 67.5 -> 76.2 % in layer 1 (a logistic regression fitted on the same inputs: 74.8 / 77.5 %);
routing_accuracy reports that share. The scale is a temperature: the mean, over domains, of the logit margin
between a domain's own row and the others' on that domain's centroid is ROUTER_MARGIN = 2 nats. At 2 nats a
token at its domain's centroid gives its domain's group e^2 / (e^2 + K - 1) = 71 % of Qwen's softmax (K = 4):
decided but far from saturated, so tuning still moves the router.
random_router (the ablation) draws one row per domain from N(0, initializer_range^2) (0.02, the models' own
init) and repeats it g times, keeping the one-domain structure above: only where the rows point differs.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from deepfusion.pipeline_config import SHARED_RULES
from deepfusion.errors import ConfigError
from deepfusion.models import MOE_LAYOUTS, build_dense_base, dense_width, expert_width, moe_layout, routed_experts

ROUTER_MARGIN = 2.0  # nats between a domain's own logit and the others' on its centroid (docstring)
SHRINK = 0.1  # how far the within-domain covariance is pulled toward isotropic before inverting it
SUPPORTED = tuple(MOE_LAYOUTS)  # model types upcycling handles (models.MOE_LAYOUTS)


def _config(model_or_config) -> PreTrainedConfig:
    config = getattr(model_or_config, "config", model_or_config)
    what = f"upcycling's MoE ({type(model_or_config).__name__})"
    moe_layout(config, what)
    return config


def experts_per_ffn(moe_config) -> int:
    """g: the fine-grained experts one dense FFN splits into (F / f)."""
    config = _config(moe_config)
    F, f = dense_width(config), expert_width(config)
    if F % f or routed_experts(config) % (F // f):
        raise ConfigError(f"config error: intermediate_size {F} / moe_intermediate_size {f} with "
                          f"{routed_experts(config)} routed experts: the dense FFN must split into whole experts "
                          "(F % f == 0) and the experts into whole domains (experts % (F / f) == 0); "
                          "pick widths that divide")
    return F // f


def num_domains(moe_config) -> int:
    """K: the knowledge domains (students) the MoE holds, g experts each."""
    return routed_experts(_config(moe_config)) // experts_per_ffn(moe_config)


def fused_config(moe_config) -> PreTrainedConfig:
    """The MoE's config with the routing that makes upcycling exact (docstring): top-g, normalised."""
    config = _config(moe_config)
    g, K = experts_per_ffn(config), num_domains(config)
    fused = type(config).from_dict(config.to_dict())
    fused._experts_implementation = getattr(config, "_experts_implementation", None)
    fused.num_experts_per_tok, fused.norm_topk_prob = g, True  # Mixtral always normalises; DeepSeek-V2 never
    if hasattr(config, "router_jitter_noise"):  # Mixtral: no multiplicative noise on the router's inputs
        fused.router_jitter_noise = 0.0
    if config.model_type == "deepseek_v3":
        # Group scores add each group's top-2 experts, so a one-expert group cannot be a group: then plain top-1.
        fused.n_group, fused.topk_group = (K, 1) if g > 1 else (1, 1)
        fused.routed_scaling_factor = 1.0
    if config.model_type == "deepseek_v2":
        # Its groups score by their best expert, so a group of any size works; its top-k weights are the plain
        # softmax (never renormalised): the chosen domain's FFN comes out scaled by its routing probability.
        fused.topk_method, fused.n_group, fused.topk_group = "group_limited_greedy", K, 1
        fused.routed_scaling_factor = 1.0
    return fused


def _shared_width(config) -> int:
    """The shared expert's FFN width (0: the class has none)."""
    if moe_layout(config).shared is None:
        return 0
    if config.model_type == "qwen2_moe":
        return config.shared_expert_intermediate_size
    return config.moe_intermediate_size * config.n_shared_experts


def shared_rule(moe_config, shared: str) -> str:
    """Resolve `shared` (auto | mean | zero) to mean or zero for this MoE."""
    config = _config(moe_config)
    width, F = _shared_width(config), dense_width(config)
    if shared not in SHARED_RULES:
        raise ConfigError(f"config error: [tune] shared = {shared!r}; allowed: {', '.join(SHARED_RULES)}")
    if shared == "mean" and width != F:
        raise ConfigError(f"config error: [tune] shared = 'mean': the shared expert is {width} wide, the students' "
                          f"FFN {F}; holding their mean needs equal widths; use shared = 'zero' or 'auto'")
    return shared if shared != "auto" else ("mean" if width == F else "zero")


# ---- Eqs. 12-13: the merge ----------------------------------------------------------------------

def _check_students(config, students: list[dict[str, torch.Tensor]]) -> None:
    K = num_domains(config)
    if len(students) != K:
        raise ConfigError(f"config error: fuse got {len(students)} students for a MoE of {K} domains ("
                          f"{routed_experts(config)} experts / {experts_per_ffn(config)} per FFN); "
                          "give one per domain")
    with torch.device("meta"):
        want = {k: v.shape for k, v in build_dense_base(config).state_dict().items()}
    for i, sd in enumerate(students):
        got = {k: v.shape for k, v in sd.items()}
        if got != want:
            bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))[0]
            raise ConfigError(f"config error: student {i} is not this MoE's dense base: {bad} is "
                              f"{tuple(got[bad]) if bad in got else 'missing'}, expected "
                              f"{tuple(want[bad]) if bad in want else 'absent'}; distil into models.build_dense_base")


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.float() for t in tensors]).mean(0)


def _dense_ffn(sd: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense base's FFN at `prefix` as gate (F, d), up (F, d), down (d, F): a gated MLP's three
    projections, or (OLMoE's dense base) a single expert's fused gate_up_proj (1, 2F, d) and down_proj."""
    if prefix + "gate_proj.weight" in sd:
        return (sd[prefix + "gate_proj.weight"].float(), sd[prefix + "up_proj.weight"].float(),
                sd[prefix + "down_proj.weight"].float())
    gate, up = sd[prefix + "experts.gate_up_proj"][0].float().chunk(2)  # Experts.forward: gate rows first
    return gate, up, sd[prefix + "experts.down_proj"][0].float()


def _split_ffn(sd: dict, prefix: str, g: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One student's FFN as g experts: gate_up (g, 2f, d) with gate rows first (Experts.forward chunks
    gate, up in that order) and down (g, d, f) scaled by `scale`."""
    gate, up, down = _dense_ffn(sd, prefix)  # (F, d), (F, d), (d, F)
    d = gate.shape[1]
    gate_up = torch.cat([gate.view(g, -1, d), up.view(g, -1, d)], dim=1)  # (g, 2f, d)
    return gate_up, down.reshape(d, g, -1).transpose(0, 1) * scale  # (g, d, f)


def moe_blocks(moe: PreTrainedModel) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every sparse FFN block: a module with a router `gate` and fused `experts`, found by
    that shape rather than by each class's attribute path."""
    return [(name, m) for name, m in moe.named_modules()
            if hasattr(m, "experts") and hasattr(m, "gate") and hasattr(m.experts, "gate_up_proj")]


def _check_layout(moe: PreTrainedModel, blocks: list) -> None:
    """Each block's experts must be (E, 2f, d) / (E, d, f) tensors: the v5 fused layout this merge writes."""
    config, f, E = moe.config, expert_width(moe.config), routed_experts(moe.config)
    for name, block in blocks:
        gu, dn = block.experts.gate_up_proj, getattr(block.experts, "down_proj", None)
        if dn is None or gu.shape != (E, 2 * f, config.hidden_size) or dn.shape != (E, config.hidden_size, f):
            raise ConfigError(f"config error: {type(moe).__name__}'s {name}.experts is not the fused "
                              f"(experts, 2 x {f}, {config.hidden_size}) layout upcycling writes "
                              f"(got {tuple(gu.shape)}); supported: {', '.join(x.cls for x in MOE_LAYOUTS.values())}")
    if not blocks:
        raise ConfigError(f"config error: {type(moe).__name__} has no sparse FFN block (mlp.gate + mlp.experts); "
                          f"supported: {', '.join(x.cls for x in MOE_LAYOUTS.values())}")


def fuse(moe_config, students: list, shared: str = "auto") -> PreTrainedModel:
    """Eqs. 12-13: the global MoE from K students (models or state dicts of the dense base), in the order of
    the domains; the router is left at zero (set it with init_router or random_router)."""
    config = fused_config(moe_config)
    rule = shared_rule(config, shared)
    sds = [s.state_dict() if isinstance(s, torch.nn.Module) else s for s in students]
    _check_students(config, sds)
    moe = AutoModelForCausalLM.from_config(config)
    g, shared_name = experts_per_ffn(config), moe_layout(config).shared
    blocks = moe_blocks(moe)
    _check_layout(moe, blocks)
    fused = moe.state_dict()  # keeps what no rule sets: zero-rule shared gate/up, DeepSeek's score bias
    for name in sds[0]:
        if name in fused and fused[name].shape == sds[0][name].shape:  # Eq. 13: all but the sparse FFNs
            fused[name] = _mean([sd[name] for sd in sds])
    for name, block in blocks:
        p, sp = f"{name}.", f"{name}.{shared_name}."
        parts = [_split_ffn(sd, p, g, g / 2 if rule == "mean" else g) for sd in sds]  # Eq. 12
        fused[p + "experts.gate_up_proj"] = torch.cat([gu for gu, _ in parts])  # (K*g, 2f, d), domain-major
        fused[p + "experts.down_proj"] = torch.cat([dn for _, dn in parts])  # (K*g, d, f)
        fused[p + "gate.weight"] = torch.zeros_like(fused[p + "gate.weight"])
        if shared_name is None:
            continue
        gated = p + "shared_expert_gate.weight" in fused  # Qwen2-MoE: sigmoid(0) = 1/2 halves it
        if gated:
            fused[p + "shared_expert_gate.weight"] = torch.zeros_like(fused[p + "shared_expert_gate.weight"])
        if rule == "mean":
            for w, t in zip(("gate_proj", "up_proj", "down_proj"), zip(*(_dense_ffn(sd, p) for sd in sds))):
                fused[f"{sp}{w}.weight"] = _mean(list(t))
            if not gated:  # DeepSeek: no gate, so its half comes from the weights
                fused[sp + "down_proj.weight"] = fused[sp + "down_proj.weight"] / 2
        else:
            fused[sp + "down_proj.weight"] = torch.zeros_like(fused[sp + "down_proj.weight"])
    moe.load_state_dict(fused, strict=True)
    return moe


# ---- the router ---------------------------------------------------------------------------------

def _routers(moe) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, router) per sparse block; the index is the number in its module path (model.layers.3.mlp)."""
    _config(moe)
    return [(int(next(part for part in name.split(".") if part.isdigit())), block.gate)
            for name, block in moe_blocks(moe)]


def _set_domain_rows(gate: torch.nn.Module, rows: torch.Tensor, g: int) -> None:
    """Domain i's row for each of its g experts: identical rows tie, so top-g takes the group whole."""
    with torch.no_grad():
        gate.weight.copy_(rows.repeat_interleave(g, dim=0))  # (K, d) -> (K*g, d)


class _Enough(Exception):
    """Raised by the last router a pass needs: the layers after it and lm_head need not run."""


@torch.no_grad()
def _router_stats(moe, public: torch.Tensor, block_domain: torch.Tensor, batch_size: int,
                  layers: int | None = None) -> list[dict]:
    """One pass over the public blocks up to the first `layers` MoE layers (all by default); per layer: each
    domain's count and sum of router inputs, their summed outer product, and how many tokens' top-1 expert
    belongs to their block's domain."""
    routers, K, g = _routers(moe)[:layers], num_domains(moe), experts_per_ffn(moe)
    stats = [{"counts": 0.0, "sums": 0.0, "outer": 0.0, "hits": 0} for _ in routers]
    batch = {}  # the current batch's token domains, read by the hooks

    def hook(s: dict, last: bool):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])  # (B*T, d): Qwen passes it flat, DeepSeek as (B, T, d)
            top1 = (x.float() @ module.weight.float().T).argmax(-1) // g  # (B*T,) the top-1 expert's domain
            s["hits"] += int((top1 == batch["domain"]).sum())
            x, onehot = x.double(), torch.nn.functional.one_hot(batch["domain"], K).double()  # (B*T, K)
            s["counts"] = s["counts"] + onehot.sum(0)  # (K,)
            s["sums"] = s["sums"] + onehot.T @ x  # (K, d)
            s["outer"] = s["outer"] + x.T @ x  # (d, d)
            if last:
                raise _Enough
        return record

    handles = [gate.register_forward_pre_hook(hook(s, slot == len(routers) - 1))
               for slot, (s, (_, gate)) in enumerate(zip(stats, routers))]
    was_training, device = moe.training, next(moe.parameters()).device
    moe.eval()
    try:
        for b in range(0, len(public), batch_size):
            ids = public[b:b + batch_size].to(device)  # (B, T)
            batch["domain"] = block_domain[b:b + batch_size].to(device).repeat_interleave(ids.shape[1])  # (B*T,)
            try:
                moe.model(input_ids=ids)
            except _Enough:
                pass
    finally:
        for h in handles:
            h.remove()
        moe.train(was_training)
    return stats


def _check_public(moe, public: torch.Tensor, block_domain: torch.Tensor) -> None:
    K = num_domains(moe)
    if public.ndim != 2 or block_domain.shape != (len(public),) or len(public) == 0:
        raise ValueError(f"got public {tuple(public.shape)} and block_domain {tuple(block_domain.shape)}; "
                         "init_router needs (N, T) token blocks, N > 0, and one domain per block (N,)")
    if block_domain.min() < 0 or block_domain.max() >= K:
        raise ValueError(f"got block domains {sorted(set(block_domain.tolist()))}; this MoE holds K = {K} domains, "
                         "so each must be in [0, K); number the domains as the students are ordered")


def routing_accuracy(moe, public: torch.Tensor, block_domain: torch.Tensor, batch_size: int = 16) -> dict:
    """Per MoE layer, the share of public tokens whose top-1 expert is one of their block's domain's; chance is
    the largest domain's share of the tokens (always answering that domain); empty_domains have no block."""
    _check_public(moe, public, block_domain)
    stats = _router_stats(moe, public, block_domain, batch_size)
    tokens = public.numel()
    layers = {i: s["hits"] / tokens for (i, _), s in zip(_routers(moe), stats)}
    per_domain = torch.bincount(block_domain, minlength=num_domains(moe))  # (K,)
    return {"routing_accuracy": sum(layers.values()) / len(layers), "layers": layers,
            "chance": float(per_domain.max()) / len(block_domain),
            "empty_domains": [i for i, n in enumerate(per_domain.tolist()) if n == 0]}


def _domain_rows(s: dict) -> torch.Tensor:
    """Linear discriminant rows S^-1 (c_i - mean_c), S the within-domain covariance shrunk toward its mean
    variance, scaled to ROUTER_MARGIN (docstring). A domain without public blocks gets a zero row: the other
    rows sum to zero, so its logit is their mean and never the top one; tuning may still raise it."""
    present = s["counts"] > 0  # (K,)
    out = torch.zeros(len(present), s["sums"].shape[1], dtype=s["sums"].dtype, device=s["sums"].device)  # (K, d)
    n = s["counts"][present]  # (K',)
    c = s["sums"][present] / n[:, None]  # (K', d) domain centroids
    within = s["outer"] / n.sum() - (n[:, None, None] * c[:, :, None] * c[:, None, :]).sum(0) / n.sum()  # (d, d)
    eye = torch.eye(len(within), dtype=within.dtype, device=within.device)
    within = (1 - SHRINK) * within + SHRINK * (within.diagonal().mean() + 1e-12) * eye
    rows = torch.linalg.solve(within, (c - c.mean(0)).T).T  # (K, d)
    logits = c @ rows.T  # (K, K): domain j's row on domain i's centroid
    K = len(c)
    margin = (logits.diagonal() - (logits.sum(1) - logits.diagonal()) / max(K - 1, 1)).mean()
    if margin > 0:  # else one domain, or identical centroids: stay neutral
        out[present] = rows * (ROUTER_MARGIN / margin)
    return out


def init_router(moe, public: torch.Tensor, block_domain: torch.Tensor, batch_size: int = 16) -> dict:
    """Router rows from the domains (docstring), layer by layer; returns routing_accuracy's report."""
    _check_public(moe, public, block_domain)
    g = experts_per_ffn(moe)
    for slot, (_, gate) in enumerate(_routers(moe)):
        # Layers before this one are already set, so this pass sees the inputs this router will get.
        rows = _domain_rows(_router_stats(moe, public, block_domain, batch_size, layers=slot + 1)[slot])
        _set_domain_rows(gate, rows.to(gate.weight.dtype), g)
    return routing_accuracy(moe, public, block_domain, batch_size)


def random_router(moe, generator: torch.Generator, std: float | None = None) -> None:
    """The ablation: one N(0, std^2) row per domain (std: the model's initializer_range), repeated g times."""
    std = moe.config.initializer_range if std is None else std
    K, g = num_domains(moe), experts_per_ffn(moe)
    for _, gate in _routers(moe):
        rows = torch.randn(K, gate.weight.shape[1], generator=generator) * std  # (K, d)
        _set_domain_rows(gate, rows.to(gate.weight.device), g)


def expert_parameter_names(moe) -> set[str]:
    """The FFN weights tuning freezes: routed experts, shared experts and the leading dense layers' FFNs (all
    hold the students' knowledge). Routers, Qwen's shared_expert_gate, attention, norms, embeddings and
    lm_head stay trainable."""
    _config(moe)
    return {name for name, _ in moe.named_parameters()
            if ".mlp." in name and ".mlp.gate." not in name and ".shared_expert_gate." not in name}
