"""Knowledge packets: what a device uploads each round of the multi-round knowledge protocol.

Every round each device runs its own small LM over the same N public "proxy" token positions. Instead of
shipping full next-token distributions (N x V floats), it ships, per position, its top-k token ids, their
probabilities at temperature T, and the leftover "tail" mass. The server sees a *coarsened* distribution
over k + 1 outcomes (the k ids plus one bucket for "everything else") and distils it into the global MoE
with the exact KL between that and the student's distribution coarsened the same way (losses.topk_kl).

A device with its own tokenizer (alignment.py) labels the same positions of the global tokenisation, in the
global vocabulary, and says which of them its own tokenisation aligns (`aligned`) and which vocabulary it
projected from (`vocab`); the server takes no knowledge from it at the other positions. Packets of devices
that share the federation's tokenizer carry neither and are byte for byte what they were before.

Read top to bottom:
  1. the packet and its wire format (safetensors via wire/safetensors.py; bytes in docs/WIRE_FORMAT.md)
  2. encode_knowledge : device side, logits -> packet
  3. validate_packet  : server side, reject anything malformed or out of place
  4. to_targets       : packet -> torch tensors for the loss
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from deepfusion.wire import PacketError
from deepfusion.wire import safetensors as st

WIRE_VERSION: int = 1


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
# A device with its own tokenizer adds both; a packet without them aligns every position.
_ALIGNED_DTYPES = {"aligned": ("U8",)}
_VOCAB_FIELD = {"vocab": str}
_VOCAB_RE = re.compile(r"[0-9A-Za-z._:+-]{1,64}")
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


def _alignment_problem(aligned, vocab, n_positions: int) -> str | None:
    """Why the optional alignment parts are malformed, or None: both absent, or a 0/1 uint8 mask of one
    entry per position together with the name of the vocabulary the knowledge was projected from."""
    if (aligned is None) != (vocab is None):
        return ("'aligned' and 'vocab' come together: a device with its own tokenizer sends both, "
                "a device with the federation's sends neither")
    if aligned is None:
        return None
    if not isinstance(vocab, str) or not _VOCAB_RE.fullmatch(vocab):
        return f"vocab must be 1-64 characters of [0-9A-Za-z._:+-] (alignment.vocab_digest), got {vocab!r:.80}"
    if not isinstance(aligned, np.ndarray) or aligned.dtype != np.uint8:
        return f"aligned must be a uint8 numpy array, got {getattr(aligned, 'dtype', type(aligned).__name__)}"
    if aligned.shape != (n_positions,):
        return f"aligned shape {aligned.shape} != ({n_positions},); it must hold one entry per position"
    if aligned.size and aligned.max() > 1:
        return f"aligned holds {int(aligned.max())}; it must be 0 (not aligned) or 1 (aligned)"
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
    aligned: np.ndarray | None = None  # (N,) uint8 0/1, own tokenizer only: positions that carry knowledge
    vocab: str | None = None  # own tokenizer only: alignment.vocab_digest of the vocabulary projected from

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
        a, b = self.aligned, other.aligned
        same_mask = (a is None and b is None) or (a is not None and b is not None and a.dtype == b.dtype
                                                   and a.shape == b.shape and a.tobytes() == b.tobytes())
        return same_scalars and same_arrays and same_mask and self.vocab == other.vocab

    __hash__ = None  # mutable, holds arrays

    def to_bytes(self) -> bytes:
        """Serialise as a safetensors blob: three arrays (four with a mask) + string metadata."""
        problem = (_field_problem(self) or _layout_problem(self.ids, self.probs, self.tail, self.vocab_size)
                   or _alignment_problem(self.aligned, self.vocab, self.n_positions))
        if problem:
            raise PacketError(f"refusing to serialise a malformed packet: {problem}")
        arrays = {name: getattr(self, name) for name in ("ids", "probs", "tail")}
        meta = {key: st.to_str(getattr(self, key), typ) for key, typ in _META_FIELDS.items()}
        if self.aligned is not None:
            arrays["aligned"], meta["vocab"] = self.aligned, self.vocab
        return st.write(arrays, meta)

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = 64 << 20) -> "KnowledgePacket":
        """Parse an upload. Every failure is a PacketError, whatever the bytes are."""
        tensors, fields = _declared(data, max_bytes)
        arrays, meta = st.read(data, "packet", version=str(WIRE_VERSION), fields={**_META_FIELDS, **fields},
                               max_bytes=max_bytes, tensors={**_TENSOR_DTYPES, **tensors},
                               mismatch="wire version is {got!r}, this reader understands {want}; "
                                        "upgrade the reader or downgrade the sender")
        p = cls(**meta, ids=arrays["ids"], probs=arrays["probs"], tail=arrays["tail"], aligned=arrays.get("aligned"))
        problem = (_layout_problem(p.ids, p.probs, p.tail, p.vocab_size)
                   or _alignment_problem(p.aligned, p.vocab, p.n_positions))
        if problem:
            raise PacketError(f"malformed packet: {problem}")
        return p


def _declared(data, max_bytes: int) -> tuple[dict, dict]:
    """The optional tensor and field a blob's header declares, so that st.read expects exactly its parts and
    names any defect itself; a blob it would refuse unread, or cannot parse, declares none."""
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) > max_bytes or not 8 + n <= len(data) or n > st.MAX_HEADER:
            return {}, {}
        header = json.loads(bytes(data[8:8 + n]))
        return (_ALIGNED_DTYPES if "aligned" in header else {},
                _VOCAB_FIELD if "vocab" in header.get("__metadata__", {}) else {})
    except Exception:  # not bytes, not JSON, not an object: st.read says which
        return {}, {}


def _same_scalar(a, b) -> bool:
    """a == b, except that NaN equals NaN (a NaN local_loss must survive a round-trip)."""
    if isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


# -----------------------------------------------------------------------------
# 2. Device side: logits -> packet


@torch.no_grad()
def encode_knowledge(logits: torch.Tensor, topk: int, temperature: float, *, device_id: str,
                     round: int, arch: str, tokens_trained: int, local_loss: float) -> KnowledgePacket:
    """Top-k of softmax(logits / T) per position, plus the tail mass, as a packet.

    logits: (N, V), any float dtype, any device. vocab_size is taken to be V.
    """
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (N, V) tensor, got {logits.dtype} {tuple(logits.shape)}")
    V = logits.shape[1]
    if not 1 <= topk <= V:
        raise ValueError(f"topk must be in [1, V={V}], got {topk}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    z = logits.float() / temperature  # (N, V)
    # top-k of the probabilities == top-k of the logits; exp(z - lse) avoids a full softmax
    top_z, top_ids = z.topk(topk, dim=-1)  # (N, k) each, sorted descending
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
                    n_positions: int, vocab_size: int, topk: int, tol: float = 1e-2) -> None:
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
    if not 1 <= p.k <= topk:
        reject(f"k={p.k} outside [1, topk={topk}]; the device must send between 1 and topk ids per position")
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
    problem = _alignment_problem(p.aligned, p.vocab, p.n_positions)
    if problem:
        reject(problem)
    if p.aligned is not None and not p.aligned.any():
        reject("aligned marks no position: a packet must carry knowledge at one position at least")
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
    """(ids long (N, k), probs float32 (N, k), tail float32 (N,)) on `device`, for losses.topk_kl.

    fp16 rounding leaves sum(probs) + tail a little off 1; we renormalise so each
    coarsened row is an exact distribution and its KL is >= 0. Validate the packet first.
    """
    ids = torch.from_numpy(p.ids.astype(np.int64)).to(device)  # (N, k)
    probs = torch.from_numpy(p.probs.astype(np.float32)).to(device)  # (N, k)
    tail = torch.from_numpy(p.tail.astype(np.float32)).to(device)  # (N,)
    total = (probs.sum(-1) + tail).clamp_min(torch.finfo(torch.float32).tiny)  # (N,)
    return ids, probs / total[:, None], tail / total


def aligned_mask(p: KnowledgePacket, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N,) bool: the positions the packet carries knowledge at (every one without a mask)."""
    if p.aligned is None:
        return torch.ones(p.n_positions, dtype=torch.bool, device=device)
    return torch.from_numpy(p.aligned.astype(bool)).to(device)
