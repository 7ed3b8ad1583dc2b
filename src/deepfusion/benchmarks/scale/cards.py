"""What the scale projection covers, and its models: the shipped config.json -> a real transformers class, built
on PyTorch's meta device (real shapes and dtypes, no storage), and its parameters counted by role.

The paper's global MoEs (Qwen1.5-MoE-A2.7B, DeepSeek-MoE-16B) and three on-device LLMs, each a config.json in
configs/scale (sources in its README) checked against the figures its model card publishes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from deepfusion.config import KNOWLEDGE_METHODS, default_config_path

DEVICE_COUNTS = (10, 100, 1_000, 10_000)  # federation sizes for the server's traffic per round
BUDGETS_GIB = (8, 16, 24, 32, 48, 80)  # device memory: phones and laptops (8-24 GiB) up to one data-centre GPU
WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # our runs ship fp32; bf16 halves weight traffic
KD_METHODS = KNOWLEDGE_METHODS  # same wire cost: no weights travel, only knowledge


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
    # the paper's own device LLMs (benchmarks/paper_scale.py)
    "GPT2LMHeadModel": (GPT2LMHeadModel, GPT2Config),
    "OlmoForCausalLM": (OlmoForCausalLM, OlmoConfig),
    "BloomForCausalLM": (BloomForCausalLM, BloomConfig),
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

