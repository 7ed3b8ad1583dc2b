"""Tests for deepfusion.wire.knowledge, in the module's order: wire format, encode, validate,
to_targets. Mostly properties, checked on random inputs."""

import dataclasses
import json

import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepfusion.wire import PacketError
from deepfusion.wire.knowledge import (
    KnowledgePacket,
    encode_knowledge,
    id_dtype,
    to_targets,
    validate_packet,
)

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
META = dict(device_id="dev-7", round=5, arch="qwen2/small", tokens_trained=123_456, local_loss=2.75)


def make_packet(N=16, V=300, k=4, T=1.5, seed=0, **meta) -> KnowledgePacket:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 3
    return encode_knowledge(logits, k, T, **{**META, **meta})


def raw_safetensors(header: dict, payload: bytes = b"") -> bytes:
    """Hand-built blob: 8-byte little-endian header length, JSON header, data."""
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + payload


def valid_parts(p: KnowledgePacket):
    """Arrays and metadata of a valid packet, to be broken one piece at a time."""
    arrays = {"ids": p.ids, "probs": p.probs, "tail": p.tail}
    meta = {"version": str(p.version), "device_id": p.device_id, "round": str(p.round), "arch": p.arch,
            "tokens_trained": str(p.tokens_trained), "local_loss": repr(p.local_loss),
            "temperature": repr(p.temperature), "vocab_size": str(p.vocab_size)}
    return arrays, meta


# -----------------------------------------------------------------------------
# 1. Packet and wire format


@pytest.mark.parametrize("vocab, want", [(2, np.uint8), (256, np.uint8), (257, np.uint16), (8192, np.uint16),
                                         (65536, np.uint16), (65537, np.uint32), (151936, np.uint32)])
def test_id_dtype_is_narrowest(vocab, want):
    assert id_dtype(vocab) == np.dtype(want)


@pytest.mark.parametrize("vocab", [0, -1, 2**32 + 1, True])
def test_id_dtype_rejects_impossible_vocab(vocab):
    with pytest.raises(ValueError):
        id_dtype(vocab)


@FAST
@given(N=st.integers(0, 40), V=st.sampled_from([3, 256, 300, 70000]), k=st.integers(1, 8),
       T=st.floats(0.05, 20), seed=st.integers(0, 2**31))
def test_roundtrip_is_lossless(N, V, k, T, seed):
    k = min(k, V)
    p = encode_knowledge(torch.randn(N, V, generator=torch.Generator().manual_seed(seed)) * 4, k, T, **META)
    q = KnowledgePacket.from_bytes(p.to_bytes())
    for name in ("ids", "probs", "tail"):
        a, b = getattr(p, name), getattr(q, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    for f in ("device_id", "round", "arch", "tokens_trained", "local_loss", "temperature", "vocab_size", "version"):
        assert getattr(p, f) == getattr(q, f) and type(getattr(p, f)) is type(getattr(q, f))
    assert q == p and (q.n_positions, q.k) == (N, k)


@FAST
@given(device_id=st.text(max_size=30), arch=st.text(max_size=30), rnd=st.integers(-10**12, 10**12),
       tokens=st.integers(0, 2**63), loss=st.floats(allow_nan=True, allow_infinity=True),
       T=st.floats(allow_nan=True, allow_infinity=True))
def test_roundtrip_metadata_is_exact(device_id, arch, rnd, tokens, loss, T):
    p = dataclasses.replace(make_packet(N=3, V=10, k=2), device_id=device_id, arch=arch, round=rnd,
                            tokens_trained=tokens, local_loss=loss, temperature=T)
    assert KnowledgePacket.from_bytes(p.to_bytes()) == p  # NaN compares equal to NaN here


def test_roundtrip_of_noncontiguous_arrays():
    p = make_packet(N=8, V=300, k=4)
    wide = np.zeros((8, 8), p.ids.dtype)
    wide[:, ::2] = p.ids
    q = dataclasses.replace(p, ids=wide[:, ::2])  # a strided view, not contiguous
    assert KnowledgePacket.from_bytes(q.to_bytes()) == p


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600))
def test_from_bytes_of_garbage_raises_packet_error_only(data):
    with pytest.raises(PacketError):
        KnowledgePacket.from_bytes(data)


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(max_size=64), at=st.integers(0, 10**6))
def test_from_bytes_of_valid_prefix_plus_junk_raises_packet_error_only(junk, at):
    blob = make_packet(N=4, V=50, k=3).to_bytes()
    at %= len(blob)
    with pytest.raises(PacketError):
        KnowledgePacket.from_bytes(blob[:at] + junk + b"\x00" * (len(blob) + 1 - at))  # never a valid length


def test_every_truncation_raises_packet_error():
    blob = make_packet(N=4, V=50, k=3).to_bytes()
    for n in range(len(blob)):
        with pytest.raises(PacketError):
            KnowledgePacket.from_bytes(blob[:n])


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(0, 10**6), byte=st.integers(0, 255))
def test_single_byte_corruption_gives_packet_or_packet_error(pos, byte):
    blob = bytearray(make_packet(N=4, V=50, k=3).to_bytes())
    blob[pos % len(blob)] = byte
    try:
        p = KnowledgePacket.from_bytes(bytes(blob))
    except PacketError:
        return
    assert isinstance(p, KnowledgePacket)  # e.g. a digit in the metadata changed: still well-formed


def _packet_blob_with(**changes):
    """A valid packet's bytes with arrays/metadata entries replaced (None deletes)."""
    arrays, meta = valid_parts(make_packet(N=4, V=300, k=3))
    for key, value in changes.items():
        table = arrays if key in ("ids", "probs", "tail", "extra") else meta
        if value is None:
            del table[key]
        else:
            table[key] = value
    return safetensors.numpy.save(arrays, metadata=meta)


def _raw_with_metadata(meta):
    arrays, _ = valid_parts(make_packet(N=4, V=300, k=3))
    header = {"__metadata__": meta, "tail": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
              "ids": {"dtype": "U16", "shape": [4, 3], "data_offsets": [8, 32]},
              "probs": {"dtype": "F16", "shape": [4, 3], "data_offsets": [32, 56]}}
    return raw_safetensors(header, arrays["tail"].tobytes() + arrays["ids"].tobytes() + arrays["probs"].tobytes())


def test_hand_built_blob_parses():  # guards the helper the malformed cases below rely on
    _, meta = valid_parts(make_packet(N=4, V=300, k=3))
    assert KnowledgePacket.from_bytes(_raw_with_metadata(meta)) == make_packet(N=4, V=300, k=3)


MALFORMED = {
    "not bytes": ("hello", "must be bytes"),
    "empty": (b"", "too short"),
    "header longer than blob": ((10**9).to_bytes(8, "little") + b"{}", "truncated"),
    "header not json": (b"\x05" + b"\x00" * 7 + b"{nope", "not valid JSON"),
    "header not utf-8": (b"\x02" + b"\x00" * 7 + b"\xff\xfe", "not valid JSON"),
    "header a list": (raw_safetensors([1, 2]), "JSON object"),  # type: ignore[arg-type]
    "header nested absurdly deep": ((200_000).to_bytes(8, "little") + b"[" * 200_000, "not valid JSON"),
    "missing tensor": (_packet_blob_with(tail=None), "tensors must be exactly"),
    "extra tensor": (_packet_blob_with(extra=np.zeros(3, np.uint8)), "tensors must be exactly"),
    "ids int64": (_packet_blob_with(ids=np.zeros((4, 3), np.int64)), "'ids' has dtype 'I64'"),
    "probs float32": (_packet_blob_with(probs=np.zeros((4, 3), np.float32)), "'probs' has dtype 'F32'"),
    "tail bf16 entry": (raw_safetensors({"ids": {"dtype": "U8", "shape": [0, 1], "data_offsets": [0, 0]},
                                         "probs": {"dtype": "F16", "shape": [0, 1], "data_offsets": [0, 0]},
                                         "tail": {"dtype": "BF16", "shape": [0], "data_offsets": [0, 0]}}),
                        "'tail' has dtype 'BF16'"),
    "ids wider than needed": (_packet_blob_with(ids=np.zeros((4, 3), np.uint32)), "narrowest"),
    "probs shape mismatch": (_packet_blob_with(probs=np.zeros((4, 2), np.float16)), "probs shape"),
    "tail shape mismatch": (_packet_blob_with(tail=np.zeros(5, np.float16)), "tail shape"),
    "ids 1-D": (_packet_blob_with(ids=np.zeros(12, np.uint16)), "ids shape"),
    "no metadata": (safetensors.numpy.save(valid_parts(make_packet(N=4, V=300, k=3))[0]), "__metadata__"),
    "metadata value not a string": (_raw_with_metadata({**valid_parts(make_packet(N=4, V=300, k=3))[1], "round": 5}),
                                    "__metadata__"),
    "wrong version": (_packet_blob_with(version="2"), "wire version"),
    "version missing": (_packet_blob_with(version=None), "wire version"),
    "missing field": (_packet_blob_with(arch=None), "missing ['arch']"),
    "unexpected field": (_packet_blob_with(colour="blue"), "unexpected ['colour']"),
    "round not an int": (_packet_blob_with(round="five"), "'round' must be a decimal integer"),
    "round with underscore": (_packet_blob_with(round="1_0"), "'round' must be a decimal integer"),
    "vocab_size absurd": (_packet_blob_with(vocab_size="9" * 30), "vocab_size"),
    "temperature not a float": (_packet_blob_with(temperature="warm"), "'temperature' must be a float"),
    "data offsets wrong": (raw_safetensors({"ids": {"dtype": "U8", "shape": [1, 1], "data_offsets": [0, 5]},
                                            "probs": {"dtype": "F16", "shape": [1, 1], "data_offsets": [5, 7]},
                                            "tail": {"dtype": "F16", "shape": [1], "data_offsets": [7, 9]},
                                            "__metadata__": valid_parts(make_packet(N=1, V=3, k=1))[1]},
                                           b"\x00" * 9), "not valid safetensors"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_from_bytes_rejects_malformed(case):
    blob, reason = MALFORMED[case]
    with pytest.raises(PacketError) as e:
        KnowledgePacket.from_bytes(blob)
    assert reason in str(e.value)


def test_from_bytes_rejects_oversized():
    blob = make_packet().to_bytes()
    assert KnowledgePacket.from_bytes(blob, max_bytes=len(blob)) == make_packet()
    with pytest.raises(PacketError, match="over the"):
        KnowledgePacket.from_bytes(blob, max_bytes=len(blob) - 1)


@pytest.mark.parametrize("change, reason", [
    (dict(ids=np.zeros((16, 4), np.int64)), "ids dtype"),
    (dict(probs=np.zeros((16, 4), np.float32)), "dtype must be float16"),
    (dict(round="5"), "field 'round'"),
    (dict(device_id=7), "field 'device_id'"),
    (dict(tokens_trained=True), "field 'tokens_trained'"),
])
def test_to_bytes_refuses_malformed(change, reason):
    with pytest.raises(PacketError, match=reason):
        dataclasses.replace(make_packet(), **change).to_bytes()


def test_packet_equality_is_bitwise():
    p = make_packet()
    q = dataclasses.replace(p, probs=p.probs.copy())
    assert p == q
    q.probs[0, 0] = np.float16(-0.0) if p.probs[0, 0] == 0 else np.nextafter(p.probs[0, 0], np.float16(0))
    assert p != q
    assert p != dataclasses.replace(p, ids=p.ids.astype(np.uint32))


# -----------------------------------------------------------------------------
# 2. encode_knowledge


@FAST
@given(N=st.integers(1, 20), V=st.integers(1, 600), k=st.integers(1, 10), T=st.floats(0.1, 10),
       scale=st.floats(0.1, 30), seed=st.integers(0, 2**31))
def test_encode_is_topk_of_tempered_softmax(N, V, k, T, scale, seed):
    k = min(k, V)
    logits = torch.randn(N, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    p = encode_knowledge(logits, k, T, **META)
    full = torch.softmax(logits / T, -1)  # (N, V)
    ref = full.gather(1, torch.from_numpy(p.ids.astype(np.int64))).numpy()  # (N, k)
    assert p.ids.dtype == id_dtype(V) and p.probs.dtype == np.float16 and p.tail.dtype == np.float16
    assert (p.n_positions, p.k, p.vocab_size) == (N, k, V)
    np.testing.assert_allclose(p.probs, ref, rtol=1e-3, atol=1e-7)  # fp16 rounding
    # they are the k largest: the smallest kept prob >= every dropped prob
    dropped = full.clone().scatter_(1, torch.from_numpy(p.ids.astype(np.int64)), -1.0).amax(-1).numpy()
    assert (ref.min(-1) >= dropped - 1e-12).all()
    assert (np.diff(p.probs.astype(np.float32), axis=1) <= 0).all()  # rows descending
    assert (p.tail >= 0).all()
    np.testing.assert_allclose(p.tail, np.clip(1 - ref.sum(-1), 0, None), atol=1e-3)
    assert all(len(set(row)) == k for row in p.ids.tolist())  # distinct ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_encode_accepts_any_float_dtype(dtype):
    p = encode_knowledge(torch.randn(8, 100).to(dtype), 5, 1.0, **META)
    validate_packet(p, round=5, known_devices=None, n_positions=8, vocab_size=100, topk=5)


@pytest.mark.parametrize("logits, k, T, reason", [
    (torch.randn(4, 10), 0, 1.0, "k must be"),
    (torch.randn(4, 10), 11, 1.0, "k must be"),
    (torch.randn(4, 10), 3, 0.0, "temperature"),
    (torch.randn(4, 10), 3, float("nan"), "temperature"),
    (torch.randn(10), 3, 1.0, "(N, V)"),
    (torch.randint(0, 5, (4, 10)), 3, 1.0, "float"),
    (torch.full((4, 10), float("nan")), 3, 1.0, "non-finite"),
])
def test_encode_rejects_bad_arguments(logits, k, T, reason):
    with pytest.raises(ValueError) as e:
        encode_knowledge(logits, k, T, **META)
    assert reason in str(e.value)


# -----------------------------------------------------------------------------
# 3. validate_packet

CHECK = dict(round=5, known_devices={"dev-7", "dev-8"}, n_positions=16, vocab_size=300, topk=4)


def _set(name, index, value):
    """Mutation: copy array `name` and write `value` at `index`."""
    def mutate(p):
        a = getattr(p, name).copy()
        a[index] = value
        return dataclasses.replace(p, **{name: a})
    return mutate


def _replace(**changes):
    return lambda p: dataclasses.replace(p, **changes)


def _first_rows(n):
    return lambda p: dataclasses.replace(p, ids=p.ids[:n], probs=p.probs[:n], tail=p.tail[:n])


DEFECTS = {
    "version": (_replace(version=2), "wire version"),
    "unknown device": (_replace(device_id="intruder"), "unknown device"),
    "stale round": (_replace(round=4), "stale round"),
    "future round": (_replace(round=6), "future round"),
    "field type": (_replace(tokens_trained="many"), "field 'tokens_trained'"),
    "vocab mismatch": (_replace(vocab_size=301), "vocab_size 301"),
    "temperature nan": (_replace(temperature=float("nan")), "temperature"),
    "temperature zero": (_replace(temperature=0.0), "temperature"),
    "temperature negative": (_replace(temperature=-1.0), "temperature"),
    "negative tokens": (_replace(tokens_trained=-1), "tokens_trained"),
    "loss not finite": (_replace(local_loss=float("inf")), "local_loss"),
    "ids dtype": (lambda p: dataclasses.replace(p, ids=p.ids.astype(np.uint32)), "ids dtype"),
    "probs dtype": (lambda p: dataclasses.replace(p, probs=p.probs.astype(np.float32)), "dtype must be float16"),
    "tail dtype": (lambda p: dataclasses.replace(p, tail=p.tail.astype(np.float64)), "dtype must be float16"),
    "ids not 2-D": (lambda p: dataclasses.replace(p, ids=p.ids.reshape(-1)), "ids shape"),
    "probs shape": (lambda p: dataclasses.replace(p, probs=p.probs[:, :3]), "probs shape"),
    "tail shape": (lambda p: dataclasses.replace(p, tail=p.tail[:15]), "tail shape"),
    "wrong N": (_first_rows(15), "n_positions 15"),
    "k too large": (lambda p: make_packet(k=5), "k=5"),
    "k zero": (lambda p: dataclasses.replace(p, ids=p.ids[:, :0], probs=p.probs[:, :0]), "k=0"),
    "probs nan": (_set("probs", (3, 1), np.nan), "non-finite"),
    "tail inf": (_set("tail", 2, np.inf), "non-finite"),
    "probs negative": (_set("probs", (0, 3), -0.25), "probs outside [0, 1]"),
    "probs above 1": (_set("probs", (0, 0), 1.5), "probs outside [0, 1]"),
    "tail negative": (_set("tail", 0, -0.5), "tail outside [0, 1]"),
    "tail above 1": (_set("tail", 0, 1.5), "tail outside [0, 1]"),
    "sum off": (lambda p: _set("tail", 7, p.tail[7] + np.float16(0.25))(p), "sum to"),
    "ids out of range": (_set("ids", (4, 2), 300), "ids out of range"),
    "duplicate ids": (lambda p: _set("ids", (9, 3), p.ids[9, 0])(p), "duplicate ids"),
}


def test_validate_accepts_a_valid_packet():
    validate_packet(make_packet(), **CHECK)
    validate_packet(make_packet(), **{**CHECK, "known_devices": None})
    validate_packet(KnowledgePacket.from_bytes(make_packet().to_bytes()), **CHECK)


@pytest.mark.parametrize("defect", DEFECTS)
def test_validate_rejects_defect(defect):
    mutate, reason = DEFECTS[defect]
    bad = mutate(make_packet())
    with pytest.raises(PacketError) as e:
        validate_packet(bad, **CHECK)
    msg = str(e.value)
    assert reason in msg, msg
    assert repr(bad.device_id) in msg and f"round {bad.round}" in msg, msg


def test_validate_tolerance_is_respected():
    bad = DEFECTS["sum off"][0](make_packet())
    validate_packet(bad, **{**CHECK, "tol": 0.3})


# -----------------------------------------------------------------------------
# 4. to_targets


@FAST
@given(N=st.integers(0, 30), V=st.integers(1, 400), k=st.integers(1, 12), T=st.floats(0.05, 5),
       seed=st.integers(0, 2**31))
def test_to_targets_rows_sum_to_one(N, V, k, T, seed):
    k = min(k, V)
    p = encode_knowledge(torch.randn(N, V, generator=torch.Generator().manual_seed(seed)) * 5, k, T, **META)
    ids, probs, tail = to_targets(p)
    assert ids.dtype == torch.long and probs.dtype == tail.dtype == torch.float32
    assert ids.shape == probs.shape == (N, k) and tail.shape == (N,)
    assert torch.equal(ids, torch.from_numpy(p.ids.astype(np.int64)))
    torch.testing.assert_close(probs.sum(-1) + tail, torch.ones(N), rtol=0, atol=1e-6)
    assert (probs >= 0).all() and (tail >= 0).all()


# -----------------------------------------------------------------------------
# Canonical bytes


def test_equal_packets_serialise_to_equal_bytes():
    """Engines compare packets byte for byte, so serialisation must not depend on hash-map order."""
    logits = torch.randn(10, 300, generator=torch.Generator().manual_seed(1))
    blobs = {encode_knowledge(logits, 4, 1.0, device_id="d", round=1, arch="a", tokens_trained=1,
                              local_loss=0.5).to_bytes() for _ in range(20)}
    assert len(blobs) == 1
    assert KnowledgePacket.from_bytes(blobs.pop()).k == 4


# -----------------------------------------------------------------------------
# 5. Alignment masks: a device with its own tokenizer


def masked_packet(N=16, aligned=None, vocab="0123abcd4567ef89"):
    mask = np.arange(N, dtype=np.uint8) % 3 != 0 if aligned is None else aligned
    return dataclasses.replace(make_packet(N=N), aligned=np.asarray(mask, np.uint8), vocab=vocab)


def _masked_blob(aligned=np.array([1, 0, 1, 1], np.uint8), vocab="v1", drop=()):
    """A masked packet's bytes (N = 4) with its mask / vocab replaced or dropped."""
    arrays, meta = valid_parts(make_packet(N=4, V=300, k=3))
    arrays["aligned"], meta["vocab"] = aligned, vocab
    for key in drop:
        arrays.pop(key, None), meta.pop(key, None)
    return safetensors.numpy.save(arrays, metadata=meta)


@FAST
@given(N=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_a_mask_and_vocab_round_trip_through_bytes(N, seed):
    mask = np.random.default_rng(seed).integers(0, 2, N).astype(np.uint8)
    p = masked_packet(N, mask)
    q = KnowledgePacket.from_bytes(p.to_bytes())
    assert q == p and q.aligned.dtype == np.uint8 and q.vocab == p.vocab
    assert p != dataclasses.replace(p, aligned=1 - mask) and p != dataclasses.replace(p, vocab="other")
    assert p != make_packet(N=N)  # with and without a mask: different packets


def test_a_packet_without_a_mask_is_the_bytes_it_always_was():
    p = make_packet()
    header = json.loads(p.to_bytes()[8:8 + int.from_bytes(p.to_bytes()[:8], "little")])
    assert set(header) == {"__metadata__", "ids", "probs", "tail"} and "vocab" not in header["__metadata__"]
    assert p.to_bytes() == dataclasses.replace(p, aligned=None, vocab=None).to_bytes()
    assert len(masked_packet().to_bytes()) - len(p.to_bytes()) < 16 + 120  # one byte a position + its header


MALFORMED_MASKS = {
    "mask uint16": (_masked_blob(aligned=np.ones(4, np.uint16)), "'aligned' has dtype 'U16'"),
    "mask float": (_masked_blob(aligned=np.ones(4, np.float16)), "'aligned' has dtype 'F16'"),
    "mask too short": (_masked_blob(aligned=np.ones(3, np.uint8)), "aligned shape (3,) != (4,)"),
    "mask 2-D": (_masked_blob(aligned=np.ones((4, 1), np.uint8)), "aligned shape (4, 1)"),
    "mask not 0/1": (_masked_blob(aligned=np.array([1, 2, 0, 1], np.uint8)), "0 (not aligned) or 1"),
    "mask without vocab": (_masked_blob(drop=("vocab",)), "come together"),
    "vocab without mask": (_masked_blob(drop=("aligned",)), "come together"),
    "vocab empty": (_masked_blob(vocab=""), "vocab must be"),
    "vocab with spaces": (_masked_blob(vocab="a b"), "vocab must be"),
    "vocab too long": (_masked_blob(vocab="f" * 65), "vocab must be"),
}


@pytest.mark.parametrize("case", MALFORMED_MASKS)
def test_a_malformed_mask_or_vocab_is_one_packet_error(case):
    blob, reason = MALFORMED_MASKS[case]
    with pytest.raises(PacketError) as e:
        KnowledgePacket.from_bytes(blob)
    assert reason in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_blob_with_a_mask_must_still_fit_the_byte_cap():
    blob = masked_packet().to_bytes()
    assert KnowledgePacket.from_bytes(blob, max_bytes=len(blob)) == masked_packet()
    with pytest.raises(PacketError, match="over the"):
        KnowledgePacket.from_bytes(blob, max_bytes=len(blob) - 1)


@pytest.mark.parametrize("change, reason", [
    (dict(aligned=np.ones(16, np.int64)), "aligned must be a uint8"),
    (dict(aligned=np.ones(15, np.uint8)), "aligned shape"),
    (dict(vocab=None), "come together"),
    (dict(vocab="tab\there"), "vocab must be"),
])
def test_to_bytes_refuses_a_malformed_mask(change, reason):
    with pytest.raises(PacketError, match=reason):
        dataclasses.replace(masked_packet(), **change).to_bytes()


def test_validate_checks_the_mask():
    validate_packet(masked_packet(), **CHECK)
    for bad, reason in ((masked_packet(aligned=np.zeros(16)), "aligned marks no position"),
                        (masked_packet(aligned=np.full(16, 7)), "0 (not aligned) or 1"),
                        (dataclasses.replace(masked_packet(), vocab=None), "come together"),
                        (_first_rows(15)(masked_packet()), "n_positions 15")):
        with pytest.raises(PacketError) as e:
            validate_packet(bad, **CHECK)
        assert reason in str(e.value) and "'dev-7'" in str(e.value), str(e.value)
