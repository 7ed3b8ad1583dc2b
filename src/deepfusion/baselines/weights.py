"""Weights on the wire: what `fedavg-moe` and `expert-subset` send down and up every round.

A WeightsPacket is one safetensors blob: named fp32 tensors (the hosted parameters under their
state-dict names, plus a few named extras such as router-usage counts) and string metadata (version,
device, round, tokens trained, the hosted experts, the round's training settings). Its length is the
bytes the method costs, so communication is measured exactly as for knowledge packets.

The server checks every upload against what it sent before averaging: same names, same shapes, fp32,
finite, tokens > 0. A bad upload is rejected with a reason and the round goes on (as in server.receive).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import safetensors.torch
import torch

from deepfusion.knowledge import PacketError, canonical_safetensors

WEIGHTS_VERSION = 1


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
                "tokens": str(self.tokens), "settings": json.dumps(self.settings, sort_keys=True),
                "hosted": json.dumps(None if self.hosted is None else {str(k): v for k, v in self.hosted.items()})}
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.tensors.items()}
        return canonical_safetensors(safetensors.torch.save(tensors, metadata=meta))  # equal packets, equal bytes

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = 1 << 32) -> WeightsPacket:
        """Parse a blob; any defect is a PacketError naming it."""
        if not isinstance(data, (bytes, bytearray)) or len(data) < 8:
            raise PacketError(f"weights packet must be at least 8 bytes, got {type(data).__name__} of {len(data) if isinstance(data, (bytes, bytearray)) else '?'}")
        if len(data) > max_bytes:
            raise PacketError(f"weights packet is {len(data)} bytes, over the {max_bytes}-byte limit")
        try:
            n = int.from_bytes(data[:8], "little")
            meta = json.loads(bytes(data[8:8 + n]))["__metadata__"]
            tensors = safetensors.torch.load(bytes(data))
            if meta["version"] != str(WEIGHTS_VERSION):
                raise PacketError(f"weights wire version {meta['version']!r}, this reader understands {WEIGHTS_VERSION}")
            hosted = json.loads(meta["hosted"])
            return cls(meta["device_id"], int(meta["round"]), tensors, int(meta["tokens"]),
                       None if hosted is None else {int(k): [int(e) for e in v] for k, v in hosted.items()},
                       json.loads(meta["settings"]))
        except PacketError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # safetensors' Rust panics derive from BaseException
            raise PacketError(f"not a valid weights packet ({type(e).__name__}: {str(e)[:120]})") from None


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
