"""Differential privacy for uploads: the Gaussian mechanism on a device's released distributions, and its accountant.

Privacy unit: one device's whole private dataset. That is what a device must protect, and it is all one
can bound here: a packet depends on the private data only through the device's model, and that model
has seen every private token, so no single private record has a smaller, provable influence (that would
need DP-SGD in local training). Neighbouring datasets: the device's dataset replaced by any other.

Mechanism, per round, on the device, before anything leaves it (`privatize`):
    p_n = softmax(z_n / T)                      (N, V) the device's dense next-token distributions
    c_n = p_n · min(1, C / ||p_n||₂)            clip each position to L2 norm C
    v_n = c_n + N(0, σ²C² I_V)                  Gaussian noise on every vocabulary entry
and then only post-processing of v (free under DP, so the choice of ids is covered too):
    ids   = top-k of v_n
    probs = clip(v_n[ids] - floor, 0, 1), rescaled if they sum past 1
    tail  = 1 - sum(probs)
    floor = σC · Φ⁻¹(1 - α/V), α = 1e-3: the largest of V noise draws stays below it with probability >= 1 - α
A device with its own tokenizer passes the log of its distribution projected onto the global vocabulary as z_n
(device.label_proxy), so the mechanism is the same on the same V; its positions that do not align hold a
constant row, which reveals nothing, and are counted in N all the same (a conservative ρ).
Top-k selection picks the largest noise, so raw noised values overstate the mass; where no prediction
clears the floor a packet says "I don't know" (all mass in the tail) instead of confidently naming random
ids, and at most a fraction α of positions carries mass that is pure noise.

Sensitivity: c_n and c'_n (any two datasets) are non-negative with norm <= C, so
||c_n - c'_n||² = ||c_n||² + ||c'_n||² - 2 c_n·c'_n <= 2C², and over the N positions of one upload
    Δ = C · sqrt(2N).
Privacy (Bun & Steinke 2016, zero-concentrated DP): the Gaussian mechanism with noise std σC and L2
sensitivity Δ is ρ-zCDP with ρ = Δ² / (2σ²C²) = N / σ² per upload; zCDP composes by addition (R uploads:
Rρ, adaptively: the device's model changes between rounds); ρ-zCDP gives (ε, δ)-DP for every δ > 0 with
    ε = ρ + 2 sqrt(ρ ln(1/δ)).
So ε grows with the number of positions a device labels: halving the proxy positions per round halves ρ.

Metadata: `tokens_trained` is fixed by the config (steps × batch × block length), `arch` by the preset;
`local_loss` is a function of the private data, so a DP device withholds it (sends 0.0).
Noise comes from a generator seeded by the OS (`secrets`), never from the run's seed, which the server knows.
"""

from __future__ import annotations

import math
import secrets
from statistics import NormalDist

import numpy as np
import torch

from deepfusion.wire.knowledge import KnowledgePacket, id_dtype

WITHHELD_LOSS = 0.0  # local_loss of a DP device's packet: the real one depends on the private data
FALSE_MASS = 1e-3  # α: the chance that a position's reported mass is pure noise (sets the noise floor)


# ---- the mechanism (pure functions) -------------------------------------------------------------

def clip_rows(p: torch.Tensor, clip: float) -> torch.Tensor:
    """(N, V) rows scaled down to L2 norm <= clip; rows already inside the ball are unchanged.

    A probability vector has ||p||₂ <= ||p||₁ = 1, so clip >= 1 never changes a distribution.
    """
    norm = p.norm(dim=-1, keepdim=True)  # (N, 1)
    return p * (clip / norm.clamp_min(torch.finfo(p.dtype).tiny)).clamp(max=1.0)


def gaussian_mechanism(p: torch.Tensor, clip: float, noise_multiplier: float,
                       generator: torch.Generator) -> torch.Tensor:
    """The released (N, V) vectors: clipped rows plus N(0, (σ C)²) on every entry. The only data-dependent step."""
    c = clip_rows(p.float(), clip)  # (N, V)
    noise = torch.randn(c.shape, generator=generator, dtype=torch.float32)  # on CPU: the generator's device
    return c + noise.to(c.device) * (noise_multiplier * clip)


def noise_floor(vocab_size: int, clip: float, noise_multiplier: float, alpha: float = FALSE_MASS) -> float:
    """σC·Φ⁻¹(1 - α/V): the largest of V noise draws stays below it with probability >= 1 - α (union bound),
    so top-k selection does not report noise as mass. E.g. 4.6 σC at V = 512, 5.2 σC at V = 8192."""
    return noise_multiplier * clip * NormalDist().inv_cdf(1.0 - alpha / max(vocab_size, 2))


def sparsify(v: torch.Tensor, topk: int, floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-processing of released vectors v (N, V): top-k ids, debiased probs in [0, 1] (rows descending,
    summing to <= 1) and the tail. Uses nothing but v and public constants."""
    top_v, ids = v.topk(topk, dim=-1)  # (N, k) each, sorted descending
    probs = (top_v - floor).clamp(0.0, 1.0)  # (N, k) monotone, so rows stay descending
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1.0)  # rescale only rows past 1
    tail = (1.0 - probs.sum(-1)).clamp_min(0.0)  # (N,)
    return ids, probs, tail


def privatize(logits: torch.Tensor, topk: int, temperature: float, clip: float, noise_multiplier: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, probs, tail) of one upload's positions under the Gaussian mechanism; logits (N, V) any float."""
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (N, V) tensor, got {logits.dtype} {tuple(logits.shape)}")
    if not (clip > 0 and noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"need clip > 0 and a finite noise_multiplier >= 0, got clip={clip}, "
                         f"noise_multiplier={noise_multiplier}")
    V = logits.shape[1]
    p = torch.softmax(logits.float() / temperature, dim=-1)  # (N, V)
    v = gaussian_mechanism(p, clip, noise_multiplier, generator)  # (N, V)
    return sparsify(v, topk, noise_floor(V, clip, noise_multiplier))


@torch.no_grad()
def encode_private(logits: torch.Tensor, topk: int, temperature: float, *, clip: float, noise_multiplier: float,
                   generator: torch.Generator, device_id: str, round: int, arch: str,
                   tokens_trained: int) -> KnowledgePacket:
    """`wire.knowledge.encode_knowledge` under DP: the same packet layout, noised values, local_loss withheld."""
    ids, probs, tail = privatize(logits, topk, temperature, clip, noise_multiplier, generator)
    V = logits.shape[1]
    return KnowledgePacket(device_id=device_id, round=round, arch=arch, tokens_trained=tokens_trained,
                           local_loss=WITHHELD_LOSS, temperature=float(temperature), vocab_size=V,
                           ids=ids.cpu().numpy().astype(id_dtype(V)),
                           probs=probs.cpu().numpy().astype(np.float16),
                           tail=tail.cpu().numpy().astype(np.float16))


def noise_generator() -> torch.Generator:
    """A generator the server cannot replay: seeded from the OS, not from the (public) run seed."""
    return torch.Generator().manual_seed(secrets.randbits(63))


# ---- the accountant -----------------------------------------------------------------------------

def sensitivity(n_positions: int, clip: float) -> float:
    """L2 sensitivity of one upload of n positions, replacing the device's dataset: C·sqrt(2N)."""
    return clip * math.sqrt(2.0 * n_positions)


def upload_rho(n_positions: int, noise_multiplier: float) -> float:
    """zCDP ρ of one upload: Δ² / (2 (σC)²) = N / σ² (C cancels). Infinite without noise."""
    return math.inf if noise_multiplier <= 0 else n_positions / noise_multiplier ** 2


def epsilon(rho: float, delta: float) -> float:
    """(ε, δ)-DP implied by ρ-zCDP: ε = ρ + 2 sqrt(ρ ln(1/δ)) (Bun & Steinke 2016, Prop. 1.3)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def report(noise_multiplier: float, clip: float, delta: float, rho: float, uploads: int,
           positions_per_upload: int) -> dict:
    """What a device has spent, for summary.json: per upload and composed over its uploads so far."""
    per_upload = upload_rho(positions_per_upload, noise_multiplier) if positions_per_upload else 0.0
    return {"mechanism": "gaussian, device-level, zCDP", "noise_multiplier": noise_multiplier, "clip": clip,
            "delta": delta, "uploads": uploads, "rho": _round(rho),
            "epsilon_per_upload": _round(epsilon(per_upload, delta)), "epsilon": _round(epsilon(rho, delta))}


def federation_report(per_device: dict[str, dict | None]) -> dict:
    """The run's guarantee is its weakest device's: ε = max over devices; None if any device uploads without DP."""
    spent = [r for r in per_device.values() if r is not None]
    exposed = sorted(d for d, r in per_device.items() if r is None)
    return {"epsilon": None if exposed or not spent else max(r["epsilon"] for r in spent),
            "delta": max((r["delta"] for r in spent), default=None), "devices_without_dp": exposed}


def _round(x: float) -> float:
    return x if not math.isfinite(x) else float(f"{x:.4g}")
