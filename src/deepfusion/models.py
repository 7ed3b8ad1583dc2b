"""Model presets over real `transformers` classes: the global MoE families and the on-device dense LLMs.

Every preset is a literal function with every number written out (torchtune's builders), so a reader
sees exactly what "small" means. Nothing here reaches a model hub: models are built from config or
loaded from a local directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BloomConfig,
    BloomForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    MistralConfig,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
)

from deepfusion.errors import ConfigError, DeviceUnavailable

# Measured on the 2-core CPU (benchmarks/experts.md, `deepfusion bench experts`): batched_mm was
# 17-27x slower than the other two; grouped_mm and eager were within noise, grouped_mm ahead in 3 of 4 pairs.
# But DeepseekV2's grouped_mm backward is not deterministic on more than one CPU thread (the same step twice
# gives different gradients; qwen_moe's does not, nor does eager): deepseek_moe takes eager, so a seed
# reproduces its run (tests/test_models.py checks both families).
DEFAULT_EXPERTS_IMPL = {"qwen_moe": "grouped_mm", "deepseek_moe": "eager"}


# ---- global MoE presets -------------------------------------------------------------------------

def qwen_moe_tiny(vocab_size: int) -> Qwen2MoeConfig:
    """Tests only: 2 layers, 4 routed experts (top-2) + a shared expert."""
    return Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=64,
        shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512, router_aux_loss_coef=0.01, tie_word_embeddings=False,
    )


def qwen_moe_small(vocab_size: int) -> Qwen2MoeConfig:
    """The default run's global model: 4 layers, 8 routed experts (top-2) + a shared expert."""
    return Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=384, moe_intermediate_size=192,
        shared_expert_intermediate_size=384, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512, router_aux_loss_coef=0.01, tie_word_embeddings=False,
    )


def deepseek_moe_tiny(vocab_size: int) -> DeepseekV3Config:
    """Tests only: DeepSeek-MoE layout (first layer dense, then fine-grained routed + shared experts)."""
    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=64,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
    )


def deepseek_moe_small(vocab_size: int) -> DeepseekV3Config:
    """DeepSeek-MoE at CPU scale: 4 layers (1 dense), 16 fine-grained experts (top-4) + 2 shared."""
    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=6, intermediate_size=384, moe_intermediate_size=96,
        n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, first_k_dense_replace=1,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
    )


MOE_PRESETS: dict[str, dict[str, Callable[[int], PreTrainedConfig]]] = {
    "qwen_moe": {"tiny": qwen_moe_tiny, "small": qwen_moe_small},
    "deepseek_moe": {"tiny": deepseek_moe_tiny, "small": deepseek_moe_small},
}
_MOE_CLASSES = {"qwen_moe": Qwen2MoeForCausalLM, "deepseek_moe": DeepseekV3ForCausalLM}


# ---- on-device dense presets --------------------------------------------------------------------

def qwen2_tiny(vocab_size: int) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512,
                       tie_word_embeddings=True)


def qwen2_small(vocab_size: int) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=384, max_position_embeddings=512,
                       tie_word_embeddings=True)


def qwen2_base(vocab_size: int) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab_size, hidden_size=192, num_hidden_layers=3, num_attention_heads=6,
                       num_key_value_heads=2, intermediate_size=512, max_position_embeddings=512,
                       tie_word_embeddings=True)


def llama_tiny(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


def llama_small(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=256, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


def llama_base(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                       num_key_value_heads=6, intermediate_size=512, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


def llama_tinyllama(vocab_size: int) -> LlamaConfig:
    """TinyLlama's layout at CPU scale: deep and narrow, grouped-query attention (4 query heads per kv head),
    FFN 2.75x the width (TinyLlama-1.1B: 22 layers of 2048, 32/4 heads, FFN 5632)."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=6, num_attention_heads=8,
                       num_key_value_heads=2, intermediate_size=352, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


# GPT-2 (learned positions, LayerNorm, GELU MLP 4x): GPT-2 is 12 x 768, GPT-2 Medium 24 x 1024.
def gpt2_tiny(vocab_size: int) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=32, n_layer=1, n_head=2,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


def gpt2_small(vocab_size: int) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=128, n_layer=4, n_head=4,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


def gpt2_medium(vocab_size: int) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=192, n_layer=6, n_head=6,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


# OLMo (non-parametric LayerNorm, SwiGLU 4x, rotary): OLMo-1B is 16 x 2048, 16 heads, FFN 8192.
def olmo_tiny(vocab_size: int) -> OlmoConfig:
    return OlmoConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def olmo_small(vocab_size: int) -> OlmoConfig:
    return OlmoConfig(vocab_size=vocab_size, hidden_size=160, num_hidden_layers=5, num_attention_heads=5,
                      num_key_value_heads=5, intermediate_size=640, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=None, bos_token_id=None, eos_token_id=None)


# BLOOM (ALiBi positions, LayerNorm, GELU MLP 4x, embedding LayerNorm): BLOOM-1.1B is 24 x 1536, 16 heads.
def bloom_tiny(vocab_size: int) -> BloomConfig:
    return BloomConfig(vocab_size=vocab_size, hidden_size=32, n_layer=1, n_head=2, tie_word_embeddings=True,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def bloom_small(vocab_size: int) -> BloomConfig:
    return BloomConfig(vocab_size=vocab_size, hidden_size=144, n_layer=6, n_head=8, tie_word_embeddings=True,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


DEVICE_PRESETS: dict[str, dict[str, Callable[[int], PreTrainedConfig]]] = {
    "qwen2": {"tiny": qwen2_tiny, "small": qwen2_small, "base": qwen2_base},
    "llama": {"tiny": llama_tiny, "small": llama_small, "tinyllama": llama_tinyllama, "base": llama_base},
    "gpt2": {"tiny": gpt2_tiny, "small": gpt2_small, "medium": gpt2_medium},
    "olmo": {"tiny": olmo_tiny, "small": olmo_small},
    "bloom": {"tiny": bloom_tiny, "small": bloom_small},
}
_DEVICE_CLASSES = {"qwen2": Qwen2ForCausalLM, "llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel,
                   "olmo": OlmoForCausalLM, "bloom": BloomForCausalLM}


# ---- the MoE's dense base model -----------------------------------------------------------------
# The dense LLM the global MoE is upcycled from (paper Fig. 1, Phase II's student): the MoE's embeddings,
# attention, norms and output, with one dense FFN of width F = intermediate_size per layer. Its FFN splits
# into F / moe_intermediate_size fine-grained experts (upcycling.py).

def _same_attention(moe: PreTrainedConfig, **changes) -> dict:
    """The MoE's non-FFN settings, as keyword arguments of a dense config of a sibling class."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings", "attention_bias",
            "attention_dropout", "sliding_window", "use_sliding_window", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id")
    kwargs = {k: getattr(moe, k) for k in keys if hasattr(moe, k)}
    kwargs["rope_parameters"] = dict(moe.rope_parameters)
    return {**kwargs, **changes}


def _same_class(moe: PreTrainedConfig, **changes) -> PreTrainedConfig:
    """The MoE's own class with `changes`: for classes whose attention has no separate dense class."""
    dense = type(moe).from_dict(moe.to_dict())
    for key, value in changes.items():
        setattr(dense, key, value)
    return dense


def _qwen2_dense(moe: PreTrainedConfig) -> Qwen2Config:
    # written out (not _same_attention): the config is part of the cached public checkpoints' key
    return Qwen2Config(
        vocab_size=moe.vocab_size, hidden_size=moe.hidden_size, num_hidden_layers=moe.num_hidden_layers,
        num_attention_heads=moe.num_attention_heads, num_key_value_heads=moe.num_key_value_heads,
        intermediate_size=moe.intermediate_size, hidden_act=moe.hidden_act, rms_norm_eps=moe.rms_norm_eps,
        max_position_embeddings=moe.max_position_embeddings, rope_parameters=dict(moe.rope_parameters),
        tie_word_embeddings=moe.tie_word_embeddings, bos_token_id=moe.bos_token_id, eos_token_id=moe.eos_token_id)


@dataclass(frozen=True)
class MoeLayout:
    """What Phase III needs to know of a transformers MoE class beyond the layout every supported class shares
    (transformers >= 5: mlp.gate.weight (E, d) routes to mlp.experts.gate_up_proj (E, 2f, d) and down_proj
    (E, d, f)). transformers exposes no generic accessor for these, hence this one table keyed by model_type."""

    cls: str  # the CausalLM class's name, for messages
    experts: str  # config attribute: routed experts per MoE layer
    expert_width: str  # config attribute: one routed expert's FFN width f
    dense_width: str | None  # config attribute: the dense FFN width F (None: an expert is a whole FFN, g = 1)
    shared: str | None  # the shared expert's module inside mlp (None: the class has none)
    dense: Callable[[PreTrainedConfig], PreTrainedConfig]  # the dense base's config


MOE_LAYOUTS: dict[str, MoeLayout] = {
    # Qwen1.5-MoE was upcycled from the dense Qwen-1.8B: its dense base is a Qwen2 model.
    "qwen2_moe": MoeLayout("Qwen2MoeForCausalLM", "num_experts", "moe_intermediate_size", "intermediate_size",
                           "shared_expert", lambda m: _qwen2_dense(m)),
    "qwen3_moe": MoeLayout("Qwen3MoeForCausalLM", "num_experts", "moe_intermediate_size", "intermediate_size",
                           None, lambda m: Qwen3Config(**_same_attention(m, intermediate_size=m.intermediate_size))),
    # DeepSeek's attention (MLA) has no dense class: the same class with every layer dense.
    "deepseek_v2": MoeLayout("DeepseekV2ForCausalLM", "n_routed_experts", "moe_intermediate_size",
                             "intermediate_size", "shared_experts",
                             lambda m: _same_class(m, first_k_dense_replace=m.num_hidden_layers)),
    "deepseek_v3": MoeLayout("DeepseekV3ForCausalLM", "n_routed_experts", "moe_intermediate_size",
                             "intermediate_size", "shared_experts",
                             lambda m: _same_class(m, first_k_dense_replace=m.num_hidden_layers)),
    # OLMoE's attention (q/k norms over the whole projection, pre-norm) has no dense class either: one expert
    # of the whole width, routed with weight softmax(one logit) = 1, is a dense FFN.
    "olmoe": MoeLayout("OlmoeForCausalLM", "num_experts", "intermediate_size", None, None,
                       lambda m: _same_class(m, num_experts=1, num_experts_per_tok=1)),
    # Mixtral is Mistral with sparse FFNs (sparse upcycling: each expert a whole FFN).
    "mixtral": MoeLayout("MixtralForCausalLM", "num_local_experts", "intermediate_size", None, None,
                         lambda m: MistralConfig(**_same_attention(m, intermediate_size=m.intermediate_size))),
}


def moe_layout(config: PreTrainedConfig, what: str = "") -> MoeLayout:
    """The MoE class's layout, or one ConfigError naming the class and the supported ones."""
    layout = MOE_LAYOUTS.get(config.model_type)
    if layout is None:
        classes = getattr(config, "architectures", None) or [type(config).__name__]
        raise ConfigError(f"config error: {what or 'the global MoE'} is {classes[0]} (model type "
                          f"{config.model_type!r}); DeepFusion upcycles dense FFNs into the experts of "
                          f"{', '.join(f'{x.cls} ({t})' for t, x in MOE_LAYOUTS.items())} only; give a "
                          "checkpoint of one of these classes")
    return layout


def dense_width(config: PreTrainedConfig) -> int:
    """F: the dense FFN width the MoE's experts are slices of."""
    layout = moe_layout(config)
    return getattr(config, layout.dense_width or layout.expert_width)


def expert_width(config: PreTrainedConfig) -> int:
    return getattr(config, moe_layout(config).expert_width)


def dense_base_config(moe: PreTrainedConfig) -> PreTrainedConfig:
    """The config of the MoE's dense base: its embeddings, attention, norms and head, one dense FFN of width
    F per layer (MOE_LAYOUTS)."""
    return moe_layout(moe).dense(moe)


def build_dense_base(moe: PreTrainedConfig) -> PreTrainedModel:
    return AutoModelForCausalLM.from_config(dense_base_config(moe))


def global_moe_config(family: str, size: str, vocab_size: int) -> PreTrainedConfig:
    config = MOE_PRESETS[family][size](vocab_size)
    config._experts_implementation = DEFAULT_EXPERTS_IMPL[family]
    return config


def server_moe_config(server, vocab_size: int) -> PreTrainedConfig:
    """The global MoE's config for upcycling: [server] pretrained's config.json (any class in MOE_LAYOUTS),
    else the family/size preset. A local MoE must use the federation's vocabulary: its experts and embeddings
    come from students distilled on the federation's token ids."""
    if not server.pretrained:
        return global_moe_config(server.family, server.size, vocab_size)
    path = Path(server.pretrained)
    if not (path / "config.json").is_file():
        raise ConfigError(f"config error: [server] pretrained = {server.pretrained!r}: no config.json there; "
                          "point it at a local directory written by save_pretrained")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    moe_layout(config, f"[server] pretrained = {server.pretrained!r}")
    if config.vocab_size != vocab_size:
        raise ConfigError(f"config error: [server] pretrained = {server.pretrained!r}: vocab {config.vocab_size} != "
                          f"federation vocab {vocab_size}; the MoE is fused from students distilled on the "
                          "federation's token ids, so use its tokenizer (data.tokenizer = the model's tokenizer)")
    # grouped_mm only where measured deterministic (DEFAULT_EXPERTS_IMPL); eager elsewhere
    config._experts_implementation = "grouped_mm" if config.model_type == "qwen2_moe" else "eager"
    return config


# ---- building, loading, exporting ---------------------------------------------------------------

def build_global_moe(family: str, size: str, vocab_size: int, pretrained: str | None = None,
                     experts_impl: str | None = None) -> PreTrainedModel:
    """The global MoE: from a local pretrained directory, else a preset with random init (seeded by caller)."""
    experts_impl = experts_impl or DEFAULT_EXPERTS_IMPL[family]
    if pretrained:
        path = Path(pretrained)
        if not (path / "config.json").is_file():
            raise ConfigError(f"config error: [server] pretrained = {pretrained!r}: no config.json there; "
                                    "point it at a local directory written by save_pretrained")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, experts_implementation=experts_impl)
        if model.config.vocab_size < vocab_size:
            raise ConfigError(f"config error: [server] pretrained MoE vocab {model.config.vocab_size} < federation vocab {vocab_size}; "
                             "use the model's own tokenizer (data.tokenizer = the model directory)")
        return model
    config = global_moe_config(family, size, vocab_size)
    config._experts_implementation = experts_impl
    return _MOE_CLASSES[family](config)


def build_device_model(family: str, size: str, vocab_size: int) -> PreTrainedModel:
    return _DEVICE_CLASSES[family](DEVICE_PRESETS[family][size](vocab_size))


# Expert counts only (hosting a subset, the scale projection), for MoE classes outside MOE_LAYOUTS too: the
# names transformers' MoE configs use, tried in order (e.g. Glm4Moe, the class DeepSeek-MoE-16B's card builds as)
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


def _experts_key(config: PreTrainedConfig) -> str:
    if config.model_type in MOE_LAYOUTS:
        return MOE_LAYOUTS[config.model_type].experts
    key = next((k for k in EXPERT_COUNT_KEYS if getattr(config, k, None)), None)
    if key is None:
        moe_layout(config)  # not an MoE config at all: its one clear error
    return key


def routed_experts(config: PreTrainedConfig) -> int:
    """Routed experts per MoE layer (each class names them differently: MOE_LAYOUTS, else EXPERT_COUNT_KEYS)."""
    return getattr(config, _experts_key(config))


def set_routed_experts(config: PreTrainedConfig, n: int) -> None:
    setattr(config, _experts_key(config), n)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_model(model: PreTrainedModel, tokenizer, out_dir: Path) -> Path:
    """Write a plain MoE checkpoint + tokenizer that AutoModelForCausalLM/AutoTokenizer load.

    The special token ids go into config.json and generation_config.json, so `generate` and `pipeline`
    stop at end of text: eos is the tokenizer's (documents are separated by it); bos and pad fall back to
    eos when the tokenizer has none. The tokenizer's model_max_length becomes the model's positions, so
    `truncation=True` cuts at what the model can read.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.eos_token_id
    ids = {"eos_token_id": eos, "bos_token_id": _or(tokenizer.bos_token_id, eos),
           "pad_token_id": _or(tokenizer.pad_token_id, eos)}
    for cfg in filter(None, (model.config, getattr(model, "generation_config", None))):
        for key, value in ids.items():
            setattr(cfg, key, value)
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    model.save_pretrained(out_dir)
    before = tokenizer.model_max_length
    tokenizer.model_max_length = positions or before  # only the exported copy: the run's tokenizer packs long text
    try:
        tokenizer.save_pretrained(out_dir)
    finally:
        tokenizer.model_max_length = before
    return out_dir


def _or(value, fallback):
    return fallback if value is None else value


def load_model(path: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no exported model there (expected config.json from "
                                "`deepfusion run --out DIR`, i.e. DIR/model)")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; nothing else in the package assumes a CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"config error: device = {name!r} but torch sees no CUDA GPU on this machine; "
                                "use device = 'auto' or 'cpu'")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (halves activation memory, tensor cores); full precision on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
