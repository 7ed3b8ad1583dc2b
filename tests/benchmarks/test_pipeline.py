"""The pipeline bench's plan and tables, on made-up run figures (the runs themselves are the bench's)."""

from deepfusion.benchmarks import pipeline


def fake(log_ppl: float) -> dict:
    per = {"medical": log_ppl, "finance": log_ppl - 1}
    return {"log_ppl": per, "qa_log_ppl": per, "accuracy": per, "threads": 2, "bytes_up": 2e6, "wall_seconds": 60}


def test_plan_runs_every_row_per_seed_then_design_rows_once():
    plan = pipeline.plan([0, 1, 2])
    assert len(plan) == 3 * len(pipeline.ROWS) + len(pipeline.DESIGN_ROWS)
    assert [p[3] for p in plan[:len(pipeline.ROWS)]] == [0] * len(pipeline.ROWS)
    assert {p[3] for p in plan[-len(pipeline.DESIGN_ROWS):]} == {0}


def test_report_mean_std_paired_and_partial_rows():
    rows = [r for r, *_ in pipeline.ROWS + pipeline.DESIGN_ROWS]
    runs = {("deepfusion", 0): fake(6.0), ("deepfusion", 1): fake(6.2),
            ("no VAA (α = 0)", 0): fake(6.5), ("no VAA (α = 0)", 1): fake(6.9),
            (pipeline.DESIGN_ROWS[0][0], 0): fake(7.0)}
    text = pipeline.report({"config": "c.toml", "seeds": [0, 1], "rows": rows, "bench_seconds": 1.0}, runs)
    assert "| deepfusion | 2 | 6.100 ± 0.141 |" in text and "| 2.0 | 60 |" in text
    assert "+0.600 ± 0.141 / +0.600 ± 0.141" in text  # paired: (0.5, 0.7) on both domains
    assert f"| {pipeline.DESIGN_ROWS[0][0]} | 1 | 7.000 |" in text and "+1.000 / +1.000" in text
    assert "OFA-KD" not in text  # a row with no finished run is left out, not shown as zeros
