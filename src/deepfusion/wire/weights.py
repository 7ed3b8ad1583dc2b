"""Weights on the wire: what `fedavg-moe` and `expert-subset` send down and up every round.

A WeightsPacket is one safetensors blob (wire/safetensors.py): named fp32 tensors (the hosted parameters
under their state-dict names, plus a few named extras such as router-usage counts) and string metadata
(version, device, round, tokens trained, the hosted experts, the round's training settings). Its length is
the bytes the method costs, so communication is measured exactly as for knowledge packets.

The server checks every upload against what it sent before averaging: same names, same shapes, fp32,
finite, tokens > 0. A bad upload is rejected with a reason and the round goes on (as in server.receive).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from deepfusion.wire import PacketError
from deepfusion.wire import safetensors as st

WEIGHTS_VERSION = 1
MAX_BYTES = 1 << 32  # the whole global MoE in fp32 fits; a round's cap is the caller's to set tighter
_FIELDS = {"version": str, "device_id": str, "round": int, "tokens": int, "settings": "json", "hosted": "json"}


@dataclass
class WeightsPacket:
    device_id: str
    round: int
    tensors: dict[str, torch.Tensor]  # state-dict name -> fp32 tensor
    tokens: int = 0  # tokens the device trained on this round (FedAvg's weight); 0 on the way down
    hosted: dict[int, list[int]] | None = None  # layer -> routed expert ids it holds; None: all of them
    settings: dict[str, float] = field(default_factory=dict)  # down: steps, batch_size, lr

    def to_bytes(self) -> bytes:
        meta = {"version": str(WEIGHTS_VERSION), "device_id": self.device_id, "round": str(self.round),
                "tokens": str(self.tokens), "settings": st.to_str(self.settings, "json"),
                "hosted": json.dumps(hosted_to_json(self.hosted))}  # in layer order, as version 1 always wrote it
        return st.write({k: v.detach().to("cpu", torch.float32) for k, v in self.tensors.items()}, meta)

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = MAX_BYTES) -> WeightsPacket:
        """Parse a blob; any defect is a PacketError naming it."""
        tensors, meta = st.read(data, "weights packet", version=str(WEIGHTS_VERSION), fields=_FIELDS,
                                max_bytes=max_bytes, backend="torch")
        if not isinstance(meta["settings"], dict):
            raise PacketError(f"malformed weights packet: settings must be a JSON object, got {meta['settings']!r}")
        return cls(meta["device_id"], meta["round"], tensors, meta["tokens"], hosted_from_json(meta["hosted"]),
                   meta["settings"])


def hosted_to_json(hosted: dict[int, list[int]] | None) -> dict[str, list[int]] | None:
    """The hosted experts as JSON has them: layer numbers become string keys."""
    return None if hosted is None else {str(layer): ids for layer, ids in hosted.items()}


def hosted_from_json(hosted) -> dict[int, list[int]] | None:
    """The hosted experts back from JSON (`hosted_to_json`); a malformed map is a PacketError."""
    try:
        return None if hosted is None else {int(k): [int(e) for e in v] for k, v in hosted.items()}
    except (AttributeError, TypeError, ValueError) as e:
        raise PacketError(f"malformed weights packet: hosted must map layers to expert ids, got {str(hosted)[:80]} "
                          f"({type(e).__name__})") from None


def validate_upload(packet: WeightsPacket, sent: WeightsPacket, expected: dict[str, torch.Size]) -> None:
    """Raise PacketError unless `packet` answers `sent` with exactly the `expected` tensors, finite fp32."""
    where = f"weights from device {packet.device_id!r} for round {packet.round}"
    if (packet.device_id, packet.round) != (sent.device_id, sent.round):
        raise PacketError(f"{where}: expected device {sent.device_id!r} round {sent.round}")
    if packet.hosted != sent.hosted:
        raise PacketError(f"{where}: hosts experts {packet.hosted}, but was sent {sent.hosted}")
    if set(packet.tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(packet.tensors)), sorted(set(packet.tensors) - set(expected))
        raise PacketError(f"{where}: tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, t in packet.tensors.items():
        if t.dtype != torch.float32 or t.shape != expected[name]:
            raise PacketError(f"{where}: {name} is {t.dtype} {tuple(t.shape)}, expected float32 {tuple(expected[name])}")
        if not torch.isfinite(t).all():
            raise PacketError(f"{where}: {name} holds NaN or inf")
    if packet.tokens <= 0:
        raise PacketError(f"{where}: tokens = {packet.tokens}; a device that trained must report tokens > 0")
