"""The weights wire format of the hosting baselines: lossless, and every defect is a PacketError."""

import pytest
import torch

from deepfusion.wire import PacketError
from deepfusion.wire.weights import WeightsPacket, validate_upload


def packet(**kw) -> WeightsPacket:
    tensors = {"a.weight": torch.randn(4, 3), "b.bias": torch.randn(3)}
    return WeightsPacket(**{"device_id": "gard", "round": 2, "tensors": tensors, "tokens": 512,
                            "hosted": {1: [0, 3]}, "settings": {"steps": 5, "lr": 0.002}, **kw})


def test_round_trip_is_lossless():
    p = packet()
    q = WeightsPacket.from_bytes(p.to_bytes())
    assert (q.device_id, q.round, q.tokens, q.hosted, q.settings) == (p.device_id, p.round, p.tokens, p.hosted, p.settings)
    assert all(torch.equal(q.tensors[k], v) for k, v in p.tensors.items())
    assert WeightsPacket.from_bytes(packet(hosted=None).to_bytes()).hosted is None


def test_bytes_are_the_fp32_weights_plus_a_small_header():
    blob = packet().to_bytes()
    assert 15 * 4 < len(blob) < 15 * 4 + 1024


@pytest.mark.parametrize("blob", [b"", b"junk", b"\xff" * 64, packet().to_bytes()[:-3], packet().to_bytes()[:40]])
def test_garbage_is_a_packet_error(blob):
    with pytest.raises(PacketError):
        WeightsPacket.from_bytes(blob)


def test_size_cap():
    with pytest.raises(PacketError, match="limit"):
        WeightsPacket.from_bytes(packet().to_bytes(), max_bytes=32)


@pytest.mark.parametrize("defect, match", [
    (lambda p: p.tensors.update({"a.weight": torch.randn(4, 4)}), "expected float32"),
    (lambda p: p.tensors.update({"a.weight": torch.full((4, 3), float("nan"))}), "NaN"),
    (lambda p: p.tensors.pop("b.bias"), "missing"),
    (lambda p: p.tensors.update({"extra": torch.zeros(1)}), "unexpected"),
    (lambda p: setattr(p, "round", 3), "round"),
    (lambda p: setattr(p, "hosted", {1: [0, 1]}), "hosts experts"),
    (lambda p: setattr(p, "tokens", 0), "tokens"),
])
def test_validate_rejects_each_defect(defect, match):
    sent = packet(tokens=0)
    expected = {k: v.shape for k, v in sent.tensors.items()}
    good = packet()
    validate_upload(good, sent, expected)  # the clean answer passes
    defect(good)
    with pytest.raises(PacketError, match=match):
        validate_upload(good, sent, expected)
