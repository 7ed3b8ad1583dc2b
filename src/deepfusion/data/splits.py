"""Split documents into private / proxy / test parts and pack them into fixed-length token blocks."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepfusion.data.corpora import Document
from deepfusion.errors import DataError

log = logging.getLogger("deepfusion")


@dataclass(frozen=True)
class Split:
    private: list[Document]  # stays on the device
    proxy: list[Document]  # public-ish text the devices and the server distil on
    test: list[Document]  # held out for perplexity


def _unit_hash(seed: int, doc: Document) -> float:
    """A number in [0, 1) fixed by (seed, source, doc_id), whatever the input order."""
    digest = hashlib.sha256(f"{seed}:{doc.source}:{doc.doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(docs: list[Document], seed: int, proxy_frac: float, test_frac: float) -> Split:
    """Assign each document by its hash: [0, test) → test, [test, test+proxy) → proxy, rest → private."""
    if len(docs) < 3:
        raise DataError(f"got {len(docs)} documents; a private, a proxy and a test part need at least 3; "
                        "add documents to this source or merge it with another")
    if not (0 < proxy_frac and 0 < test_frac and proxy_frac + test_frac < 1):
        raise DataError(f"got proxy_frac={proxy_frac}, test_frac={test_frac}; both must be > 0 "
                        "and sum to < 1 so every part gets documents; fix the config")
    ranked = sorted(docs, key=lambda d: (_unit_hash(seed, d), d.source, d.doc_id))
    units = [_unit_hash(seed, d) for d in ranked]
    n = len(ranked)
    b1 = sum(u < test_frac for u in units)
    b2 = sum(u < test_frac + proxy_frac for u in units)
    # A small source (CDC has 59 files) can hash no document into a part, and an empty test or
    # proxy set breaks perplexity and distillation. The parts are intervals of the hash, so we
    # move the boundary by one: the document whose hash lies nearest the empty part joins it.
    b1 = min(max(b1, 1), n - 2)
    b2 = min(max(b2, b1 + 1), n - 1)
    return Split(private=ranked[b2:], proxy=ranked[b1:b2], test=ranked[:b1])


def share_documents(docs: list[Document], n_devices: int, uneven: bool, alpha: float, seed: int) -> list[list[Document]]:
    """Deal one source's private documents to the n devices that share it.

    even:   round-robin (every device gets the same number of documents, ±1).
    uneven: the paper's "distributed randomly and unevenly" (§V-A): device shares q ~ Dirichlet(alpha · 1_n),
            drawn once per (seed, source); every device first gets one document, the rest go to devices drawn
            from q document by document. alpha = 1 makes every split of the unit interval equally likely;
            smaller alpha is more uneven.
    """
    if not uneven or n_devices == 1:
        return [docs[i::n_devices] for i in range(n_devices)]
    if len(docs) < n_devices:
        raise DataError(f"got {len(docs)} private documents for {n_devices} devices on source {docs[0].source!r}; "
                        "each device needs at least one; use fewer devices on it or a larger source")
    digest = hashlib.sha256(f"{seed}:share:{docs[0].source}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    q = rng.dirichlet(np.full(n_devices, alpha))
    owner = np.concatenate([np.arange(n_devices), rng.choice(n_devices, size=len(docs) - n_devices, p=q)])
    return [[doc for doc, o in zip(docs, owner) if o == i] for i in range(n_devices)]


def pack_blocks(tokenizer, docs: list[Document], seq_len: int) -> torch.Tensor:
    """Encode docs, end each with eos, concatenate and cut into (N, seq_len) blocks; drop the tail."""
    if seq_len < 1:
        raise DataError(f"got seq_len={seq_len}; blocks need at least one token; fix the config")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("got a tokenizer without an eos token; documents are separated by eos; "
                        "load it with deepfusion.data.load_tokenizer, which sets one")
    if not docs:
        return torch.empty(0, seq_len, dtype=torch.long)
    texts = [d.text for d in docs]
    key = _blocks_key(tokenizer, texts, seq_len)
    path = blocks_cache_dir() / f"{key}.pt" if key else None
    if path is not None and (blocks := _load_blocks(path, key, seq_len)) is not None:
        return blocks
    # One batched call: the Rust tokenizer encodes the documents in parallel.
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    flat = np.concatenate([np.asarray(x + [eos], dtype=np.int64) for x in ids])
    n = len(flat) // seq_len
    blocks = torch.from_numpy(flat[: n * seq_len].reshape(n, seq_len).copy())
    if path is not None:
        _save_blocks(path, key, blocks)
    return blocks


# ---- the packed-block cache: a run packs the same documents as the last run on this machine ------------------
# Tokenising the corpora is about half of a smoke run's time, and every run, engine and SuperNode packs the same
# documents with the same tokenizer again. The blocks are cached on disk by a hash of everything that decides
# them; a cache file that cannot be read or does not match its key is packed again and rewritten.

_BLOCKS_FORMAT = "blocks-v1"  # bump when packing changes, so old cache files are not reused


def blocks_cache_dir() -> Path:
    """~/.cache/deepfusion/blocks, or under $XDG_CACHE_HOME when set."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deepfusion" / "blocks"


def _blocks_key(tokenizer, texts: list[str], seq_len: int) -> str | None:
    """sha256 of the tokenizer (its serialised JSON and what transformers adds around it), the texts and seq_len;
    None (no caching) for a tokenizer without a serialisable backend, or when DEEPFUSION_NO_BLOCK_CACHE=1."""
    if os.environ.get("DEEPFUSION_NO_BLOCK_CACHE", "") not in ("", "0"):
        return None
    try:
        serialised = tokenizer.backend_tokenizer.to_str()
    except Exception:  # a stand-in, or a custom (Python) component that does not serialise: never cached
        return None
    backend = tokenizer.backend_tokenizer
    import tokenizers
    import transformers

    h = hashlib.sha256()

    def add(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "big") + b)  # length prefix: ["ab", "c"] != ["a", "bc"]

    add(repr((_BLOCKS_FORMAT, seq_len, tokenizer.eos_token_id, type(tokenizer).__qualname__,
              getattr(tokenizer, "split_special_tokens", None), getattr(backend, "encode_special_tokens", None),
              tokenizers.__version__, transformers.__version__)).encode())
    add(serialised.encode())
    for t in texts:
        add(t.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _load_blocks(path: Path, key: str, seq_len: int) -> torch.Tensor | None:
    """The cached (N, seq_len) blocks, or None when the file is missing, unreadable or not what the key says."""
    try:
        saved = torch.load(path, weights_only=True)
        blocks = saved["blocks"]
        if (saved["key"] != key or blocks.dim() != 2 or blocks.shape[1] != seq_len
                or saved["sha256"] != hashlib.sha256(blocks.numpy().tobytes()).hexdigest()):
            raise ValueError("does not match its key")
        return blocks.long()
    except FileNotFoundError:
        return None
    except Exception as e:  # a torn or foreign file: it is only a cache, so pack again and rewrite it
        log.debug("block cache: ignoring %s (%s)", path, e)
        return None


def _save_blocks(path: Path, key: str, blocks: torch.Tensor) -> None:
    """Write atomically (temp file + rename): a killed run never leaves half a cache file under the final name."""
    small = blocks.to(torch.int32)  # token ids: half the bytes of int64
    record = {"key": key, "blocks": small, "sha256": hashlib.sha256(small.numpy().tobytes()).hexdigest()}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:  # a read-only or full disk: the run goes on without the cache
        log.debug("block cache: cannot write %s (%s)", path, e)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _domain_generator(seed: int, domain: str) -> torch.Generator:
    # Per-domain seeds: adding a domain must not change which blocks the others draw.
    digest = hashlib.sha256(f"{seed}:{domain}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def balanced_proxy(blocks_by_domain: dict[str, torch.Tensor], max_blocks: int,
                   seed: int) -> tuple[torch.Tensor, list[str]]:
    """Draw the same number of blocks from every domain; return them shuffled with each row's domain.

    An unbalanced proxy (finance was 5% of proxy tokens) left finance perplexity far behind.
    """
    if not blocks_by_domain:
        raise DataError("got no domains for the proxy set; it needs blocks from at least one domain; "
                        "check the devices' sources")
    domains = sorted(blocks_by_domain)  # sorted: the result must not depend on dict order
    widths = {blocks_by_domain[d].shape[1:] for d in domains}
    if len(widths) != 1 or any(blocks_by_domain[d].dim() != 2 for d in domains):
        raise DataError(f"got proxy blocks of shapes {[tuple(blocks_by_domain[d].shape) for d in domains]}; "
                        "domains are mixed row by row so all must be (N, seq_len) with one seq_len; "
                        "pack them with the same seq_len")
    n = min(max_blocks // len(domains), *(len(blocks_by_domain[d]) for d in domains))
    if n < 1:
        counts = {d: len(blocks_by_domain[d]) for d in domains}
        raise DataError(f"got proxy blocks per domain {counts} with max_blocks={max_blocks}; a balanced "
                        "proxy needs at least one block per domain; raise max_blocks or proxy_frac, "
                        "or lower seq_len")
    picks = []
    for d in domains:
        rows = blocks_by_domain[d]
        picks.append(rows[torch.randperm(len(rows), generator=_domain_generator(seed, d))[:n]])
    labels = [d for d in domains for _ in range(n)]
    # Shuffle rows so that consumers reading in order still see every domain in each batch.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return torch.cat(picks)[order], [labels[i] for i in order.tolist()]


def proxy_leftover(blocks_by_domain: dict[str, torch.Tensor], max_blocks: int, per_domain: int,
                   seed: int) -> dict[str, torch.Tensor]:
    """Up to `per_domain` blocks per domain that `balanced_proxy` (same arguments) did *not* draw.

    A validation set for early stopping and for tuning λ: public text like the proxy, yet never trained
    on and never the test split (tuning on test would flatter every number we report).
    """
    domains = sorted(blocks_by_domain)
    n = min(max_blocks // len(domains), *(len(blocks_by_domain[d]) for d in domains))
    left = {}
    for d in domains:
        rows = blocks_by_domain[d]
        rest = torch.randperm(len(rows), generator=_domain_generator(seed, d))[n:n + per_domain]  # same draw
        if len(rest):
            left[d] = rows[rest]
    return left
