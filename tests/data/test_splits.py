"""Splits are deterministic and complete; blocks end documents with eos; the proxy is balanced."""

import random

import pytest
import torch

from deepfusion.data import Document, balanced_proxy, pack_blocks, split_documents
from deepfusion.errors import DataError


def docs(n, source="s"):
    return [Document(source, "d", str(i), f"text {i}") for i in range(n)]


def ids(part):
    return [d.doc_id for d in part]


def test_split_is_deterministic_disjoint_covering_and_order_independent():
    corpus = docs(500)
    a = split_documents(corpus, seed=1, proxy_frac=0.2, test_frac=0.1)
    shuffled = corpus[:]
    random.Random(0).shuffle(shuffled)
    b = split_documents(shuffled, seed=1, proxy_frac=0.2, test_frac=0.1)
    assert (ids(a.private), ids(a.proxy), ids(a.test)) == (ids(b.private), ids(b.proxy), ids(b.test))
    parts = [set(ids(p)) for p in (a.private, a.proxy, a.test)]
    assert sum(map(len, parts)) == 500 and set().union(*parts) == set(ids(corpus))
    assert 30 < len(a.test) < 75 and 70 < len(a.proxy) < 130  # roughly the fractions
    c = split_documents(corpus, seed=2, proxy_frac=0.2, test_frac=0.1)
    assert ids(c.test) != ids(a.test)


@pytest.mark.parametrize("n", [3, 4, 5, 10])
@pytest.mark.parametrize("seed", range(5))
def test_split_parts_never_empty(n, seed):
    s = split_documents(docs(n), seed=seed, proxy_frac=0.01, test_frac=0.01)
    assert s.private and s.proxy and s.test
    assert sorted(ids(s.private) + ids(s.proxy) + ids(s.test)) == sorted(ids(docs(n)))
    s = split_documents(docs(n), seed=seed, proxy_frac=0.49, test_frac=0.5)
    assert s.private and s.proxy and s.test


def test_split_errors():
    with pytest.raises(DataError, match="got 2 documents"):
        split_documents(docs(2), 0, 0.1, 0.1)
    with pytest.raises(DataError, match="proxy_frac=0.6"):
        split_documents(docs(10), 0, 0.6, 0.5)


class CharTokenizer:
    """A stand-in with the PreTrainedTokenizerFast call signature: one id per character."""
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_pack_blocks_shape_and_eos():
    blocks = pack_blocks(CharTokenizer(), [Document("s", "d", "0", "abc"), Document("s", "d", "1", "defgh")], 4)
    # "abc" eos "defgh" eos = 10 tokens → 2 full blocks, 2 dropped
    assert blocks.dtype == torch.long and blocks.tolist() == [[97, 98, 99, 0], [100, 101, 102, 103]]
    assert pack_blocks(CharTokenizer(), [Document("s", "d", "0", "ab")], 4).shape == (0, 4)
    assert pack_blocks(CharTokenizer(), [], 4).shape == (0, 4)


def test_pack_blocks_with_real_tokenizer(tmp_path):
    from deepfusion.data import train_tokenizer
    tok = train_tokenizer(["hello world, hello there"] * 20, 300, tmp_path)
    blocks = pack_blocks(tok, [Document("s", "d", str(i), "hello world") for i in range(10)], 8)
    flat = blocks.flatten().tolist()
    assert blocks.shape[1] == 8 and flat.count(tok.eos_token_id) >= 5
    assert tok.decode(flat[: flat.index(tok.eos_token_id)]) == "hello world"


def test_balanced_proxy_balance_and_determinism():
    blocks = {"medical": torch.arange(400).view(100, 4), "finance": torch.arange(1000, 1020).view(5, 4)}
    rows, domains = balanced_proxy(blocks, max_blocks=64, seed=3)
    assert rows.shape == (10, 4) and domains.count("medical") == domains.count("finance") == 5
    for row, d in zip(rows.tolist(), domains):
        assert (row[0] >= 1000) == (d == "finance")
    assert len({tuple(r) for r in rows.tolist()}) == 10  # without replacement
    again = balanced_proxy(dict(reversed(blocks.items())), max_blocks=64, seed=3)
    assert torch.equal(again[0], rows) and again[1] == domains
    assert not torch.equal(balanced_proxy(blocks, 64, seed=4)[0], rows)
    rows, domains = balanced_proxy(blocks, max_blocks=6, seed=3)
    assert len(rows) == 6 and domains.count("finance") == 3


def test_balanced_proxy_errors():
    with pytest.raises(DataError, match="finance"):
        balanced_proxy({"medical": torch.zeros(4, 2), "finance": torch.zeros(0, 2)}, 10, 0)
    with pytest.raises(DataError, match="one seq_len"):
        balanced_proxy({"medical": torch.zeros(4, 2), "finance": torch.zeros(4, 3)}, 10, 0)
    with pytest.raises(DataError, match="no domains"):
        balanced_proxy({}, 10, 0)


def test_proxy_leftover_is_what_the_balanced_proxy_left_out():
    from deepfusion.data import proxy_leftover

    blocks = {"medical": torch.arange(40).view(20, 2), "finance": torch.arange(100, 116).view(8, 2)}
    proxy, _ = balanced_proxy(blocks, 10, seed=3)
    left = proxy_leftover(blocks, 10, per_domain=2, seed=3)
    drawn = {tuple(r.tolist()) for r in proxy}
    assert {d: len(b) for d, b in left.items()} == {"medical": 2, "finance": 2}
    assert not drawn & {tuple(r.tolist()) for b in left.values() for r in b}
    assert proxy_leftover(blocks, 16, per_domain=5, seed=3).keys() == {"medical"}  # finance: all 8 drawn


def test_devices_sharing_a_source_get_even_or_uneven_shares():
    from deepfusion.data.splits import share_documents

    docs = [Document("medquad:x", "medical", f"{i:04d}", f"text {i}") for i in range(200)]
    even = share_documents(docs, 4, uneven=False, alpha=1.0, seed=0)
    assert [len(s) for s in even] == [50] * 4 and even[1] == docs[1::4]  # round-robin, as before
    uneven = share_documents(docs, 4, uneven=True, alpha=1.0, seed=0)
    sizes = [len(s) for s in uneven]
    assert sum(sizes) == 200 and min(sizes) >= 1 and max(sizes) > 2 * min(sizes)  # every doc once, uneven
    assert sorted(d.doc_id for s in uneven for d in s) == [d.doc_id for d in docs]
    assert uneven == share_documents(docs, 4, uneven=True, alpha=1.0, seed=0)  # seeded
    assert uneven != share_documents(docs, 4, uneven=True, alpha=1.0, seed=1)
    with pytest.raises(DataError, match="each device needs at least one"):
        share_documents(docs[:3], 4, uneven=True, alpha=1.0, seed=0)


# ---- the packed-block cache ---------------------------------------------------------------------------------

CACHE_DOCS = [Document("s", "d", str(i), f"hello world {i}, the heart pumps blood") for i in range(30)]


@pytest.fixture
def block_cache(tmp_path, monkeypatch):
    """An empty cache under a private XDG_CACHE_HOME, the cache on, and a small real tokenizer."""
    from deepfusion.data import train_tokenizer
    from deepfusion.data.splits import blocks_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DEEPFUSION_NO_BLOCK_CACHE", raising=False)
    assert blocks_cache_dir() == tmp_path / "xdg" / "deepfusion" / "blocks"
    return train_tokenizer([d.text for d in CACHE_DOCS] * 5, 300, tmp_path / "tok"), blocks_cache_dir()


def no_tokenising(monkeypatch, tok):
    """Any tokenizer call from here on fails the test: the blocks must come from the cache."""
    monkeypatch.setattr(type(tok), "__call__", lambda *a, **k: pytest.fail("tokenised again instead of reading"))


def test_cached_blocks_equal_uncached_and_skip_the_tokenizer(block_cache, monkeypatch):
    tok, where = block_cache
    monkeypatch.setenv("DEEPFUSION_NO_BLOCK_CACHE", "1")
    uncached = pack_blocks(tok, CACHE_DOCS, 8)
    assert not where.exists()  # disabled: nothing written
    monkeypatch.delenv("DEEPFUSION_NO_BLOCK_CACHE")
    first = pack_blocks(tok, CACHE_DOCS, 8)
    [file] = where.iterdir()  # written atomically: no temp file left beside it
    assert file.suffix == ".pt" and len(file.stem) == 64
    no_tokenising(monkeypatch, tok)
    second = pack_blocks(tok, CACHE_DOCS, 8)
    for blocks in (first, second):
        assert blocks.dtype == torch.long and torch.equal(blocks, uncached)
    assert len(uncached) > 10


def test_a_corrupt_cache_file_is_packed_again_and_rewritten(block_cache, monkeypatch):
    tok, where = block_cache
    want = pack_blocks(tok, CACHE_DOCS, 8)
    [file] = where.iterdir()
    good = file.read_bytes()
    for bad in (b"", b"not a torch file", good[: len(good) // 2]):
        file.write_bytes(bad)
        assert torch.equal(pack_blocks(tok, CACHE_DOCS, 8), want)
        assert file.read_bytes() != bad and [p.name for p in where.iterdir()] == [file.name]
    # a readable file whose blocks are not the ones its key names (another file copied over it)
    other = pack_blocks(tok, CACHE_DOCS[::-1], 8)
    assert other.shape == want.shape and not torch.equal(other, want)
    [other_file] = [p for p in where.iterdir() if p != file]
    file.write_bytes(other_file.read_bytes())
    assert torch.equal(pack_blocks(tok, CACHE_DOCS, 8), want)
    no_tokenising(monkeypatch, tok)
    assert torch.equal(pack_blocks(tok, CACHE_DOCS, 8), want)  # rewritten: read back now


def test_the_cache_key_changes_with_seq_len_tokenizer_and_texts(block_cache, tmp_path):
    from deepfusion.data import train_tokenizer
    from deepfusion.data.splits import _blocks_key

    tok, where = block_cache
    other_tok = train_tokenizer([d.text for d in CACHE_DOCS] * 5, 260, tmp_path / "tok")  # fewer merges
    texts = [d.text for d in CACHE_DOCS]
    keys = {_blocks_key(tok, texts, 8), _blocks_key(tok, texts, 9), _blocks_key(other_tok, texts, 8),
            _blocks_key(tok, texts[:-1], 8), _blocks_key(tok, ["ab", "c"], 8), _blocks_key(tok, ["a", "bc"], 8)}
    assert len(keys) == 6 and _blocks_key(tok, texts, 8) == _blocks_key(tok, list(texts), 8)
    for t, seq_len in ((tok, 8), (tok, 9), (other_tok, 8)):
        blocks = pack_blocks(t, CACHE_DOCS, seq_len)
        assert blocks.shape[1] == seq_len
    assert len(list(where.iterdir())) == 3
    assert len(pack_blocks(other_tok, CACHE_DOCS, 8)) > len(pack_blocks(tok, CACHE_DOCS, 8))  # each its own blocks


def test_an_unwritable_cache_does_not_stop_packing(block_cache, tmp_path, monkeypatch):
    tok, _ = block_cache
    want = pack_blocks(tok, CACHE_DOCS, 8)
    (tmp_path / "file").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert torch.equal(pack_blocks(tok, CACHE_DOCS, 8), want)


def test_a_tokenizer_without_a_serialisable_backend_is_not_cached(block_cache):
    _, where = block_cache
    assert pack_blocks(CharTokenizer(), [Document("s", "d", "0", "abcdefgh")], 4).shape == (2, 4)
    assert not where.exists()
