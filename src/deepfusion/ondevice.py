"""Phase 0 of the paper (§IV-A): an edge device trains its own LLM on its private data, then uploads it once.

A device's recipe, top to bottom:
    model   = the public checkpoint of its type (GPT-2, TinyLlama, ...: checkpoints.py)
    plan    = full fine-tuning or LoRA adapters of some rank, by `finetune` and memory_mb (lora.py, measured)
    train on its private blocks until local validation stops improving, or max_steps
    e_n     = the embedding of its private text on the server's public basis (embedding.py)
    upload  = its best weights in fp16/bf16 (LoRA: merged, or only the adapter) + e_n (wire/upload.py), once

Nothing here imports an engine: the local engine calls `run_task` in-process, a Flower node calls it on
its own machine. Only the Upload leaves the device; the private text and blocks never do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deepfusion import lora
from deepfusion.baselines.centralized import EarlyStopping
from deepfusion.config import DeviceConfig, FederationConfig, device_at
from deepfusion.device import lm_loss
from deepfusion.models import autocast, n_params
from deepfusion.wire.upload import DTYPES, Task, Upload, wire_tokenizer


MAX_VAL_BLOCKS = 64  # 8 k tokens estimate a loss to ~1 %; a large device need not check 760 blocks every time


@dataclass
class PrivateData:
    """What a device holds: its documents (for e_n) and their token blocks (for training)."""

    texts: list[str]
    blocks: torch.Tensor  # (N, T) long, in its tokenizer's ids
    tokenizer: object | None = None  # its own tokenizer (federation.device_tokenizer); None: the federation's


def hold_out(blocks: torch.Tensor, val_frac: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) blocks: a seeded val_frac of the device's blocks (at least one, at most
    MAX_VAL_BLOCKS) for early stopping."""
    if len(blocks) < 2:
        raise ValueError(f"{len(blocks)} private block(s): local training needs one to train on and one to "
                         "validate on; give the device more data or lower data.seq_len")
    order = torch.randperm(len(blocks), generator=generator)
    n_val = min(max(1, math.ceil(val_frac * len(blocks))), MAX_VAL_BLOCKS)
    return blocks[order[n_val:]], blocks[order[:n_val]]


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, torch_device: torch.device, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        b = blocks[start:start + batch].to(torch_device)
        with autocast(torch_device):
            total += lm_loss(model, b).item() * len(b)
        count += len(b)
    return total / count


def train_until_converged(model, train: torch.Tensor, val: torch.Tensor, dc: DeviceConfig,
                          generator: torch.Generator, torch_device: torch.device) -> dict:
    """AdamW on random private batches; every eval_every steps the held-out loss decides: a better one keeps
    these weights, `patience` checks without one end training. The best weights are the ones uploaded."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=dc.lr, weight_decay=0.01)
    stopper = EarlyStopping(dc.patience)
    curve = [{"step": 0, "val_loss": round(mean_loss(model, val, torch_device), 4)}]
    stop, step = stopper.update(model, curve[0]["val_loss"], 0), 0
    while step < dc.max_steps and not stop:
        model.train()
        for _ in range(min(dc.eval_every, dc.max_steps - step)):
            idx = torch.randint(len(train), (dc.batch_size,), generator=generator)
            with autocast(torch_device):
                loss = lm_loss(model, train[idx].to(torch_device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        curve.append({"step": step, "train_loss": round(loss.item(), 4),
                      "val_loss": round(mean_loss(model, val, torch_device), 4)})
        stop = stopper.update(model, curve[-1]["val_loss"], len(curve) - 1)
    model.load_state_dict(stopper.best_state)
    best = curve[stopper.best_round]
    return {"curve": curve, "steps": step, "best_step": best["step"], "val_loss": best["val_loss"],
            "tokens_trained": step * dc.batch_size * train.shape[1], "stopped": "patience" if stop else "max_steps"}


def device_arch(dc: DeviceConfig, config, tokenizer: bytes = b"") -> str:
    """The upload's architecture label: family/size, or for a device's own checkpoint its config's model type
    and directory (checkpoints.arch_label), and its own tokenizer's digest: Phase I averages only devices with
    equal labels, and two vocabularies' weights do not average."""
    import hashlib

    from deepfusion.checkpoints import arch_label

    label = arch_label(dc.family, dc.size, dc.checkpoint, config)
    return label + (f"+tok:{hashlib.sha256(tokenizer).hexdigest()[:8]}" if tokenizer else "")


def wire_config(config) -> dict:
    """The architecture descriptor an upload carries: the config without `_name_or_path`, the directory the
    model was loaded from on the device (a local path says nothing the server needs and should not leave)."""
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def make_upload(dc: DeviceConfig, model, embedding: bytes, info: dict, tokenizer=None) -> Upload:
    """The device's weights in its upload dtype (tied weights once), its architecture, e_n, and its own
    tokenizer if it has one (the server needs it to align: alignment.py)."""
    dtype = DTYPES[dc.upload_dtype]
    tensors = {name: p.detach().to("cpu", dtype) for name, p in model.named_parameters()}
    tok = wire_tokenizer(tokenizer) if tokenizer is not None else b""
    return Upload(dc.id, device_arch(dc, model.config, tok), wire_config(model.config), tensors, embedding, info, tok)


def make_adapter_upload(dc: DeviceConfig, peft_model, embedding: bytes, info: dict) -> Upload:
    """Only the LoRA tensors in the upload dtype (peft's names), with the base's architecture and e_n; the server
    adds them to its own copy of the type's public checkpoint (lora.merge_upload)."""
    base = peft_model.get_base_model()
    tensors = lora.adapter_tensors(peft_model, DTYPES[dc.upload_dtype])
    return Upload(dc.id, device_arch(dc, base.config), wire_config(base.config), tensors, embedding,
                  {**info, "params": n_params(base) - lora.trainable_params(peft_model)})


def run_task(cfg: FederationConfig, device_id: str, task_bytes: bytes, private: PrivateData, model,
             seed: int, torch_device: torch.device) -> bytes:
    """One device's whole part in the protocol: the task in, its upload out (as bytes).

    `model` is the device's public checkpoint, loaded by the caller (checkpoints.public_model).
    """
    from deepfusion import embedding  # late: the encoder loads only where a device embeds

    task = Task.from_bytes(task_bytes)
    if task.device_id != device_id:
        raise ValueError(f"task is addressed to {task.device_id!r}, this device is {device_id!r}")
    dc = next(d for d in cfg.devices if d.id == device_id)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = model.to(torch_device)
    train, val = hold_out(private.blocks, dc.val_frac, generator)
    where = device_at([d.id for d in cfg.devices].index(dc.id), dc.id)
    plan = lora.choose(dc, model, train[:dc.batch_size].to(torch_device), lm_loss, where)  # measured peaks
    base_hash = lora.base_sha256(model) if plan.finetune == "lora" and dc.upload == "adapter" else None
    if plan.finetune == "lora":
        model = lora.attach(model, plan.rank)
    trainable = lora.trainable_params(model)
    report = train_until_converged(model, train, val, dc, generator, torch_device)
    e_n = embedding.embed_device(embedding.load_encoder(), embedding.Basis.from_bytes(task.basis), private.texts,
                                 cfg.clustering.embed_texts, seed)
    # no wall-clock time in the upload: equal work, equal bytes (engines compare uploads byte for byte)
    info = {**report, "peak_mem_bytes": plan.peak, "private_blocks": len(private.blocks)}
    if plan.finetune == "full":  # the info as before the finetune key existed: full devices' uploads unchanged
        return make_upload(dc, model, e_n, {**info, "params": n_params(model)}, private.tokenizer).to_bytes()
    info.update(finetune="lora", lora_rank=plan.rank, trainable_params=trainable)
    if base_hash:
        return make_adapter_upload(dc, model, e_n, {**info, **lora.adapter_info(model, base_hash)}).to_bytes()
    merged = model.merge_and_unload()  # W + (alpha / r) B A: the upload is the whole model, as a full device's
    return make_upload(dc, merged, e_n, {**info, "params": n_params(merged), "upload": "merged"},
                       private.tokenizer).to_bytes()


def public_model(cfg: FederationConfig, dc: DeviceConfig, public: torch.Tensor, tokenizer,
                 torch_device: torch.device):
    """The device's starting point, as GPT-2 or TinyLlama is in practice: its type's public checkpoint, from a
    local directory (checkpoint = ...) or made once from the public text and cached (checkpoints.py). A preset
    with its own tokenizer is made from the same public text, cut by that tokenizer. `public` and `tokenizer`
    are the federation's."""
    from deepfusion.checkpoints import device_model
    from deepfusion.config import device_at
    from deepfusion.federation import device_tokenizer, public_blocks

    where = device_at([d.id for d in cfg.devices].index(dc.id), dc.id)
    own = device_tokenizer(cfg, dc.id, tokenizer)
    if not dc.checkpoint:  # a given checkpoint is loaded, not pretrained: its public text is never read
        public = public_blocks(tokenizer, own, public)
    return device_model(dc.family, dc.size, len(own), public, cfg.pretrain, dc.checkpoint, where,
                        torch_device=torch_device, own_tokenizer=own is not tokenizer)
