"""The tokenizer trains fast on small text, round-trips, is cached, and loads with AutoTokenizer."""

import pytest
from transformers import AutoTokenizer

from deepfusion.data import load_tokenizer, train_tokenizer
from deepfusion.errors import DataError
from deepfusion.data import tokenizer as tokmod

TEXTS = ["The patient has a fever of 38.5°C.", "Total sales were $1,496.5 million in 2019."] * 30


def test_train_roundtrip_and_special_tokens(tmp_path):
    tok = train_tokenizer(TEXTS, 300, tmp_path)
    assert len(tok) <= 300 and tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    for text in [*TEXTS[:2], "unseen ünïcödé 漢字 \n\t tabs"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok("Total sales")["input_ids"]) < len("Total sales")  # merges were learnt


def test_cache_is_reused_without_training(tmp_path, monkeypatch):
    first = train_tokenizer(TEXTS, 300, tmp_path)
    [cache] = [p for p in tmp_path.iterdir()]
    assert not cache.name.startswith(".")  # no temp dir left behind
    monkeypatch.setattr(tokmod, "_train", lambda *a: pytest.fail("trained again instead of using the cache"))
    second = train_tokenizer(TEXTS, 300, tmp_path)
    assert second.get_vocab() == first.get_vocab()
    auto = AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
    assert auto("sales fever")["input_ids"] == first("sales fever")["input_ids"]
    assert auto.eos_token == "<|endoftext|>"


def test_cache_key_depends_on_inputs(tmp_path):
    train_tokenizer(TEXTS, 300, tmp_path)
    train_tokenizer(TEXTS, 290, tmp_path)
    train_tokenizer(TEXTS[:-1], 300, tmp_path)
    assert len(list(tmp_path.iterdir())) == 3


def test_errors(tmp_path):
    with pytest.raises(DataError, match="vocab_size=100"):
        train_tokenizer(TEXTS, 100, tmp_path)
    with pytest.raises(DataError, match="no such tokenizer folder"):
        load_tokenizer(tmp_path / "missing")


def test_load_sets_pad_from_eos(tmp_path):
    tok = train_tokenizer(TEXTS, 300, tmp_path / "cache")
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path / "nopad"))
    loaded = load_tokenizer(tmp_path / "nopad")
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("kind", ["unigram", "wordpiece"])
def test_a_trained_kind_is_the_same_tokenizer_run_after_run(kind):
    """The trainers order tied pieces by a hash map's walk; _canonical fixes the ids (and Unigram's scores)."""
    from tests.byo import SIZES, corpus_texts

    texts = list(corpus_texts())
    first, second = (tokmod.train_kind(texts, kind, SIZES[kind]) for _ in range(2))
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    text = "Anaemia and the 10-K: revenue grew 4.5%."
    assert first(text)["input_ids"] == second(text)["input_ids"]
    assert first.convert_ids_to_tokens(first(text)["input_ids"])[0] == ("<s>" if kind == "unigram" else "[CLS]")
