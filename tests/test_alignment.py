"""alignment.py on three real tokenizers trained here (tests/byo.py): byte-level BPE, Unigram, WordPiece."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizer

from deepfusion import alignment as al
from deepfusion.errors import DataError
from tests.byo import SIZES, corpus_texts, load

PAIRS = list(itertools.permutations(("bpe", "unigram", "wordpiece"), 2))
WORDY = ("  Héllo wörld, naïve café:  stratification\tof 1,452.4 tokens\n\nQuestion ﬁne 日本語 "
         "<|endoftext|> [SEP]  ")


@pytest.fixture(scope="module")
def toks(byo_tokenizers):
    return {name: load(path) for name, path in byo_tokenizers.items()}


def pieces(tok, tz: al.Tokenization, tokens) -> list[str]:
    return tok.convert_ids_to_tokens([tz.ids[i] for i in tokens])


def check(A: al.Alignment, *sides: al.Tokenization) -> None:
    """What every alignment must be: disjoint minimal spans in order, each tiled exactly by both sides."""
    spans = A.spans.tolist()
    assert all(lo < hi for lo, hi in spans)
    assert all(h0 <= l1 for (_, h0), (l1, _) in zip(spans, spans[1:]))
    across = []
    for tz, side in zip(sides, (A.a, A.b)):
        cs = al.char_spans(tz)
        for g, (lo, hi) in enumerate(spans):
            mine = cs[(side.group == g).numpy()]
            assert len(mine) and (mine[:, 0] >= lo).all() and (mine[:, 1] <= hi).all()
            held = np.zeros(hi - lo, bool)
            for s, e in mine:
                held[s - lo:e - lo] = True
            assert held.all(), "a span's characters are all held by its tokens"
            assert side.weight[side.group == g].sum().item() == pytest.approx(hi - lo)
        across.append({p for s, e in cs for p in range(s + 1, e)})
    for lo, hi in spans:  # minimal: no position inside a span is a cut of both sides
        assert all(p in across[0] or p in across[1] for p in range(lo + 1, hi))


def test_three_real_tokenizers_of_different_algorithms_and_sizes(toks, byo_tokenizers):
    kinds = {n: type(t.backend_tokenizer.model).__name__ for n, t in toks.items()}
    assert kinds == {"bpe": "BPE", "unigram": "Unigram", "wordpiece": "WordPiece"}
    assert {n: len(t) for n, t in toks.items()} == SIZES
    assert all(t.is_fast for t in toks.values()) and all((p / "tokenizer.json").is_file()
                                                          for p in byo_tokenizers.values())


def test_a_word_split_differently_maps_to_the_same_characters(toks):
    text = "Question: What is stratification of tokens?"
    tz = {n: al.tokenize(t, text) for n, t in toks.items()}
    lo, hi = text.index(" stratification"), text.index(" of")
    splits = {n: [p for p, (s, e) in zip(pieces(toks[n], tz[n], range(len(tz[n]))), al.char_spans(tz[n]).tolist())
                  if lo <= s < e <= hi] for n in toks}
    # Unigram's lone "▁" before "strat" holds no character (whitespace joins the word after it).
    assert splits == {"bpe": ["Ġst", "r", "at", "ific", "ation"], "unigram": ["strat", "if", "ic", "ation"],
                      "wordpiece": ["st", "##r", "##ati", "##f", "##ic", "##ation"]}
    expect = {("bpe", "unigram"): [" strat", "ific", "ation"], ("bpe", "wordpiece"): [" st", "r", "atific", "ation"],
              ("unigram", "wordpiece"): [" stratif", "ic", "ation"]}
    for (x, y), want in expect.items():
        A = al.align(tz[x], tz[y])
        check(A, tz[x], tz[y])
        inside = [g for g in A.groups() if lo <= g.chars[0] < g.chars[1] <= hi]
        assert [text[s:e] for s, e in (g.chars for g in inside)] == want
        assert (inside[0].chars[0], inside[-1].chars[1]) == (lo, hi)  # the word tiled exactly, space and all
        B = al.align(tz[y], tz[x])  # the same spans, the other way round
        assert torch.equal(B.spans, A.spans)


@pytest.mark.parametrize("x,y", PAIRS)
def test_every_character_is_covered_exactly_once(toks, x, y):
    text = corpus_texts()[0][:1500] + "\n" + corpus_texts()[-1][:1500]
    tx, ty = al.tokenize(toks[x], text), al.tokenize(toks[y], text)
    A = al.align(tx, ty)
    check(A, tx, ty)
    spans = A.spans.tolist()
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(h0 == l1 for (_, h0), (l1, _) in zip(spans, spans[1:]))  # contiguous: each character once
    assert "".join(text[s:e] for s, e in spans) == text


def test_special_tokens_whitespace_and_unicode(toks):
    tz = {n: al.tokenize(t, WORDY) for n, t in toks.items()}
    A = al.align(tz["unigram"], tz["wordpiece"])
    check(A, tz["unigram"], tz["wordpiece"])
    assert A.a.group[0] == A.a.group[-1] == -1 and A.b.group[0] == A.b.group[-1] == -1  # <s> </s>, [CLS] [SEP]
    texts = [WORDY[s:e] for s, e in A.spans.tolist()]
    assert "".join(texts) == WORDY  # leading, doubled and trailing whitespace included
    assert texts[0] == "  Hé" and texts[-1] == " [SEP]  "  # a trailing run joins the word before it
    assert "\n\nQuestion" in texts and "\tof" in texts and "  stratif" in texts  # else the word after it
    assert "".join(texts[-11:-1]) == " <|endoftext|>"  # a special written in the text is text
    B = al.align(tz["bpe"], tz["unigram"])
    check(B, tz["bpe"], tz["unigram"])
    groups = {WORDY[s:e]: g for g, (s, e) in zip(B.groups(), B.spans.tolist())}
    e_acute = groups["é"]  # 'é' is two byte-level tokens, one Unigram token
    assert pieces(toks["bpe"], tz["bpe"], e_acute.a) == ["Ã", "©"]
    assert B.a.weight[list(e_acute.a)].tolist() == [0.5, 0.5]
    fine = groups[" ﬁne"]  # NFKC: 'ﬁ' -> 'fi', both Unigram pieces share the ligature
    assert pieces(toks["unigram"], tz["unigram"], fine.b) == ["▁f", "ine"]
    whitespace_only = [i for i, p in enumerate(pieces(toks["bpe"], tz["bpe"], range(len(tz["bpe"])))) if p == "Ġ"]
    assert whitespace_only and all(B.a.group[i] == -1 for i in whitespace_only)


@pytest.mark.usefixtures("_share_toks")
@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab Cé\n\t,.1日ﬁ", max_size=40))
def test_alignment_groups_are_consistent_on_random_texts(text):
    toks = _TOKS
    tz = {n: al.tokenize(t, text) for n, t in toks.items()}
    for x, y in PAIRS:
        A = al.align(tz[x], tz[y])
        check(A, tz[x], tz[y])
        covered = "".join(text[s:e] for s, e in A.spans.tolist())
        assert covered == (text if text.strip() else "")
        for g in A.groups():  # the span's last token on each side ends where the span ends
            assert al.char_spans(tz[x])[g.a[-1]][1] == al.char_spans(tz[y])[g.b[-1]][1] == g.chars[1]


_TOKS: dict = {}


@pytest.fixture(scope="module")
def _share_toks(byo_tokenizers):
    """hypothesis's @given cannot take fixtures; the property test reads the tokenizers from here."""
    if not _TOKS:
        _TOKS.update({n: load(p) for n, p in byo_tokenizers.items()})


# ---- span_pool ------------------------------------------------------------------------------------


def char_features(tz: al.Tokenization, per_char: torch.Tensor, side: al.Side) -> torch.Tensor:
    """Each token's feature: its characters' features, a shared character counted by its share."""
    cs = al.char_spans(tz)
    held = np.zeros(len(tz.text), np.int64)
    for s, e in cs:
        held[s:e] += 1
    feats = torch.randn(len(tz), per_char.shape[1], dtype=per_char.dtype) * 100  # garbage where unaligned
    for i, (s, e) in enumerate(cs):
        if side.group[i] >= 0:
            share = torch.from_numpy(1.0 / held[s:e]).to(per_char.dtype)
            feats[i] = (per_char[s:e] * share[:, None]).sum(0) / share.sum()
    return feats


@pytest.mark.parametrize("x,y", PAIRS)
def test_span_pool_of_the_same_characters_gives_the_same_span_means(toks, x, y):
    tx, ty = al.tokenize(toks[x], WORDY), al.tokenize(toks[y], WORDY)
    A = al.align(tx, ty)
    per_char = torch.randn(len(WORDY), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fa, fb = char_features(tx, per_char, A.a), char_features(ty, per_char, A.b)
    pa, pb = al.span_pool(fa, A.a), al.span_pool(fb, A.b)
    want = torch.stack([per_char[s:e].mean(0) for s, e in A.spans.tolist()])
    torch.testing.assert_close(pa, want)
    torch.testing.assert_close(pb, want)
    stages = torch.stack([fa, 2 * fa]).requires_grad_()  # (J, T, d): VAA's stages pool at once
    pooled = al.span_pool(stages, A.a)
    torch.testing.assert_close(pooled.detach(), torch.stack([want, 2 * want]))
    pooled.sum().backward()
    assert (stages.grad[:, A.a.group < 0] == 0).all() and stages.grad[:, A.a.group >= 0].abs().sum() > 0


# ---- the vocabulary map ---------------------------------------------------------------------------


def test_surface_normalises_each_algorithms_markers():
    byte, meta, wp = al.Markers(byte_level=True), al.Markers(space="▁"), al.Markers(continuing="##")
    assert [al.surface(t, byte) for t in ("Ġhello", "Ã©", "Ã", "ĊĊ")] == [" hello", "é", "\udcc3", "\n\n"]
    assert [al.surface(t, meta) for t in ("▁hello", "llo", "<0xC3>", "▁")] == [" hello", "llo", "\udcc3", " "]
    assert [al.surface(t, wp) for t in ("hello", "##llo", ",", "##,")] == [" hello", "llo", ",", ","]


def levenshtein(a: str, b: str) -> int:
    """The textbook dynamic programme, to check rapidfuzz's MinED against."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_map_vocab_exact_then_word_start_then_edit_distance():
    glob = ["<eos>", " hello", "hello", "lo", " world", " word", "x", " wor"]
    dev = [" hello", "lo", "world", " wrld", " worlds", "y", "<eos>"]
    got = al.map_vocab(dev, glob, exclude=[0]).tolist()
    # identical surfaces: exact; 'world' differs only by the word-start space; ' wrld' and ' worlds' are one
    # edit from ' world' (' wrld' two from ' word'); 'y' is one from each single character, the lowest id
    # ('x') wins; '<eos>' never reaches the excluded special: its nearest ordinary tokens are 4 edits away.
    assert got[:6] == [1, 3, 4, 4, 4, 6]
    for d, g in zip(dev[3:], got[3:]):  # MinED: the lowest id among the nearest, by the textbook distance
        dist = [levenshtein(d, t) if i else 99 for i, t in enumerate(glob)]
        assert g == dist.index(min(dist))
    assert got[6] == 2
    assert al.map_vocab(glob, glob).tolist() == list(range(len(glob)))


def test_vocab_map_on_real_tokenizers(toks):
    bpe, uni, wp = toks["bpe"], toks["unigram"], toks["wordpiece"]
    assert al.vocab_map(bpe, bpe).tolist() == list(range(len(bpe)))
    m = al.vocab_map(uni, bpe)
    assert m.shape == (len(uni),) and m.dtype == torch.long and 0 <= m.min() and m.max() < len(bpe)
    both = [t for t in uni.get_vocab() if t.startswith("▁") and len(t) > 2 and "Ġ" + t[1:] in bpe.get_vocab()]
    assert len(both) > 20  # the shared words map onto each other
    assert all(m[uni.convert_tokens_to_ids(t)] == bpe.convert_tokens_to_ids("Ġ" + t[1:]) for t in both)
    ids = lambda tok, ts: [tok.convert_tokens_to_ids(t) for t in ts]  # noqa: E731
    eos = bpe.convert_tokens_to_ids("<|endoftext|>")
    assert m[ids(uni, ["<s>", "</s>", "<unk>"])].tolist() == [eos, eos, eos]  # bpe has eos alone
    assert m[ids(uni, ["<pad>"])].tolist() == ids(bpe, ["<|pad|>"])
    w = al.vocab_map(wp, bpe)
    assert w[ids(wp, ["[CLS]", "[SEP]", "[PAD]"])].tolist() == [eos, eos] + ids(bpe, ["<|pad|>"])
    assert w[ids(wp, ["##ation"])].tolist() == ids(bpe, ["ation"])
    assert al.vocab_map(bpe, uni)[eos] == uni.convert_tokens_to_ids("</s>")
    m[:] = 0  # a copy: the cached map is untouched
    assert al.vocab_map(uni, bpe).max() > 0
    assert al.vocab_map(uni, bpe, device_size=len(uni) + 3)[-3:].tolist() == [eos] * 3


# ---- predictions in the global vocabulary, at the global positions --------------------------------


def test_topk_to_global_conserves_mass_and_keeps_ids_distinct():
    gen = torch.Generator().manual_seed(0)
    V, G, k = 60, 40, 8
    vmap = torch.arange(V) // 3  # three device tokens per global id: many merges; global ids 20..39 unreachable
    ids = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(50)])
    probs = torch.rand(50, k, generator=gen).softmax(-1) * 0.9
    gids, gprobs = al.topk_to_global(ids, probs, vmap, global_size=G)
    torch.testing.assert_close(gprobs.sum(-1), probs.sum(-1))  # mass conserved, so the tail too
    assert all(len(set(r)) == k for r in gids.tolist()) and (gids < G).all()
    assert (gprobs[:, :-1] >= gprobs[:, 1:]).all()  # descending
    for r in range(50):  # each global id holds the summed mass of the device ids landing on it
        want = torch.zeros(G, dtype=probs.dtype).index_add(0, vmap[ids[r]], probs[r])
        torch.testing.assert_close(torch.zeros(G, dtype=probs.dtype).index_add(0, gids[r], gprobs[r]), want)
        fillers = gids[r][gprobs[r] == 0]
        assert (fillers >= 20).all()  # unreachable ids: probability 0 is exactly true there
    full = al.project_probs(torch.rand(4, V, generator=gen).softmax(-1), vmap, G)
    torch.testing.assert_close(full.sum(-1), torch.ones(4))
    tight = al.topk_to_global(ids[:, :4], probs[:, :4], torch.arange(V) % 8)  # every global id reachable
    assert all(len(set(r)) == 4 for r in tight[0].tolist())
    torch.testing.assert_close(tight[1].sum(-1), probs[:, :4].sum(-1))


@pytest.mark.parametrize("x,y", [("unigram", "bpe"), ("wordpiece", "bpe"), ("bpe", "unigram")])
def test_at_global_positions_puts_each_prediction_where_both_predict_the_same_next_characters(toks, x, y):
    dev, glob = al.tokenize(toks[x], WORDY), al.tokenize(toks[y], WORDY)
    A = al.align(dev, glob)
    values = torch.arange(len(dev) * 2).reshape(len(dev), 2)
    out, mask = al.at_global_positions(values, A, fill=-1)
    assert out.shape == (len(glob), 2) and mask.sum() == len(A)
    assert (out[~mask] == -1).all() and not mask[torch.tensor(glob.special)].any()  # added specials masked
    cd, cg = al.char_spans(dev), al.char_spans(glob)
    for j in mask.nonzero().flatten().tolist():  # the device token behind it ends where this global token does
        i = int(out[j, 0]) // 2
        assert cd[i][1] == cg[j][1]
    ids = torch.randint(len(toks[x]), (len(dev), 4))
    gids, gprobs = al.topk_to_global(ids, torch.full((len(dev), 4), 0.2), al.vocab_map(toks[x], toks[y]),
                                     global_size=len(toks[y]))
    at_ids, m2 = al.at_global_positions(gids, A)
    assert torch.equal(m2, mask) and torch.equal(at_ids[mask], gids[A.a.last])


# ---- one clear error for what cannot be aligned ---------------------------------------------------


class CharTokenizer(PreTrainedTokenizer):
    """A slow (pure Python) tokenizer: one token per character, no offsets."""

    def __init__(self, **kw):
        self.vocab = {c: i for i, c in enumerate("abc <unk>".split()[0] + " ")}
        self.vocab["<unk>"] = len(self.vocab)
        super().__init__(unk_token="<unk>", **kw)

    def get_vocab(self):
        return dict(self.vocab)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def _tokenize(self, text):
        return list(text)

    def _convert_token_to_id(self, token):
        return self.vocab.get(token, self.vocab["<unk>"])

    def _convert_id_to_token(self, i):
        return {v: k for k, v in self.vocab.items()}[i]


def test_a_tokenizer_without_offsets_is_one_clear_error(toks):
    slow = CharTokenizer()
    for call in (lambda: al.tokenize(slow, "abc"), lambda: al.vocab_map(slow, toks["bpe"]),
                 lambda: al.markers(slow)):
        with pytest.raises(DataError, match="CharTokenizer is not a fast .* gives no character offsets"):
            call()
    with pytest.raises(DataError, match="gives no character offsets"):
        al.Tokenization("abc", (1, 2), ((0, 0), (0, 0)), (False, False), name="tokenizer X")

    class NoOffsets:  # claims to be fast, returns no offset_mapping
        is_fast, backend_tokenizer, name_or_path = True, None, "no-offsets"

        def __call__(self, text, **kw):
            return {"input_ids": [1, 2]}

    with pytest.raises(DataError, match="NoOffsets \\('no-offsets'\\) gives no character offsets"):
        al.tokenize(NoOffsets(), "abc")
    with pytest.raises(DataError, match="outside the text"):
        al.Tokenization("abc", (1,), ((0, 9),), (False,))
    a, b = al.tokenize(toks["bpe"], "abc"), al.tokenize(toks["unigram"], "abd")
    with pytest.raises(DataError, match="different texts"):
        al.align(a, b)
    A = al.align(a, al.tokenize(toks["unigram"], "abc"))
    with pytest.raises(DataError, match="span_pool: features have 7 positions"):
        al.span_pool(torch.zeros(7, 3), A.a)
    with pytest.raises(DataError, match="at_global_positions: 7 device positions"):
        al.at_global_positions(torch.zeros(7), A)
    with pytest.raises(DataError, match="project_probs: probabilities over 5 ids, but the vocabulary map has 4"):
        al.project_probs(torch.zeros(5), torch.arange(4), 4)
    with pytest.raises(DataError, match="device ids 9..9 fall outside the vocabulary map's 4 ids"):
        al.topk_to_global(torch.tensor([[9]]), torch.tensor([[1.0]]), torch.arange(4))


def test_truncation_leaves_the_uncovered_tail_out(toks):
    text = "stratification of tokens and more tokens"
    dev = al.tokenize(toks["bpe"], text, add_special_tokens=False, max_length=4)
    glob = al.tokenize(toks["wordpiece"], text)
    A = al.align(dev, glob)
    check(A, dev, glob)
    end = al.char_spans(dev)[-1][1]
    assert A.spans[-1, 1] <= end and (A.b.group[al.char_spans(glob)[:, 0] >= end] == -1).all()


# ---- public blocks under a device's tokenizer (section 6) ------------------------------------------------

@pytest.fixture(scope="module")
def global_blocks(tmp_path_factory):
    """A global byte-level BPE (the federation's own trainer) and 48-token blocks of real text, cut from the
    token stream as data.pack_blocks cuts them: blocks start inside words and hold EOS between documents."""
    from deepfusion.data import pack_blocks, train_tokenizer
    from deepfusion.data.corpora import Document

    texts = corpus_texts()
    tok = train_tokenizer(list(texts), 700, tmp_path_factory.mktemp("global-tok"))
    docs = [Document("x", "medical", str(i), t) for i, t in enumerate(texts[:40])]
    return tok, pack_blocks(tok, docs, 48)


def test_a_block_decodes_to_text_whose_offsets_hold_each_token(global_blocks):
    tok, blocks = global_blocks
    with_eos = next(i for i in range(len(blocks)) if (blocks[i] == tok.eos_token_id).any())
    for row in (blocks[0], blocks[with_eos]):
        tz = al.block_tokenization(tok, row.tolist())
        assert tz.ids == tuple(row.tolist())
        for i, ((s, e), sp) in enumerate(zip(tz.offsets, tz.special)):
            if sp:
                assert s == e and tz.ids[i] == tok.eos_token_id  # the EOS covers nothing
            elif "\ufffd" not in tok.decode([tz.ids[i]]):  # a whole-character token's text is its own decode
                assert tz.text[s:e] == tok.decode([tz.ids[i]])
            else:  # part of a character's bytes: the last part holds the character, the others nothing
                assert e - s <= 1
        assert all(s0 <= s1 for (s0, _), (s1, _) in zip(tz.offsets, tz.offsets[1:]))


@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece"])
def test_block_views_cut_the_same_text_and_put_the_devices_eos_where_the_block_has_one(global_blocks, toks, kind):
    from deepfusion.data.tokenizer import load_tokenizer
    from tests.byo import three_tokenizers  # noqa: F401  (the fixture trained them)

    tok, blocks = global_blocks
    dev = toks[kind]
    if dev.eos_token is None:
        dev.eos_token = dev.sep_token  # as data.load_tokenizer does for a WordPiece
    views = al.block_views(tok, dev, blocks[:12])
    for row, v in zip(blocks[:12], views):
        g = al.block_tokenization(tok, row.tolist())
        assert v.alignment.text == g.text and len(v.alignment) > 0.5 * len(row)  # most of the block aligns
        assert int((v.ids == dev.eos_token_id).sum()) == int((row == tok.eos_token_id).sum())
        a = v.alignment
        assert (a.b.last < len(row)).all() and (a.a.last < len(v.ids)).all()
    capped = al.block_views(tok, dev, blocks[:2], max_length=10)
    assert all(len(v.ids) == 10 and (v.alignment.a.last < 10).all() for v in capped)


def test_same_vocabulary_tells_a_copy_from_another_tokenizer(global_blocks, toks, tmp_path):
    from deepfusion.data.tokenizer import load_tokenizer

    tok, _ = global_blocks
    tok.save_pretrained(tmp_path / "copy")
    assert al.same_vocabulary(tok, load_tokenizer(tmp_path / "copy"))
    assert not al.same_vocabulary(tok, toks["bpe"])
