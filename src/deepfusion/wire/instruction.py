"""The instruction: what the server asks of each device every round of the multi-round knowledge protocol.

No model weights: only what to do (local steps, batch size, learning rate) and which public proxy blocks to
label, with k and the temperature of the knowledge packet the device answers with (wire/knowledge.py).

It is compact JSON, not safetensors: it holds no tensor, and its bytes are what the recorded runs and
engine-parity digests were made with. Keys in field order, no spaces:

    {"round":3,"proxy_indices":[0,1,2],"local_steps":4,"batch_size":8,"lr":0.002,"topk":16,"temperature":2.0}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from deepfusion.wire import PacketError

MAX_BYTES = 16 << 20  # an instruction lists proxy block indices: a few kB for thousands of blocks


@dataclass
class Instruction:
    """Server -> device, each round."""

    round: int  # 1-based federation round the device answers
    proxy_indices: list[int]  # which proxy blocks to label, in order
    local_steps: int  # local optimiser steps before labelling
    batch_size: int
    lr: float
    topk: int  # k of the packet's top-k ids per position
    temperature: float  # T of the packet's probabilities

    @classmethod
    def for_device(cls, cfg, dc, round: int, n_proxy: int) -> Instruction:
        """The round's message to device `dc` of `cfg` (a FederationConfig and one of its DeviceConfigs): every
        proxy block, the device's own training settings, the federation's knowledge settings. Both engines and
        the scale projection build it here, so their bytes agree."""
        return cls(round=round, proxy_indices=list(range(n_proxy)), local_steps=dc.local_steps,
                   batch_size=dc.batch_size, lr=dc.lr, topk=cfg.knowledge.topk, temperature=cfg.knowledge.temperature)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = MAX_BYTES) -> Instruction:
        """Parse the server's instruction; any defect is a PacketError naming it."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise PacketError(f"malformed instruction: must be bytes, got {type(data).__name__}")
        if len(data) > max_bytes:
            raise PacketError(f"instruction is {len(data)} bytes, over the {max_bytes}-byte limit; refused unread")
        try:
            got = json.loads(bytes(data).decode())
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON
            raise PacketError(f"malformed instruction: not JSON ({type(e).__name__}: {str(e)[:80]})") from None
        problem = _problem(got)
        if problem:
            raise PacketError(f"malformed instruction: {problem}; server and device must run the same deepfusion")
        return cls(**got)


def _problem(got) -> str | None:
    """Why a parsed instruction cannot be run, or None."""
    if not isinstance(got, dict):
        return f"must be a JSON object, got {type(got).__name__}"
    names = [f.name for f in fields(Instruction)]
    if set(got) != set(names):
        return f"fields wrong: missing {sorted(set(names) - set(got))}, unexpected {sorted(set(got) - set(names))}"
    for key in ("round", "local_steps", "batch_size", "topk"):
        if not _is_int(got[key]):
            return f"{key!r} must be an integer, got {got[key]!r}"
    if not isinstance(got["proxy_indices"], list) or not all(_is_int(i) and i >= 0 for i in got["proxy_indices"]):
        return "'proxy_indices' must be a list of integers >= 0"
    for key in ("lr", "temperature"):
        v = got[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"{key!r} must be a finite number, got {v!r}"
    for key, lo in (("local_steps", 0), ("batch_size", 1), ("topk", 1)):
        if got[key] < lo:
            return f"{key!r} must be >= {lo}, got {got[key]}"
    if got["lr"] < 0 or got["temperature"] <= 0:
        return f"lr must be >= 0 and temperature > 0, got lr={got['lr']}, temperature={got['temperature']}"
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
