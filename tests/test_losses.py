"""Tests for deepfusion.losses: topk_kl and topk_kl_shared by their properties (zero for identical inputs,
k = vocabulary gives the dense KL, the analytic gradient equals autograd's, chunking and weights change nothing
they should not), checked on random inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepfusion.losses import topk_kl, topk_kl_shared
from deepfusion.wire.knowledge import KnowledgePacket, encode_knowledge, to_targets, validate_packet

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
META = dict(device_id="dev-7", round=5, arch="qwen2/small", tokens_trained=123_456, local_loss=2.75)


def reference_topk_kl(z, ids, p, p_tail, weight=None):
    """Plain autograd float64 version of the same loss, straight from the definition."""
    z = z.double()
    N, V = z.shape
    log_q = z.log_softmax(-1).gather(1, ids)  # (N, k)
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1)  # (N,)
    if ids.shape[1] < V:  # with k = V there is no tail bucket (and p_tail must be 0)
        outside = torch.ones_like(z, dtype=torch.bool).scatter(1, ids, False)  # (N, V)
        log_q_tail = z.masked_fill(~outside, -math.inf).logsumexp(-1) - z.logsumexp(-1)  # (N,)
        kl = kl + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    w = torch.ones(N, dtype=z.dtype) if weight is None else weight.double()
    return (w * kl).sum() / w.sum()


def random_targets(N, V, k, seed, topk=True, dtype=torch.float64):
    """Teacher distribution coarsened to k ids (its top-k, or random distinct ids) + tail."""
    g = torch.Generator().manual_seed(seed)
    full = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)  # (N, V)
    if topk:
        ids = full.topk(k, -1).indices  # (N, k)
    else:
        ids = torch.rand(N, V, generator=g).argsort(-1)[:, :k]  # (N, k) distinct, any order
    probs = full.gather(1, ids)  # (N, k)
    tail = (1 - probs.sum(-1)).clamp_min(0)  # (N,)
    if k == V:
        tail = torch.zeros(N, dtype=torch.float64)
    return ids, probs.to(dtype), tail.to(dtype)


def student(N, V, seed, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()


@FAST
@given(N=st.integers(1, 12), V=st.integers(2, 50), k=st.integers(1, 50), seed=st.integers(0, 2**31))
def test_kl_of_identical_coarsened_distributions_is_zero(N, V, k, seed):
    k = min(k, V)
    teacher = torch.randn(N, V, generator=torch.Generator().manual_seed(seed)) * 3
    ids = teacher.topk(k, -1).indices
    q = teacher.softmax(-1)
    probs = q.gather(1, ids)
    tail = (1 - probs.sum(-1)).clamp_min(0) if k < V else torch.zeros(N)
    assert abs(topk_kl(teacher, ids, probs, tail).item()) < 1e-5


def test_identical_distributions_end_to_end_through_the_wire():
    teacher = torch.randn(64, 500) * 4
    p = KnowledgePacket.from_bytes(encode_knowledge(teacher, 8, 2.0, **META).to_bytes())
    validate_packet(p, round=5, known_devices={"dev-7"}, n_positions=64, vocab_size=500, topk=8)
    loss = topk_kl(teacher / 2.0, *to_targets(p))
    assert 0 <= loss.item() < 1e-5  # only fp16 rounding of the targets separates them


@FAST
@given(N=st.integers(1, 10), V=st.integers(1, 60), seed=st.integers(0, 2**31))
def test_full_vocab_equals_dense_kl(N, V, seed):
    ids, probs, tail = random_targets(N, V, V, seed, topk=False, dtype=torch.float32)
    z = student(N, V, seed, torch.float32)
    dense_target = torch.zeros(N, V).scatter(1, ids, probs)  # (N, V)
    dense = F.kl_div(z.log_softmax(-1), dense_target, reduction="batchmean")
    torch.testing.assert_close(topk_kl(z, ids, probs, tail), dense, rtol=1e-5, atol=1e-5)


@FAST
@given(N=st.integers(1, 10), V=st.integers(1, 40), k=st.integers(1, 40), seed=st.integers(0, 2**31),
       topk=st.booleans(), weighted=st.booleans())
def test_loss_and_gradient_match_autograd_reference(N, V, k, seed, topk, weighted):
    k = min(k, V)
    ids, probs, tail = random_targets(N, V, k, seed, topk=topk)
    g = torch.Generator().manual_seed(seed + 2)
    weight = (torch.rand(N, generator=g, dtype=torch.float64) * (torch.rand(N, generator=g) > 0.3)) if weighted else None
    if weight is not None and weight.sum() == 0:
        weight[0] = 0.5
    z = student(N, V, seed)
    loss = topk_kl(z, ids, probs, tail, weight)
    (grad,) = torch.autograd.grad(loss, z)
    z_ref = z.detach().clone().requires_grad_()
    ref = reference_topk_kl(z_ref, ids, probs, tail, weight)
    (grad_ref,) = torch.autograd.grad(ref, z_ref)
    assert loss.item() >= -1e-12  # Gibbs: KL >= 0
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 17, 49, 50])
def test_gradient_matches_reference_for_each_k_in_float32(k):
    N, V = 24, 50
    ids, probs, tail = random_targets(N, V, k, seed=k)
    weight = torch.rand(N, dtype=torch.float64)
    z = student(N, V, seed=k, dtype=torch.float32, scale=4.0)
    topk_kl(z, ids, probs, tail, weight).backward()
    z_ref = z.detach().double().requires_grad_()
    reference_topk_kl(z_ref, ids, probs, tail, weight).backward()
    torch.testing.assert_close(z.grad.double(), z_ref.grad, rtol=1e-4, atol=1e-7)


def test_underflowed_tail_stays_exact():
    # every non-top-k logit is 200 below the top-k ones: in float32 exp(-200) is 0, so
    # 1 - sum(q_S) and even sum(exp(z_j - max)) lose the tail; the loss must not
    N, V, k = 6, 40, 4
    ids, probs, tail = random_targets(N, V, k, seed=3)
    z64 = torch.full((N, V), -200.0, dtype=torch.float64) + torch.randn(N, V, dtype=torch.float64)
    z64.scatter_(1, ids, torch.randn(N, k, dtype=torch.float64))
    z = z64.float().requires_grad_()
    loss = topk_kl(z, ids, probs, tail)
    loss.backward()
    z_ref = z.detach().double().requires_grad_()
    ref = reference_topk_kl(z_ref, ids, probs, tail)
    ref.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(z.grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(z.grad.double(), z_ref.grad, rtol=1e-4, atol=1e-7)


def test_zero_weights_give_exactly_zero_loss_and_grad():
    N, V, k = 8, 30, 5
    ids, probs, tail = random_targets(N, V, k, seed=1, dtype=torch.float32)
    z = student(N, V, 1, torch.float32)
    with torch.no_grad():
        z[0, :] = -math.inf  # a row whose KL is inf: weight 0 must still silence it
        z[0, ids[0, 0]] = 0.0
    loss = topk_kl(z, ids, probs, tail, torch.zeros(N))
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_zero_weight_rows_are_ignored():
    N, V, k = 10, 30, 5
    ids, probs, tail = random_targets(N, V, k, seed=2)
    weight = torch.tensor([1.0, 0, 2, 0, 0, 1, 1, 0, 3, 0], dtype=torch.float64)
    keep = weight > 0
    z = student(N, V, 2)
    loss = topk_kl(z, ids, probs, tail, weight)
    loss.backward()
    z_kept = z.detach()[keep].requires_grad_()
    ref = topk_kl(z_kept, ids[keep], probs[keep], tail[keep], weight[keep])
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z.grad[keep], z_kept.grad)
    assert (z.grad[~keep] == 0).all()


def test_weights_are_scale_free():
    ids, probs, tail = random_targets(7, 20, 3, seed=4)
    z = student(7, 20, 4)
    w = torch.rand(7, dtype=torch.float64)
    torch.testing.assert_close(topk_kl(z, ids, probs, tail, w), topk_kl(z, ids, probs, tail, w * 1e-20))


@FAST
@given(N=st.integers(0, 30), chunk=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_chunked_equals_unchunked(N, chunk, seed):
    V, k = 33, 6
    ids, probs, tail = random_targets(N, V, k, seed, dtype=torch.float32)
    weight = torch.rand(N, generator=torch.Generator().manual_seed(seed))
    z = student(N, V, seed, torch.float32)
    a = topk_kl(z, ids, probs, tail, weight, chunk_size=chunk)
    (ga,) = torch.autograd.grad(a, z)
    b = topk_kl(z, ids, probs, tail, weight, chunk_size=10**6)
    (gb,) = torch.autograd.grad(b, z)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(ga, gb)  # rows are independent: chunking cannot change a gradient entry


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input(dtype):
    N, V, k = 40, 300, 8
    ids, probs, tail = random_targets(N, V, k, seed=5, dtype=torch.float32)
    z = student(N, V, 5, dtype)
    loss = topk_kl(z, ids, probs, tail, chunk_size=16)
    loss.backward()
    z32 = z.detach().float().requires_grad_()
    loss32 = topk_kl(z32, ids, probs, tail)
    loss32.backward()
    assert loss.dtype == torch.float32 and z.grad.dtype == dtype
    torch.testing.assert_close(loss, loss32)  # same logits (already rounded), float32 compute
    torch.testing.assert_close(z.grad.float(), z32.grad, rtol=1e-2, atol=1e-5)


def test_backward_scales_with_grad_output_and_runs_once():
    ids, probs, tail = random_targets(5, 20, 3, seed=6)
    z = student(5, 20, 6)
    (g1,) = torch.autograd.grad(topk_kl(z, ids, probs, tail), z)
    (g3,) = torch.autograd.grad(3 * topk_kl(z, ids, probs, tail), z)
    torch.testing.assert_close(g3, 3 * g1)
    loss = topk_kl(z, ids, probs, tail)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_no_grad_forward_gives_the_same_loss():
    ids, probs, tail = random_targets(9, 25, 4, seed=7)
    z = student(9, 25, 7)
    with torch.no_grad():
        a = topk_kl(z, ids, probs, tail)
    assert not a.requires_grad
    torch.testing.assert_close(a, topk_kl(z.detach(), ids, probs, tail))
    torch.testing.assert_close(a, topk_kl(z, ids, probs, tail).detach())


def test_targets_get_no_gradient():
    ids, probs, tail = random_targets(4, 10, 3, seed=8)
    probs.requires_grad_()
    z = student(4, 10, 8)
    loss = topk_kl(z, ids, probs, tail)
    gz, gp = torch.autograd.grad(loss, (z, probs), allow_unused=True)
    assert gz is not None and gp is None


@pytest.mark.parametrize("change, reason", [
    (dict(ids=torch.zeros(4, 3, dtype=torch.long)), "targets must be"),
    (dict(tail=torch.zeros(5)), "targets must be"),
    (dict(weight=-torch.ones(4)), "weight must be"),
    (dict(weight=torch.ones(3)), "weight must be"),
    (dict(weight=torch.tensor([1.0, float("nan"), 1, 1])), "weight must be"),
    (dict(ids=torch.full((4, 2), 10)), "ids must lie in"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(student_logits=torch.zeros(4, 10, dtype=torch.long)), "student_logits"),
])
def test_topk_kl_rejects_bad_arguments(change, reason):
    args = dict(student_logits=torch.zeros(4, 10), ids=torch.tensor([[0, 1]] * 4), probs=torch.full((4, 2), 0.25),
                tail=torch.full((4,), 0.5))
    args.update(change)
    with pytest.raises(ValueError, match=reason):
        topk_kl(**args)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_shared_student_kl_equals_the_sum_of_per_teacher_kls(k):
    """K teachers against one student: the same value and gradient as topk_kl on the repeated student."""
    g = torch.Generator().manual_seed(k)
    K, N, V = 3, 5, 11
    z = torch.randn(N, V, generator=g, requires_grad=True)
    ids = torch.stack([torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)]) for _ in range(K)])
    raw = torch.rand(K, N, k + 1, generator=g)
    raw = raw / raw.sum(-1, keepdim=True)
    probs, tail = raw[..., :k], raw[..., k]
    w = torch.rand(K, N, generator=g)
    shared = topk_kl_shared(z, ids, probs, tail, w)
    (grad_shared,) = torch.autograd.grad(shared, z)
    z2 = z.detach().clone().requires_grad_(True)
    ref = topk_kl(z2.unsqueeze(0).expand(K, N, V).reshape(K * N, V), ids.reshape(K * N, k),
                  probs.reshape(K * N, k), tail.reshape(K * N), weight=w.reshape(K * N))
    ref.backward()
    torch.testing.assert_close(shared, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_shared, z2.grad, atol=1e-5, rtol=1e-4)
    assert topk_kl_shared(z, ids, probs, tail, torch.zeros(K, N)).item() == 0.0
