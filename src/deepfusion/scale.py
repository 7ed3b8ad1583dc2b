"""Scale projection: what each method costs a device and the server, at the paper's model sizes.

The paper's global MoEs (Qwen1.5-MoE-A2.7B, DeepSeek-MoE-16B) cannot train on this machine, but their
arithmetic can be measured. Their config.json files (configs/scale/, sources in its README) build the
real `transformers` classes on PyTorch's `meta` device: every tensor has its real shape and dtype and no
storage, so a 16-billion-parameter model "trains" one step in about a second on any CPU. From that:

  - parameters by role: routed experts vs everything else (embeddings, attention, norms, routers, shared
    experts, dense layers, lm_head), counted from the built modules;
  - the training peak of one device step: weights, gradients and AdamW state as the optimiser creates them,
    plus the activations autograd keeps for backward (measured with saved_tensors_hooks);
  - bytes on the wire: safetensors size of the weights a method ships, the real `Instruction` JSON, and a
    real `KnowledgePacket` of the multi-round federation's proxy set (configs/multiround.toml);
  - per method, bytes per device per round and device memory, and the server's traffic for N devices.

    python -m deepfusion.scale --out benchmarks/scale

Read top to bottom:
  1. the models: shipped config.json -> a real transformers class, built on meta
  2. parameters by role
  3. the training peak of one device step
  4. bytes on the wire
  5. rows per method, N-device totals, the output files
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
import transformers.integrations.moe as hf_moe
from transformers import (
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from deepfusion.config import FederationConfig, default_config_path, load_config
from deepfusion.device import Instruction, lm_loss
from deepfusion.knowledge import encode_knowledge

DEVICE_COUNTS = (10, 100, 1_000, 10_000)  # federation sizes for the server's traffic per round
BUDGETS_GIB = (8, 16, 24, 32, 48, 80)  # device memory: phones and laptops (8-24 GiB) up to one data-centre GPU
WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # our runs ship fp32; bf16 halves weight traffic
KD_METHODS = ("multiround-views", "device-kd", "plain-fkd")  # same wire cost: no weights travel, only knowledge


@dataclass(frozen=True)
class Card:
    """A shipped config and the figures its model card publishes, to check the built model against."""

    name: str  # file stem in configs/scale
    title: str
    published_total: float  # parameters, as published
    published_activated: float | None  # MoE only: parameters one token passes through
    source: str  # where the published figures are stated


GLOBAL_MODELS = (
    Card("qwen1.5-moe-a2.7b", "Qwen1.5-MoE-A2.7B", 14.3e9, 2.7e9,
         "model card huggingface.co/Qwen/Qwen1.5-MoE-A2.7B: 14.3B total, 2.7B activated"),
    Card("deepseek-moe-16b-base", "DeepSeek-MoE-16B", 16.4e9, 2.8e9,
         "github.com/deepseek-ai/DeepSeek-MoE README: 16.4B; DeepSeekMoE paper (arXiv 2401.06066): 2.8B activated"),
)
DEVICE_MODELS = (
    Card("qwen2-0.5b", "Qwen2-0.5B", 0.49e9, None, "Qwen2 model card: 0.49B"),
    Card("llama-3.2-1b-instruct", "Llama-3.2-1B-Instruct", 1.23e9, None, "Llama 3.2 model card: 1.23B"),
    Card("qwen2.5-1.5b-instruct", "Qwen2.5-1.5B-Instruct", 1.54e9, None, "Qwen2.5-1.5B-Instruct model card: 1.54B"),
)


# -----------------------------------------------------------------------------
# 1. The models: shipped config.json -> a real transformers class, built on meta


def scale_config_dir() -> Path:
    """configs/scale in a checkout, found the way the federation configs are."""
    return default_config_path("multiround").parent / "scale"


def read_config(name: str) -> dict:
    path = scale_config_dir() / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"scale config {name!r}: {path} not found; the projection builds models only from the "
                                f"config.json files shipped in configs/scale (see its README)")
    return json.loads(path.read_text(encoding="utf-8"))


def deepseek_moe_as_glm4_moe(raw: dict) -> Glm4MoeConfig:
    """DeepSeek-MoE-16B's own class is remote code, so we build it with the closest class transformers ships.

    DeepSeek-MoE-16B is plain multi-head attention, a dense first layer, then fine-grained routed experts plus
    shared experts (one MLP of n_shared * moe_intermediate). transformers' DeepseekV2/V3 classes can only
    build MLA attention; Glm4MoeForCausalLM builds exactly this layout, module for module (q/k/v/o without
    bias, first_k_dense_replace, n_shared_experts, moe_intermediate_size), so the parameter shapes are the
    model card's. What differs is routing arithmetic only: GLM scores experts with a sigmoid (plus a
    persistent 64-float bias buffer per layer, not a parameter), DeepSeek-MoE with a softmax. That changes
    no shape and no parameter count; what autograd saves differs by a few (tokens x E) router tensors.
    """
    if raw.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"deepseek config: moe_layer_freq = {raw['moe_layer_freq']}; Glm4MoeForCausalLM puts an MoE "
                         "block in every layer after first_k_dense_replace, so only moe_layer_freq = 1 maps exactly")
    return Glm4MoeConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_key_value_heads"], attention_bias=raw["attention_bias"], use_qk_norm=False,
        moe_intermediate_size=raw["moe_intermediate_size"], n_routed_experts=raw["n_routed_experts"],
        n_shared_experts=raw["n_shared_experts"], num_experts_per_tok=raw["num_experts_per_tok"],
        first_k_dense_replace=raw["first_k_dense_replace"], norm_topk_prob=raw["norm_topk_prob"],
        n_group=1, topk_group=1, routed_scaling_factor=1.0, rms_norm_eps=raw["rms_norm_eps"],
        max_position_embeddings=raw["max_position_embeddings"], tie_word_embeddings=raw["tie_word_embeddings"],
        # DeepSeek-MoE rotates the whole head; GLM's default rotates half (no effect on shapes, set for fidelity)
        rope_parameters={"rope_type": "default", "rope_theta": float(raw["rope_theta"]), "partial_rotary_factor": 1.0},
    )


_CLASSES = {  # config.json "architectures"[0] -> the transformers class that builds it, and its config class
    "Qwen2MoeForCausalLM": (Qwen2MoeForCausalLM, Qwen2MoeConfig),
    "Qwen2ForCausalLM": (Qwen2ForCausalLM, Qwen2Config),
    "LlamaForCausalLM": (LlamaForCausalLM, LlamaConfig),
}


def transformers_config(raw: dict, vocab_size: int | None = None) -> tuple[type[PreTrainedModel], PreTrainedConfig]:
    """The class and config a shipped config.json builds; vocab_size overrides the card's (the federation's)."""
    if vocab_size:  # the card's special-token ids belong to its own tokenizer, not the federation's
        raw = raw | {"vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    arch = (raw.get("architectures") or ["<none>"])[0]
    if arch == "DeepseekForCausalLM":
        return Glm4MoeForCausalLM, deepseek_moe_as_glm4_moe(raw)
    if arch not in _CLASSES:
        raise ValueError(f"scale config: architecture {arch!r} has no mapping; known: "
                         f"{', '.join([*_CLASSES, 'DeepseekForCausalLM'])}. Add its transformers class to _CLASSES")
    cls, config_cls = _CLASSES[arch]
    return cls, config_cls.from_dict(raw)


def build_on_meta(cls: type[PreTrainedModel], config: PreTrainedConfig) -> PreTrainedModel:
    """The real class with every tensor on the meta device: real shapes and dtypes, no storage."""
    if "Moe" in cls.__name__:
        config._experts_implementation = "grouped_mm"  # qwen_moe's default kernel (models.DEFAULT_EXPERTS_IMPL)
    with torch.device("meta"):
        return cls(config).train()


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Fused SDPA (the kernel CPU and CUDA runs use): saves q, k, v, out and the log-sum-exp for backward.

    query (B, H, T, D), key/value (B, H_kv, T, D); the kernel handles H_kv < H itself, as with enable_gqa.
    """
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def meta_kernels():
    """Route two kernels on meta to the ones a real device runs, so autograd saves the same tensors.

    - SDPA: on meta, PyTorch dispatches to the unfused math path, which saves the (B, H, T, T) attention
      matrix; real runs use a fused kernel. We call the fused CPU kernel, whose meta function exists.
    - grouped_mm: PyTorch's meta shape check for grouped_mm demands bf16 (a CUDA rule) although the CPU
      kernel runs fp32; we take transformers' own fallback op, which saves the same (input, weight) pair.
    Checked in tests/test_scale.py: on tiny models, meta and a real CPU step save the same bytes.
    """
    functional = torch.nn.functional
    saved = functional.scaled_dot_product_attention, hf_moe._can_use_grouped_mm
    functional.scaled_dot_product_attention = _fused_attention
    hf_moe._can_use_grouped_mm = lambda *args: False
    try:
        yield
    finally:
        functional.scaled_dot_product_attention, hf_moe._can_use_grouped_mm = saved


# -----------------------------------------------------------------------------
# 2. Parameters by role


@dataclass(frozen=True)
class Census:
    """A built model's trainable parameters by role. Routed experts are what expert-subset devices choose among."""

    shapes: dict[str, tuple[int, ...]]  # every trainable tensor: name -> shape
    expert_names: frozenset[str]  # the routed-expert tensors, each (E, ...) with one slice per expert
    num_experts: int  # E routed experts per MoE layer (0: dense model)
    top_k: int  # routed experts per token
    moe_layers: int

    @property
    def total(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def routed_expert(self) -> int:
        return sum(math.prod(self.shapes[n]) for n in self.expert_names)

    @property
    def non_expert(self) -> int:
        """Embeddings, attention, norms, routers, shared experts, dense layers, lm_head."""
        return self.total - self.routed_expert

    @property
    def per_expert(self) -> int:
        """One routed expert in every MoE layer: what hosting one more expert per layer costs."""
        return self.routed_expert // self.num_experts if self.num_experts else 0

    @property
    def activated(self) -> int:
        """Parameters one token passes through: everything but the experts it is not routed to."""
        return self.non_expert + self.top_k * self.per_expert

    def hosted_shapes(self, m: int) -> dict[str, tuple[int, ...]]:
        """The tensors an expert-subset device holds: everything, with each routed-expert tensor cut to m experts."""
        return {n: ((m, *s[1:]) if n in self.expert_names else s) for n, s in self.shapes.items()}


def census(model: PreTrainedModel) -> Census:
    # transformers 5 stores a layer's routed experts as 3-D tensors (E, out, in) in a module named *Experts
    # (Qwen2MoeExperts, Glm4MoeExperts); shared experts are plain MLPs and count as non-expert.
    experts = [(name, mod) for name, mod in model.named_modules() if type(mod).__name__.endswith("Experts")]
    expert_names = frozenset(f"{name}.{p}" for name, mod in experts for p, _ in mod.named_parameters())
    num_experts = experts[0][1].num_experts if experts else 0
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if any(shapes[n][0] != num_experts for n in expert_names):
        raise ValueError(f"routed-expert tensors must all be (E={num_experts}, ...); got "
                         f"{sorted({shapes[n][0] for n in expert_names})} as first dims: the class layout changed")
    return Census(shapes, expert_names, num_experts, getattr(model.config, "num_experts_per_tok", 0), len(experts))


# -----------------------------------------------------------------------------
# 3. The training peak of one device step


@dataclass(frozen=True)
class StepMemory:
    """Bytes one AdamW training step holds at its peak, estimated as the sum of what is alive together."""

    params: int
    weights: int
    gradients: int
    optimizer: int  # AdamW's exp_avg and exp_avg_sq (and its step counters)
    activations: int  # tensors saved for backward at the end of forward, plus the logits

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def resident_per_param_bytes(self) -> float:
        """Weights + gradients + optimiser state per parameter (16 for fp32 AdamW)."""
        return (self.weights + self.gradients + self.optimizer) / self.params


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (views of one storage count once)."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def step_memory(model: PreTrainedModel, batch: int, seq_len: int) -> StepMemory:
    """One real training step (device.lm_loss, backward, AdamW), measured as device.measure_train_peak defines a
    device's peak: resident state + gradients + activations saved for backward (+ the logits). The model is
    normally on meta; a real (tiny) model works too, which is how the tests check the meta measurement.

    Activations are the tensors autograd still holds at the end of forward (a weak reference each: a saved
    tensor whose graph branch cannot reach the loss, e.g. the router's top-k scores, is freed at once and not
    counted), deduplicated by storage, weights excluded. An estimate, not an allocator trace: transients (the
    loss's vocabulary-sized temporaries, backward scratch) are left out, and activations are counted as alive
    while every gradient exists, which over-counts (backward frees activations as gradients appear).
    """
    params = list(model.parameters())
    weights = {p.untyped_storage()._cdata for p in params}
    kernels = meta_kernels if params[0].is_meta else contextlib.nullcontext  # a real model runs its own kernels
    saved: list[weakref.ref] = []
    logits: list[int] = []  # bytes of the lm_head output, alive with the saved tensors while the loss is taken
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: logits.append(out.untyped_storage().nbytes()))
    blocks = torch.zeros(batch, seq_len, dtype=torch.long, device=params[0].device)  # (B, T) token ids
    with kernels(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(weakref.ref(t)) or t, lambda t: t):
        loss = lm_loss(model, blocks)
    hook.remove()
    alive = [t for t in (ref() for ref in saved) if t is not None and t.untyped_storage()._cdata not in weights]
    activations = _storage_bytes(alive) + sum(logits)
    with kernels():
        loss.backward()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    optimizer.step()  # creates exp_avg, exp_avg_sq and step for every parameter, as on a device
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return StepMemory(sum(p.numel() for p in params), _storage_bytes(params), _storage_bytes(p.grad for p in params),
                      _storage_bytes(state), activations)


# -----------------------------------------------------------------------------
# 4. Bytes on the wire


_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def safetensors_bytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """len(safetensors.torch.save(tensors)) for tensors of these shapes and one dtype, without their data.

    The format is an 8-byte header length, a JSON header (tensors sorted by name, each with dtype, shape and
    byte offsets, padded with spaces to 8 bytes) and the raw data. Checked byte for byte against the library
    on a real model in tests/test_scale.py.
    """
    header, offset = {}, 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    return 8 + len(text) + (-len(text) % 8) + offset


def instruction_bytes(cfg: FederationConfig) -> int:
    """The server's round message, built as engines/local.py builds it for the first device of cfg."""
    dc = cfg.devices[0]
    down = Instruction(round=cfg.rounds, proxy_indices=list(range(cfg.data.proxy_blocks)), local_steps=dc.local_steps,
                       batch_size=dc.batch_size, lr=dc.lr, topk=cfg.server.topk, temperature=cfg.server.temperature)
    return len(down.to_bytes())


def knowledge_packet(n_positions: int, k: int, vocab_size: int, temperature: float = 1.0, sample: int = 64, seed: int = 0):
    """A real KnowledgePacket of n_positions, encoded by encode_knowledge from random logits of the real vocab.

    A full proxy set's logits (65,024 x 151,936 floats = 40 GB) do not fit, and a packet's size depends on its
    shapes, not its values: we encode `sample` positions and repeat their rows to n_positions.
    """
    logits = torch.randn(sample, vocab_size, generator=torch.Generator().manual_seed(seed))  # (sample, V)
    part = encode_knowledge(logits, k, temperature, device_id="device-00001", round=1, arch="qwen2/base",
                            tokens_trained=61_440, local_loss=2.0)
    rows = np.arange(n_positions) % sample  # (N,) which sampled row each position repeats
    return dataclasses.replace(part, ids=part.ids[rows], probs=part.probs[rows], tail=part.tail[rows])


def packet_bytes(n_positions: int, k: int, vocab_size: int) -> int:
    return len(knowledge_packet(n_positions, k, vocab_size).to_bytes())


# -----------------------------------------------------------------------------
# 5. Rows per method, N-device totals, the output files


@dataclass(frozen=True)
class Measured:
    """One shipped model built on meta and stepped once."""

    card: Card
    cls: str
    vocab_size: int  # the vocabulary it was built with (the federation's, for on-device LLMs)
    card_params: int  # parameters with the card's own vocabulary: what the published total describes
    census: Census
    memory: StepMemory


def measure(card: Card, batch: int, seq_len: int, vocab_size: int | None = None) -> Measured:
    raw = read_config(card.name)
    cls, config = transformers_config(raw, vocab_size)
    model = build_on_meta(cls, config)
    card_params = census(build_on_meta(*transformers_config(raw))).total if vocab_size else census(model).total
    return Measured(card, cls.__name__, config.vocab_size, card_params, census(model), step_memory(model, batch, seq_len))


def _row(global_model: str, method: str, variant: str, params: int, down: dict, up: dict, memory: int, how: str) -> dict:
    row = {"global_model": global_model, "method": method, "variant": variant, "device_params": params,
           "down_bytes": down["fp32"], "up_bytes": up["fp32"], "round_bytes": down["fp32"] + up["fp32"],
           "round_bytes_bf16": down["bf16"] + up["bf16"], "device_memory_bytes": memory}
    for n in DEVICE_COUNTS:  # the server sends every device its down message and receives every up message
        row[f"total_bytes_{n}"] = n * row["round_bytes"]
        row[f"total_bytes_bf16_{n}"] = n * row["round_bytes_bf16"]
    return row | {"how": how}


def method_rows(moe: Measured, devices: list[Measured], down_kd: int, up_kd: int) -> list[dict]:
    """fedavg-moe, expert-subset at a few m, and the knowledge-distillation methods, for one global MoE."""
    c, mem = moe.census, moe.memory
    weights = {w: safetensors_bytes(c.shapes, dt) for w, dt in WIRE_DTYPES.items()}
    rows = [_row(moe.card.title, "fedavg-moe", "full MoE", c.total, weights, weights, mem.total,
                 "safetensors of every parameter down and up; memory: one AdamW step of the MoE on meta")]
    for m in sorted({c.top_k, c.num_experts // 4, c.num_experts // 2}):
        hosted = {w: safetensors_bytes(c.hosted_shapes(m), dt) for w, dt in WIRE_DTYPES.items()}
        params = c.non_expert + m * c.per_expert
        memory = round(params * mem.resident_per_param_bytes) + mem.activations
        rows.append(_row(moe.card.title, "expert-subset", f"m={m} of {c.num_experts}", params, hosted, hosted, memory,
                         "safetensors of the hosted parameters down and up; memory: hosted parameters x the MoE "
                         "step's resident bytes per parameter + the MoE step's activations"))
    kd = {"fp32": down_kd, "bf16": down_kd}, {"fp32": up_kd, "bf16": up_kd}
    for dev in devices:
        for method in KD_METHODS:
            rows.append(_row(moe.card.title, method, dev.card.title, dev.census.total, *kd, dev.memory.total,
                             "Instruction JSON down, KnowledgePacket up; memory: one AdamW step of the on-device "
                             f"LLM on meta, with the federation's vocabulary ({dev.vocab_size})"))
    return rows


def budget_rows(moe: Measured, devices: list[Measured]) -> list[dict]:
    """For each device memory budget: the most experts per layer an expert-subset device can train, and which
    on-device LLMs fit. m below top_k does not fit: a token must reach top_k distinct experts."""
    c, mem = moe.census, moe.memory
    rows = []
    for gib in BUDGETS_GIB:
        spare = gib * 2**30 - mem.activations - c.non_expert * mem.resident_per_param_bytes
        m = min(c.num_experts, max(0, math.floor(spare / (c.per_expert * mem.resident_per_param_bytes))))
        rows.append({"global_model": moe.card.title, "budget_gib": gib, "expert_subset_m": m if m >= c.top_k else 0,
                     "kd_devices_that_fit": [d.card.title for d in devices if d.memory.total <= gib * 2**30]})
    return rows


def model_row(x: Measured) -> dict:
    c = x.census
    row = {"model": x.card.title, "config": f"configs/scale/{x.card.name}.json", "class": x.cls, "vocab_size": x.vocab_size,
           "params": c.total, "card_vocab_params": x.card_params, "published_params": x.card.published_total,
           "card_vs_published_pct": round(100 * (x.card_params / x.card.published_total - 1), 2),
           "routed_expert_params": c.routed_expert, "non_expert_params": c.non_expert, "experts": c.num_experts,
           "top_k": c.top_k, "moe_layers": c.moe_layers, "activated_params": c.activated if c.num_experts else c.total,
           "published_activated": x.card.published_activated, "published_source": x.card.source}
    return row | {f"step_{f.name}_bytes": getattr(x.memory, f.name) for f in dataclasses.fields(StepMemory)}


def project(out_dir: Path, config: Path | None = None, command: str | None = None) -> list[dict]:
    """Build every shipped model on meta, measure, and write out_dir/{scale.json, scale.csv, SCALE.md}."""
    cfg = load_config(config or default_config_path("multiround"))
    batch, seq_len, k = cfg.devices[0].batch_size, cfg.data.seq_len, cfg.server.topk
    positions = cfg.data.proxy_blocks * (seq_len - 1)  # P * (T - 1): every proxy position with a next token
    rows, budgets, models = [], [], []
    for card in GLOBAL_MODELS:
        moe = measure(card, batch, seq_len)
        # devices speak the federation's tokenizer (packets carry token ids), so they take the MoE's vocabulary
        devices = [measure(d, batch, seq_len, moe.vocab_size) for d in DEVICE_MODELS]
        rows += method_rows(moe, devices, instruction_bytes(cfg), packet_bytes(positions, k, moe.vocab_size))
        budgets += budget_rows(moe, devices)
        models += [model_row(moe)] + [model_row(d) for d in devices]
    settings = {"proxy_blocks": cfg.data.proxy_blocks, "seq_len": seq_len, "positions": positions, "topk": k,
                "device_batch": batch, "config": str(config or "configs/multiround.toml"),
                "command": command or f"python -m deepfusion.scale --out {out_dir}", "machine": machine(),
                "torch": torch.__version__, "transformers": transformers.__version__}
    write_outputs(Path(out_dir), settings, models, rows, budgets)
    return rows


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()}-core CPU, {gpu}"


def write_outputs(out: Path, settings: dict, models: list[dict], rows: list[dict], budgets: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"settings": settings, "models": models, "rows": rows, "expert_subset_budgets": budgets}
    (out / "scale.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    with open(out / "scale.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "SCALE.md").write_text(markdown(settings, models, rows, budgets), encoding="utf-8")


# ---- SCALE.md ---------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """Decimal units, as network traffic is counted: 1 MB = 10^6 bytes."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000


def human_gib(n: float) -> str:
    """Binary GiB, as device memory is sold."""
    return f"{n / 2**30:.1f} GiB"


def human_params(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _table(header: list[str], lines: list[list[str]]) -> str:
    rule = "|" + "|".join("---" for _ in header) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(line) + " |" for line in lines])


def _model_table(models: list[dict]) -> str:
    lines, seen = [], set()
    for m in models:  # an on-device LLM appears once per federation vocabulary
        if (m["model"], m["vocab_size"]) in seen:
            continue
        seen.add((m["model"], m["vocab_size"]))
        moe = bool(m["experts"])
        activated = f"{human_params(m['activated_params'])} (published {human_params(m['published_activated'] or 0)})"
        lines.append([m["model"], f"`{m['class']}`", f"{m['vocab_size']:,}", human_params(m["params"]),
                      human_params(m["card_vocab_params"]), human_params(m["published_params"]),
                      f"{m['card_vs_published_pct']:+.2f}%", human_params(m["routed_expert_params"]) if moe else "-",
                      human_params(m["non_expert_params"]) if moe else "-", activated if moe else "-"])
    return _table(["model", "class", "vocab (built)", "params (built)", "params (card's vocab)", "published", "diff",
                   "routed experts", "non-expert", "activated / token"], lines)


def _label(row: dict) -> str:
    return "multiround-views = device-kd = plain-fkd" if row["method"] in KD_METHODS else row["method"]


def _per_device_table(rows: list[dict]) -> str:
    lines = [[r["global_model"], _label(r), r["variant"], human_params(r["device_params"]), human_bytes(r["down_bytes"]),
              human_bytes(r["up_bytes"]), human_bytes(r["round_bytes"]), human_bytes(r["round_bytes_bf16"]),
              human_gib(r["device_memory_bytes"])]
             for r in rows if r["method"] not in KD_METHODS[1:]]  # the three KD methods share every number
    return _table(["global MoE", "method", "device hosts", "params on device", "down", "up", "round (fp32)",
                   "round (bf16)", "device memory to take part"], lines)


def _totals_table(rows: list[dict]) -> str:
    lines, kd_seen = [], set()
    for r in rows:  # KD bytes do not depend on the device's LLM: one line per global MoE
        if r["method"] in KD_METHODS and (r["global_model"] in kd_seen or not kd_seen.add(r["global_model"])):
            continue
        hosts = "any on-device LLM" if r["method"] in KD_METHODS else r["variant"]
        lines.append([r["global_model"], _label(r), hosts] + [human_bytes(r[f"total_bytes_{n}"]) for n in DEVICE_COUNTS])
    return _table(["global MoE", "method", "device hosts", *[f"N = {n:,}" for n in DEVICE_COUNTS]], lines)


def _budget_table(budgets: list[dict]) -> str:
    lines = [[b["global_model"], f"{b['budget_gib']} GiB", str(b["expert_subset_m"] or "does not fit"),
              ", ".join(b["kd_devices_that_fit"]) or "none"] for b in budgets]
    return _table(["global MoE", "budget", "expert-subset: m (experts per layer)",
                   "multiround-views: on-device LLMs that fit"], lines)


def _headline(rows: list[dict]) -> str:
    """One sentence per global MoE: bytes and memory of the three families of methods."""
    out = []
    for g in dict.fromkeys(r["global_model"] for r in rows):
        mine = [r for r in rows if r["global_model"] == g]
        fed = next(r for r in mine if r["method"] == "fedavg-moe")
        sub = min((r for r in mine if r["method"] == "expert-subset"), key=lambda r: r["device_params"])
        kd = [r for r in mine if r["method"] == KD_METHODS[0]]
        out.append(f"- **{g}**: per device per round, fedavg-moe moves {human_bytes(fed['round_bytes'])} and needs "
                   f"{human_gib(fed['device_memory_bytes'])}; expert-subset with the fewest experts ({sub['variant']}) "
                   f"{human_bytes(sub['round_bytes'])} and {human_gib(sub['device_memory_bytes'])}; multiround-views "
                   f"{human_bytes(kd[0]['round_bytes'])} ({100 * kd[0]['round_bytes'] / fed['round_bytes']:.4f}% of "
                   f"fedavg-moe) and {human_gib(min(r['device_memory_bytes'] for r in kd))} to "
                   f"{human_gib(max(r['device_memory_bytes'] for r in kd))}, the on-device LLM's training step.")
    return "\n".join(out)


def markdown(settings: dict, models: list[dict], rows: list[dict], budgets: list[dict]) -> str:
    s = settings
    kd = next(r for r in rows if r["method"] == KD_METHODS[0])
    return f"""# Scale projection: the paper's global MoEs, measured on the meta device

Command: `{s['command']}`
Machine: {s['machine']}. Models are built on PyTorch's `meta` device (real shapes, no storage), so no number
below depends on the machine. torch {s['torch']}, transformers {s['transformers']}.
Federation: `{s['config']}`: proxy set {s['proxy_blocks']} blocks x {s['seq_len']} tokens = {s['positions']:,} positions
with a next token, top-k {s['topk']}; a device's training step is one batch of {s['device_batch']} x {s['seq_len']} tokens.
Bytes in decimal units (1 MB = 10^6 B), device memory in GiB (2^30 B).

{_headline(rows)}

## Models (built from configs/scale/*.json by the real transformers classes)

{_model_table(models)}

On-device LLMs are built with the federation's vocabulary (the global MoE's): packets carry token ids, so every
device speaks the federation's tokenizer. "params (card's vocab)" is the same class built with the card's own
vocabulary, which is what the published figure and the diff describe. DeepSeek-MoE-16B is built by
`Glm4MoeForCausalLM` (configs/scale/README.md says why): the same modules and shapes; its router scores experts
with a sigmoid where DeepSeek-MoE uses a softmax, which changes no count and no byte.

## Per device per round

{_per_device_table(rows)}

## The server's traffic per round: N x (down + up), fp32 weights (bf16 halves the weight methods: scale.json)

{_totals_table(rows)}

## What fits a device memory budget

{_budget_table(budgets)}

An expert-subset device must hold every non-routed-expert parameter plus at least top-k experts per MoE layer
(a token is routed to top-k distinct experts), and train them with AdamW.

## How each number was obtained

- **Parameters**: summed over `named_parameters()` of the real class built on meta from the shipped config.json.
  Routed experts are the 3-D tensors of each `*Experts` module (one slice per expert); everything else
  (embeddings, attention, norms, routers, shared experts, dense layers, lm_head) is non-expert.
  Activated = non-expert + top-k x (one expert in every MoE layer).
- **Weights on the wire** (`fedavg-moe`, `expert-subset`): the exact size of `safetensors.torch.save` of the
  trainable tensors (header + data), computed from names and shapes and checked byte for byte against the library
  on a real model (tests/test_scale.py). fp32 as our runs ship, and bf16. Expert-subset hosts every
  non-routed-expert tensor plus m routed experts per MoE layer, and ships exactly those, both ways.
- **Instruction** ({human_bytes(kd['down_bytes'])} down, KD methods): `len(device.Instruction(...).to_bytes())`, built as
  `engines/local.py` builds it for the multi-round federation (it lists the {s['proxy_blocks']} proxy block indices).
- **KnowledgePacket** ({human_bytes(kd['up_bytes'])} up, KD methods): `len(packet.to_bytes())` of a real packet of
  {s['positions']:,} positions made by `knowledge.encode_knowledge` from random logits of the MoE's vocabulary (64
  positions encoded, their rows repeated: the size depends on shapes, not values). Per position: k ids in the
  narrowest unsigned int for the vocabulary (uint32 here: both vocabularies exceed 65,536), k fp16 probabilities, one
  fp16 tail: 50 bytes; the rest is the safetensors header.
- **Device memory to take part**: one training step of what the device trains, run on meta: `device.lm_loss`
  forward, backward, `torch.optim.AdamW.step()`. Weights + gradients + AdamW state as allocated (16 bytes per
  parameter in fp32), plus activations: the tensors autograd still holds for backward at the end of forward
  (saved_tensors_hooks, deduplicated by storage, weights excluded) plus the logits. Attention is measured with the
  fused SDPA kernel real runs use; on tiny models the meta measurement equals a real CPU step's (tests/test_scale.py).
  Expert-subset: hosted parameters x the MoE step's 16 bytes per parameter + the MoE step's activations (the device
  keeps the full router, and a token still goes through top-k experts).
- **Totals**: N x (down + up) per round, the bytes through the server.

## Known approximations

- The peak is a sum of what is alive together, not an allocator trace: it leaves out transients (the loss's
  vocabulary-sized temporaries, backward scratch, allocator fragmentation, a CUDA context) and counts activations as
  alive while all gradients exist (backward frees them as it goes). fp32 throughout; bf16 autocast on a GPU would
  roughly halve the activations, not the 16 bytes per parameter of fp32 AdamW.
- One batch of {s['device_batch']} x {s['seq_len']} tokens: activations grow linearly with tokens, the rest does not.
- DeepSeek-MoE-16B is built by `Glm4MoeForCausalLM`: identical shapes, different router scoring (no effect on counts
  or bytes). Qwen1.5-MoE-A2.7B and the on-device LLMs are built by their own classes.
- Weight bytes are the tensors' safetensors blob without string metadata: a transport's own metadata (device, round,
  the hosted-expert list) adds well under a kilobyte to a multi-gigabyte message.
- Expert-subset as defined for the projection: the device hosts every non-routed-expert tensor, full routers
  included, and ships exactly those. A runnable variant may cut the router to the m hosted rows, send the full router
  rows down for usage counting and counts (E per layer) up: (E - m) x hidden per layer either way, under 0.1% of the
  bytes. Its memory takes the full MoE step's activations (the expert computation per token is the same top-k).
- Every step uses the plain next-token loss (`device.lm_loss`); an MoE's router load-balancing term adds
  (tokens x E) floats per layer, a fraction of a percent of the activations.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for scale.json, scale.csv, SCALE.md")
    parser.add_argument("--config", default=None, help="federation TOML whose proxy set and device batch to use "
                                                       "(default: configs/multiround.toml)")
    args = parser.parse_args(argv)
    command = "python -m deepfusion.scale --out " + args.out + (f" --config {args.config}" if args.config else "")
    rows = project(Path(args.out), Path(args.config) if args.config else None, command)
    print(f"wrote {len(rows)} rows to {args.out}/scale.json, scale.csv, SCALE.md")


if __name__ == "__main__":
    main()
