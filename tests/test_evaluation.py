"""Evaluation as the paper measures it: log-perplexity, perplexity and token accuracy, on blocks and on QA answers."""

import math
from types import SimpleNamespace

import pytest
import torch

from deepfusion import evaluation
from deepfusion.config import DataConfig
from deepfusion.errors import ConfigError
from deepfusion.evaluation import evaluate, lm_metrics
from deepfusion.models import build_global_moe

CPU = torch.device("cpu")
V, T = 11, 9


class Bigram(torch.nn.Module):
    """Next-token logits from the current token alone (a table row): figures a test can compute by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def blocks(n, seed, vocab=V):
    return torch.randint(vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def by_hand(table, ids, mask=None):
    """(sum NLL, hits, count) over the scored positions, one position at a time."""
    nll, hits, count = 0.0, 0, 0
    for r in range(len(ids)):
        for i in range(T - 1):
            if mask is None or mask[r, i]:
                row, nxt = table[ids[r, i]], int(ids[r, i + 1])
                nll -= float(torch.log_softmax(row.double(), -1)[nxt])
                hits += int(row.argmax()) == nxt
                count += 1
    return nll, hits, count


def close(a, b):
    return a == pytest.approx(b, rel=1e-3)  # figures carry 4 significant digits


@pytest.fixture
def sets():
    g = torch.Generator().manual_seed(7)
    qa_mask = torch.rand(5, T, generator=g) < 0.3
    qa_mask[0] = False  # a row with no answer token is skipped, not divided by
    qa_mask[:, -1] = False  # the last position has no next token
    repeated = torch.zeros(2, T, dtype=torch.long)  # one token over and over: its NLL is far from the random blocks'
    every = torch.ones(2, T, dtype=torch.bool).index_fill(1, torch.tensor(T - 1), 0)
    test_sets = {"s1": ("medical", blocks(3, 1)), "s2": ("medical", repeated[:1]), "s3": ("finance", blocks(2, 3))}
    qa_sets = {"s1": ("medical", (blocks(5, 4), qa_mask)), "s2": ("medical", (repeated, every))}
    return test_sets, qa_sets


def test_log_ppl_is_the_log_of_evaluate_ppl_on_a_real_moe(sets):
    torch.manual_seed(0)
    model = build_global_moe("qwen_moe", "tiny", V)
    test_sets, qa_sets = sets
    m, e = lm_metrics(model, test_sets, qa_sets, CPU), evaluate(model, test_sets, CPU)
    assert m["ppl"] == e["ppl"] and m["ppl_by_source"] == e["ppl_by_source"]  # the same pass
    for key in ("", "_by_source"):
        assert m["log_ppl" + key].keys() == e["ppl" + key].keys()
        assert all(close(math.exp(m["log_ppl" + key][k]), e["ppl" + key][k]) for k in e["ppl" + key])
    assert 0.5 * V < e["ppl"]["finance"] < 2 * V  # an untrained model is near uniform


def test_accuracy_is_100_for_a_model_that_predicts_the_reference():
    table = torch.zeros(V, V)
    table[torch.arange(V), (torch.arange(V) + 1) % V] = 5.0  # predicts token + 1
    counting = (torch.arange(4 * T).view(4, T) + torch.arange(4).view(4, 1)) % V  # each next token is token + 1
    mask = torch.zeros(4, T, dtype=torch.bool)
    mask[:, 2:5] = True
    m = lm_metrics(Bigram(table), {"s": ("d", counting)}, {"s": ("d", (counting, mask))}, CPU)
    assert m["accuracy"] == m["qa_accuracy"] == {"d": 100.0} and m["accuracy_by_source"] == {"s": 100.0}
    assert close(m["log_ppl"]["d"], math.log(math.exp(5) + V - 1) - 5) and close(m["qa_log_ppl"]["d"], m["log_ppl"]["d"])
    shifted = lm_metrics(Bigram(table.roll(1, 1)), {"s": ("d", counting)}, {}, CPU)  # predicts token + 2
    assert shifted["accuracy"] == {"d": 0.0} and shifted["qa_accuracy"] == {}


def test_figures_match_a_hand_computation_and_domains_weigh_sources_by_tokens(sets):
    test_sets, qa_sets = sets
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    m = lm_metrics(Bigram(table), test_sets, qa_sets, CPU, batch=2)
    text = {s: by_hand(table, b) for s, (_, b) in test_sets.items()}
    qa = {s: by_hand(table, ids, mask) for s, (_, (ids, mask)) in qa_sets.items()}
    for s, (nll, hits, n) in text.items():
        assert close(m["log_ppl_by_source"][s], nll / n) and close(m["ppl_by_source"][s], math.exp(nll / n))
        assert close(m["accuracy_by_source"][s], 100 * hits / n)
    for s, (nll, hits, n) in qa.items():
        assert close(m["qa_log_ppl_by_source"][s], nll / n) and close(m["qa_accuracy_by_source"][s], 100 * hits / n)
    for figures, prefix in ((text, ""), (qa, "qa_")):
        nll, hits, n = (sum(x[i] for s, x in figures.items() if s != "s3") for i in range(3))  # s1 + s2: medical
        assert close(m[prefix + "log_ppl"]["medical"], nll / n) and close(m[prefix + "accuracy"]["medical"], 100 * hits / n)
        # token-weighted, which differs from the plain mean of the sources' figures here
        plain = (figures["s1"][0] / figures["s1"][2] + figures["s2"][0] / figures["s2"][2]) / 2
        assert abs(nll / n - plain) > 0.05  # far beyond the 4-digit rounding
    assert close(m["log_ppl"]["finance"], text["s3"][0] / text["s3"][2])
    assert "finance" not in m["qa_log_ppl"] and "s3" not in m["qa_accuracy_by_source"]  # s3 has no QA pairs


def test_chunks_and_batches_do_not_change_the_figures(sets, monkeypatch):
    test_sets, qa_sets = sets
    model = Bigram(torch.randn(V, V, generator=torch.Generator().manual_seed(1)))
    whole = lm_metrics(model, test_sets, qa_sets, CPU)
    monkeypatch.setattr(evaluation, "CHUNK_ELEMENTS", 3 * V)  # 3 rows of logits at a time
    pieces = lm_metrics(model, test_sets, qa_sets, CPU, batch=1)
    assert whole.keys() == pieces.keys()
    assert all(close(pieces[k][s], v) for k in whole for s, v in whole[k].items())


def test_qa_pairs_config_is_validated():
    DataConfig(qa_pairs=0).validate()
    with pytest.raises(ConfigError, match="qa_pairs = -1"):
        DataConfig(qa_pairs=-1).validate()


def test_prepare_data_builds_qa_sets_from_test_documents_only(smoke_config):
    from deepfusion.data import load_source, qa_examples, split_documents
    from deepfusion.federation import prepare_data

    d = smoke_config.data
    d.qa_pairs = 5
    data = prepare_data(smoke_config, private=False)
    assert set(data.qa_sets) == {dev.source for dev in smoke_config.devices}
    for source, (domain, (ids, mask)) in data.qa_sets.items():
        split = split_documents(load_source(source, data.data_dir), d.seed, d.proxy_frac, d.test_frac)
        expected = qa_examples(data.tokenizer, split.test, d.seq_len, 5)
        assert domain == data.test_sets[source][0] and ids.shape == (5, d.seq_len)
        assert torch.equal(ids, expected[0]) and torch.equal(mask, expected[1])
    d.qa_pairs = 0
    assert prepare_data(smoke_config, private=False).qa_sets == {}
