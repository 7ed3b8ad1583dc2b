"""The one safetensors reader/writer: canonical bytes, and every defect one PacketError with one reason."""

import json

import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepfusion.wire import PacketError
from deepfusion.wire import safetensors as wst

FIELDS = {"version": str, "name": str, "n": int, "x": float, "cfg": "json"}
META = {"version": "1", "name": "dev", "n": "7", "x": "0.25", "cfg": '{"a": [1, 2]}'}
TENSORS = {"a": np.arange(6, dtype=np.uint16).reshape(2, 3), "b": np.ones(4, np.float16)}


def read(blob, **kw):
    return wst.read(blob, "thing", **{"version": "1", "fields": FIELDS, "max_bytes": 1 << 20, **kw})


def test_write_then_read_round_trips_with_typed_fields():
    arrays, meta = read(wst.write(TENSORS, META), tensors={"a": ("U16",), "b": ("F16",)})
    assert all(np.array_equal(arrays[k], v) and arrays[k].dtype == v.dtype for k, v in TENSORS.items())
    assert meta == {"version": "1", "name": "dev", "n": 7, "x": 0.25, "cfg": {"a": [1, 2]}}


def test_equal_messages_are_equal_bytes_whatever_the_insertion_order():
    forward = wst.write(TENSORS, META)
    backward = wst.write(dict(reversed(TENSORS.items())), dict(reversed(META.items())))
    assert forward == backward
    n = int.from_bytes(forward[:8], "little")
    header = forward[8:8 + n].rstrip(b" ")
    assert header == json.dumps(json.loads(header), separators=(",", ":"), sort_keys=True).encode()
    assert n % 8 == 0  # safetensors' alignment, kept


def test_numpy_and_torch_tensors_give_the_same_bytes():
    as_torch = {k: torch.from_numpy(v) for k, v in TENSORS.items()}
    assert wst.write(as_torch, META) == wst.write(TENSORS, META)
    tensors, _ = read(wst.write(as_torch, META), backend="torch")
    assert isinstance(tensors["a"], torch.Tensor) and torch.equal(tensors["a"], as_torch["a"])


def test_noncontiguous_input_is_written_as_its_values():
    wide = np.arange(12, dtype=np.uint16).reshape(2, 6)
    arrays, _ = read(wst.write({"a": wide[:, ::2]}, META))
    assert np.array_equal(arrays["a"], wide[:, ::2])


def test_metadata_must_be_strings():
    with pytest.raises(PacketError, match=r"non-strings under \['n'\]"):
        wst.write(TENSORS, {**META, "n": 7})


def test_the_prefix_admits_extra_string_keys():
    _, meta = read(wst.write(TENSORS, {**META, "file/a.json": "{}"}), prefix="file/")
    assert meta["file/a.json"] == "{}"
    with pytest.raises(PacketError, match=r"unexpected \['file/a.json'\]"):
        read(wst.write(TENSORS, {**META, "file/a.json": "{}"}))


def _blob(meta=META, tensors=TENSORS):
    return wst.write(tensors, meta)


def _raw(header, data=b""):
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


BAD = {
    "not bytes": ("blob", {}, "malformed thing: must be bytes"),
    "short": (b"\x01\x02", {}, "too short"),
    "truncated header": ((10**6).to_bytes(8, "little") + b"{}", {}, "truncated"),
    "header over its cap": (_blob(), {"max_header": 64}, "over the 64-byte limit for its header"),
    "header not JSON": (b"\x03" + b"\x00" * 7 + b"{no", {}, "not valid JSON"),
    "header a list": (_raw([1]), {}, "JSON object"),
    "tensor missing": (_blob(tensors={"a": TENSORS["a"]}), {"tensors": {"a": ("U16",), "b": ("F16",)}},
                       "tensors must be exactly ['a', 'b']"),
    "tensor dtype": (_blob(), {"tensors": {"a": ("U8",), "b": ("F16",)}}, "'a' has dtype 'U16'"),
    "no metadata": (safetensors.numpy.save(TENSORS), {}, "__metadata__ must be a map"),
    "version": (_blob({**META, "version": "2"}), {}, "thing: wire version '2', this reader understands '1'"),
    "field missing": (_blob({k: v for k, v in META.items() if k != "x"}), {}, "missing ['x']"),
    "field extra": (_blob({**META, "y": "1"}), {}, "unexpected ['y']"),
    "int": (_blob({**META, "n": "7.0"}), {}, "'n' must be a decimal integer"),
    "float": (_blob({**META, "x": "big"}), {}, "'x' must be a float"),
    "json": (_blob({**META, "cfg": "{"}), {}, "'cfg' must be JSON"),
    "data short": (_blob()[:-1], {}, "not valid safetensors, its header does not describe its data"),
    "too big": (_blob(), {"max_bytes": 100}, "thing is"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_defect_is_one_packet_error_with_its_reason(case):
    blob, kw, reason = BAD[case]
    with pytest.raises(PacketError) as e:
        read(blob, **kw)
    assert reason in str(e.value)


def test_the_caller_names_the_error_class():
    class Mine(PacketError):
        pass

    with pytest.raises(Mine, match="too short"):
        read(b"", error=Mine)


def test_the_version_message_is_the_callers():
    with pytest.raises(PacketError, match="thing: got 2, want 1; upgrade"):
        read(_blob({**META, "version": "2"}), mismatch="got {got}, want {want}; upgrade")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_garbage_is_a_packet_error_only(data):
    with pytest.raises(PacketError):
        read(data)


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 10**6), byte=st.integers(0, 255))
def test_one_corrupted_byte_reads_or_is_a_packet_error(pos, byte):
    blob = bytearray(_blob())
    blob[pos % len(blob)] = byte
    try:
        read(bytes(blob))
    except PacketError:
        pass
