"""Question-answer examples: the question as context, the answer as the only scored tokens.

The paper scores answers (§V: token perplexity and token accuracy of the QA responses). One example is

    Question: {q}\\nAnswer: {a}<eos><pad>...        (TAT-QA: "Question: {q} Answer: {a}")

in exactly the surface form the source's text used (corpora.qa_prompt renders both), so the model is
asked for an answer in the format it trained on. mask[i] is True where token i+1 is an answer token.
"""

from __future__ import annotations

import torch

from deepfusion.data.corpora import Document, qa_prompt
from deepfusion.errors import DataError

MIN_ANSWER = 8  # answer tokens an example keeps even when the question must be cut for them


def _cue(tokenizer, source: str) -> list[int]:
    # The prompt's last tokens ("\nAnswer:"): the least of the question an example may keep.
    return tokenizer(qa_prompt(source, "")[len("Question: "):], add_special_tokens=False)["input_ids"]


def _encode_heads(tokenizer, texts: list[str], n: int) -> list[list[int]]:
    """The ids of each text, exact in their first n (all of them if fewer): what an example can hold.

    MedQuAD answers run to thousands of characters and an example holds n tokens, so each text is cut
    at a space near 8n characters first: the pre-tokenizer splits at whitespace, so the cut text's ids
    are the full text's ids up to the cut. A cut text that still falls short of n is encoded whole.
    """
    heads = [t if len(t) <= 8 * n else t[:8 * n].rpartition(" ")[0].rstrip() or t for t in texts]
    ids = tokenizer(heads, add_special_tokens=False, verbose=False)["input_ids"]
    for i, (t, h) in enumerate(zip(texts, heads)):
        if len(ids[i]) < n and h != t:
            ids[i] = tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]
    return ids


def _fit(prompt: list[int], answer: list[int], cue: int, seq_len: int) -> tuple[list[int], int] | None:
    """The prompt's kept tail and the number of answer tokens kept, or None if the answer cannot fit."""
    # The answer takes what the whole question leaves, but at least MIN_ANSWER tokens (or all it has);
    # the question is cut from the left, so the cue just before the answer always stays.
    keep = min(len(answer), max(seq_len - len(prompt), MIN_ANSWER))
    room = seq_len - keep
    if not answer or room < cue:
        return None
    return prompt[-room:], keep


def qa_examples(tokenizer, docs: list[Document], seq_len: int, max_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, seq_len) long, mask (N, seq_len) bool) for up to max_pairs of the documents' QA pairs.

    Pairs whose answer cannot fit beside its cue are skipped; of the rest, more than max_pairs are thinned
    to max_pairs evenly spaced over the documents (a fixed subset, so rounds compare).
    """
    if seq_len < 2:
        raise DataError(f"got seq_len={seq_len}; a QA example needs a prompt token and an answer token; "
                        "fix data.seq_len")
    if max_pairs < 0:
        raise DataError(f"got max_pairs={max_pairs}; it must be >= 0 (0: no QA examples); fix data.qa_pairs")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("got a tokenizer without an eos token; a QA example ends with eos; "
                        "load it with deepfusion.data.load_tokenizer, which sets one")
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    pairs = [(d.source, q, a) for d in docs for q, a in d.qa]
    if not pairs or max_pairs == 0:
        return torch.empty(0, seq_len, dtype=torch.long), torch.empty(0, seq_len, dtype=torch.bool)
    # Prompt and answer are encoded apart (one batched call each): the text splits pre-tokens at
    # "Answer:" | " answer" anyway, so the ids are those of the joined text and the boundary is exact.
    prompts = tokenizer([qa_prompt(s, q) for s, q, _ in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    answers = _encode_heads(tokenizer, [f" {a}" for _, _, a in pairs], seq_len)
    cues = {s: len(_cue(tokenizer, s)) for s in {s for s, _, _ in pairs}}
    fits = []  # (kept prompt ids, kept answer ids)
    for (source, _, _), prompt, answer in zip(pairs, prompts, answers):
        if (fit := _fit(prompt, answer, cues[source], seq_len)) is not None:
            fits.append((fit[0], answer[:fit[1]]))
    if len(fits) > max_pairs:
        fits = [fits[i] for i in torch.linspace(0, len(fits) - 1, max_pairs).long().tolist()]
    ids = torch.full((len(fits), seq_len), pad, dtype=torch.long)
    mask = torch.zeros(len(fits), seq_len, dtype=torch.bool)
    for row, (prompt, answer) in enumerate(fits):
        seq = (prompt + answer + [eos])[:seq_len]  # eos ends a whole answer; a cut one has no room for it
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, len(prompt) - 1:len(prompt) + len(answer) - 1] = True  # positions predicting an answer token
    return ids, mask
