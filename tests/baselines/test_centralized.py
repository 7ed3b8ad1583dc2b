"""Centralized training: the pool is everyone's data, and early stopping keeps the best round."""

import json

import pytest
import torch

from deepfusion.baselines.centralized import EarlyStopping, pooled_blocks, validation_score


def test_validation_score_weighs_domains_equally():
    assert validation_score({"medical": 100.0, "finance": 100.0}) == pytest.approx(100.0)
    assert validation_score({"medical": 50.0, "finance": 200.0}) == pytest.approx(100.0)  # geometric mean


def test_early_stopping_keeps_the_best_state_and_waits_patience_rounds():
    model = torch.nn.Linear(2, 2)
    stop = EarlyStopping(patience=2)
    assert not stop.update(model, 10.0, 1)
    with torch.no_grad():
        model.weight.fill_(7.0)
    assert not stop.update(model, 5.0, 2)  # better: its weights are kept
    with torch.no_grad():
        model.weight.fill_(-1.0)
    assert not stop.update(model, 6.0, 3)
    assert stop.update(model, 5.5, 4)  # two rounds without a better score
    assert stop.best_round == 2 and torch.all(stop.best_state["weight"] == 7.0)
    again = EarlyStopping(2)
    again.load(stop.state())
    assert again.best == 5.0 and again.best_round == 2


@pytest.mark.slow
def test_pool_holds_every_private_block_and_the_proxy(smoke_config):
    from deepfusion.federation import prepare_data

    data = prepare_data(smoke_config)
    pool = pooled_blocks(data)
    assert len(pool) == sum(len(b) for b in data.private.values()) + len(data.proxy)
    test_rows = {tuple(r.tolist()) for _, blocks in data.test_sets.values() for r in blocks}
    val_rows = {tuple(r.tolist()) for _, blocks in data.validation.values() for r in blocks}
    pool_rows = {tuple(r.tolist()) for r in pool}
    # Validation is never trained on; MedQuAD repeats some passages across documents, so a few blocks of
    # identical text may still occur on both sides (tests/data/test_splits.py checks the draw itself).
    assert val_rows and len(val_rows & pool_rows) <= 0.1 * len(val_rows) and not val_rows & test_rows


@pytest.mark.slow
def test_centralized_converged_stops_and_exports_its_best_round(smoke_config, tmp_path, capsys, shared_prepare_data):
    from deepfusion.cli import main
    from deepfusion.engines.local import run

    smoke_config.method = "centralized-converged"
    smoke_config.server.patience, smoke_config.server.max_rounds = 1, 4
    summary = run(smoke_config, tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(lines) == summary["rounds"] <= 4
    assert all("validation_ppl" in x for x in lines)
    best = summary["best_round"]
    assert lines[best - 1]["ppl"] == summary["ppl"]  # the exported weights are the best round's
    from deepfusion.config import default_config_path

    assert main(["eval", "--model", str(tmp_path / "model"), "--config", str(default_config_path("smoke-multiround")),
                 "--data-dir", smoke_config.data.dir]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["ppl"]["medical"] == pytest.approx(summary["ppl"]["medical"], rel=1e-3)
