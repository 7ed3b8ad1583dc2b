"""`deepfusion bench --recheck DIR`: a published smoke table re-run and compared; edited figures and another
thread count are caught. One real smoke federation is published and re-run once (module fixtures); every
other recheck reuses that rerun (same config, commit and threads), so the module costs one smoke run (the
published one is the suite's shared smoke_deepfusion)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from deepfusion.benchmarks import paper, pipeline, recheck
from deepfusion.benchmarks.report import thread_setting
from deepfusion.cli import main
from deepfusion.config import default_config_path
from deepfusion.errors import DataError


@pytest.fixture(scope="module")
def published(smoke_deepfusion, tmp_path_factory) -> Path:
    """A profile directory as the pipeline bench leaves it: DIR/runs/deepfusion/s0 (the smoke federation, its
    Phase 0 recorded in DIR/recordings) and DIR/results.json. A copy of the suite's shared smoke run
    (tests/conftest.py: smoke_deepfusion, with data.dir in its config: the recheck reads the same corpora),
    since the recheck writes into DIR."""
    root = tmp_path_factory.mktemp("published") / "table"
    shutil.copytree(smoke_deepfusion.root, root)
    summary = json.loads((root / "runs" / "deepfusion" / "s0" / "summary.json").read_text())
    (root / "results.json").write_text(json.dumps({"runs": [{"row": "deepfusion", "seed": 0,
                                                             **pipeline.figures(summary)}]}))
    return root


@pytest.fixture(scope="module")
def reruns(published, tmp_path_factory) -> Path:
    """The one real rerun: every test's recheck points --recheck-out here and reuses it."""
    out = tmp_path_factory.mktemp("reruns")
    recheck.recheck(published, out)
    return out


def copy_of(published: Path, tmp_path: Path) -> Path:
    """The table to edit: its summaries and recordings (the model and checkpoint are not read)."""
    root = tmp_path / "table"
    shutil.copytree(published, root, ignore=shutil.ignore_patterns("model", "checkpoint", "*.png"))
    return root


def edit(root: Path, change) -> None:
    path = root / "runs" / "deepfusion" / "s0" / "summary.json"
    summary = json.loads(path.read_text())
    change(summary)
    path.write_text(json.dumps(summary))


def bench(capsys, root: Path, out: Path, *extra) -> tuple[int, str]:
    rc = main(["bench", "--recheck", str(root), "--recheck-out", str(out), *extra])
    return rc, capsys.readouterr().out


def test_an_unchanged_table_regenerates(published, reruns, capsys):
    rc, out = bench(capsys, published, reruns)
    assert rc == 0, out
    result = json.loads((published / "recheck.json").read_text())
    assert result["differ"] == 0 and len(result["runs"]) == 1
    run = result["runs"][0]
    assert (run["row"], run["seed"], run["uploads"]) == ("deepfusion", 0, str(published / "recordings"))
    figures = {f["figure"] for f in run["figures"]}
    assert {"log_ppl medical", "accuracy finance", "qa_log_ppl medical", "qa_accuracy finance",
            "ppl medical"} <= figures
    assert all(f["published"] == f["now"] and f["rel"] == 0 for f in run["figures"])
    assert "All 1 runs regenerate" in out and "DIFFERS" not in out and "THREADS DIFFER" not in out
    assert (published / "RECHECK.md").read_text().strip() == out.strip()
    assert not (published / "recheck").exists()  # --recheck-out given: DIR gets only recheck.json, RECHECK.md


def test_an_edited_figure_differs_and_exits_1(published, reruns, tmp_path, capsys):
    root = copy_of(published, tmp_path)
    edit(root, lambda s: s["log_ppl"].update(medical=round(s["log_ppl"]["medical"] + 0.01, 3)))
    rc, out = bench(capsys, root, reruns)
    assert rc == 1
    run = json.loads((root / "recheck.json").read_text())["runs"][0]
    moved = [f["figure"] for f in run["figures"] if f["differs"]]
    assert moved == ["log_ppl medical"] and run["differs"]
    line = next(x for x in out.splitlines() if "| log_ppl medical |" in x)
    assert line.endswith("| **DIFFERS** |") and "1 of 1 runs DIFFER: deepfusion s0" in out
    # 0.01 on a log-ppl of ~6 is ~0.17 %: within a 1 % tolerance, beyond 0.1 %
    assert bench(capsys, root, reruns, "--tolerance", "0.01")[0] == 0
    assert bench(capsys, root, reruns, "--tolerance", "0.001")[0] == 1


def test_a_run_published_under_another_thread_count_is_flagged(published, reruns, tmp_path, capsys):
    root = copy_of(published, tmp_path)
    then = torch.get_num_threads() + 1
    edit(root, lambda s: s["provenance"].update(threads=then))
    rc, out = bench(capsys, root, reruns)
    assert rc == 0  # the figures agree; the thread count is said, not judged
    assert f"{then} → {torch.get_num_threads()} (THREADS DIFFER)" in out
    assert f"recheck under the published setting with --threads {then}" in out
    assert json.loads((root / "recheck.json").read_text())["runs"][0]["threads"] == [then, torch.get_num_threads()]


def test_only_and_seeds_restrict_what_is_rerun(published, reruns, capsys, tmp_path):
    rc, out = bench(capsys, published, reruns, "--only", "no-vaa")
    assert rc == 2  # nothing matches: one line, no rerun
    assert bench(capsys, published, reruns, "--only", "deepfusion", "--seeds", "0")[0] == 0
    assert bench(capsys, published, reruns, "--seeds", "1")[0] == 2


# ---- no run needed ----------------------------------------------------------------------------------

def test_comparison_rules():
    then = {"seed": 0, "config": {}, "log_ppl": {"medical": 6.072}, "ppl": {"medical": 433.7},
            "provenance": {"threads": 2, "commit": "abcdef0123", "dirty": False}}
    same = recheck.compare("deepfusion/s0", then, then, None, 0.0)
    assert not same["differs"] and same["row"] == "deepfusion" and same["commit"] == ["abcdef0", "abcdef0"]
    last_digit = {**then, "log_ppl": {"medical": 6.073}}
    assert recheck.compare("x/s0", then, last_digit, None, 0.0)["differs"]  # tolerance 0: the digits must agree
    assert not recheck.compare("x/s0", then, last_digit, None, 0.001)["differs"]
    assert recheck.compare("x/s0", then, {**then, "ppl": {}}, None, 0.5)["differs"]  # a figure gone missing
    old = {k: v for k, v in then.items() if k != "log_ppl"}  # published before summaries carried log_ppl
    assert not recheck.compare("x/s0", old, then, None, 0.0)["differs"]


def test_a_committed_pipeline_table_without_its_runs_is_rebuilt_from_results_json(tmp_path):
    """benchmarks/*/runs/ is not committed: the pipeline profile's results.json and ROWS rebuild each run."""
    figures = {"log_ppl": {"medical": 6.0, "finance": 5.0}, "ppl": {"medical": 403.4, "finance": 148.4}}
    (tmp_path / "results.json").write_text(json.dumps({"config": str(default_config_path("smoke")), "runs": [
        {"row": "deepfusion", "seed": 1, "threads": 2, **figures},
        {"row": "random router", "seed": 0, "threads": 1, **figures}]}))
    runs = dict(recheck.published_runs(tmp_path, [], [], tmp_path / "recheck"))
    assert list(runs) == ["deepfusion/s1", "random-router/s0"]
    assert runs["deepfusion/s1"]["config"]["seed"] == 1 and runs["deepfusion/s1"]["provenance"] == {"threads": 2}
    assert runs["random-router/s0"]["config"]["tune"]["router_init"] == "random"
    assert runs["random-router/s0"]["log_ppl"] == figures["log_ppl"]
    assert list(dict(recheck.published_runs(tmp_path, ["router"], [], tmp_path))) == ["random-router/s0"]


def paper_table(root: Path, *rows: dict) -> Path:
    """A committed paper-profile table as the bench leaves it in git: results.json and the cells' configs."""
    for r in rows:
        paper.write_case_config(root, paper.CASES[r["case"]], r["n"], r["seed"])
    (root / "results.json").write_text(json.dumps({"profile": "paper", "runs": list(rows)}))
    return root


PAPER_ROW = {"case": "medical", "n": 16, "row": "no VAA", "seed": 1, "method": "deepfusion-no-vaa", "log_ppl": 6.5,
             "accuracy": 6.7, "qa_log_ppl": 6.8, "qa_accuracy": None, "threads": 2, "commit": "057cfd2" + "0" * 33,
             "torch": "2.13.0+cpu"}


def test_a_committed_paper_table_without_its_runs_is_rebuilt_from_its_cell_configs(tmp_path):
    """The paper profile's runs are not committed either: its cell configs (DIR/configs) and paper.ROWS rebuild
    each run as the bench ran it, with the row's figures under the case's domain and its provenance."""
    root = paper_table(tmp_path, PAPER_ROW, PAPER_ROW | {"row": "FedMKT", "method": "fedmkt", "seed": 0})
    runs = dict(recheck.published_runs(root, [], [], root / "recheck"))
    assert list(runs) == ["medical/N16/deepfusion-no-vaa/s1", "medical/N16/fedmkt/s0"]
    run = runs["medical/N16/deepfusion-no-vaa/s1"]
    assert run["method"] == run["config"]["method"] == "deepfusion-no-vaa" and run["config"]["seed"] == 1
    assert [d["id"] for d in run["config"]["devices"]] == [f"med-{i:03d}" for i in range(16)]
    assert run["log_ppl"] == {"medical": 6.5} and "qa_accuracy" not in run
    assert run["provenance"] == {"threads": 2, "commit": PAPER_ROW["commit"], "torch": "2.13.0+cpu"}
    compared = recheck.compare("medical/N16/deepfusion-no-vaa/s1", run, run, None, 0.0)
    assert compared["row"] == "medical/N16/deepfusion-no-vaa" and compared["commit"][0] == "057cfd2"
    assert list(dict(recheck.published_runs(root, ["fedmkt"], [0], root))) == ["medical/N16/fedmkt/s0"]


def test_a_paper_table_rechecks_the_runs_here_and_rebuilds_the_rest(tmp_path):
    """A machine holding some of the runs (DIR/runs) rechecks those from their summaries, the others from
    results.json: `--only medical/N16` works wherever the table is committed."""
    root = paper_table(tmp_path, PAPER_ROW, PAPER_ROW | {"seed": 2})
    (name, rebuilt), = recheck.published_runs(root, [], [2], root / "recheck")
    here = root / "runs" / name / "summary.json"
    here.parent.mkdir(parents=True)
    here.write_text(json.dumps(rebuilt | {"log_ppl": {"medical": 6.25}}))
    runs = dict(recheck.published_runs(root, [], [], root / "recheck"))
    assert runs["medical/N16/deepfusion-no-vaa/s2"]["log_ppl"] == {"medical": 6.25}  # the run here wins
    assert runs["medical/N16/deepfusion-no-vaa/s1"]["log_ppl"] == {"medical": 6.5}


def test_a_paper_table_with_a_missing_config_or_an_unknown_row_says_which(tmp_path):
    root = paper_table(tmp_path, PAPER_ROW)
    (root / "configs" / "medical-N16-s1.toml").unlink()
    with pytest.raises(DataError, match="medical-N16-s1.toml is missing"):
        recheck.published_runs(root, [], [], root / "recheck")
    paper_table(root, PAPER_ROW | {"row": "no such row"})
    with pytest.raises(DataError, match="'no such row' is not one of the paper profile's"):
        recheck.published_runs(root, [], [], root / "recheck")


def test_a_table_header_states_one_thread_setting():
    assert thread_setting({"a s0": 2, "b s0": 2}) == "2 CPU thread(s) in every run"
    mixed = thread_setting({"a s0": 2, "a s1": 2, "b s0": 1})
    assert "this table mixes thread settings: 2 CPU thread(s): a s0, a s1; 1 CPU thread(s): b s0" in mixed
    runs = {("deepfusion", 0): {"log_ppl": {"medical": 6.0, "finance": 5.0}, "threads": 2},
            ("deepfusion", 1): {"log_ppl": {"medical": 6.0, "finance": 5.0}, "threads": 1}}
    for r in runs.values():
        r |= {"qa_log_ppl": r["log_ppl"], "accuracy": r["log_ppl"], "bytes_up": 1e6, "wall_seconds": 1}
    text = pipeline.report({"config": "c.toml", "seeds": [0, 1], "rows": ["deepfusion"], "bench_seconds": 1}, runs)
    assert "this table mixes thread settings" in text.split("\n\n")[1]  # in the header, before the table


def test_bad_recheck_arguments_end_in_one_line(tmp_path, capsys):
    for argv, says in ((["--recheck", str(tmp_path)], "no " + str(tmp_path / "runs")),
                       (["--recheck", str(tmp_path), "--profile", "quick"], "drop --profile"),
                       (["--tolerance", "0.1", "--profile", "quick", "--out", str(tmp_path)], "belong to --recheck"),
                       (["--recheck", str(tmp_path), "--tolerance", "-1"], "--tolerance -1.0: must be >= 0")):
        assert main(["bench", *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
