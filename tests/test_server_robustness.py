"""Property-based: no malformed upload may crash the server or reach the optimiser."""

import dataclasses

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepfusion.config import ServerConfig
from deepfusion.knowledge import KnowledgePacket, encode_knowledge, validate_packet
from deepfusion.server import build_server, server_round

V, P, T, K = 64, 3, 6, 4
SERVER = build_server(ServerConfig(family="qwen_moe", size="tiny", steps=1, batch_size=2, topk=K), "deepfusion", V,
                      torch.randint(V, (P, T), generator=torch.Generator().manual_seed(0)), ["a", "b"], 0,
                      torch.device("cpu"))
WEIGHTS = {k: v.clone() for k, v in SERVER.model.state_dict().items()}
GOOD = encode_knowledge(torch.randn(P * (T - 1), V, generator=torch.Generator().manual_seed(1)), K, 1.0,
                        device_id="a", round=1, arch="qwen2/tiny", tokens_trained=10, local_loss=2.0)


def corrupt_array(draw, arr):
    arr = arr.copy()
    i = draw(st.integers(0, arr.size - 1))
    flat = arr.reshape(-1)
    if arr.dtype.kind == "f":
        flat[i] = draw(st.sampled_from([np.nan, np.inf, -np.inf, -0.5, 1.5, 7.0]))
    else:
        flat[i] = draw(st.sampled_from([V, V + 1, np.iinfo(arr.dtype).max]))
    return arr


@st.composite
def malformed(draw):
    """A packet with one defect, as bytes (or raw junk bytes)."""
    kind = draw(st.sampled_from(["ids", "probs", "tail", "shape", "dtype", "round", "device", "vocab", "dup",
                                 "temperature", "truncate", "junk", "flip"]))
    p = GOOD
    if kind in ("ids", "probs", "tail"):
        p = dataclasses.replace(p, **{kind: corrupt_array(draw, getattr(p, kind))})
    elif kind == "shape":
        n = draw(st.integers(1, P * (T - 1) - 1))
        p = dataclasses.replace(p, ids=p.ids[:n], probs=p.probs[:n], tail=p.tail[:n])
    elif kind == "dtype":
        p = dataclasses.replace(p, probs=p.probs.astype(np.float32))
    elif kind == "round":
        p = dataclasses.replace(p, round=draw(st.sampled_from([0, 2, -1, 10**9])))
    elif kind == "device":
        p = dataclasses.replace(p, device_id=draw(st.sampled_from(["b", "", "mallory"])))
    elif kind == "vocab":
        p = dataclasses.replace(p, vocab_size=draw(st.sampled_from([V - 1, V * 2])))
    elif kind == "dup":
        ids = p.ids.copy()
        ids[draw(st.integers(0, len(ids) - 1)), 1] = ids[0, 0] if ids[0, 0] != ids[0, 1] else ids[0, 2]
        ids[:, 1] = ids[:, 0]
        p = dataclasses.replace(p, ids=ids)
    elif kind == "temperature":
        p = dataclasses.replace(p, temperature=draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf")])))
    if kind == "junk":
        return draw(st.binary(max_size=512))
    try:
        blob = p.to_bytes()
    except Exception:  # to_bytes refuses some defects itself; send the honest bytes with a flipped byte instead
        blob = GOOD.to_bytes()
        kind = "flip"
    if kind == "truncate":
        return blob[:draw(st.integers(0, len(blob) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(blob) - 1))
        return blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:]
    return blob


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=malformed())
def test_malformed_uploads_are_rejected_and_never_reach_the_optimiser(blob):
    result = server_round(SERVER, {"a": blob}, 1)
    if result["accepted"]:  # a flipped byte can land in slack (header padding, a low mantissa bit): still valid
        packet = KnowledgePacket.from_bytes(blob)
        validate_packet(packet, round=1, known_devices={"a", "b"}, n_positions=P * (T - 1), vocab_size=V, k_max=K)
        SERVER.model.load_state_dict(WEIGHTS)
        return
    assert result.get("skipped") and "a" in result["rejected"] and result["rejected"]["a"]
    for name, value in SERVER.model.state_dict().items():
        assert torch.equal(value, WEIGHTS[name]), name
