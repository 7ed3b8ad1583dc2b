"""Train (once, cached) and load the byte-level BPE tokenizer that every model in a run shares."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from deepfusion.errors import DataError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
_FORMAT = "bytelevel-bpe-v1"  # bump when training changes, so old caches are not reused


def _cache_key(texts: list[str], vocab_size: int) -> str:
    h = hashlib.sha256(f"{_FORMAT}:{vocab_size}".encode())
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "big") + b)  # length prefix: ["ab","c"] ≠ ["a","bc"]
    return h.hexdigest()[:16]


def _train(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown tokens ever
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def train_tokenizer(texts: list[str], vocab_size: int, cache_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on texts, or load it from cache_dir/<hash of inputs>/ if trained before."""
    if vocab_size < 256 + 2:
        raise DataError(f"got vocab_size={vocab_size}; byte-level BPE needs 256 byte tokens plus "
                        f"{EOS} and {PAD}; use at least 258")
    if not any(texts):
        raise DataError("got no text to train the tokenizer on; check the sources feeding it")
    target = Path(cache_dir) / _cache_key(texts, vocab_size)
    if not (target / "tokenizer.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Save into a temp dir and rename, so a killed run never leaves a half-written cache.
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            _train(texts, vocab_size).save_pretrained(str(tmp))
            os.replace(tmp, target)
        except OSError:
            if not (target / "tokenizer.json").is_file():  # not just a concurrent run that won
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # Load even after training, so the first and every later call return the same thing.
    return load_tokenizer(target)


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a local directory; eos is set and pad falls back to eos."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such tokenizer folder; it must hold a save_pretrained tokenizer; "
                        "train one with deepfusion.data.train_tokenizer or fix the path")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load a tokenizer from it ({e}); "
                        "it must hold tokenizer.json from save_pretrained; retrain or fix the path") from None
    if tok.eos_token is None and tok.sep_token is not None:
        tok.eos_token = tok.sep_token  # WordPiece (BERT): [SEP] is what ends a text there
    if tok.eos_token is None:
        if EOS not in tok.get_vocab():
            raise DataError(f"{path}: tokenizer has no eos token and no {EOS}; documents are "
                            "separated by eos; set eos_token in its tokenizer_config.json")
        tok.eos_token = EOS
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ---- other algorithms, as devices bring them (GPT-2's byte-level BPE, SentencePiece's Unigram, BERT's WordPiece) --
# Bring-your-own-tokenizer fixtures and the byo benchmark train these: real tokenizers of the three families
# the alignment layer must handle (alignment.py), made here because nothing may come from a hub.

def _bpe(texts, size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>")


def _unigram(texts, size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    # A small seed and fast shrinking: 4 s instead of 10 s on these documents, the same kind of pieces.
    trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=specials, unk_token="<unk>",
                                      seed_size=5000, max_piece_length=8, shrinking_factor=0.5,
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok = _canonical(tok, len(specials))
    tok.post_processor = _wrapped(tok, "<s>", "</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _wordpiece(texts, size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)  # strips accents too
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=size, special_tokens=specials,
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok = _canonical(tok, len(specials))
    tok.post_processor = _wrapped(tok, "[CLS]", "[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]")


def _canonical(tok: Tokenizer, n_specials: int) -> Tokenizer:
    """The same tokenizer with its ids in one order, run after run. The Unigram and WordPiece trainers order
    tied pieces by a hash map's walk, which changes between processes (measured: 13 of 800 Unigram ids and 48
    of 600 WordPiece ids moved between two trainings; BPE did not), and the Unigram scores differ in their
    11th decimal. Neither model reads ids when it segments (WordPiece: longest match; Unigram: the scores), so
    the special tokens keep their ids and the rest are sorted: WordPiece by string, Unigram by its score
    rounded to 5 decimals (stored rounded), then by string."""
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    if spec["model"]["type"] == "Unigram":
        specials, rest = vocab[:n_specials], [[p, round(score, 5)] for p, score in vocab[n_specials:]]
        spec["model"]["vocab"] = specials + sorted(rest, key=lambda ps: (-ps[1], ps[0]))
    else:
        order = sorted(vocab, key=vocab.get)
        spec["model"]["vocab"] = {t: i for i, t in enumerate(order[:n_specials] + sorted(order[n_specials:]))}
    return Tokenizer.from_str(json.dumps(spec))


def _wrapped(tok: Tokenizer, begin: str, end: str) -> processors.TemplateProcessing:
    """Wrap each sequence in begin ... end, as SentencePiece (Llama) and BERT tokenizers do when asked to."""
    return processors.TemplateProcessing(single=f"{begin} $A {end}", pair=f"{begin} $A {end} $B {end}",
                                         special_tokens=[(t, tok.token_to_id(t)) for t in (begin, end)])


KINDS = {"bpe": _bpe, "unigram": _unigram, "wordpiece": _wordpiece}


def train_kind(texts: list[str], kind: str, size: int) -> PreTrainedTokenizerFast:
    """A tokenizer of one of KINDS with `size` ids, trained on texts (seconds for a few hundred documents)."""
    if kind not in KINDS:
        raise DataError(f"tokenizer kind {kind!r}: choose one of {', '.join(KINDS)}")
    return KINDS[kind](texts, size)
