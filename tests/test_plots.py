"""A single run makes plots (issue 13, item 12): PNG curves next to summary.json for each protocol, drawn from
metrics.jsonl (so a resumed run has all of them), TensorBoard events with --tensorboard, and a plot that fails
costs one warning line, never the run. Through the real command line, on the smoke configs."""

import json
from pathlib import Path

import pytest
from PIL import Image

from deepfusion import plots
from deepfusion.cli import main
from deepfusion.config import default_config_path
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow


def run(*argv) -> int:
    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip("real corpora not found")
    return main(["run", *map(str, argv), "--data-dir", str(SHARED_DATA), "--no-progress"])


def assert_images(out: Path, names) -> None:
    for name in names:
        with Image.open(out / name) as image:
            image.verify()  # a whole, readable PNG
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_multiround_run_plots_and_logs_each_round_and_a_resume_all_of_them(tmp_path):
    out, board = tmp_path / "run", tmp_path / "board"
    assert run("--config", default_config_path("smoke-multiround"), "--rounds", 1, "--out", out,
               "--tensorboard", board) == 0
    assert_images(out, plots.MULTIROUND_PLOTS)
    first = (out / "ppl_per_round.png").read_bytes()

    assert main(["run", "--resume", str(out), "--rounds", "3", "--data-dir", str(SHARED_DATA), "--no-progress",
                 "--tensorboard", str(board)]) == 0
    assert_images(out, plots.MULTIROUND_PLOTS)
    assert (out / "ppl_per_round.png").read_bytes() != first  # redrawn with the resumed rounds
    logged = scalars(board)
    for domain, ppl in ((d, [r["ppl"][d] for r in records(out)]) for d in ("medical", "finance")):
        # every round once, the first stretch's events hidden by the second writer's purge
        assert logged[f"ppl/{domain}"] == [(r, pytest.approx(p, rel=1e-6)) for r, p in zip((1, 2, 3), ppl)]
    assert [step for step, _ in logged["comm/bytes_up"]] == [1, 2, 3] and logged["comm/bytes_up"][0][1] > 0


def test_a_oneshot_run_plots_and_logs_each_phase_curve(tmp_path):
    out, board = tmp_path / "run", tmp_path / "board"
    assert run("--config", default_config_path("smoke"), "--out", out, "--tensorboard", board) == 0
    assert_images(out, plots.ONESHOT_PLOTS)
    logged, recs = scalars(board), records(out)
    for device in (r for r in recs if r["phase"] == "0"):
        assert [s for s, _ in logged[f"phase0/{device['device']}/val_loss"]] == [p["step"] for p in device["curve"]]
    for domain in (r for r in recs if r["phase"] == "II"):
        for term in ("total", "ce", "fm", "kl"):
            assert [s for s, _ in logged[f"phase2/domain{domain['domain']}/{term}"]] == [p["step"] for p in domain["curve"]]
    [phase3] = [r for r in recs if r["phase"] == "III"]
    steps = [p["step"] for p in phase3["tuning"]["curve"]]
    for domain in ("medical", "finance"):
        assert [s for s, _ in logged[f"phase3/validation_ppl/{domain}"]] == steps == [0, 3, 6]
    assert logged["phase1/ari"] == [(0, 1.0)]


def test_a_plot_that_fails_is_one_warning_line_not_a_failed_run(tmp_path, monkeypatch, capsys):
    def broken(rounds):
        raise ValueError("no room on the canvas")

    monkeypatch.setattr(plots, "_bytes_per_round", broken)
    out = tmp_path / "run"
    assert run("--config", default_config_path("smoke-multiround"), "--rounds", 1, "--out", out) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "plots:" in line]
    assert warnings == [warnings[0]] and "bytes_per_round.png not written (ValueError: no room on the canvas)" \
        in warnings[0] and "WARNING" in warnings[0]
    assert json.loads(captured.out)["rounds"] == 1 and (out / "summary.json").is_file()
    assert_images(out, ["ppl_per_round.png"])  # the other plot is still drawn
    assert not (out / "bytes_per_round.png").exists() and not list(out.glob("*.tmp"))


def test_plots_come_from_metrics_jsonl_alone(tmp_path):
    """A run directory's curves can be drawn again from its metrics.jsonl (what a resumed run does)."""
    lines = [{"round": r, "ppl": {"medical": 400.0 - 50 * r, "finance": 380.0 - 40 * r}, "bytes_up": 41328}
             for r in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"round": 4, "pp')
    assert [p.name for p in plots.write_plots(tmp_path)] == list(plots.MULTIROUND_PLOTS)  # a torn last line skipped
    assert_images(tmp_path, plots.MULTIROUND_PLOTS)
