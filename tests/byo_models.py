"""Bring-your-own checkpoints for tests: tiny real models of several families, written with save_pretrained
into a directory together with one tokenizer and loaded back only through the Auto classes. No hub, ever.

    tokenizer(root)               -> a byte-level BPE tokenizer directory (the project's own trainer)
    device_dir(root, family, tok) -> a causal LM of that family (DEVICE_FAMILIES), tokenizer beside it
    moe_dirs(root, kind, tok)     -> (MoE dir, its dense base dir) for each of MOE_KINDS

Every config is written out here, independently of models.dense_base_config, so the tests check that the
code pairs a user's dense base with its MoE rather than agreeing with itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from transformers import AutoModelForCausalLM

TEXTS = [
    "The patient was given 20 mg of the drug twice a day for two weeks.",
    "Revenue rose 12% to $4.1 million in 2019, while operating costs fell.",
    "Symptoms include fever, cough and shortness of breath; see a doctor.",
    "Net income per share was 0.53 dollars compared with 0.41 a year earlier.",
] * 8
VOCAB = 300  # 256 bytes + 2 specials + a few merges: every token id any text can produce

# Device side: one tiny model per family, hidden 32, one or two layers. No special token ids: the
# federation's tokenizer decides them (and a default eos of 50256 would not fit a 300-token vocabulary).
_NO_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
DEVICE_FAMILIES = {
    "gpt2": lambda v: tf.GPT2Config(vocab_size=v, n_positions=128, n_embd=32, n_layer=2, n_head=2, **_NO_IDS),
    "llama": lambda v: tf.LlamaConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                                      **_NO_IDS),
    "olmo": lambda v: tf.OlmoConfig(vocab_size=v, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=128, **_NO_IDS),
    "bloom": lambda v: tf.BloomConfig(vocab_size=v, hidden_size=32, n_layer=2, n_head=2, **_NO_IDS),
    "qwen3": lambda v: tf.Qwen3Config(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                      max_position_embeddings=128, **_NO_IDS),
}

# Server side: (MoE, its dense base). Dense FFN F = 64; routed experts 32 wide where the class has a separate
# expert width (g = 2), else whole-FFN experts (g = 1). Four routed experts: K = 2 domains, or 4 for g = 1.
# rope and eps written out: the classes' defaults differ (Mixtral's rope_theta is 1e6, Mistral's 1e4)
_ATTN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
             tie_word_embeddings=False, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **_NO_IDS)
_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            num_key_value_heads=2)


def _qwen2_moe(v):
    moe = tf.Qwen2MoeConfig(vocab_size=v, num_key_value_heads=1, intermediate_size=64, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, **_ATTN)
    return moe, tf.Qwen2Config(vocab_size=v, num_key_value_heads=1, intermediate_size=64, **_ATTN)


def _qwen3_moe(v):
    moe = tf.Qwen3MoeConfig(vocab_size=v, num_key_value_heads=1, head_dim=16, intermediate_size=64,
                            moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, **_ATTN)
    return moe, tf.Qwen3Config(vocab_size=v, num_key_value_heads=1, head_dim=16, intermediate_size=64, **_ATTN)


def _deepseek(cls, **routing):
    def make(v):
        common = dict(vocab_size=v, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                      n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, **_MLA, **_ATTN)
        return (cls(first_k_dense_replace=1, **routing, **common),
                cls(first_k_dense_replace=2, **routing, **common))  # every layer dense
    return make


def _olmoe(v):
    moe = tf.OlmoeConfig(vocab_size=v, num_key_value_heads=2, intermediate_size=64, num_experts=4,
                         num_experts_per_tok=2, **_ATTN)
    return moe, tf.OlmoeConfig(vocab_size=v, num_key_value_heads=2, intermediate_size=64, num_experts=1,
                               num_experts_per_tok=1, **_ATTN)  # one whole-width expert: a dense FFN


def _mixtral(v):
    moe = tf.MixtralConfig(vocab_size=v, num_key_value_heads=1, intermediate_size=64, num_local_experts=4,
                           num_experts_per_tok=2, **_ATTN)
    return moe, tf.MistralConfig(vocab_size=v, num_key_value_heads=1, intermediate_size=64, sliding_window=None,
                                 **_ATTN)


MOE_KINDS = {
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v2": _deepseek(tf.DeepseekV2Config),
    "deepseek_v3": _deepseek(tf.DeepseekV3Config, norm_topk_prob=True, routed_scaling_factor=1.0),
    "olmoe": _olmoe,
    "mixtral": _mixtral,
}


def tokenizer(root: Path) -> Path:
    """The shared tokenizer's directory (trained once per root by the project's own BPE trainer)."""
    from deepfusion.data.tokenizer import train_tokenizer

    out = Path(root) / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        train_tokenizer(TEXTS, VOCAB, Path(root) / ".tokenizer-cache").save_pretrained(out)
    return out


def _save(config, path: Path, tok: Path, seed: int) -> Path:
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tok, local_files_only=True).save_pretrained(path)
    return path


def vocab_of(tok: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tok, local_files_only=True))


def device_dir(root: Path, family: str, tok: Path, vocab: int | None = None, seed: int = 0) -> Path:
    """A tiny `family` causal LM saved at root/<family>; vocab defaults to the tokenizer's."""
    return _save(DEVICE_FAMILIES[family](vocab or vocab_of(tok)), Path(root) / family, tok, seed)


def moe_dirs(root: Path, kind: str, tok: Path, seed: int = 0) -> tuple[Path, Path]:
    """(the MoE's directory, its dense base's directory) for one of MOE_KINDS."""
    moe, dense = MOE_KINDS[kind](vocab_of(tok))
    return (_save(moe, Path(root) / f"{kind}-moe", tok, seed),
            _save(dense, Path(root) / f"{kind}-dense", tok, seed + 1))
