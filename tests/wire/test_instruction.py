"""The instruction: compact JSON whose bytes do not change, parsed field by field; every defect a PacketError."""

import json

import pytest

from deepfusion.wire import PacketError
from deepfusion.wire.instruction import Instruction


def instruction(r=1, indices=(0, 1, 2, 3, 4, 5)):
    return Instruction(round=r, proxy_indices=list(indices), local_steps=3, batch_size=4, lr=1e-2, topk=5,
                       temperature=2.0)


def test_instruction_round_trips_and_rejects_garbage():
    ins = instruction()
    assert Instruction.from_bytes(ins.to_bytes()) == ins
    with pytest.raises(ValueError, match="malformed instruction"):
        Instruction.from_bytes(b"\xff{")


def test_bytes_are_compact_json_in_field_order():
    """Recorded runs and engine-parity digests hold these bytes: the layout must not drift."""
    assert instruction(r=3, indices=(0, 5)).to_bytes() == (
        b'{"round":3,"proxy_indices":[0,5],"local_steps":3,"batch_size":4,"lr":0.01,"topk":5,"temperature":2.0}')


def _with(**changes) -> bytes:
    fields = {**json.loads(instruction().to_bytes()), **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not ...}).encode()


@pytest.mark.parametrize("blob, reason", [
    ("not bytes", "must be bytes"),
    (b"[1, 2]", "JSON object"),
    (b"\x00" * 3, "not JSON"),
    (_with(topk=...), "missing ['topk']"),
    (_with(colour="blue"), "unexpected ['colour']"),
    (_with(round="3"), "'round' must be an integer"),
    (_with(batch_size=True), "'batch_size' must be an integer"),
    (_with(proxy_indices=[0, -1]), "proxy_indices"),
    (_with(proxy_indices="0,1"), "proxy_indices"),
    (_with(lr="fast"), "'lr' must be a finite number"),
    (_with(temperature=float("nan")), "'temperature' must be a finite number"),
    (_with(topk=0), "'topk' must be >= 1"),
    (_with(batch_size=0), "'batch_size' must be >= 1"),
    (_with(local_steps=-1), "'local_steps' must be >= 0"),
    (_with(temperature=0.0), "temperature > 0"),
])
def test_each_defect_is_a_packet_error_naming_it(blob, reason):
    with pytest.raises(PacketError, match="malformed instruction") as e:
        Instruction.from_bytes(blob)
    assert reason in str(e.value)


def test_an_integer_learning_rate_is_a_number():
    assert Instruction.from_bytes(_with(lr=1)).lr == 1


def test_size_cap():
    blob = instruction().to_bytes()
    assert Instruction.from_bytes(blob, max_bytes=len(blob)) == instruction()
    with pytest.raises(PacketError, match="over the"):
        Instruction.from_bytes(blob, max_bytes=len(blob) - 1)


def test_for_device_takes_the_devices_settings_and_the_federations_knowledge(tmp_path):
    from deepfusion.config import default_config_path, load_config

    cfg = load_config(default_config_path("smoke-multiround"), ["knowledge.topk=7"])
    dc = cfg.devices[-1]
    got = Instruction.from_bytes(Instruction.for_device(cfg, dc, 2, 5).to_bytes())
    assert (got.round, got.proxy_indices, got.local_steps, got.batch_size, got.lr, got.topk) == \
        (2, [0, 1, 2, 3, 4], dc.local_steps, dc.batch_size, dc.lr, 7)
    assert got.temperature == cfg.knowledge.temperature
