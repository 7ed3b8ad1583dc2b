"""The top-k distillation losses: KL(teacher || student) between distributions coarsened to k ids + a tail.

A teacher (a device's knowledge packet, or the teachers' mixture in tuning) gives, per position, k token ids,
their probabilities and the leftover tail mass (wire/knowledge.py, to_targets). The student's full
distribution is coarsened the same way, onto the same k ids plus one bucket for everything else, and the KL
between the two (k + 1)-outcome distributions is exact.

    topk_kl         one teacher per student row; a hand-written, chunked backward (memory: one (N, V) buffer)
    topk_kl_shared  K teachers against one student row each: one log-normaliser for all of them
"""

from __future__ import annotations

import math

import torch

# The loss: KL(teacher || student) between coarsened distributions
#
# For one row with student logits z (V,), teacher ids S (k,), probs p (k,), tail p_t:
#   q = softmax(z),  q_S = q[S],  q_t = 1 - sum(q_S)
#   KL = sum_i p_i (log p_i - log q_i) + p_t (log p_t - log q_t)
# and, with P = sum(p) + p_t (exactly 1 after to_targets),
#   dKL/dz_j = P q_j - p_i                 for j = S_i
#   dKL/dz_j = P q_j - p_t q_j / q_t       for j not in S
# 1 - sum(q_S) would cancel catastrophically when q_t is tiny, so log q_t is computed
# as logsumexp(z outside S) - logsumexp(z): we sum exp(z_j - max z) over j not in S
# directly. Rows where even that sum underflows (every non-top-k logit ~90+ below the
# max in float32) take an exact masked-logsumexp path instead.
#
# Speed: the loss is one pass of exp plus a few cheap reductions per chunk, and the
# gradient is built in place in the same buffer during forward. Only that (N, V)
# gradient is kept for backward, which just scales it by grad_output. On CPU, fresh
# (c, V) temporaries (page faults) and torch.logsumexp (several passes) made a
# recompute-in-backward version 2.6x a cross-entropy step; this one is below 1x.


def _xlogx_minus_xlogy(x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x (log x - log y), defined as 0 where x == 0 (even if log y = -inf)."""
    return torch.where(x > 0, x * (x.log() - log_y), torch.zeros_like(x))


def _exact_tail(z: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor):
    """log q_t and q_j / q_t (0 on the top-k columns) for the few rows whose tail underflowed.

    z (r, V), ids (r, k), lse (r,) = logsumexp(z). q_j / q_t = exp(z_j - lse_rest) <= 1.
    """
    lse_rest = z.scatter(1, ids, -math.inf).logsumexp(-1)  # (r,) over non-top-k logits only
    # no logits outside S at all (k = V, or all -inf): q_t = 0, KL = inf, no tail pull
    safe = torch.where(torch.isfinite(lse_rest), lse_rest, torch.full_like(lse_rest, math.inf))
    pull = (z - safe[:, None]).exp_().scatter_(1, ids, 0.0)  # (r, V)
    return lse_rest - lse, pull


def _kl_and_grad_chunk(z, ids, p, p_tail, scale, buf):
    """KL per row (c,) of one chunk; writes scale_n * dKL_n/dz into buf (c, V).

    z (c, V) compute dtype (never modified), ids (c, k), p (c, k), p_tail/scale (c,).
    """
    m = z.amax(-1, keepdim=True)  # (c, 1) shift so exp never overflows
    e = torch.sub(z, m, out=buf).exp_()  # (c, V) exp(z - m), reusing buf: no new (c, V)
    z_S = z.gather(1, ids)  # (c, k)
    e_S = (z_S - m).exp()  # (c, k)
    e.scatter_(1, ids, 0.0)  # (c, V) keep only the non-top-k columns
    rest = e.sum(-1)  # (c,) sum over j not in S of exp(z_j - m): no cancellation
    total = rest + e_S.sum(-1)  # (c,) softmax denominator, >= 1 (it contains exp(0))
    log_q = z_S - m - total.log()[:, None]  # (c, k)
    log_q_tail = rest.log() - total.log()  # (c,)
    mass = p.sum(-1) + p_tail  # (c,) P above
    # rows with p_t > 0 but an underflowed tail sum go through _exact_tail
    tiny = torch.finfo(z.dtype).tiny ** 0.5  # far above subnormals: rest is accurate above it
    exact = (p_tail > 0) & (rest < tiny)  # (c,)
    pull = torch.where((p_tail > 0) & ~exact, p_tail / rest, torch.zeros_like(rest))  # (c,) p_t / (q_t total)
    # non-top-k columns: e_j (P / total - p_t / rest) = P q_j - p_t q_j / q_t
    e.mul_(((mass / total - pull) * scale)[:, None])
    if exact.any():
        rows = exact.nonzero().squeeze(1)  # (r,)
        log_q_tail[rows], ratio = _exact_tail(z[rows], ids[rows], (m[rows, 0] + total[rows].log()))
        e.index_add_(0, rows, ratio.mul_((p_tail * scale)[rows, None]), alpha=-1.0)  # - p_t q_j / q_t
    # top-k columns: P q_i - p_i
    e.scatter_(1, ids, (e_S / total[:, None] * mass[:, None] - p) * scale[:, None])
    return _xlogx_minus_xlogy(p, log_q).sum(-1) + _xlogx_minus_xlogy(p_tail, log_q_tail)


class _TopkKL(torch.autograd.Function):
    """Loss and its analytic gradient, chunk_size rows at a time, both in forward.

    The gradient buffer (N, V, in z's dtype) is the only large tensor kept for backward.
    """

    @staticmethod
    def forward(ctx, z, ids, p, p_tail, scale, chunk_size):
        # z (N, V) any float; ids (N, k) long; p (N, k), p_tail (N,), scale (N,) in compute dtype
        cdt = p.dtype
        N, V = z.shape
        grad = torch.empty_like(z) if ctx.needs_input_grad[0] else None  # (N, V)
        direct = grad is not None and z.dtype == cdt  # build the gradient in place in grad
        tmp = None if direct else torch.empty(min(chunk_size, N), V, dtype=cdt, device=z.device)
        kl = torch.empty(N, dtype=cdt, device=z.device)  # (N,)
        for a in range(0, N, chunk_size):
            b = min(a + chunk_size, N)
            buf = grad[a:b] if direct else tmp[: b - a]  # (c, V)
            kl[a:b] = _kl_and_grad_chunk(z[a:b].to(cdt), ids[a:b], p[a:b], p_tail[a:b], scale[a:b], buf)
            if grad is not None and not direct:
                grad[a:b] = buf  # cast to z's dtype (bf16/fp16)
        # zero-weight rows contribute exactly 0, even if their KL is inf
        loss = torch.where(scale > 0, scale * kl, torch.zeros_like(kl)).sum()
        ctx.grad = grad  # not an input or output, so a ctx attribute rather than save_for_backward
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None  # hand the buffer over; it is scaled in place below
        if grad is None:
            raise RuntimeError("topk_kl backward ran twice (retain_graph=True?); "
                               "its gradient buffer is consumed by the first backward; recompute the loss")
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None, None


def topk_kl(student_logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
            tail: torch.Tensor, weight: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Weighted mean over rows of KL(teacher || student), both coarsened to ids + tail.

    student_logits: (N, V) float, already divided by the temperature by the caller.
    ids (N, k) long, probs (N, k), tail (N,): from to_targets (validated, so no duplicate ids).
    weight: (N,) >= 0, or None for a plain mean. Returns a scalar:
        sum_n w_n KL_n / max(sum_n w_n, eps)  -- exactly 0, with zero gradient, when all w_n = 0.
    Gradients flow to student_logits only. Computes in float32 (float64 for float64
    input); the loss is in that dtype and the gradient in student_logits' dtype.
    """
    z = student_logits
    if z.ndim != 2 or not z.is_floating_point():
        raise ValueError(f"student_logits must be a float (N, V) tensor, got {z.dtype} {tuple(z.shape)}")
    N, V = z.shape
    if ids.ndim != 2 or ids.shape[0] != N or probs.shape != ids.shape or tail.shape != (N,):
        raise ValueError(f"targets must be ids (N, k), probs (N, k), tail (N,) with N={N}; got "
                         f"{tuple(ids.shape)}, {tuple(probs.shape)}, {tuple(tail.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cdt = torch.promote_types(z.dtype, torch.float32)
    ids = ids.to(z.device, torch.long)
    if ids.numel() and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(f"ids must lie in [0, V={V}), got range [{int(ids.min())}, {int(ids.max())}]; "
                         f"run validate_packet first")
    probs, tail = probs.detach().to(z.device, cdt), tail.detach().to(z.device, cdt)
    weight = torch.ones(N, dtype=cdt, device=z.device) if weight is None else weight.detach().to(z.device, cdt)
    if weight.shape != (N,) or not torch.isfinite(weight).all() or (weight < 0).any():
        raise ValueError(f"weight must be finite, >= 0 and of shape ({N},); got shape {tuple(weight.shape)}")
    scale = weight / weight.sum().clamp_min(torch.finfo(cdt).tiny)  # (N,) sums to 1, or all 0
    return _TopkKL.apply(z, ids, probs, tail, scale, chunk_size)


def topk_kl_shared(student_logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
    """Σ_k Σ_n w_kn KL(teacher_kn || student_n) / Σ w: K teachers against ONE student row per position.

    The per-device KD term compares every device with the same final head. Calling `topk_kl` on the
    student repeated K times costs K softmaxes over the vocabulary; here the log-normaliser is computed
    once and each teacher only gathers its k logits, so K teachers cost about one cross-entropy.
    student_logits (N, V); ids (K, N, k) long; probs (K, N, k); tail (K, N); weight (K, N) >= 0.
    log q_tail = log(1 - Σ q_i) is clamped at 1e-12: exact unless a device's top-k covers the student's
    mass to within float32 rounding, where the term is bounded instead of infinite.
    """
    z = student_logits.float()
    K, N, k = ids.shape
    lse = torch.logsumexp(z, dim=-1)  # (N,)
    gathered = z.gather(1, ids.permute(1, 0, 2).reshape(N, K * k))  # (N, K*k): one gather for all teachers
    log_q = (gathered - lse.unsqueeze(1)).view(N, K, k).permute(1, 0, 2)  # (K, N, k)
    q_tail = (1.0 - log_q.exp().sum(-1)).clamp_min(1e-12)  # (K, N)
    p, p_tail = probs.float(), tail.float()
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * q_tail.log()  # (K, N)
    w = weight.float()
    return (w * kl).sum() / w.sum().clamp_min(1e-12)
