"""Logit views (multiround-views): one "view" of the global MoE per device, mixed from several depths.

A small dense device model and a deep sparse MoE see the same text differently: a shallow model's
predictions look like the MoE's *shallower* features, and each device has its own calibration. A view
gives device k a prediction view_k(H), a mix of the MoE's stage logits aligned with that device, so the
KL against the device's top-k knowledge compares like with like. This is the multi-round knowledge
protocol's (beyond the paper) server-side head. It works in logit space: intermediate MoE features are
projected through the LM head and compared with the device's final predictions, which makes it close to
the paper's OFA-KD baseline, not to the paper's VAA (feature-space attention between teacher and student
stages, DESIGN §2).

For every token t and view k:
    n_s      = final_norm(h_s)                       stage features, s = chosen MoE depths (last included)
    z_s      = lm_head(n_s)                          one LM-head pass per stage, shared by all views
    q_kt     = W_q n_L[t] + e_k                      query: last stage + the view's learned embedding
    a_kts    = softmax_s(q_kt . W_k n_s[t] / sqrt(d) + b_ks)   attention across stages (per head, averaged)
    view_k   = (z_L + tanh(g_k) * (sum_s a_kts z_s - z_L)) / exp(log_temp_k)

Design (two CPU probes while it was built): an expressive side path learned each device's knowledge itself and
the exported backbone learned less, so a view can express little but its *view*: which depths, how
much, what temperature. W_q/W_k are shared and narrow, per view there are heads*(dim+stages)+2 numbers,
and everything starts as the identity on the final head (g = 0, e = 0, W_q = 0, b = 0, temp = 1):
at initialisation multiround-views is exactly per-device KD (device-kd). Mixing in logit space is exact
because the LM head is linear, and costs one head pass per stage instead of one per view. The views are
training-only: the exported model is a plain MoE checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def stage_layers(num_layers: int, num_stages: int) -> list[int]:
    """Evenly spaced depths 1..L, the last layer always included, e.g. L=4, S=2 -> [2, 4]."""
    num_stages = min(num_stages, num_layers)
    return sorted({round(num_layers * (i + 1) / num_stages) for i in range(num_stages)})


def stage_logits(hidden_states: tuple[torch.Tensor, ...], final_logits: torch.Tensor, layers: list[int],
                 final_norm: nn.Module, lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised stage features and their logits.

    hidden_states is transformers' tuple (embeddings, layer 1, ..., layer L) whose last entry is already
    final-normed (so its logits are `final_logits`). Returns feats (S, N, d) and logits (S, N, V).
    """
    num_layers = len(hidden_states) - 1
    feats, logits = [], []
    for layer in layers:
        h = hidden_states[layer]
        if layer == num_layers:
            feats.append(h.flatten(0, -2))  # (N, d) already normed
            logits.append(final_logits.flatten(0, -2))  # (N, V)
        else:
            n = final_norm(h).flatten(0, -2)  # (N, d)
            feats.append(n)
            logits.append(lm_head(n))  # (N, V)
    return torch.stack(feats), torch.stack(logits)  # (S, N, d), (S, N, V)


class LogitViews(nn.Module):
    """All views view_1..view_K in one module, computed in one batched pass."""

    def __init__(self, hidden_size: int, num_views: int, num_stages: int, heads: int = 2, dim: int = 16):
        super().__init__()
        self.heads, self.dim, self.num_stages = heads, dim, num_stages
        self.key = nn.Linear(hidden_size, heads * dim, bias=False)
        self.query = nn.Linear(hidden_size, heads * dim, bias=False)
        nn.init.normal_(self.key.weight, std=1.0 / math.sqrt(hidden_size))
        nn.init.zeros_(self.query.weight)  # uniform attention at start; the gate hides it anyway
        self.view_embedding = nn.Parameter(torch.zeros(num_views, heads, dim))
        self.stage_bias = nn.Parameter(torch.zeros(num_views, heads, num_stages))
        self.gate = nn.Parameter(torch.zeros(num_views))  # 0: view_k is the final head at init
        self.log_temp = nn.Parameter(torch.zeros(num_views))

    def attention(self, feats: torch.Tensor) -> torch.Tensor:
        """Per-view, per-token weights over stages. feats (S, N, d) -> (K, N, S)."""
        S, N, _ = feats.shape
        keys = self.key(feats).view(S, N, self.heads, self.dim)  # (S, N, H, D)
        query = self.query(feats[-1]).view(N, self.heads, self.dim)  # (N, H, D)
        query = query.unsqueeze(0) + self.view_embedding.unsqueeze(1)  # (K, N, H, D)
        scores = torch.einsum("knhd,snhd->knhs", query, keys) / math.sqrt(self.dim)  # (K, N, H, S)
        scores = scores + self.stage_bias.unsqueeze(1)  # (K, 1, H, S) broadcast over tokens
        return scores.softmax(dim=-1).mean(dim=2)  # (K, N, S): heads averaged

    def forward(self, feats: torch.Tensor, logits: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """feats (S, N, d), logits (S, N, V) from `stage_logits` -> view logits (K, N, V).

        `views` (K',) selects a subset of views (e.g. the devices that answered this round).
        """
        weights = self.attention(feats)  # (K, N, S)
        gate, temp = torch.tanh(self.gate), self.log_temp.exp()
        if views is not None:
            weights, gate, temp = weights[views], gate[views], temp[views]
        # final + gate * (mixed - final), over temp, folded into one coefficient per stage: a single
        # pass over the (K, N, V) output instead of four (the LM head is linear, so this is exact)
        last = torch.zeros_like(weights)
        last[..., -1] = 1.0  # (K, N, S): the final stage alone
        coef = (last + gate.view(-1, 1, 1) * (weights - last)) / temp.view(-1, 1, 1)  # (K, N, S)
        return torch.einsum("kns,snv->knv", coef, logits)  # (K, N, V)

    def describe(self) -> list[dict[str, float | list[float]]]:
        """What each view learned (gate, temperature, mean stage preference), for logs and analysis."""
        with torch.no_grad():
            prefs = self.stage_bias.softmax(-1).mean(1)  # (K, S)
            return [{"gate": float(torch.tanh(g)), "temperature": float(t.exp()), "stage_pref": [round(float(x), 3) for x in p]}
                    for g, t, p in zip(self.gate, self.log_temp, prefs)]
