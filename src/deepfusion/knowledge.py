"""Knowledge packets: what a device uploads each round, and the loss that distils them.

Every round each device runs its own small LM over the same N public "proxy" token
positions. Instead of shipping full next-token distributions (N x V floats), it ships,
per position, its top-k token ids, their probabilities at temperature T, and the
leftover "tail" mass. The server sees a *coarsened* distribution over k + 1 outcomes
(the k ids plus one bucket for "everything else") and distils it into the global MoE
with the exact KL between that and the student's distribution coarsened the same way.

Read top to bottom:
  1. the packet and its wire format (safetensors; byte layout in docs/WIRE_FORMAT.md)
  2. encode_knowledge : device side, logits -> packet
  3. validate_packet  : server side, reject anything malformed or out of place
  4. to_targets       : packet -> torch tensors for the loss
  5. topk_kl          : the coarsened KL with a hand-written, chunked backward
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np
import safetensors.numpy
import torch

WIRE_VERSION: int = 1


class PacketError(ValueError):
    """A knowledge packet is malformed or invalid. The message is one clear reason."""


# -----------------------------------------------------------------------------
# 1. The packet and its wire format


def id_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned integer dtype that holds every token id 0 .. vocab_size-1."""
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(
        f"vocab_size={vocab_size} does not fit uint32 ids; the wire format caps ids at 32 bits"
    )


# metadata key -> python type it parses to; every value travels as a string
_META_FIELDS = {
    "version": int,
    "device_id": str,
    "round": int,
    "arch": str,
    "tokens_trained": int,
    "local_loss": float,
    "temperature": float,
    "vocab_size": int,
}
_TENSOR_DTYPES = {"ids": ("U8", "U16", "U32"), "probs": ("F16",), "tail": ("F16",)}
_INT_RE = re.compile(r"-?[0-9]{1,30}")  # plain decimal only: no "1_000", no " 7", no 10**4000
_PY_TYPES = {str: (str,), int: (int, np.integer), float: (int, float, np.integer, np.floating)}


def _field_problem(p) -> str | None:
    """Why p's scalar fields have the wrong Python types, or None if they are fine."""
    for key, typ in _META_FIELDS.items():
        v = getattr(p, key)
        if isinstance(v, bool) or not isinstance(v, _PY_TYPES[typ]):
            return f"field {key!r} must be {typ.__name__}, got {type(v).__name__}"
    return None


def _layout_problem(ids, probs, tail, vocab_size) -> str | None:
    """Why the three arrays don't form a well-shaped packet, or None if they do.

    Shared by to_bytes, from_bytes and validate_packet so all three agree on the layout.
    """
    for name, a in (("ids", ids), ("probs", probs), ("tail", tail)):
        if not isinstance(a, np.ndarray):
            return f"{name} must be a numpy array, got {type(a).__name__}"
    try:
        want_ids = id_dtype(vocab_size)
    except ValueError as e:
        return f"bad vocab_size: {e}"
    if ids.dtype != want_ids:
        return (f"ids dtype is {ids.dtype}, but vocab_size={vocab_size} needs {want_ids} "
                f"(the narrowest unsigned type); encode with id_dtype(vocab_size)")
    if probs.dtype != np.float16 or tail.dtype != np.float16:
        return (f"probs/tail dtype must be float16, got {probs.dtype}/{tail.dtype}; "
                f"the wire format ships half precision, build packets with encode_knowledge")
    if ids.ndim != 2:
        return f"ids shape must be (N, k), got {ids.shape}"
    if probs.shape != ids.shape:
        return f"probs shape {probs.shape} != ids shape {ids.shape}; both must be (N, k)"
    if tail.shape != ids.shape[:1]:
        return f"tail shape {tail.shape} != ({ids.shape[0]},); it must be (N,)"
    return None


@dataclass(eq=False)  # eq below: arrays compare bit for bit, not element-wise
class KnowledgePacket:
    device_id: str
    round: int  # 1-based federation round
    arch: str  # architecture descriptor, e.g. "qwen2/small"
    tokens_trained: int  # private tokens the device trained on so far
    local_loss: float  # device's mean local training loss this round
    temperature: float
    vocab_size: int
    ids: np.ndarray  # (N, k) id_dtype(vocab_size)
    probs: np.ndarray  # (N, k) float16, each row descending
    tail: np.ndarray  # (N,)   float16, 1 - sum(probs) clipped at 0
    version: int = WIRE_VERSION

    @property
    def n_positions(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def __eq__(self, other) -> bool:
        if not isinstance(other, KnowledgePacket):
            return NotImplemented
        same_scalars = all(
            _same_scalar(getattr(self, f), getattr(other, f)) for f in _META_FIELDS
        )
        same_arrays = all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for a, b in ((self.ids, other.ids), (self.probs, other.probs), (self.tail, other.tail))
        )
        return same_scalars and same_arrays

    __hash__ = None  # mutable, holds arrays

    def to_bytes(self) -> bytes:
        """Serialise as a safetensors blob: three arrays + string metadata."""
        problem = _field_problem(self) or _layout_problem(self.ids, self.probs, self.tail, self.vocab_size)
        if problem:
            raise PacketError(f"refusing to serialise a malformed packet: {problem}")
        # safetensors reads raw memory from the data pointer, so arrays must be contiguous
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in ("ids", "probs", "tail")}
        # repr() of a float round-trips exactly; str() of an int is plain decimal
        meta = {key: (repr(float(getattr(self, key))) if typ is float else str(getattr(self, key)))
                for key, typ in _META_FIELDS.items()}
        return canonical_safetensors(safetensors.numpy.save(arrays, metadata=meta))

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = 64 << 20) -> "KnowledgePacket":
        """Parse an upload. Every failure is a PacketError, whatever the bytes are."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise PacketError(f"packet must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > max_bytes:
            raise PacketError(f"packet is {len(data)} bytes, over the {max_bytes}-byte limit")
        header = _read_header(data)
        meta = _read_metadata(header)
        try:
            # safetensors checks offsets, sizes and that the data is exactly covered
            arrays = safetensors.numpy.load(data)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # pyo3 panics derive from BaseException, not Exception
            raise PacketError(f"not a valid safetensors blob: {e}") from None
        p = cls(**meta, ids=arrays["ids"], probs=arrays["probs"], tail=arrays["tail"])
        problem = _layout_problem(p.ids, p.probs, p.tail, p.vocab_size)
        if problem:
            raise PacketError(problem)
        return p


def canonical_safetensors(blob: bytes) -> bytes:
    """Rewrite the safetensors header with sorted keys: safetensors orders metadata by a hash map, so equal
    packets would otherwise give different bytes, and engines compare packets byte for byte."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), separators=(",", ":"), sort_keys=True).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8-byte alignment
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def _same_scalar(a, b) -> bool:
    """a == b, except that NaN equals NaN (a NaN local_loss must survive a round-trip)."""
    if isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _read_header(data: bytes) -> dict:
    """The safetensors JSON header: 8-byte little-endian length, then that much JSON.

    safetensors.numpy.load does not return metadata, so we read the header ourselves;
    checking tensor names and dtypes here also gives clearer errors than the loader.
    """
    if len(data) < 8:
        raise PacketError(f"packet is {len(data)} bytes; too short to hold the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise PacketError(f"header claims {n} bytes but only {len(data) - 8} follow; truncated or not safetensors")
    try:
        header = json.loads(data[8:8 + n])
    except Exception as e:  # bad utf-8, bad JSON, absurd nesting (RecursionError)
        raise PacketError(f"header is not valid JSON: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise PacketError(f"header must be a JSON object, got {type(header).__name__}")
    names = set(header) - {"__metadata__"}
    if names != set(_TENSOR_DTYPES):
        raise PacketError(f"tensors must be exactly {sorted(_TENSOR_DTYPES)}, got {sorted(names)}")
    for name, allowed in _TENSOR_DTYPES.items():
        entry = header[name]
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in allowed:
            raise PacketError(f"tensor {name!r} has dtype {dtype!r}; the wire format allows {list(allowed)}")
    return header


def _read_metadata(header: dict) -> dict:
    """Typed packet fields from the header's __metadata__ (a str -> str map)."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PacketError("header __metadata__ must be a map of strings to strings")
    # version first: a future version may have different fields, and this is the real reason
    version = meta.get("version")
    if version != str(WIRE_VERSION):
        raise PacketError(f"wire version is {version!r}, this reader understands {WIRE_VERSION}; "
                          f"upgrade the reader or downgrade the sender")
    if set(meta) != set(_META_FIELDS):
        missing, extra = set(_META_FIELDS) - set(meta), set(meta) - set(_META_FIELDS)
        raise PacketError(f"metadata fields wrong: missing {sorted(missing)}, unexpected {sorted(extra)}")
    out = {}
    for key, typ in _META_FIELDS.items():
        s = meta[key]
        if typ is int:
            if not _INT_RE.fullmatch(s):
                raise PacketError(f"metadata {key!r} must be a decimal integer, got {s[:40]!r}")
            out[key] = int(s)
        elif typ is float:
            try:
                out[key] = float(s)
            except ValueError:
                raise PacketError(f"metadata {key!r} must be a float, got {s[:40]!r}") from None
        else:
            out[key] = s
    return out


# -----------------------------------------------------------------------------
# 2. Device side: logits -> packet


@torch.no_grad()
def encode_knowledge(logits: torch.Tensor, k: int, temperature: float, *, device_id: str,
                     round: int, arch: str, tokens_trained: int, local_loss: float) -> KnowledgePacket:
    """Top-k of softmax(logits / T) per position, plus the tail mass, as a packet.

    logits: (N, V), any float dtype, any device. vocab_size is taken to be V.
    """
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (N, V) tensor, got {logits.dtype} {tuple(logits.shape)}")
    V = logits.shape[1]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V={V}], got {k}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    z = logits.float() / temperature  # (N, V)
    # top-k of the probabilities == top-k of the logits; exp(z - lse) avoids a full softmax
    top_z, top_ids = z.topk(k, dim=-1)  # (N, k) each, sorted descending
    probs = (top_z - z.logsumexp(-1, keepdim=True)).exp()  # (N, k)
    if not torch.isfinite(probs).all():
        raise ValueError("logits produce non-finite probabilities (NaN or +inf in logits); fix the model output")
    tail = (1.0 - probs.sum(-1)).clamp_min(0.0)  # (N,) float32 before rounding to fp16
    return KnowledgePacket(
        device_id=device_id, round=round, arch=arch, tokens_trained=tokens_trained,
        local_loss=float(local_loss), temperature=float(temperature), vocab_size=V,
        ids=top_ids.cpu().numpy().astype(id_dtype(V)),
        probs=probs.cpu().numpy().astype(np.float16),  # rounding keeps rows descending
        tail=tail.cpu().numpy().astype(np.float16),
    )


# -----------------------------------------------------------------------------
# 3. Server side: validation


def validate_packet(p: KnowledgePacket, *, round: int, known_devices: set[str] | None,
                    n_positions: int, vocab_size: int, k_max: int, tol: float = 1e-2) -> None:
    """Raise PacketError (naming device, round and defect) unless p is fit to distil this round."""
    where = f"packet from device {p.device_id!r} for round {p.round}"

    def reject(what: str):
        raise PacketError(f"{where}: {what}")

    problem = _field_problem(p)
    if problem:
        reject(problem)
    # who and when
    if p.version != WIRE_VERSION:
        reject(f"wire version {p.version}, server speaks {WIRE_VERSION}; device must upgrade")
    if known_devices is not None and p.device_id not in known_devices:
        reject("unknown device; it is not registered in this federation")
    if p.round < round:
        reject(f"stale round: server is at round {round}; drop it, the device will resend")
    if p.round > round:
        reject(f"future round: server is at round {round}; device clock is ahead")
    # scalars
    if p.vocab_size != vocab_size:
        reject(f"vocab_size {p.vocab_size} != server vocab_size {vocab_size}; wrong tokenizer")
    if not (math.isfinite(p.temperature) and p.temperature > 0):
        reject(f"temperature must be finite and > 0, got {p.temperature}")
    if p.tokens_trained < 0:
        reject(f"tokens_trained must be >= 0, got {p.tokens_trained}")
    if not math.isfinite(p.local_loss):
        reject(f"local_loss must be finite, got {p.local_loss}; device training diverged")
    # layout
    problem = _layout_problem(p.ids, p.probs, p.tail, p.vocab_size)
    if problem:
        reject(problem)
    if p.n_positions != n_positions:
        reject(f"n_positions {p.n_positions} != {n_positions} proxy positions this round; "
               f"the device must score every proxy position")
    if not 1 <= p.k <= k_max:
        reject(f"k={p.k} outside [1, k_max={k_max}]; the device must send between 1 and k_max ids")
    # values
    probs, tail = p.probs.astype(np.float32), p.tail.astype(np.float32)  # (N, k), (N,)
    if not (np.isfinite(probs).all() and np.isfinite(tail).all()):
        reject("non-finite probs or tail (NaN/inf); the device model output is broken")
    if probs.size and (probs.min() < 0 or probs.max() > 1):
        reject(f"probs outside [0, 1]: got range [{probs.min()}, {probs.max()}]")
    if tail.size and (tail.min() < 0 or tail.max() > 1):
        reject(f"tail outside [0, 1]: got range [{tail.min()}, {tail.max()}]")
    err = np.abs(probs.sum(-1) + tail - 1.0)  # (N,)
    if err.size and err.max() > tol:
        n = int(err.argmax())
        reject(f"probs + tail sum to {probs[n].sum() + tail[n]:.4f} at position {n}, not 1 (tol {tol})")
    if p.ids.size and int(p.ids.max()) >= vocab_size:
        reject(f"ids out of range: max id {int(p.ids.max())} >= vocab_size {vocab_size}; wrong tokenizer?")
    ids = np.sort(p.ids, axis=1)  # (N, k); duplicates become neighbours
    dup = (ids[:, 1:] == ids[:, :-1]).any(axis=1)  # (N,)
    if dup.any():
        reject(f"duplicate ids within a row, first at position {int(dup.argmax())}; "
               f"top-k ids are distinct, so the packet was not made by encode_knowledge")


# -----------------------------------------------------------------------------
# 4. Packet -> loss targets


def to_targets(p: KnowledgePacket, device: torch.device | str = "cpu"):
    """(ids long (N, k), probs float32 (N, k), tail float32 (N,)) on `device`.

    fp16 rounding leaves sum(probs) + tail a little off 1; we renormalise so each
    coarsened row is an exact distribution and its KL is >= 0. Validate the packet first.
    """
    ids = torch.from_numpy(p.ids.astype(np.int64)).to(device)  # (N, k)
    probs = torch.from_numpy(p.probs.astype(np.float32)).to(device)  # (N, k)
    tail = torch.from_numpy(p.tail.astype(np.float32)).to(device)  # (N,)
    total = (probs.sum(-1) + tail).clamp_min(torch.finfo(torch.float32).tiny)  # (N,)
    return ids, probs / total[:, None], tail / total


# -----------------------------------------------------------------------------
# 5. The loss: KL(teacher || student) between coarsened distributions
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
