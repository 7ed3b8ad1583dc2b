"""LoRA devices (Issue 11): a device whose memory cannot hold full fine-tuning trains low-rank adapters, and
uploads either the merged model or, when the server holds the same public base, only the adapter.

We use Hugging Face's `peft` rather than a hand-written LoRA: it is maintained against transformers' model
classes (GPT-2's Conv1D included), and its adapter state dict (get_peft_model_state_dict) and merge
(merge_and_unload) are the ones the ecosystem reads, so the server merges exactly what the device trained.

    targets  every nn.Linear / Conv1D except the LM head, found by type: the attention and MLP projections of
             every family (GPT-2's c_attn, Llama's q_proj, BLOOM's query_key_value, ...) without per-family lists
    alpha    2 r: the update's scale alpha / r stays 2 whatever rank the budget picks, so `lr` means the same
    choose   finetune = "auto": full fine-tuning if its measured training peak fits memory_mb, else the largest
             rank of RANKS whose measured peak fits (memory.py measures one real step; nothing is estimated)
    adapter  upload = "adapter": the lora_A / lora_B tensors under their peft names, with rank, alpha, targets and
             the base weights' sha256 in the upload's info; the server rebuilds its own copy of the type's
             public checkpoint, checks the hash, loads the adapter and merges (merge_upload)
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from dataclasses import dataclass, replace

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from deepfusion.config import DeviceConfig
from deepfusion.errors import ConfigError
from deepfusion.memory import train_peak_bytes

RANKS = (64, 32, 16, 8, 4)  # the ladder "auto" and lora_rank = 0 climb down, largest first
ALPHA_PER_RANK = 2
MAX_RANK = 4096  # a server refuses a larger claimed rank before building anything


@dataclass(frozen=True)
class Plan:
    """How a device trains: its mode, LoRA rank (0 for full) and that setup's measured training peak."""

    finetune: str  # "full" | "lora"
    rank: int
    peak: int  # bytes of one training step (memory.train_peak_bytes)


# ---- attaching --------------------------------------------------------------------------------------

def _linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    head = model.get_output_embeddings()  # the LM head (tied to the embedding in every device preset)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}


def target_modules(model: PreTrainedModel) -> list[str]:
    """The leaf names of every projection LoRA adapts: all nn.Linear / Conv1D modules except the LM head."""
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_layers(model)})


def useful_ranks(model: PreTrainedModel) -> list[int]:
    """RANKS up to the smallest targeted dimension: B A has rank <= min(in, out), so a larger r adds memory
    and nothing else. At least the ladder's smallest rank."""
    cap = min(min(m.weight.shape) for m in _linear_layers(model).values())
    return [r for r in RANKS if r <= cap] or [RANKS[-1]]


def lora_config(rank: int, targets: list[str], conv1d: bool, alpha: float | None = None):
    from peft import LoraConfig

    # no dropout: training stays a deterministic function of the seed, and the peak has no dropout masks
    return LoraConfig(r=rank, lora_alpha=ALPHA_PER_RANK * rank if alpha is None else alpha, lora_dropout=0.0,
                      target_modules=list(targets), fan_in_fan_out=conv1d, task_type="CAUSAL_LM")


def attach(model: PreTrainedModel, rank: int, targets: list[str] | None = None, alpha: float | None = None):
    """The model wrapped with rank-`rank` adapters (in place; everything but the adapters frozen)."""
    from peft import get_peft_model

    targets = targets or target_modules(model)
    conv1d = any(isinstance(m, Conv1D) for m in _linear_layers(model).values())
    with warnings.catch_warnings():  # transformers' deprecation notice from inside peft: not ours to act on
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lora_config(rank, targets, conv1d, alpha))


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- choosing from the budget ------------------------------------------------------------------------

def lora_peak(model: PreTrainedModel, rank: int, batch: torch.Tensor, loss_fn, lr: float) -> int:
    """The measured training peak with rank-`rank` adapters, on a throw-away copy. The adapters' random init
    draws from a forked generator, so probing leaves the device's training stream as it was."""
    with torch.random.fork_rng(devices=[]):
        probe = attach(copy.deepcopy(model), rank)
    return train_peak_bytes(probe, batch, loss_fn, lr)


def choose(dc: DeviceConfig, model: PreTrainedModel, batch: torch.Tensor, loss_fn, where: str) -> Plan:
    """The device's training plan from its config and its measured peaks (one training step each)."""
    if dc.finetune == "full":  # as before this key existed: no budget check, the same peak measured
        return Plan("full", 0, train_peak_bytes(model, batch, loss_fn, dc.lr))
    budget = dc.memory_mb * 2**20 if dc.memory_mb else math.inf
    peaks = {}
    if dc.finetune == "auto":
        peaks["full fine-tuning"] = full = train_peak_bytes(model, batch, loss_fn, dc.lr)
        if full <= budget:
            return Plan("full", 0, full)
    for rank in [dc.lora_rank] if dc.lora_rank else useful_ranks(model):
        peaks[f"LoRA rank {rank}"] = peak = lora_peak(model, rank, batch, loss_fn, dc.lr)
        if peak <= budget:
            return Plan("lora", rank, peak)
    smallest = min(peaks, key=peaks.get)
    raise ConfigError(f"config error: {where}: memory_mb = {dc.memory_mb} is too small to train: the smallest "
                      f"measured peak, {smallest}, needs {peaks[smallest] / 2**20:.2f} MB at batch_size "
                      f"{dc.batch_size}; raise memory_mb or lower batch_size")


# ---- the device's upload -----------------------------------------------------------------------------

def base_sha256(model: torch.nn.Module) -> str:
    """The base weights' fingerprint: an adapter means something only on the weights it was trained on."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their peft names (lora_A / lora_B per targeted module)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


def adapter_tensors(peft_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", dtype) for k, v in adapter_state(peft_model).items()}


def adapter_info(peft_model, base_hash: str) -> dict:
    config = peft_model.peft_config["default"]
    return {"upload": "adapter", "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
            "base_sha256": base_hash}


# ---- the server's side --------------------------------------------------------------------------------

def is_adapter(info: dict) -> bool:
    return info.get("upload") == "adapter"


def adapter_spec(info: dict) -> tuple[int, float, list[str], str]:
    """(rank, alpha, targets, base sha256) from an upload's info, each checked; ValueError names the bad one."""
    rank, alpha, targets, digest = (info.get(k) for k in ("lora_rank", "lora_alpha", "target_modules", "base_sha256"))
    if not (isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= MAX_RANK):
        raise ValueError(f"lora_rank {rank!r} is not an integer in [1, {MAX_RANK}]")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < math.inf):
        raise ValueError(f"lora_alpha {alpha!r} is not a finite positive number")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"target_modules {str(targets)[:80]} is not a non-empty list of module names")
    if not (isinstance(digest, str) and len(digest) == 64):
        raise ValueError(f"base_sha256 {str(digest)[:80]!r} is not a sha256 hex digest")
    return rank, float(alpha), targets, digest


def expected_adapter(config: PreTrainedConfig, info: dict) -> dict[str, torch.Size]:
    """The adapter tensor names and shapes the architecture and the claimed rank / targets give (built on the
    meta device: no memory, no init). ValueError if the claim does not fit the architecture."""
    rank, alpha, targets, _ = adapter_spec(info)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    unknown = sorted(set(targets) - set(target_modules(base)))
    if unknown:
        raise ValueError(f"target_modules {unknown[:3]} are not projections of a {config.model_type} model "
                         f"(it has {', '.join(target_modules(base))})")
    return {k: v.shape for k, v in adapter_state(attach(base, rank, targets, alpha)).items()}


def merge_upload(upload, base: PreTrainedModel):
    """The upload as if it carried the merged model: `base` (the server's copy of the device type's public
    checkpoint, consumed) + the adapter, merged with peft. ValueError if the base is not the one the adapter
    was trained on or the adapter does not load exactly."""
    from peft import set_peft_model_state_dict

    rank, alpha, targets, digest = adapter_spec(upload.info)
    held = base_sha256(base)
    if held != digest:
        raise ValueError(f"its adapter was trained on a base (sha256 {digest[:12]}...) the server does not hold "
                         f"(its public checkpoint of {upload.arch} is {held[:12]}...); upload the merged model")
    model = attach(base.float(), rank, targets, alpha)
    loaded = set_peft_model_state_dict(model, {k: v.float() for k, v in upload.tensors.items()})
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if missing or loaded.unexpected_keys:
        raise ValueError(f"adapter does not load onto its base: missing {missing[:2]}, "
                         f"unexpected {list(loaded.unexpected_keys)[:2]}")
    merged = model.merge_and_unload()
    return replace(upload, tensors={n: p.detach() for n, p in merged.named_parameters()})
