"""Token alignment: distillation between models whose tokenizers differ (bring your own tokenizer).

The paper distils each device model into the MoE with L = CE + α Σ_j MSE(F_j^T, VAA(F^S)_j) + β KL and never
says how the KL and the feature matching cope with different vocabularies: both are written per token index,
as if teacher and student cut the text the same way. With a device's own tokenizer they do not: "stratification"
is 'Ġst|r|at|ific|ation' to a byte-level BPE, '▁st|r|at|if|ic|ation' to a Unigram and 'st|##r|##ati|##f|##ic|
##ation' to a WordPiece. This module aligns the two tokenisations on the characters they cover, the way
cross-tokenizer distillation does it (FedMKT's MinED token mapping; ULD's idea that only spans of text, not
token indices, are common ground), and gives the KL and the feature term something to compare.

Read top to bottom:
  1. tokenize            a text under a tokenizer, with character offsets          -> Tokenization
  2. align               two tokenisations of one text: spans both cut the same way -> Alignment (S spans)
  3. span_pool           features (..., T, d) -> (..., S, d): the VAA / MSE term over character spans
  4. vocab_map           device vocabulary -> global vocabulary (exact surface, else MinED), one tensor
  5. topk_to_global, project_probs, at_global_positions: a device's predictions in the global vocabulary at
                         the global tokenisation's positions (the multi-round server, crosskd's KL)

Choices the paper leaves open (DESIGN §8), and why:
- Common ground is characters: an *aligned span* is a stretch of text [lo, hi) that both tokenisations cut
  at lo and at hi and nowhere they both cut in between, and that both cover completely. Groups (a-tokens
  i..j, b-tokens k..l) are these spans; they are disjoint, in text order, and as fine as both allow.
- Whitespace: byte-level BPE puts a space into the next token ('Ġword'), SentencePiece likewise ('▁word'),
  WordPiece drops it. Before aligning, every token edge inside or at the ends of a whitespace run moves to the
  run's start, i.e. whitespace belongs to the word after it (as 'Ġ' and '▁' put it); a run that ends the text
  belongs to the word before it. A whitespace-only token ('Ġ', '▁', 'ĊĊ') then covers no character.
- Special tokens a tokenizer adds (BOS/EOS, [CLS]/[SEP]) and zero-width tokens cover no character and belong
  to no span: their positions are masked. A special token written in the text ('<|endoftext|>') is text.
- Unicode: offsets are Python character indices. A character split over several byte-level tokens ('é' =
  'Ã' '©') makes those tokens share it; a normaliser that expands a character (NFKC 'ﬁ' -> 'fi') does the
  same. Sharing tokens stay in one span; in span_pool each character's unit weight is split among them.
- Truncation or dropped characters (a normaliser that deletes control characters): a stretch one side covers
  and the other does not is in no span; its tokens are masked.
- The logit KL: a causal LM's output at its last token of a span predicts the token that starts at the span's
  end, on both sides. So each span gives one comparison: the device's prediction at its last token of the span
  against the global model's at its last token. Positions inside a span (a word one side splits finer) are
  masked: there is no common next-token event there. A span that ends in whitespace-only tokens split
  differently by the two sides compares "what follows the space" with "the space": rare and kept.
- Vocabularies: FedMKT's MinED. A device token maps to the global token with the same surface string once the
  algorithms' markers are normalised ('Ġ' and '▁' are a leading space, '##' marks a continuation, byte-level
  characters and '<0xNN>' byte fallbacks are their bytes); else to the one with the same characters but a
  different word-start space; else to the nearest by Levenshtein distance (ties: the lowest global id, which
  in BPE is the earlier, more frequent merge). Special tokens map to the global special of the same role.
  The edit distances use `rapidfuzz` (MIT, maintained, C++ with a batched, multi-threaded cdist): the map
  compares every unmatched device token with the whole global vocabulary once, 10^8-10^9 short-string
  distances for real vocabularies, which a Python edit distance cannot do; the `Levenshtein` package is a thin
  layer over rapidfuzz and adds nothing here.
- The map's merges: several device tokens can land on one global id; their probability is summed (the
  projected distribution p_G(g) = Σ_{a -> g} p_A(a) conserves mass). ULD's sorted-probability distance would
  avoid the map but throws away which token is which; MinED keeps the KL a KL over named tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from deepfusion.errors import DataError


# -----------------------------------------------------------------------------
# 1. A text under a tokenizer, with character offsets


def _name(tokenizer) -> str:
    """How an error names a tokenizer: its class and where it was loaded from."""
    where = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}" + (f" ({where!r})" if where else "")


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise DataError(f"tokenizer {_name(tokenizer)} is not a fast (Rust `tokenizers`) tokenizer, so it gives no "
                        "character offsets and cannot be aligned with another tokenizer; load or convert it as a "
                        "PreTrainedTokenizerFast (a folder with tokenizer.json)")


@dataclass(frozen=True)
class Tokenization:
    """One tokenizer's cut of one text: ids, each token's [start, end) characters, and which it added itself."""

    text: str
    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    special: tuple[bool, ...]  # added by the tokenizer (BOS/EOS, [CLS]/[SEP]): covers no character
    name: str = "tokenizer"  # for error messages

    def __post_init__(self):
        if not len(self.ids) == len(self.offsets) == len(self.special):
            raise DataError(f"{self.name}: {len(self.ids)} ids, {len(self.offsets)} offsets and "
                            f"{len(self.special)} special flags; they must be one per token")
        n = len(self.text)
        bad = next(((s, e) for s, e in self.offsets if not 0 <= s <= e <= n), None)
        if bad is not None:
            raise DataError(f"{self.name}: offset {bad} is outside the text's {n} characters; offsets must be "
                            "character offsets into the same text")
        real = [(s, e) for (s, e), sp in zip(self.offsets, self.special) if not sp]
        # Two or more tokens and not one holds a character: no offsets at all (a lone empty token can be a
        # truncated '▁' and is allowed).
        if self.text.strip() and len(real) >= 2 and not any(s < e for s, e in real):
            raise DataError(f"{self.name} gives no character offsets (every token is empty) for a non-empty "
                            "text, so it cannot be aligned; use a tokenizer whose offsets map back to the text")

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(tokenizer, text: str, *, add_special_tokens: bool = True, max_length: int | None = None) -> Tokenization:
    """text under a fast tokenizer, with return_offsets_mapping; feed .ids to the model as they are."""
    _require_fast(tokenizer)
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                        return_special_tokens_mask=True, truncation=max_length is not None, max_length=max_length)
    except (NotImplementedError, TypeError, ValueError) as e:
        raise DataError(f"tokenizer {_name(tokenizer)} gives no character offsets ({e}); use a fast tokenizer "
                        "with return_offsets_mapping") from None
    if "offset_mapping" not in enc:
        raise DataError(f"tokenizer {_name(tokenizer)} gives no character offsets; use a fast tokenizer "
                        "with return_offsets_mapping")
    ids = tuple(int(i) for i in enc["input_ids"])
    special = tuple(bool(m) for m in enc.get("special_tokens_mask", [0] * len(ids)))
    offsets = tuple((int(s), int(e)) for s, e in enc["offset_mapping"])
    return Tokenization(text, ids, offsets, special, name=f"tokenizer {_name(tokenizer)}")


def _snap_table(text: str) -> np.ndarray:
    """(n+1,) where each character position moves: edges in or at a whitespace run go to the run's start
    (the run belongs to the next word, as 'Ġ' and '▁' put it), or to the text's end for a trailing run."""
    n = len(text)
    snap = np.arange(n + 1)
    i = 0
    while i < n:
        if not text[i].isspace():
            i += 1
            continue
        j = i
        while j < n and text[j].isspace():
            j += 1
        snap[i:j + 1] = n if j == n else i
        i = j
    return snap


def char_spans(tz: Tokenization) -> np.ndarray:
    """(T, 2) each token's characters after whitespace is given to the next word; added specials are empty."""
    snap = _snap_table(tz.text)
    spans = snap[np.asarray(tz.offsets, dtype=np.int64).reshape(-1, 2)]
    spans[np.asarray(tz.special, dtype=bool)] = 0  # an added BOS/EOS covers nothing, wherever it says it is
    return spans


# -----------------------------------------------------------------------------
# 2. Aligning two tokenisations of one text


def _cover(spans: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n+1,) whether a token runs across each position, (n,) how many tokens hold each character."""
    real = spans[spans[:, 0] < spans[:, 1]]
    across = np.zeros(n + 2, dtype=np.int64)  # positions s+1 .. e-1 lie strictly inside a token
    np.add.at(across, real[:, 0] + 1, 1)
    np.add.at(across, real[:, 1], -1)
    held = np.zeros(n + 1, dtype=np.int64)
    np.add.at(held, real[:, 0], 1)
    np.add.at(held, real[:, 1], -1)
    return np.cumsum(across)[: n + 1] > 0, np.cumsum(held)[:n]


@dataclass(frozen=True)
class Side:
    """One tokenisation's part in an Alignment (T its tokens, S the aligned spans)."""

    group: torch.Tensor  # (T,) long: the span each token lies in, -1 if none (added special, unaligned)
    weight: torch.Tensor  # (T,) float: characters of its span the token holds (a shared one split evenly)
    first: torch.Tensor  # (S,) long: the span's first token
    last: torch.Tensor  # (S,) long: the span's last token: its output predicts what follows the span


class Group(NamedTuple):
    a: range  # a-tokens i..j
    b: range  # b-tokens k..l
    chars: tuple[int, int]  # the characters [lo, hi) both cover exactly


@dataclass(frozen=True)
class Alignment:
    """The spans two tokenisations of one text cut the same way; a and b as passed to align()."""

    text: str
    spans: torch.Tensor  # (S, 2) long: [lo, hi) characters of each aligned span, in text order
    a: Side
    b: Side

    def __len__(self) -> int:
        return int(self.spans.shape[0])

    def groups(self) -> list[Group]:
        """The spans as (a-tokens, b-tokens, characters), for reading and tests."""
        return [Group(range(int(fa), int(la) + 1), range(int(fb), int(lb) + 1), (int(lo), int(hi)))
                for fa, la, fb, lb, (lo, hi) in zip(self.a.first, self.a.last, self.b.first, self.b.last,
                                                     self.spans.tolist())]


def _side(spans: np.ndarray, held: np.ndarray, cuts: np.ndarray, keep: np.ndarray) -> Side:
    """Place each token in its span; weights split a shared character's unit among its holders."""
    # 0 and n are always cuts, and no cut falls inside a token: a token with s < e lies in the piece
    # [cuts[p], cuts[p+1]) that starts at or before s. Kept pieces are renumbered 0..S-1.
    piece = np.searchsorted(cuts, spans[:, 0], side="right") - 1
    ok = spans[:, 0] < spans[:, 1]
    ok[ok] &= keep[piece[ok]]
    group = np.full(len(spans), -1, dtype=np.int64)
    group[ok] = (np.cumsum(keep) - 1)[piece[ok]]
    share = np.concatenate([[0.0], np.cumsum(np.where(held > 0, 1.0 / np.maximum(held, 1), 0.0))])
    weight = np.where(ok, share[spans[:, 1]] - share[spans[:, 0]], 0.0)
    n_spans, idx = int(keep.sum()), np.arange(len(spans))
    first = np.full(n_spans, len(spans), dtype=np.int64)
    last = np.full(n_spans, -1, dtype=np.int64)
    np.minimum.at(first, group[ok], idx[ok])
    np.maximum.at(last, group[ok], idx[ok])
    return Side(torch.from_numpy(group), torch.from_numpy(weight), torch.from_numpy(first), torch.from_numpy(last))


def align(a: Tokenization, b: Tokenization) -> Alignment:
    """The spans of text that a and b both cut at both ends and both cover; a = device/teacher, b = global."""
    if a.text != b.text:
        raise DataError(f"{a.name} and {b.name} tokenised different texts ({len(a.text)} vs {len(b.text)} "
                        "characters); alignment needs two tokenisations of the same text")
    n = len(a.text)
    sa, sb = char_spans(a), char_spans(b)
    (across_a, held_a), (across_b, held_b) = _cover(sa, n), _cover(sb, n)
    cuts = np.flatnonzero(~across_a & ~across_b)  # positions neither side runs across (0 and n among them)
    # A piece between consecutive cuts is a span if every character in it is held on both sides.
    missing = np.concatenate([[0], np.cumsum((held_a == 0) | (held_b == 0))])
    lo, hi = cuts[:-1], cuts[1:]
    keep = missing[hi] - missing[lo] == 0
    spans = torch.from_numpy(np.stack([lo[keep], hi[keep]], 1).astype(np.int64).reshape(-1, 2))
    return Alignment(a.text, spans, _side(sa, held_a, cuts, keep), _side(sb, held_b, cuts, keep))


# -----------------------------------------------------------------------------
# 3. Features over character spans (VAA's MSE, not per token index)


def span_pool(features: torch.Tensor, side: Side) -> torch.Tensor:
    """(..., T, d) -> (..., S, d): each span's mean over its characters of the feature of the token holding
    each character. Weighting by characters, not tokens, makes it independent of how finely a side splits the
    span: features that are a function of the characters pool to the same value on both sides."""
    T = side.group.shape[0]
    if features.shape[-2] != T:
        raise DataError(f"span_pool: features have {features.shape[-2]} positions but the tokenisation has {T} "
                        "tokens; pool the features of the same tokenisation that was aligned")
    on = side.group >= 0
    w = side.weight[on].to(features.dtype)
    g = side.group[on].to(features.device)
    S = side.first.shape[0]
    num = features.new_zeros(*features.shape[:-2], S, features.shape[-1])
    num = num.index_add(-2, g, features[..., on.to(features.device), :] * w.to(features.device)[:, None])
    den = features.new_zeros(S).index_add(0, g, w.to(features.device))
    return num / den[:, None]


# -----------------------------------------------------------------------------
# 4. The vocabulary map (FedMKT's MinED)


@dataclass(frozen=True)
class Markers:
    """How a tokenizer's vocabulary writes what is not plain text."""

    byte_level: bool = False  # GPT-2's byte-to-character table ('Ġ' = space)
    space: str | None = None  # SentencePiece's '▁'
    continuing: str | None = None  # WordPiece's '##' (a piece without it starts a word)


def _walk(node) -> list[dict]:
    """A pre_tokenizer / decoder JSON node and the members of a Sequence."""
    if not isinstance(node, dict):
        return []
    inner = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers") or []
    return [node] + [m for child in inner for m in _walk(child)]


def markers(tokenizer) -> Markers:
    """Read the markers off the fast tokenizer's own definition (tokenizer.json)."""
    _require_fast(tokenizer)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    parts = _walk(spec.get("pre_tokenizer")) + _walk(spec.get("decoder"))
    kinds = {p.get("type") for p in parts}
    space = next((p.get("replacement") for p in parts if p.get("type") == "Metaspace"), None)
    # Llama-style: no Metaspace, a decoder that replaces '▁' with a space.
    space = space or next((p["pattern"].get("String") for p in parts if p.get("type") == "Replace"
                           and isinstance(p.get("pattern"), dict) and p.get("content") == " "), None)
    model = spec.get("model") or {}
    cont = model.get("continuing_subword_prefix") if model.get("type") in ("WordPiece", "BPE") else None
    return Markers(byte_level="ByteLevel" in kinds, space=space or None, continuing=cont or None)


def _byte_table() -> dict[str, int]:
    """character -> byte of GPT-2's table (printable bytes stand for themselves, the rest from U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    rest = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + i): b for i, b in enumerate(rest)})
    return table


_BYTE_OF = _byte_table()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def surface(token: str | None, m: Markers) -> str:
    """The text a vocabulary entry stands for, markers normalised: a leading space for a word start,
    bytes decoded (a lone byte of a multi-byte character becomes a surrogate, so it matches only itself)."""
    if token is None:
        return ""
    if m.byte_level and all(c in _BYTE_OF for c in token):
        return bytes(_BYTE_OF[c] for c in token).decode("utf-8", "surrogateescape")
    if hit := _BYTE_FALLBACK.fullmatch(token):
        return bytes([int(hit[1], 16)]).decode("utf-8", "surrogateescape")
    if m.space:
        token = token.replace(m.space, " ")
    if m.continuing:
        if token.startswith(m.continuing):
            return token[len(m.continuing):]
        # A word-initial piece follows a space in running text, unless it is punctuation (BERT's pre-tokenizer
        # makes ',' a word of its own, and a comma follows its word without a space).
        return " " + token if token[:1].isalnum() else token
    return token


def map_vocab(device: Sequence[str], global_: Sequence[str], *, exclude: Sequence[int] = (),
              workers: int = -1) -> torch.Tensor:
    """(V_device,) long: each device surface's global id. Exact surface, else the same characters with or
    without a leading space, else the nearest by Levenshtein distance (ties: the lowest global id).
    Global ids in exclude (its special tokens) are never targets."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    banned = set(int(i) for i in exclude)
    ids = [i for i in range(len(global_)) if i not in banned]
    if not ids:
        raise DataError("the global vocabulary has no ordinary token to map onto")
    exact, loose = {}, {}
    for i in reversed(ids):  # reversed: the lowest id wins
        exact[global_[i]] = i
        loose[global_[i].lstrip(" ")] = i
    out = np.array([exact.get(s, loose.get(s.lstrip(" "), -1)) for s in device], dtype=np.int64)
    todo = np.flatnonzero(out < 0)
    choices = [global_[i] for i in ids]
    for start in range(0, len(todo), 256):  # chunks bound memory: 256 x V int32
        chunk = todo[start:start + 256]
        d = cdist([device[i] for i in chunk], choices, scorer=Levenshtein.distance, dtype=np.int32, workers=workers)
        out[chunk] = np.asarray(ids)[d.argmin(1)]  # argmin: first minimum, the lowest id
    return torch.from_numpy(out)


# A special's role -> the global roles it may take, in order. eos comes first: a token that is both bos and eos
# (GPT-2's <|endoftext|>) separates documents, which is what a causal LM predicts it for.
_ROLES = {"eos": ("eos", "sep"), "sep": ("sep", "eos"), "bos": ("bos", "cls", "eos"), "cls": ("cls", "bos", "eos"),
          "pad": ("pad", "eos"), "unk": ("unk", "eos"), "mask": ("mask", "unk", "eos")}


def _specials(tokenizer) -> dict[int, str]:
    """Special token id -> its role ('bos', 'eos', ...; 'other' for the rest)."""
    roles = {}
    for role in _ROLES:
        tok = getattr(tokenizer, f"{role}_token", None)
        if isinstance(tok, str) and (i := tokenizer.convert_tokens_to_ids(tok)) is not None:
            roles.setdefault(int(i), role)
    for i in getattr(tokenizer, "all_special_ids", []):
        roles.setdefault(int(i), "other")
    return roles


def _vocab(tokenizer, size: int | None) -> list[str | None]:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return list(tokens) + [None] * max(0, (size or 0) - len(tokens))


def _fingerprint(tokenizer, size: int | None) -> str:
    body = json.dumps([markers(tokenizer).__dict__, _vocab(tokenizer, size), sorted(_specials(tokenizer).items()),
                       sorted(getattr(tokenizer, "get_added_vocab", dict)().items())], ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers give the same ids to the same strings and cut text alike (then no alignment)."""
    if a is b:
        return True
    if not (getattr(a, "is_fast", False) and getattr(b, "is_fast", False)):
        return False
    return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str() and _specials(a) == _specials(b)


_MAPS: dict[tuple[str, str], torch.Tensor] = {}


def vocab_map(device_tokenizer, global_tokenizer, *, device_size: int | None = None) -> torch.Tensor:
    """(V_device,) long: device id -> global id, computed once per (device, global) vocabulary pair in this
    process. device_size: the device model's output width when it exceeds its tokenizer (padded embedding
    rows; those ids map like an unknown token)."""
    key = (_fingerprint(device_tokenizer, device_size), _fingerprint(global_tokenizer, None))
    if key not in _MAPS:
        _MAPS[key] = _compute_map(device_tokenizer, global_tokenizer, device_size)
    return _MAPS[key].clone()  # a copy: no caller can change the next one's map


def _compute_map(dev, glob, device_size: int | None) -> torch.Tensor:
    m_dev, m_glob = markers(dev), markers(glob)
    added_dev, added_glob = set(dev.get_added_vocab()), set(glob.get_added_vocab())
    # Added (user) tokens are literal text: their markers are not the model's.
    dev_vocab, glob_vocab = _vocab(dev, device_size), _vocab(glob, None)
    dev_surf = [t if t in added_dev else surface(t, m_dev) for t in dev_vocab]
    glob_surf = [t if t in added_glob else surface(t, m_glob) for t in glob_vocab]
    dev_special, glob_special = _specials(dev), _specials(glob)
    out = map_vocab(dev_surf, glob_surf, exclude=list(glob_special))
    for i, role in dev_special.items():
        out[i] = _special_target(dev_vocab[i], role, glob, glob_special)
    for i in range(len(dev), len(dev_vocab)):  # padded rows past the tokenizer
        out[i] = _special_target(None, "unk", glob, glob_special)
    return out


def _special_target(token: str | None, role: str, glob, glob_special: dict[int, str]) -> int:
    """A device special token's global id: the same string if the global has it as a special, else the
    special of the same role (cls -> bos, sep -> eos, ...), else the global eos, else its first special."""
    by_string = {glob.convert_ids_to_tokens(i): i for i in glob_special}
    if token in by_string:
        return by_string[token]
    by_role = {r: i for i, r in sorted(glob_special.items(), reverse=True)}
    for r in _ROLES.get(role, ("unk", "eos")) + ("eos",):
        if r in by_role:
            return by_role[r]
    return min(glob_special) if glob_special else 0


# -----------------------------------------------------------------------------
# 5. A device's predictions in the global vocabulary, at the global tokenisation's positions


def _check_width(width: int, vocab_map_: torch.Tensor, what: str) -> None:
    if width != len(vocab_map_):
        raise DataError(f"{what} {width} ids, but the vocabulary map has {len(vocab_map_)}; build the map with "
                        "vocab_map(device_tokenizer, global_tokenizer, device_size=the model's output width)")


def project_probs(probs: torch.Tensor, vocab_map_: torch.Tensor, global_size: int) -> torch.Tensor:
    """(..., V_device) -> (..., V_global): p_G(g) = Σ_{a -> g} p_A(a), for a full distribution (crosskd)."""
    _check_width(probs.shape[-1], vocab_map_, "project_probs: probabilities over")
    out = probs.new_zeros(*probs.shape[:-1], global_size)
    return out.index_add(-1, vocab_map_.to(probs.device), probs)


def topk_to_global(ids: torch.Tensor, probs: torch.Tensor, vocab_map_: torch.Tensor, *,
                   global_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A device's top-k (..., k) over its vocabulary as a top-k over the global one.

    Mass of ids that land on one global id is summed (the row's total and so its tail are unchanged). Ids stay
    distinct per row, as losses.topk_kl needs: a slot freed by a merge gets a global id no device token maps to
    (probability 0, exactly true of the projected distribution), or failing that the lowest unused id. Rows
    come back sorted by probability, descending. global_size defaults to the map's largest id + 1."""
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < len(vocab_map_):
        raise DataError(f"topk_to_global: device ids {int(ids.min())}..{int(ids.max())} fall outside the "
                        f"vocabulary map's {len(vocab_map_)} ids; build the map for this device's vocabulary")
    gids = vocab_map_.to(ids.device)[ids.long()]
    k = gids.shape[-1]
    same = gids[..., :, None] == gids[..., None, :]  # (..., k, k)
    earlier = torch.tril(torch.ones(k, k, dtype=torch.bool, device=ids.device), -1)
    first = ~(same & earlier).any(-1)  # the first slot of each global id holds its summed mass
    mass = torch.where(first, (same * probs[..., None, :]).sum(-1), torch.zeros_like(probs))
    gids = torch.where(first, gids, _fillers(gids, first, vocab_map_, global_size))
    mass, order = mass.sort(dim=-1, descending=True, stable=True)
    return gids.gather(-1, order), mass


def _fillers(gids: torch.Tensor, first: torch.Tensor, vocab_map_: torch.Tensor, global_size: int | None):
    """Distinct ids for freed slots, none already in the row: unreachable global ids first."""
    k = gids.shape[-1]
    size = int(global_size if global_size is not None else int(vocab_map_.max()) + 1)
    if size < k:
        raise DataError(f"topk_to_global: k = {k} distinct ids cannot fit a global vocabulary of {size}")
    reached = torch.zeros(size, dtype=torch.bool)
    reached[vocab_map_.long()] = True
    # At most k ids of the pool are in a row, so at least k are free: enough for every freed slot.
    unreached = (~reached).nonzero().flatten()[:k].tolist()
    pool = torch.tensor(list(dict.fromkeys(unreached + list(range(min(size, 2 * k))))))
    lookup = torch.full((size,), len(pool), dtype=torch.long)
    lookup[pool] = torch.arange(len(pool))
    rows = gids.reshape(-1, k).cpu()
    in_row = torch.zeros(len(rows), len(pool) + 1, dtype=torch.bool).scatter_(1, lookup[rows], True)[:, :-1]
    free_first = torch.argsort(in_row.to(torch.int8), dim=1, stable=True)[:, :k]  # free pool entries, in order
    slot = ((~first).reshape(-1, k).cpu().cumsum(-1) - 1).clamp(min=0)  # the r-th freed slot takes the r-th
    return pool[free_first.gather(1, slot)].reshape(gids.shape).to(gids.device)


def at_global_positions(values: torch.Tensor, alignment: Alignment, *, fill=0) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_device, ...) per-position predictions -> ((T_global, ...), mask (T_global,)) for align(device, global).

    The global position that ends each aligned span gets the device's prediction at its last token of the
    span: both predict the token that starts where the span ends. Every other global position (inside a span,
    an added BOS/EOS, text the device did not cover) gets fill and mask False: leave it out of the KL."""
    a, b = alignment.a, alignment.b
    if values.shape[0] != a.group.shape[0]:
        raise DataError(f"at_global_positions: {values.shape[0]} device positions, but the device tokenisation "
                        f"has {a.group.shape[0]} tokens; pass predictions for the tokenisation that was aligned")
    out = values.new_full((b.group.shape[0], *values.shape[1:]), fill)
    out[b.last.to(values.device)] = values[a.last.to(values.device)]
    mask = torch.zeros(b.group.shape[0], dtype=torch.bool, device=values.device)
    mask[b.last.to(values.device)] = True
    return out, mask


# -----------------------------------------------------------------------------
# 6. The public blocks under a device's tokenizer (what a device's model reads in Phase II and each round)


@dataclass(frozen=True)
class BlockView:
    """One public block as a device's tokenizer cuts it: the ids its model reads, aligned with the block."""

    ids: torch.Tensor  # (T_device,) long
    alignment: Alignment  # a = the device's tokenisation, b = the block's global ids


def block_tokenization(tokenizer, ids: Sequence[int], sep: str = "\n\n") -> Tokenization:
    """A block of global ids back to text, with each token's character offsets.

    Blocks are cut from a token stream (data.pack_blocks), so a block may start inside a word or a character
    and cannot be re-tokenised into the same ids. The offsets come from decoding instead: token i ends where
    the decoded prefix ids[:i+1] stops agreeing with the whole decoded text (a byte-level token holding half a
    character decodes to U+FFFD there, so it ends where the token before it did and covers nothing). A global
    EOS separates documents: it becomes `sep` in the text, as a special token that covers none of it."""
    eos, ids = tokenizer.eos_token_id, [int(i) for i in ids]
    text, offsets, special = "", [], []
    start = 0
    for end in [i for i, t in enumerate(ids) if t == eos] + [len(ids)]:
        seg = ids[start:end]
        if seg:
            if text:  # documents are separated, not glued: a word must not run across an EOS
                text += sep
            whole = tokenizer.decode(seg, clean_up_tokenization_spaces=False)
            prefixes = tokenizer.batch_decode([seg[:i + 1] for i in range(len(seg))],
                                              clean_up_tokenization_spaces=False)
            done = 0
            for p in prefixes:
                n = len(p) if whole.startswith(p) else len(_common_prefix(p, whole))
                offsets.append((len(text) + done, len(text) + max(done, n)))
                done = max(done, n)
            text += whole
            special += [False] * len(seg)
        if end < len(ids):  # the EOS itself
            offsets.append((len(text), len(text)))
            special.append(True)
        start = end + 1
    return Tokenization(text, tuple(ids), tuple(offsets), tuple(special), name=f"tokenizer {_name(tokenizer)}")


def _common_prefix(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:n]


def device_tokenization(tokenizer, block: Tokenization, max_length: int | None = None) -> Tokenization:
    """The block's text under a device's tokenizer: each document cut on its own, the device's EOS between
    them where the block has the global one, truncated to the model's max_length tokens."""
    _require_fast(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {_name(tokenizer)} has no eos token; a device's documents are separated by "
                        "its eos, so give the tokenizer one (eos_token in its tokenizer_config.json; "
                        "deepfusion.data.load_tokenizer takes a [SEP] for it)")
    ids, offsets, special = [], [], []
    for lo, hi in _pieces(block):
        if lo is None:  # the block's EOS: the device's own, at the same place
            ids.append(eos)
            offsets.append((hi, hi))
            special.append(True)
            continue
        enc = tokenizer(block.text[lo:hi], add_special_tokens=False, return_offsets_mapping=True)
        ids += enc["input_ids"]
        offsets += [(lo + s, lo + e) for s, e in enc["offset_mapping"]]
        special += [False] * len(enc["input_ids"])
    if max_length is not None:
        ids, offsets, special = ids[:max_length], offsets[:max_length], special[:max_length]
    return Tokenization(block.text, tuple(int(i) for i in ids), tuple(offsets), tuple(special),
                        name=f"tokenizer {_name(tokenizer)}")


def _pieces(block: Tokenization) -> list[tuple[int | None, int]]:
    """The block in order: (lo, hi) characters of each document, (None, at) for each EOS between them."""
    out, run = [], []
    for (s, e), sp in [*zip(block.offsets, block.special), ((0, 0), True)]:
        if not sp:
            run.append((s, e))
            continue
        if run:
            out.append((run[0][0], run[-1][1]))
            run = []
        out.append((None, s))
    return out[:-1]  # the sentinel


def block_views(global_tokenizer, device_tokenizer, blocks: torch.Tensor,
                max_length: int | None = None) -> list[BlockView]:
    """Every (T,) row of global ids in blocks as the device's tokenizer cuts its text, aligned with it."""
    out = []
    for row in blocks.tolist():
        g = block_tokenization(global_tokenizer, row)
        d = device_tokenization(device_tokenizer, g, max_length)
        out.append(BlockView(torch.tensor(d.ids, dtype=torch.long), align(d, g)))
    return out


def vocab_digest(tokenizer) -> str:
    """A short name for a tokenizer's vocabulary and the way it cuts text: equal for the same vocabulary, so a
    server can tell that a device's knowledge still speaks the vocabulary it spoke last round."""
    return _fingerprint(tokenizer, None)[:16]
