"""The training peak of one step: what a device must hold to train a model, on CPU, CUDA or the meta device.

The package's one memory estimator. Its callers: a device's measured peak (device.py, ondevice.py), the
budget an expert-subset host fits its experts into (baselines/hosting.py, engines/flower/node.py, engines/local.py), and
the scale projection's models at the paper's sizes, built on PyTorch's meta device (benchmarks/scale).

    weights + AdamW state    resident: the parameters and the optimiser's moments (and step counters)
  + gradients                one per trainable parameter
  + activations              every distinct storage autograd saves for backward during forward

On CUDA the allocator's own peak counter measures the last two. PyTorch keeps no CPU peak counter (and the
profiler costs seconds a step), so on CPU and meta the activations are the storages saved for backward,
counted once each however many views share them, weights excluded: the tensors alive together at the
step's peak (the loss's log-softmax over the vocabulary among them). A sum, not an allocator trace: the
loss's other vocabulary-sized temporaries and backward's scratch are left out, and activations count as
alive while every gradient exists (backward frees them as gradients appear). Counting only the storages
still alive at the end of forward (plus the logits) instead differed by under 0.1 % on our presets.

On meta every tensor has its real shape and dtype and no storage, so a 16-billion-parameter model steps in
seconds; two kernels are routed to the ones a real device runs (meta_kernels), so that autograd saves the
same tensors as on CPU (tests/test_memory.py: equal to within the bytes of a few expert offsets).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import transformers.integrations.moe as hf_moe
from transformers import PreTrainedModel

from deepfusion.models import autocast


@dataclass(frozen=True)
class StepMemory:
    """Bytes one AdamW training step holds at its peak, as the sum of what is alive together."""

    params: int
    weights: int
    gradients: int
    optimizer: int  # AdamW's exp_avg and exp_avg_sq (and its step counters)
    activations: int  # saved for backward; on CUDA the allocator's peak above resident state, less the gradients

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def resident_per_param_bytes(self) -> float:
        """Weights + gradients + optimiser state per parameter (16 for fp32 AdamW)."""
        return (self.weights + self.gradients + self.optimizer) / self.params


def train_peak_bytes(model: PreTrainedModel, batch: torch.Tensor, loss_fn, lr: float = 1e-3) -> int:
    """Peak bytes of one training step of `model` on `batch` (see step_memory)."""
    return step_memory(model, batch, loss_fn, lr).total


def step_memory(model: PreTrainedModel, batch: torch.Tensor, loss_fn, lr: float = 1e-3) -> StepMemory:
    """One AdamW step of `loss_fn(model, batch)` (an MoE host adds its router loss), measured.

    The step runs on a throw-away copy, so training is not perturbed. A first step creates AdamW's state,
    so that it counts as resident; the second is measured.
    """
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    _train_step(model, optimizer, batch, loss_fn)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    resident = dict(params=sum(p.numel() for p in model.parameters()), weights=_bytes(model.parameters()),
                    optimizer=_bytes(state))
    if batch.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(batch.device)
        base = torch.cuda.memory_allocated(batch.device)
        _, gradients = _train_step(model, optimizer, batch, loss_fn)
        above = torch.cuda.max_memory_allocated(batch.device) - base
        return StepMemory(**resident, gradients=gradients, activations=max(0, above - gradients))
    activations, gradients = _train_step(model, optimizer, batch, loss_fn)
    return StepMemory(**resident, gradients=gradients, activations=activations)


def _train_step(model: PreTrainedModel, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
                loss_fn) -> tuple[int, int]:
    """One step; returns (activations, gradients): the bytes of the distinct storages saved for backward
    (weights excluded) and of the gradients."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, torch.UntypedStorage] = {}  # held until forward ends: a freed storage's address may be reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage
        return t

    # on meta, the real kernels in full precision (autocast has no meta device); elsewhere the training step's own
    kernels = meta_kernels() if batch.device.type == "meta" else autocast(batch.device)
    with kernels:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model, batch)
        activations = sum(s.nbytes() for s in saved.values())
        saved.clear()
        loss.backward()
    gradients = _bytes(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return activations, gradients


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (views of one storage count once)."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


# ---- the meta device: the kernels a real device runs -------------------------------------------------


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
    """
    functional = torch.nn.functional
    saved = functional.scaled_dot_product_attention, hf_moe._can_use_grouped_mm
    functional.scaled_dot_product_attention = _fused_attention
    hf_moe._can_use_grouped_mm = lambda *args: False
    try:
        yield
    finally:
        functional.scaled_dot_product_attention, hf_moe._can_use_grouped_mm = saved
