"""Bring-your-own-tokenizer fixtures: three real tokenizers of different algorithms and sizes, trained here.

Offline and real: each is trained with the `tokenizers` library on the project's own corpora (MedQuAD's CDC
pages and TAT-QA's first half, ~200 documents), wrapped as a PreTrainedTokenizerFast, saved with
save_pretrained and meant to be loaded back through AutoTokenizer.from_pretrained(dir) -- a local
directory, never a hub name.

    bpe        byte-level BPE, 1,000 ids, GPT-2 style: 'Ġ' marks a leading space, no BOS/EOS added
    unigram    Unigram (SentencePiece style), 800 ids: NFKC, '▁' marks spaces, adds <s> ... </s>
    wordpiece  WordPiece (BERT style), 600 ids: lower-cases, strips accents, drops spaces, '##' marks
               a word's continuation, adds [CLS] ... [SEP]

Stable API for other tests:  three_tokenizers(root) -> {"bpe": dir, "unigram": dir, "wordpiece": dir}.
A directory that already holds tokenizer.json is reused, so a session-scoped root trains once
(conftest.py's `byo_tokenizers` fixture).
"""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import AutoTokenizer

from deepfusion.data.tokenizer import train_kind

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # as conftest's data_dir
SOURCES = ("medquad:cdc", "tatqa:0/2")
SIZES = {"bpe": 1000, "unigram": 800, "wordpiece": 600}


@functools.cache
def corpus_texts(data_dir: Path = SHARED_DATA) -> tuple[str, ...]:
    """The documents the three tokenizers learn from; skips the calling test if the corpora are absent."""
    from deepfusion.data.corpora import load_source

    if not (Path(data_dir) / "medquad").is_dir():
        import pytest

        pytest.skip(f"real corpora not found at {data_dir} (see shared/data/DATA.md)")
    return tuple(d.text for spec in SOURCES for d in load_source(spec, Path(data_dir)))




def three_tokenizers(root: Path, data_dir: Path = SHARED_DATA) -> dict[str, Path]:
    """Train (or reuse) the three tokenizers under root; returns {"bpe"|"unigram"|"wordpiece": directory}."""
    out = {}
    for name, size in SIZES.items():
        target = Path(root) / name
        if not (target / "tokenizer.json").is_file():
            train_kind(list(corpus_texts(Path(data_dir))), name, size).save_pretrained(str(target))
        out[name] = target
    return out


def load(directory: Path):
    """Load one of them back the way a user's tokenizer is loaded: from its local directory only."""
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
