"""The multi-round loop both engines share: rounds after a resume, the record, the checkpoint, early stopping,
and the retry of missing devices. The engines' own steps are tested with the engines (tests/engines)."""

import json
import logging
from types import SimpleNamespace

import torch

from deepfusion.baselines.centralized import EarlyStopping
from deepfusion.config import default_config_path, load_config
from deepfusion.outputs import load_checkpoint
from deepfusion.progress import RunProgress
from deepfusion.recipes.multiround import checkpoint_path, retry_missing, run_rounds


def tiny_server() -> SimpleNamespace:
    model = torch.nn.Linear(2, 2)
    return SimpleNamespace(step=0, model=model, views=None, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           generator=torch.Generator().manual_seed(0), vocabs={})


def rounds(tmp_path, ppl_per_round, records=None, stopper=None, total=4):
    cfg = load_config(default_config_path("smoke-multiround"))
    server, asked = tiny_server(), []
    ppl = iter(ppl_per_round)

    def step(r):
        asked.append(r)
        return {"accepted": ["a", "b"], "rejected": {}, "bytes_up": 10 * r, "seconds_devices": 0.0}

    def validate():
        return {"ppl": {"medical": next(ppl)}}

    with RunProgress(tmp_path, live=False) as shown:
        shown.stage("ROUND", "round", total)
        got = run_rounds(cfg, tmp_path, server, step, lambda: {"ppl": {"medical": 1.0}},
                         lambda recs: {"comm": {"rounds": len(recs)}}, shown, total, records or [], stopper, validate)
    return got, asked


def test_every_round_recorded_and_checkpointed(tmp_path):
    got, asked = rounds(tmp_path, [])
    assert asked == [1, 2, 3, 4] and [r["round"] for r in got] == [1, 2, 3, 4]
    assert [json.loads(line)["bytes_up"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [10, 20, 30, 40]
    state = load_checkpoint(checkpoint_path(tmp_path))
    assert state["round"] == 4 and state["comm"] == {"rounds": 4} and len(state["metrics"]) == 4
    assert set(state["server"]) >= {"model", "optimizer", "step"}


def test_a_resumed_loop_runs_only_the_rounds_after_its_records(tmp_path):
    got, asked = rounds(tmp_path, [], records=[{"round": 1}, {"round": 2}])
    assert asked == [3, 4] and [r["round"] for r in got] == [1, 2, 3, 4]


def test_early_stopping_ends_after_patience_rounds_without_a_better_validation(tmp_path):
    stopper = EarlyStopping(patience=2)
    got, asked = rounds(tmp_path, [5.0, 4.0, 4.5, 4.2, 3.0], stopper=stopper, total=5)
    assert asked == [1, 2, 3, 4] and stopper.best_round == 2  # rounds 3 and 4 did not beat round 2
    assert got[-1]["validation_ppl"] == {"medical": 4.2}


def test_retry_asks_only_the_missing_devices_until_enough_answered(caplog):
    cfg = load_config(default_config_path("smoke-multiround"), ["server.min_devices=3", "server.round_retries=2"])
    ids, asked = [d.id for d in cfg.devices], []

    def ask(missing):
        asked.append(list(missing))
        return {missing[0]: b"x"}  # one more device answers per retry

    with caplog.at_level(logging.WARNING, logger="deepfusion"):
        got = retry_missing(cfg, 1, {ids[0]: b"x"}, ids, ask)
    assert sorted(got) == sorted(ids) and asked == [ids[1:], ids[2:]]
    got = retry_missing(load_config(default_config_path("smoke-multiround"), ["server.min_devices=3",
                                                                               "server.round_retries=0"]),
                        1, {ids[0]: b"x"}, ids, ask)
    assert list(got) == [ids[0]] and "the server skips this round" in caplog.text
