"""The data embedding e_n: MiniLM from the local wheel, the server's basis, a device's tens of bytes."""

import random

import numpy as np
import pytest
import torch

from deepfusion.data import load_source, split_documents
from deepfusion.embedding import (Basis, EmbeddingError, choose_texts, decode_embedding, embed_device, fit_basis,
                                  load_encoder, quantize)
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


@pytest.fixture(scope="module")
def public_and_private():
    """Public (proxy) and private documents of two real sources, few of each: encoding is the slow part."""
    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA} (see shared/data/DATA.md)")
    public, private = [], {}
    for spec in ("medquad:ghr", "tatqa:0/1"):
        split = split_documents(load_source(spec, SHARED_DATA), 0, 0.2, 0.1)
        public += choose_texts([d.text for d in split.proxy], 6, 0)
        private[spec] = [d.text for d in split.private]
    return public, private


@pytest.fixture(scope="module")
def basis(encoder, public_and_private):
    return fit_basis(encoder, public_and_private[0], dim=8)


def test_encoder_gives_unit_vectors_cut_at_max_tokens(encoder):
    long = "Glaucoma damages the optic nerve. " * 200  # far beyond 256 tokens
    v = encoder.encode([long, long + "Revenue rose by 5% in 2019.", "Revenue rose by 5% in 2019."])
    assert v.shape == (3, 384) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))
    assert torch.equal(v[0], v[1])  # the tail past max_tokens is never seen
    assert (v[0] @ v[2]).item() < 0.5  # and different texts give different vectors


def test_encoder_is_loaded_once_per_process(encoder):
    assert load_encoder() is encoder


def test_basis_round_trips_bit_for_bit_and_is_small(basis):
    data = basis.to_bytes()
    assert len(data) == 8 + 2 * (1 + 8) * 384
    back = Basis.from_bytes(data)
    assert torch.equal(back.mean, basis.mean) and torch.equal(back.axes, basis.axes)
    torch.testing.assert_close(basis.axes @ basis.axes.T, torch.eye(8), atol=2e-3, rtol=0)  # orthonormal (fp16)
    with pytest.raises(EmbeddingError, match="truncated"):
        Basis.from_bytes(data[:-2])
    with pytest.raises(EmbeddingError, match="DFB1"):
        Basis.from_bytes(b"XXXX" + data[4:])


def test_basis_needs_more_documents_than_axes(encoder):
    with pytest.raises(EmbeddingError, match="3 distinct public documents for a basis of 8 axes"):
        fit_basis(encoder, ["a", "b", "c", "a"], dim=8)


def test_device_embedding_is_tens_of_bytes_deterministic_and_decodes(encoder, basis, public_and_private):
    texts = public_and_private[1]["medquad:ghr"]
    e = embed_device(encoder, basis, texts, n_texts=4, seed=0)
    assert len(e) == basis.dim + 2 <= 64
    shuffled = list(texts)
    random.Random(1).shuffle(shuffled)
    assert embed_device(encoder, basis, shuffled, n_texts=4, seed=0) == e  # the choice ignores input order
    v = decode_embedding(e, dim=basis.dim)
    exact = basis.project(encoder.encode(choose_texts(texts, 4, 0)).mean(0))
    scale = float(np.frombuffer(e[:2], dtype="<f2")[0])
    assert (v - exact).abs().max().item() <= scale / 2 + 1e-6  # int8 rounding, nothing worse
    assert quantize(v) == e  # decoding then re-encoding gives the same bytes
    with pytest.raises(EmbeddingError, match="expected 10 bytes|8 \\+ 2 bytes"):
        decode_embedding(e + b"\x00", dim=basis.dim)


def test_quantize_keeps_direction_and_survives_zero():
    v = torch.tensor([0.3, -0.1, 0.02, 0.0])
    back = decode_embedding(quantize(v))
    assert torch.nn.functional.cosine_similarity(back, v, dim=0).item() > 0.9999
    assert len(quantize(torch.zeros(4))) == 6
    assert torch.equal(decode_embedding(quantize(torch.zeros(4))), torch.zeros(4))
    with pytest.raises(EmbeddingError, match="non-finite"):
        quantize(torch.tensor([1.0, float("nan")]))


def test_choose_texts_is_a_seeded_subset():
    texts = [f"doc {i}" for i in range(100)]
    a = choose_texts(texts, 10, seed=0)
    assert len(a) == 10 and set(a) <= set(texts) and a == choose_texts(texts[::-1], 10, seed=0)
    assert a != choose_texts(texts, 10, seed=1)
    assert choose_texts(texts[:3], 10, seed=0) == choose_texts(texts[:3], 3, seed=0)  # fewer: all of them


def test_encoder_loads_without_the_network(monkeypatch):
    import socket

    from deepfusion.embedding import Encoder

    def refuse(*args, **kwargs):
        raise AssertionError(f"the encoder tried to connect to {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert Encoder().encode(["offline"]).shape == (1, 384)
    with pytest.raises(EmbeddingError, match="no encoder at /nonexistent"):
        Encoder("/nonexistent")
