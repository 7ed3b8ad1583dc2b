"""The byo bench's reuse of earlier rows and its table, on made-up figures (the runs themselves are the bench's)."""

import json

import pytest

from deepfusion.benchmarks import byo


def fake(log_ppl: float, commit: str) -> dict:
    per = {"medical": log_ppl, "finance": log_ppl - 1}
    return {"log_ppl": per, "qa_log_ppl": per, "accuracy": per, "threads": 2, "bytes_up": 2e6, "wall_seconds": 60,
            "phase_seconds": {"phase2": 900.0, "phase3": 600.0}, "peak_mem_mb": {"gpt2/small": 147.2},
            "upload_mb_per_device": 5.36, "tokenizer_kb_per_device": 0.0, "commit": commit}


def test_rows_in_an_earlier_results_json_are_reused_and_keep_their_commit(tmp_path, monkeypatch):
    earlier = [{"row": "global tokenizer", "seed": 0, **fake(6.0, "a" * 40)},
               {"row": "own tokenizers", "seed": 0, **fake(6.1, "a" * 40)}]
    (tmp_path / "results.json").write_text(json.dumps({"seeds": [0], "runs": earlier}))
    ran = []

    def run_one(out, row, seed):
        ran.append(row)
        return {"row": row}

    monkeypatch.setattr(byo, "run_one", run_one)
    monkeypatch.setattr(byo, "measures", lambda summary: fake(6.3, "b" * 40))
    monkeypatch.setattr(byo, "aligned_share", lambda out, seed: {"gpt2: bpe-6000": 0.968})
    results = byo.run_bench(tmp_path, [0])
    assert ran == ["LoRA devices"]  # only the row not measured before runs
    assert [(r["row"], r["log_ppl"]["medical"], r["commit"][0]) for r in results["runs"]] == [
        ("global tokenizer", 6.0, "a"), ("own tokenizers", 6.1, "a"), ("LoRA devices", 6.3, "b")]
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| global tokenizer | 1 | 6.000 |" in table and table.count("| aaaaaaa |") == 2
    assert "| LoRA devices | 1 | 6.300 |" in table and "| bbbbbbb |" in table
    assert "| +0.300 / +0.300 |" in table and "| +0.100 / +0.100 |" in table  # paired with the global row
    assert "96.8%" in table


def test_a_finished_run_on_disk_wins_over_the_earlier_figures(tmp_path, monkeypatch):
    (tmp_path / "results.json").write_text(json.dumps({"seeds": [0], "runs": [
        {"row": row, "seed": 0, **fake(6.0, "a" * 40)} for row in byo.ROWS]}))
    done = tmp_path / "runs" / byo._slug("global tokenizer") / "s0"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    monkeypatch.setattr(byo, "run_one", lambda out, row, seed: {"row": row})
    monkeypatch.setattr(byo, "measures", lambda summary: fake(5.9, "c" * 40))
    monkeypatch.setattr(byo, "aligned_share", lambda out, seed: {})
    results = byo.run_bench(tmp_path, [0])
    assert [r["log_ppl"]["medical"] for r in results["runs"]] == pytest.approx([5.9, 6.0, 6.0])
