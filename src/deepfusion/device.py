"""One edge device: its own small LLM, trained on private data, answering the server with top-k knowledge.

A device round is a plain recipe: read the server's instruction, train locally for a few steps, label
the requested public proxy blocks, upload a knowledge packet. The device's model and optimiser persist
across rounds; the private data never leaves this module (only `KnowledgePacket`s do).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from deepfusion import alignment, privacy
from deepfusion.config import DeviceConfig
from deepfusion.errors import ConfigError
from deepfusion.memory import train_peak_bytes
from deepfusion.models import autocast, build_device_model, n_params
from deepfusion.wire.instruction import Instruction
from deepfusion.wire.knowledge import KnowledgePacket, encode_knowledge

LABEL_BATCH = 16  # proxy blocks per labelling forward pass: bounds the (B, T, V) logits in memory


@dataclass
class Device:
    """A device's persistent state: config, model, optimiser, data, counters."""

    cfg: DeviceConfig
    arch: str
    model: PreTrainedModel
    optimizer: torch.optim.Optimizer
    private: torch.Tensor  # (N_private, T) token blocks, never leave the device
    proxy: torch.Tensor  # (N_proxy, T) the public proxy blocks, same on every device
    generator: torch.Generator
    torch_device: torch.device
    tokens_trained: int = 0
    peak_mem_bytes: int = 0
    history: list[dict] = field(default_factory=list)
    noise_generator: torch.Generator | None = None  # DP noise, seeded by the OS (privacy.noise_generator)
    dp_rho: float = 0.0  # zCDP ρ spent by this device's uploads so far
    dp_uploads: int = 0
    dp_positions: int = 0  # positions per upload (ρ per upload = positions / σ²)
    own: OwnTokenizer | None = None  # its own tokenizer's view of the proxy set; None: it reads the global ids


@dataclass(frozen=True)
class OwnTokenizer:
    """What a device with its own tokenizer needs to answer in the global vocabulary, computed once."""

    views: list[alignment.BlockView]  # one per proxy block: the ids its model reads, aligned with the block
    vocab_map: torch.Tensor  # (V_device,) long: device id -> global id (MinED)
    global_size: int  # the global vocabulary's size: the packet's vocab_size
    vocab: str  # alignment.vocab_digest of its tokenizer, named in every packet


def align_to_global(model: PreTrainedModel, proxy: torch.Tensor, global_tokenizer, tokenizer) -> OwnTokenizer:
    """The proxy blocks under the device's tokenizer (cut to the model's positions) and its vocabulary map."""
    width = model.get_output_embeddings().weight.shape[0]  # may exceed the tokenizer: padded rows
    views = alignment.block_views(global_tokenizer, tokenizer, proxy,
                                  max_length=getattr(model.config, "max_position_embeddings", None))
    return OwnTokenizer(views, alignment.vocab_map(tokenizer, global_tokenizer, device_size=width),
                        len(global_tokenizer), alignment.vocab_digest(tokenizer))


def build_device(cfg: DeviceConfig, size: str, vocab_size: int, private: torch.Tensor, proxy: torch.Tensor,
                 seed: int, torch_device: torch.device, *, global_tokenizer=None, tokenizer=None) -> Device:
    """Create a device's model from its preset (seeded per device so runs are reproducible). `tokenizer`: its
    own (vocab_size is then its size, `global_tokenizer` the federation's); None: it reads the global ids."""
    torch.manual_seed(seed)
    if cfg.checkpoint:  # the user's own model, any causal LM: it starts from its weights, not from scratch
        from deepfusion.checkpoints import arch_label, device_model
        from deepfusion.pipeline_config import PretrainConfig

        model = device_model(cfg.family, size, vocab_size, proxy, PretrainConfig(), cfg.checkpoint,
                             own_tokenizer=tokenizer is not None)
        arch = arch_label(cfg.family, size, cfg.checkpoint, model.config)
    else:
        model, arch = build_device_model(cfg.family, size, vocab_size), f"{cfg.family}/{size}"
    model = model.to(torch_device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    own = align_to_global(model, proxy, global_tokenizer, tokenizer) if tokenizer is not None else None
    return Device(cfg, arch, model, optimizer, private, proxy, generator, torch_device, own=own)


def lm_loss(model: PreTrainedModel, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over (B, T) blocks."""
    logits = model(input_ids=blocks).logits[:, :-1]  # (B, T-1, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), blocks[:, 1:].flatten())


def local_train(device: Device, steps: int, batch_size: int, lr: float) -> float:
    """`steps` AdamW steps on random private blocks; returns the mean loss."""
    device.model.train()
    for group in device.optimizer.param_groups:
        group["lr"] = lr
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(device.private), (batch_size,), generator=device.generator)
        batch = device.private[idx].to(device.torch_device)
        with autocast(device.torch_device):
            loss = lm_loss(device.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(device.model.parameters(), 1.0)
        device.optimizer.step()
        device.optimizer.zero_grad(set_to_none=True)
        device.tokens_trained += batch.numel()
        losses.append(loss.item())
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def label_proxy(device: Device, indices: list[int], topk: int, temperature: float, round: int,
                local_loss: float) -> KnowledgePacket:
    """Top-k next-token knowledge on the requested proxy blocks: positions 0..T-2 of each block.

    Encoded batch by batch, so only LABEL_BATCH blocks of full-vocabulary logits are ever in memory. A device
    with its own tokenizer encodes its projected log-probabilities, so the temperature (and DP's clipping and
    noise) applies to the distribution projected onto the global vocabulary, as for any other device.
    """
    device.model.eval()
    meta = dict(device_id=device.cfg.id, round=round, arch=device.arch, tokens_trained=device.tokens_trained)
    dp = device.cfg.dp_noise > 0
    if dp and device.noise_generator is None:
        device.noise_generator = privacy.noise_generator()
    parts, masks = [], []
    for start in range(0, len(indices), LABEL_BATCH):
        batch = indices[start:start + LABEL_BATCH]
        if device.own is None:
            logits = _proxy_logits(device, batch)
        else:
            logits, aligned = _global_log_probs(device, batch)
            masks.append(aligned)
        if dp:  # the Gaussian mechanism: nothing computed from private data leaves un-noised (privacy.py)
            parts.append(privacy.encode_private(logits, topk, temperature, clip=device.cfg.dp_clip,
                                                noise_multiplier=device.cfg.dp_noise,
                                                generator=device.noise_generator, **meta))
        else:
            parts.append(encode_knowledge(logits, topk, temperature, local_loss=local_loss, **meta))
    packet = dataclasses.replace(parts[0], ids=np.concatenate([p.ids for p in parts]),
                                 probs=np.concatenate([p.probs for p in parts]),
                                 tail=np.concatenate([p.tail for p in parts]))
    if device.own is not None:
        packet = dataclasses.replace(packet, aligned=torch.cat(masks).numpy().astype(np.uint8), vocab=device.own.vocab)
    if dp:  # every upload is a release, retries included
        device.dp_rho += privacy.upload_rho(packet.n_positions, device.cfg.dp_noise)
        device.dp_uploads, device.dp_positions = device.dp_uploads + 1, packet.n_positions
    return packet


def _proxy_logits(device: Device, batch: list[int]) -> torch.Tensor:
    """(B*(T-1), V) the model's logits on the proxy blocks, positions 0..T-2."""
    blocks = device.proxy[batch].to(device.torch_device)
    with autocast(device.torch_device):
        return device.model(input_ids=blocks).logits[:, :-1].flatten(0, 1)


TINY = 1e-30  # the log of a global id no device token maps to: far below any real prediction, finite


def _global_log_probs(device: Device, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """((B*(T-1), V_global) float, (B*(T-1),) bool): a device with its own tokenizer's log-probabilities over
    the global vocabulary at positions 0..T-2 of each proxy block, and which positions end an aligned span.
    The rest hold a uniform row (log-probabilities all 0): well-formed, and marked as carrying nothing."""
    own, T1 = device.own, device.proxy.shape[1] - 1
    views = [own.views[i] for i in batch]
    rows, masks = [], []
    for view, probs in zip(views, _view_probs(device, views)):
        moved, mask = alignment.at_global_positions(probs, view.alignment)  # (T, V_device), (T,)
        rows.append(moved[:T1])
        masks.append(mask[:T1].cpu())
    logp = alignment.project_probs(torch.cat(rows), own.vocab_map, own.global_size).clamp_min(TINY).log()
    mask = torch.cat(masks)
    return logp.masked_fill(~mask.to(logp.device)[:, None], 0.0), mask


def _view_probs(device: Device, views: list[alignment.BlockView]) -> list[torch.Tensor]:
    """Each view's (T_device, V_device) next-token probabilities. Views differ in length: right-padded into one
    batch, which a causal model reads exactly as each view alone up to its own length."""
    longest = max(len(v.ids) for v in views)
    ids = torch.zeros(len(views), longest, dtype=torch.long)
    for i, v in enumerate(views):
        ids[i, :len(v.ids)] = v.ids
    with autocast(device.torch_device):
        logits = device.model(input_ids=ids.to(device.torch_device)).logits
    probs = logits.float().softmax(-1)
    return [probs[i, :len(v.ids)] for i, v in enumerate(views)]


def run_round(device: Device, instruction: Instruction) -> KnowledgePacket:
    """One device round: local training, then knowledge on the proxy set."""
    start = time.perf_counter()
    if device.peak_mem_bytes == 0:  # measured once: the step's shape does not change across rounds
        device.peak_mem_bytes = measure_train_peak(device, instruction.batch_size)
    loss = local_train(device, instruction.local_steps, instruction.batch_size, instruction.lr)
    packet = label_proxy(device, instruction.proxy_indices, instruction.topk, instruction.temperature,
                         instruction.round, loss)
    if device.cfg.attack:
        packet = poison(packet, device.cfg.attack, device.generator)
    device.history.append({"round": instruction.round, "local_loss": loss, "seconds": time.perf_counter() - start})
    return packet


def poison(packet: KnowledgePacket, attack: str, generator: torch.Generator) -> KnowledgePacket:
    """An adversarial device's upload, for measuring robustness: well-formed, so validation cannot catch it.

    uniform:  random ids, equal probabilities (no knowledge);
    shifted:  the device's own probabilities on ids shifted by a random offset (confidently wrong);
    inverted: the probability order reversed over the same ids (rank-inverted).
    """
    ids, probs = packet.ids.astype(np.int64), packet.probs.astype(np.float32)
    V, (N, k) = packet.vocab_size, ids.shape
    if attack == "uniform":
        ids = torch.stack([torch.randperm(V, generator=generator)[:k] for _ in range(N)]).numpy()
        probs = np.full((N, k), (1.0 - packet.tail.astype(np.float32))[:, None] / k)
    elif attack == "shifted":
        ids = (ids + int(torch.randint(1, V, (1,), generator=generator))) % V
    elif attack == "inverted":
        probs = probs[:, ::-1]
    return dataclasses.replace(packet, ids=ids.astype(packet.ids.dtype), probs=np.ascontiguousarray(probs, np.float16))


@torch.no_grad()
def evaluate_device(device: Device, blocks: torch.Tensor, batch: int = 16) -> float:
    """The device model's own perplexity on held-out blocks (the local-only reference)."""
    device.model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        b = blocks[start:start + batch].to(device.torch_device)
        with autocast(device.torch_device):
            loss = lm_loss(device.model, b)
        total += loss.item() * b[:, 1:].numel()
        count += b[:, 1:].numel()
    return math.exp(total / max(count, 1))


def measure_train_peak(device: Device, batch_size: int) -> int:
    """Peak bytes of one training step of the device's model at `batch_size` (memory.py)."""
    return train_peak_bytes(device.model, device.private[:batch_size].to(device.torch_device), lm_loss, device.cfg.lr)


def device_state(device: Device) -> dict:
    """A device's persistent state (on a real device it stays on the device; the local engine checkpoints it)."""
    return {"model": device.model.state_dict(), "optimizer": device.optimizer.state_dict(),
            "generator": device.generator.get_state(), "tokens_trained": device.tokens_trained,
            "peak_mem_bytes": device.peak_mem_bytes, "history": device.history,
            "noise_generator": device.noise_generator.get_state() if device.noise_generator else None,
            "dp": (device.dp_rho, device.dp_uploads, device.dp_positions)}


def load_device_state(device: Device, state: dict) -> None:
    device.model.load_state_dict(state["model"])
    device.optimizer.load_state_dict(state["optimizer"])
    device.generator.set_state(state["generator"])
    device.tokens_trained, device.peak_mem_bytes = state["tokens_trained"], state["peak_mem_bytes"]
    device.history = list(state["history"])
    if state.get("noise_generator") is not None:
        device.noise_generator = torch.Generator()
        device.noise_generator.set_state(state["noise_generator"])
    device.dp_rho, device.dp_uploads, device.dp_positions = state.get("dp", (0.0, 0, 0))


def describe(device: Device) -> dict:
    return {"id": device.cfg.id, "arch": device.arch, "params": n_params(device.model),
            "private_blocks": len(device.private), "source": device.cfg.source, "privacy": privacy_spent(device)}


def privacy_spent(device: Device) -> dict | None:
    """The (ε, δ) this device's uploads have spent so far; None when it uploads without differential privacy."""
    c = device.cfg
    if not c.dp_noise > 0:
        return None
    return privacy.report(c.dp_noise, c.dp_clip, c.dp_delta, device.dp_rho, device.dp_uploads, device.dp_positions)


def choose_size(cfg: DeviceConfig, vocab_size: int, seq_len: int, torch_device: torch.device) -> str:
    """The largest preset of the device's family whose measured training peak fits its memory budget."""
    from deepfusion.models import DEVICE_PRESETS

    budget = cfg.memory_mb * 2**20
    dummy = torch.randint(vocab_size, (cfg.batch_size, seq_len))
    fits, peaks = [], {}
    for size in DEVICE_PRESETS[cfg.family]:
        probe = build_device(cfg, size, vocab_size, dummy, dummy[:1], 0, torch_device)
        peaks[size] = peak = measure_train_peak(probe, cfg.batch_size)
        if peak <= budget:
            fits.append((peak, size))
    if not fits:
        smallest = min(peaks, key=peaks.get)
        raise ConfigError(f"config error: device {cfg.id!r}: memory_mb = {cfg.memory_mb} fits no {cfg.family} preset "
                          f"(the smallest, {smallest!r}, needs {peaks[smallest] / 2**20:.1f} MB to train with "
                          f"batch_size {cfg.batch_size}); raise memory_mb or lower batch_size")
    return max(fits)[1]
