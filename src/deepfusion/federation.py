"""What every engine shares: the federation's data, laid out per device (the run's output files: outputs.py).

Engines call these functions; they do not subclass anything (duplicate before abstracting).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deepfusion.config import DataConfig, FederationConfig
from deepfusion.data import (Split, balanced_proxy, load_source, load_tokenizer, pack_blocks, proxy_leftover,
                              resolve_data_dir, split_documents, train_tokenizer)
from deepfusion.data.qa import qa_examples
from deepfusion.data.splits import share_documents
from deepfusion.errors import DataError

log = logging.getLogger("deepfusion")


@dataclass
class FederationData:
    tokenizer: object  # PreTrainedTokenizerFast shared by every device and the server (the wire contract)
    private: dict[str, torch.Tensor]  # device id -> (N, T) private blocks; only that device reads them
    proxy: torch.Tensor  # (P, T) public proxy blocks, balanced across domains
    proxy_domains: list[str]  # domain of every proxy row
    test_sets: dict[str, tuple[str, torch.Tensor]]  # source -> (domain, (N, T) held-out blocks)
    validation: dict[str, tuple[str, torch.Tensor]]  # domain -> (domain, (N, T) proxy blocks never trained on)
    device_source: dict[str, str]  # device id -> its source spec
    data_dir: Path
    # source -> (domain, (ids (M, T), mask (M, T))): held-out QA pairs whose answers are scored (data/qa.py)
    qa_sets: dict[str, tuple[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    device_tokenizers: dict[str, object] = field(default_factory=dict)  # device id -> its own tokenizer, if any


def prepare_data(cfg: FederationConfig, data_dir: str | None = None, private: bool = True) -> FederationData:
    """Load every device's source, split it, train (or load) the tokenizer, pack token blocks.

    private=False leaves out the devices' private blocks: a Flower server needs only the public parts
    (tokenizer, proxy, held-out test sets); each device packs its own blocks with `device_private`.
    """
    root = resolve_data_dir(data_dir or cfg.data.dir)
    d = cfg.data
    splits, domains = {}, {}
    for dev in cfg.devices:
        if dev.source not in splits:
            docs = load_source(dev.source, root, dev.domain)
            splits[dev.source] = split_documents(docs, d.seed, d.proxy_frac, d.test_frac)
            domains[dev.source] = docs[0].domain
    proxy_docs = [doc for s in splits.values() for doc in s.proxy]
    if d.tokenizer:
        tokenizer = load_tokenizer(Path(d.tokenizer))
    else:
        tokenizer = train_tokenizer([doc.text for doc in proxy_docs], d.vocab_size, cache_dir() / "tokenizers")

    blocks = {dev.id: device_private(cfg, dev.id, tokenizer, root, splits[dev.source])
              for dev in cfg.devices} if private else {}

    by_domain: dict[str, list[torch.Tensor]] = {}
    for source, split in splits.items():
        by_domain.setdefault(domains[source], []).append(pack_blocks(tokenizer, split.proxy, d.seq_len))
    pool = {k: torch.cat(v) for k, v in by_domain.items()}
    proxy, proxy_domains = balanced_proxy(pool, d.proxy_blocks, d.seed)
    validation = {dom: (dom, b) for dom, b in proxy_leftover(pool, d.proxy_blocks, d.val_blocks, d.seed).items()}

    test_sets = {source: (domains[source], held_out_blocks(tokenizer, split.test, d))
                 for source, split in splits.items()}
    qa_sets = {}  # from the test documents alone: answers as unseen as the test blocks
    for source, split in splits.items():
        ids, mask = qa_examples(tokenizer, split.test, d.seq_len, d.qa_pairs)
        if len(ids):  # jsonl/text sources have no QA pairs
            qa_sets[source] = (domains[source], (ids, mask))
    log.info("data: %d devices, proxy %d blocks %s, test %s", len(cfg.devices), len(proxy),
             {k: proxy_domains.count(k) for k in sorted(set(proxy_domains))},
             {s: len(b) for s, (_, b) in test_sets.items()})
    own = {dev.id: t for dev in cfg.devices if (t := own_tokenizer(cfg, dev.id, tokenizer)) is not None}
    return FederationData(tokenizer, blocks, proxy, proxy_domains, test_sets, validation,
                          {dev.id: dev.source for dev in cfg.devices}, root, qa_sets, own)


def device_documents(cfg: FederationConfig, device_id: str, root: Path, split: Split | None = None) -> list:
    """One device's private documents, from its own source alone (a device on its own node calls this).

    Devices configured on one source share its private documents (data.private_split: even or uneven).
    `split` skips re-reading the source when the caller has split it already.
    """
    ids = [x.id for x in cfg.devices]
    if device_id not in ids:
        raise DataError(f"device {device_id!r} is not in this federation's config (devices: {', '.join(ids)}); "
                        "name one of them (e.g. flower-supernode --node-config 'device-id=\"...\"')")
    dev, d = cfg.devices[ids.index(device_id)], cfg.data
    if split is None:
        split = split_documents(load_source(dev.source, root, dev.domain), d.seed, d.proxy_frac, d.test_frac)
    sharing = [x.id for x in cfg.devices if x.source == dev.source]
    shares = share_documents(split.private, len(sharing), d.private_split == "uneven", d.split_alpha, d.seed)
    return shares[sharing.index(dev.id)]


def device_tokenizer(cfg: FederationConfig, device_id: str, global_tokenizer):
    """The tokenizer a device's model reads: its own ([[devices]] tokenizer, else one saved in its checkpoint
    dir), or the federation's when it has none or its own is the same vocabulary (no alignment needed then)."""
    from deepfusion import alignment

    from deepfusion.config import HOSTING_METHODS, SERVER_METHODS

    dc = next(d for d in cfg.devices if d.id == device_id)
    where = dc.tokenizer or (dc.checkpoint if dc.checkpoint and (Path(dc.checkpoint) / "tokenizer.json").is_file()
                             else None)
    if where is None or cfg.method in HOSTING_METHODS + SERVER_METHODS:  # those devices train the global MoE
        return global_tokenizer
    key = str(Path(where).resolve())
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(Path(where))
    own = _TOKENIZERS[key]
    return global_tokenizer if alignment.same_vocabulary(own, global_tokenizer) else own


_TOKENIZERS: dict[str, object] = {}  # dir -> loaded tokenizer: devices of one type share it


def own_tokenizer(cfg: FederationConfig, device_id: str, global_tokenizer):
    """The device's own tokenizer, or None when it reads the federation's (what its upload carries)."""
    tok = device_tokenizer(cfg, device_id, global_tokenizer)
    return None if tok is global_tokenizer else tok


def public_blocks(global_tokenizer, own_tokenizer, public: torch.Tensor) -> torch.Tensor:
    """The public blocks' text cut by a device's own tokenizer and packed into blocks of the same length (the
    public checkpoint of a preset with its own tokenizer is pretrained on these); with no own tokenizer (None,
    or the federation's own) the blocks as they are."""
    from deepfusion.alignment import block_views

    if own_tokenizer is None or own_tokenizer is global_tokenizer:
        return public
    flat = torch.cat([v.ids for v in block_views(global_tokenizer, own_tokenizer, public)])
    n = len(flat) // public.shape[1]
    return flat[: n * public.shape[1]].view(n, public.shape[1])


def device_private(cfg: FederationConfig, device_id: str, tokenizer, root: Path,
                   split: Split | None = None) -> torch.Tensor:
    """One device's (N, T) private blocks (its documents, packed by its own tokenizer; `tokenizer` is the
    federation's)."""
    tokenizer = device_tokenizer(cfg, device_id, tokenizer)
    blocks = pack_blocks(tokenizer, device_documents(cfg, device_id, root, split), cfg.data.seq_len)
    if len(blocks) == 0:
        source = next(x.source for x in cfg.devices if x.id == device_id)
        raise DataError(f"device {device_id!r}: source {source!r} gives no private block of {cfg.data.seq_len} "
                        "tokens; give it more data or lower data.seq_len")
    return blocks


def device_seed(cfg: FederationConfig, device_id: str) -> int:
    """A device's training seed: distinct per device, fixed by the run's seed, the same on every engine."""
    return cfg.seed * 1000 + [d.id for d in cfg.devices].index(device_id) + 1


def held_out_blocks(tokenizer, docs: list, d: DataConfig) -> torch.Tensor:
    """(N, T) evaluation blocks of a source's test documents: at most d.test_blocks, spread over the split."""
    blocks = pack_blocks(tokenizer, docs, d.seq_len)
    keep = torch.linspace(0, len(blocks) - 1, min(d.test_blocks, len(blocks))).long()  # fixed, so rounds compare
    return blocks[keep]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepfusion"
