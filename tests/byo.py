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

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

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


def _bpe(texts) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SIZES["bpe"], special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>")


def _unigram(texts) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    # A small seed and fast shrinking: 4 s instead of 10 s on these documents, the same kind of pieces.
    trainer = trainers.UnigramTrainer(vocab_size=SIZES["unigram"], special_tokens=specials, unk_token="<unk>",
                                      seed_size=5000, max_piece_length=8, shrinking_factor=0.5,
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>",
        special_tokens=[(s, tok.token_to_id(s)) for s in ("<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _wordpiece(texts) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)  # strips accents too
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=SIZES["wordpiece"], special_tokens=specials,
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]")


_TRAIN = {"bpe": _bpe, "unigram": _unigram, "wordpiece": _wordpiece}


def three_tokenizers(root: Path, data_dir: Path = SHARED_DATA) -> dict[str, Path]:
    """Train (or reuse) the three tokenizers under root; returns {"bpe"|"unigram"|"wordpiece": directory}."""
    out = {}
    for name, train in _TRAIN.items():
        target = Path(root) / name
        if not (target / "tokenizer.json").is_file():
            train(list(corpus_texts(Path(data_dir)))).save_pretrained(str(target))
        out[name] = target
    return out


def load(directory: Path):
    """Load one of them back the way a user's tokenizer is loaded: from its local directory only."""
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
