"""Corpora, splits, token blocks and the shared tokenizer for DeepFusion runs."""

from deepfusion.data.corpora import (
    MEDQUAD_SOURCES,
    Document,
    load_jsonl,
    load_medquad,
    load_source,
    load_tatqa,
    load_text_dir,
)
from deepfusion.data.discovery import UPSTREAM, Upstream, download_upstream, resolve_data_dir
from deepfusion.data.qa import qa_examples
from deepfusion.data.splits import Split, balanced_proxy, pack_blocks, proxy_leftover, split_documents
from deepfusion.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "MEDQUAD_SOURCES", "Document", "load_jsonl", "load_medquad", "load_source",
    "load_tatqa", "load_text_dir", "UPSTREAM", "Upstream", "download_upstream", "resolve_data_dir",
    "Split", "balanced_proxy", "pack_blocks", "proxy_leftover", "split_documents", "load_tokenizer", "train_tokenizer",
    "qa_examples",
]
