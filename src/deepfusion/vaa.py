"""View-Aligned Attention (VAA): the paper's cross-architecture feature distillation (§IV-C, Fig. 5, Eqs. 7-9).

A teacher (a small dense LM of any family) and the student (the MoE's dense base) are each cut into J
representation stages. VAA lets the student blend its stage features into features that look like the
teacher's, then matches them with an MSE per stage:

    F^S    = Concat(C_1 F_1^S, ..., C_J F_J^S)          (B, P_q, d)   Eq. 7: patchify + project each stage
    F^S'   = MHSA(F^S)                                  (B, P_q, d)   Eq. 8: attention across all stage-patches
    F_j^S' = W_j F^S'[stage j]                          (B, P_q/J, d_T)  back to J stages, teacher's width
    L_FM   = sum_j MSE(F_j^T, F_j^S')                                  Eq. 9

Choices the paper leaves open (DESIGN §8), and why:
- stage j ends at layer round(L * j / J) of transformers' hidden_states tuple (embeddings, layer 1, ..., L),
  at least layer 1; a model shallower than J repeats layers (`stage_ends`). The last stage is the final-normed
  output, which transformers puts last in the tuple.
- the teacher's features are brought onto the student's patch grid by averaging each patch's p tokens, then
  standardised per patch (LayerNorm without affine): residual streams differ in scale across families and
  depths (0.05 vs 1.0 in our presets), and without it alpha would weigh teachers and stages differently.
- the student's stage features are standardised per token the same way before the convolution: one
  initialisation of C_j then suits every depth, and the student cannot lower the MSE by rescaling its stream.
- a learned stage embedding and patch-position embedding are added to F^S: attention is permutation-blind,
  so without them a patch could not tell which stage or which stretch of text it came from.
- causal (default): a patch at position t attends only to patches at positions <= t, in any stage. The LM is
  causal; attending to later patches would let VAA read the future and lower the MSE without the student
  encoding it. (Inside a patch the conv sees its p tokens, as the teacher's pooled target does.)
- one pre-norm residual attention block (x + MHSA(LN(x)), then LN before the stage projections): the residual
  makes "stage j answers for teacher stage j" the easy start, attention learns the blend across stages.
VAA is training-only: it lives beside the student during Phase II and is discarded (crosskd.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepfusion.errors import ConfigError


# ---- stages and the patch grid ------------------------------------------------------------------

def stage_ends(num_layers: int, stages: int) -> list[int]:
    """Index into hidden_states where stage j = 1..J ends: round-half-up(L*j/J), at least 1.

    e.g. L=4, J=4 -> [1, 2, 3, 4]; L=6, J=4 -> [2, 3, 5, 6]; L=1, J=4 -> [1, 1, 1, 1] (repeats).
    """
    return [max(1, (2 * num_layers * j + stages) // (2 * stages)) for j in range(1, stages + 1)]


def stage_features(hidden_states: tuple[torch.Tensor, ...], ends: list[int]) -> list[torch.Tensor]:
    """The J stage features F_j, each (B, T, d), from transformers' (embeddings, layer 1, ..., layer L)."""
    return [hidden_states[e] for e in ends]


def patch_length(seq_len: int, patches: int, stages: int) -> int:
    """p = T * J / P_q tokens per patch; T must split evenly into P_q / J patches."""
    per_stage = patches // stages
    if per_stage < 1 or seq_len % per_stage:
        raise ConfigError(
            f"config error: [distill] patches = {patches} with stages = {stages} cuts each stage's sequence into "
            f"{per_stage} patches, but the public blocks are T = {seq_len} tokens, not a multiple of {per_stage}; "
            f"VAA's patches must tile the sequence: set patches to stages x a divisor of {seq_len} "
            f"(e.g. {stages * _largest_divisor(seq_len, max(per_stage, 1))}) or change [data] seq_len")
    return seq_len // per_stage


def _largest_divisor(n: int, at_most: int) -> int:
    return max(k for k in range(1, min(n, at_most) + 1) if n % k == 0)


def pool_patches(h: torch.Tensor, patches: int) -> torch.Tensor:
    """Teacher side: mean over each patch's p tokens, standardised per patch. (B, T, d_T) -> (B, n, d_T)."""
    B, T, d = h.shape
    pooled = h.float().view(B, patches, T // patches, d).mean(dim=2)  # (B, n, d_T)
    return F.layer_norm(pooled, (d,))


def pool_spans(h: torch.Tensor, pool: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Teacher side, own tokenizer: the pool-weighted mean of its tokens per patch, standardised per patch.
    (B, L, d_T), (B, n, L), (B, n) -> (B, n, d_T); an empty patch comes out 0 (the loss leaves it out)."""
    pooled = (pool.to(h.dtype) @ h).float() / weight.clamp_min(1e-9)[..., None]
    return F.layer_norm(pooled, (h.shape[-1],))


# ---- the parts of VAA ---------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """C_j of Eq. 7: a stage's tokens, standardised, cut into patches of p tokens and projected to d."""

    def __init__(self, student_dim: int, dim: int, patch: int):
        super().__init__()
        self.conv = nn.Conv1d(student_dim, dim, kernel_size=patch, stride=patch)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(h, (h.shape[-1],))  # (B, T, d_S) per token
        return self.conv(h.transpose(1, 2)).transpose(1, 2)  # (B, d_S, T) -> (B, d, n) -> (B, n, d)


class StageAttention(nn.Module):
    """Eq. 8: multi-head self-attention over all P_q stage-patches, optionally causal in patch position."""

    def __init__(self, dim: int, heads: int, mask: torch.Tensor | None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # W_q, W_k, W_v
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("mask", mask, persistent=False)  # (P_q, P_q) bool, True = may attend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, P, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # 3 x (B, P, d)
        q, k, v = (t.view(B, P, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, P, d/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)  # (B, H, P, d/H)
        return self.proj(y.transpose(1, 2).reshape(B, P, d))  # (B, P, d)


def patch_mask(stages: int, per_stage: int) -> torch.Tensor:
    """(P_q, P_q) bool: query patch i may see key patch k iff k's position <= i's position, in any stage."""
    pos = torch.arange(stages * per_stage) % per_stage  # (P_q,) stage-major order, as Eq. 7 concatenates
    return pos.unsqueeze(0) <= pos.unsqueeze(1)  # (P_q, P_q): rows are queries


# ---- the whole module ---------------------------------------------------------------------------

class ViewAlignedAttention(nn.Module):
    """VAA for one (student, teacher) pair: student stage features -> J features at the teacher's width."""

    def __init__(self, student_dim: int, teacher_dim: int, seq_len: int, stages: int = 4, patches: int = 32,
                 dim: int = 64, heads: int = 4, causal: bool = True):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"config error: [distill] dim = {dim}: must be a multiple of heads = {heads}")
        self.stages, self.per_stage = stages, patches // stages
        patch = patch_length(seq_len, patches, stages)
        self.embed = nn.ModuleList(PatchEmbed(student_dim, dim, patch) for _ in range(stages))  # C_1..C_J
        self.stage_emb = nn.Parameter(0.02 * torch.randn(stages, 1, dim))  # which stage a patch came from
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, self.per_stage, dim))  # where in the text
        self.ln_attn = nn.LayerNorm(dim)
        self.attn = StageAttention(dim, heads, patch_mask(stages, self.per_stage) if causal else None)
        self.ln_out = nn.LayerNorm(dim)
        self.out = nn.ModuleList(nn.Linear(dim, teacher_dim) for _ in range(stages))  # W_1..W_J to d_T

    def forward(self, student_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """J features (B, T, d_S) -> J aligned features F_j^S', each (B, P_q/J, d_T)."""
        x = torch.stack([c(h) for c, h in zip(self.embed, student_feats)], dim=1)  # (B, J, n, d)
        x = (x + self.stage_emb + self.pos_emb).flatten(1, 2)  # (B, J*n, d) = (B, P_q, d): Eq. 7's concat
        x = x + self.attn(self.ln_attn(x))  # (B, P_q, d): Eq. 8
        x = self.ln_out(x).view(x.shape[0], self.stages, self.per_stage, -1)  # (B, J, n, d)
        return [w(x[:, j]) for j, w in enumerate(self.out)]  # J x (B, n, d_T)

    def loss(self, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
             pool: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 9: sum over stages of the MSE between pooled teacher features and the aligned student's.
        pool (B, n, L): a teacher with its own tokenizer, pooled over character spans (crosskd.patch_pool)."""
        aligned = self(student_feats)
        if pool is None:
            targets = [pool_patches(t.detach(), self.per_stage) for t in teacher_feats]  # J x (B, n, d_T)
            return sum(F.mse_loss(s.float(), t) for s, t in zip(aligned, targets))
        weight = pool.sum(-1)  # (B, n): characters behind each patch's target; 0 = no span ends there
        on = weight > 0
        targets = [pool_spans(t.detach(), pool, weight) for t in teacher_feats]  # J x (B, n, d_T)
        return sum(F.mse_loss(s.float()[on], t[on]) for s, t in zip(aligned, targets))
