"""QA examples: the mask covers exactly the answer, in the surface form the corpora's text uses; cuts keep the answer."""

import pytest
import torch

from deepfusion.data import Document, load_source, qa_examples, train_tokenizer
from deepfusion.errors import DataError
from deepfusion.data.corpora import qa_prompt
from deepfusion.data.qa import MIN_ANSWER, _encode_heads


@pytest.fixture
def real_docs(shared_data):
    return load_source("medquad:cdc", shared_data)[:6] + load_source("tatqa:0/8", shared_data)[:6]


@pytest.fixture
def tok(real_docs, tmp_path_factory):
    # cached on disk by its inputs: trained once for the module's tests
    return train_tokenizer([d.text for d in real_docs], 1000, tmp_path_factory.getbasetemp() / "qa-tokenizer")


def answer_text(tok, ids, mask):
    """The text of the tokens that masked positions predict."""
    return tok.decode(ids[1:][mask[:-1]])


def test_masks_cover_exactly_the_answers_of_real_medquad_and_tatqa_documents(real_docs, tok):
    for doc in (real_docs[0], real_docs[-1]):  # a MedQuAD page, a TAT-QA report
        assert doc.qa
        ids, mask = qa_examples(tok, [doc], 4096, 1000)
        assert ids.shape == mask.shape == (len(doc.qa), 4096) and ids.dtype == torch.long and mask.dtype == torch.bool
        for row, m, (q, a) in zip(ids, mask, doc.qa):
            prompt = qa_prompt(doc.source, q)
            assert f"{prompt} {a}" in doc.text  # the form the model trained on
            assert answer_text(tok, row, m) == f" {a}"
            first = int(m.nonzero()[0])  # predicts the first answer token
            assert tok.decode(row[:first + 1]) == prompt
            n = first + 1 + int(m.sum())
            # prompt and answer encoded apart are the joined text's tokens, then eos, then padding
            assert row[:n].tolist() == tok(f"{prompt} {a}", add_special_tokens=False)["input_ids"]
            assert row[n] == tok.eos_token_id and (row[n + 1:] == tok.pad_token_id).all()
            assert m.sum() == n - first - 1 and not m[n - 1:].any()


def test_answers_cut_before_encoding_keep_the_first_tokens_exact(real_docs, tok):
    answers = [f" {a}" for d in real_docs for _, a in d.qa]
    assert max(map(len, answers)) > 8 * 16  # some are cut
    for head, full in zip(_encode_heads(tok, answers, 16), tok(answers, add_special_tokens=False)["input_ids"]):
        assert len(head) >= min(16, len(full)) and head == full[:len(head)]  # every id of a cut text is exact


def test_medquad_and_tatqa_prompts_differ_as_their_texts_do():
    assert qa_prompt("medquad:gard", "Why?") == "Question: Why?\nAnswer:"
    assert qa_prompt("tatqa:0/2", "Why?") == "Question: Why? Answer:"


def test_a_long_answer_is_cut_on_the_right_and_keeps_its_question(tok):
    answer = " ".join(f"word{i}" for i in range(200))
    doc = Document("medquad:x", "medical", "1", "", (("What is it?", answer),))
    prompt = tok(qa_prompt("medquad:x", "What is it?"), add_special_tokens=False)["input_ids"]
    ids, mask = qa_examples(tok, [doc], 40, 8)
    assert ids[0, :len(prompt)].tolist() == prompt  # the whole question
    assert mask[0].sum() == 40 - len(prompt) and f" {answer}".startswith(answer_text(tok, ids[0], mask[0]))
    assert tok.eos_token_id not in ids[0].tolist()  # a cut answer has no room for eos


def test_a_long_question_is_cut_on_the_left_and_the_answer_kept(tok):
    question = " ".join(f"q{i}" for i in range(300))
    doc = Document("tatqa:0/1", "finance", "1", "", ((question, "12.5 million"),))
    ids, mask = qa_examples(tok, [doc], 32, 8)
    assert answer_text(tok, ids[0], mask[0]) == " 12.5 million"
    first = int(mask[0].nonzero()[0])
    kept = tok.decode(ids[0, :first + 1])
    assert kept.endswith(" Answer:") and qa_prompt("tatqa:0/1", question).endswith(kept) and "q0 " not in kept


def test_long_question_and_answer_keep_at_least_min_answer_tokens(tok):
    question = " ".join(f"q{i}" for i in range(300))
    answer = " ".join(f"a{i}" for i in range(300))
    ids, mask = qa_examples(tok, [Document("medquad:x", "medical", "1", "", ((question, answer),))], 24, 8)
    assert mask[0].sum() == MIN_ANSWER and tok.decode(ids[0, :24 - MIN_ANSWER]).endswith("\nAnswer:")


def test_a_pair_whose_answer_cannot_fit_is_skipped(tok):
    long_answer = " ".join(f"a{i}" for i in range(50))
    doc = Document("medquad:x", "medical", "1", "", (("Q?", long_answer), ("Q?", "yes")))
    cue = len(tok("\nAnswer:", add_special_tokens=False)["input_ids"])
    ids, mask = qa_examples(tok, [doc], cue + MIN_ANSWER - 1, 8)  # room for the cue and fewer than MIN_ANSWER
    assert len(ids) == 1 and answer_text(tok, ids[0], mask[0]) == " yes"


def test_subset_is_fixed_and_spread_over_documents(tok):
    docs = [Document("medquad:x", "medical", str(i), "", tuple((f"Q{i}.{j}?", f"A{i}.{j}") for j in range(4)))
            for i in range(10)]
    ids, mask = qa_examples(tok, docs, 32, 4)
    again = qa_examples(tok, docs, 32, 4)
    assert torch.equal(ids, again[0]) and torch.equal(mask, again[1])
    answers = [answer_text(tok, r, m) for r, m in zip(ids, mask)]
    assert answers[0] == " A0.0" and answers[-1] == " A9.3" and len({a.split(".")[0] for a in answers}) == 4
    assert qa_examples(tok, docs, 32, 0)[0].shape == (0, 32)
    assert qa_examples(tok, [Document("jsonl:x", "legal", "1", "no pairs")], 32, 4)[1].shape == (0, 32)


def test_errors(tok):
    with pytest.raises(DataError, match="seq_len=1"):
        qa_examples(tok, [], 1, 4)
    with pytest.raises(DataError, match="max_pairs=-1"):
        qa_examples(tok, [], 32, -1)
