"""The paper profile: its federations (paper.py) and its report (paper_report.py), on made-up summaries."""

import json
import math
import statistics
import tomllib

import pytest

from deepfusion.benchmarks import paper, paper_report
from deepfusion.config import default_config_path, load_config


@pytest.mark.parametrize("case", list(paper.CASES))
def test_the_shipped_case_config_is_the_profiles_n16_seed0_federation(case):
    shipped = load_config(default_config_path(f"paper-{case}"))
    made = paper.case_devices(paper.CASES[case], 16, 0)
    assert [(d.id, d.source, d.family, d.size, d.max_steps) for d in shipped.devices] == \
        [(d["id"], d["source"], d["family"], d["size"], d["max_steps"]) for d in made]


def test_devices_draw_the_cases_types_and_deal_sources_round_robin():
    case = paper.CASES["finance"]
    devices = paper.case_devices(case, 128, 1)
    assert len({d["id"] for d in devices}) == 128
    assert {(d["family"], d["size"]) for d in devices} == set(case.types)  # all three types at N = 128
    assert [d["source"] for d in devices[:5]] == [*case.sources, case.sources[0]]
    assert devices != paper.case_devices(case, 128, 2)  # another seed, other types
    assert devices == paper.case_devices(case, 128, 1)  # reproducible


def test_a_cells_config_has_its_n_devices_and_nothing_of_the_template_list(tmp_path):
    path = paper.write_case_config(tmp_path, paper.CASES["medical"], 32, 0)
    text = path.read_text()
    assert "# N = 16" not in text and text.count("[[devices]]") == 32
    cfg = load_config(path, ["seed=0"], method="fedjets")
    assert len(cfg.devices) == 32 and cfg.server.family == "qwen_moe"
    assert tomllib.loads(text)["data"]["private_split"] == "uneven"


def test_quick_plans_the_main_rows_on_one_seed_and_records_phase0_first():
    runs = paper.plan(paper.PROFILES["paper-quick"])
    assert {s for s, *_ in runs} == {0} and {n for _, _, n, _ in runs} == {16, 32}
    assert runs[0][3].method == "deepfusion"
    assert {r.label for *_, r in runs} == {"DeepFusion", "FedMKT", "FedJETS", "centralized", "public data only"}
    full = paper.plan(paper.PROFILES["paper"])
    assert len(full) == 3 * 2 * 4 * len(paper.ROWS)
    assert [n for _, _, n, _ in full] == sorted(n for _, _, n, _ in full)  # N by N: every seed of N = 16 first


# ---- the report, from summaries made up so that each verdict is known ---------------------------------

def summary(method: str, case: str, log_ppl: float, acc: float, up: int, peak: int, threads: int = 2) -> dict:
    devices = {"d0": {"arch": "gpt2/small", "ppl_own_source": math.exp(log_ppl + 1)}} if method == "deepfusion" else {}
    return {"method": method, "log_ppl": {case: log_ppl}, "accuracy": {case: acc}, "qa_log_ppl": {case: log_ppl + .1},
            "qa_accuracy": {case: acc - 1}, "comm_bytes": {"up": up, "down": 10}, "devices": devices,
            "device_peak_mem_bytes": {"d0": peak}, "wall_seconds": 5.0,
            "phase_seconds": {"phase0": 1, "phase2": 2, "phase3": 3} if method == "deepfusion" else None,
            "provenance": {"threads": threads, "commit": "abc1234def", "torch": "2.13.0", "transformers": "5.25.0"}}


# row -> (log_ppl, accuracy, bytes up, peak): DeepFusion beats FedJETS and FedMKT, loses to OFA-KD
MADE = {"DeepFusion": ("deepfusion", 5.0, 20.0, 1000, 100), "OFA-KD": ("ofa-kd", 4.9, 21.0, 1000, 100),
        "FedMKT": ("fedmkt", 5.5, 15.0, 50, 100), "FedJETS": ("fedjets", 5.6, 14.0, 4000, 400),
        "centralized": ("centralized-converged", 4.5, 21.0, 0, 0), "public data only": ("proxy-only", 6.0, 10.0, 0, 0)}


def results(threads=(2,)) -> dict:
    runs = []
    for case in ("medical", "finance"):
        for n in (16, 32):
            for seed, t in zip((0, 1), threads * 2):
                for row, (method, lp, acc, up, peak) in MADE.items():
                    s = summary(method, case, lp - 0.01 * n / 16 - 0.001 * seed, acc, up * n, peak, t)
                    runs.append(paper_report.figures(s, case, n, row, seed, 1.0))
    return {"profile": "paper-quick", "seeds": [0, 1], "counts": [16, 32], "cases": ["medical", "finance"],
            "rows": list(MADE), "runs": runs, "failed": {}, "bench_seconds": 1.0}


def verdicts(res: dict) -> dict[str, str]:
    return {c["claim"].split(" (")[0]: c["verdict"] for c in paper_report.claims(res)}


def test_claims_follow_the_numbers():
    v = verdicts(results())
    assert v["DeepFusion beats the federated MoE baselines in log-perplexity"] == "reproduced"
    assert v["DeepFusion beats the federated MoE baselines in accuracy"] == "reproduced"
    assert v["VAA beats OFA-KD and FedMKT"] == "not reproduced"  # OFA-KD wins every cell
    assert v["Less communication than FedJETS"] == "reproduced"
    assert v["FedJETS needs 3.3-9.3× the device memory"] == "reproduced"
    assert v["Better with more devices"] == "reproduced"
    assert v["DeepFusion comes close to centralized training"] == "reproduced"  # 20 / 21 = 95 %
    assert v['The abstract\'s "5.28 %"'] == "not testable here"


def test_one_cell_lost_is_not_reproduced():
    res = results()
    for r in res["runs"]:
        if (r["case"], r["n"], r["row"]) == ("finance", 32, "FedJETS"):
            r["log_ppl"] = 1.0
    assert verdicts(res)["DeepFusion beats the federated MoE baselines in log-perplexity"] == "not reproduced"


def test_more_devices_is_read_on_the_seeds_run_at_every_n_and_waits_for_both_cases():
    res = results()
    assert verdicts(res)["Better with more devices"] == "reproduced"
    # seed 1 (0.001 lower everywhere) run at N = 16 only: seed 0 falls 4.990 -> 4.9895, while the mean over
    # whatever seeds each N has stays at 4.9895 (a change of seeds read as a trend)
    res["runs"] = [r for r in res["runs"] if not (r["n"] == 32 and r["seed"] == 1)]
    for r in res["runs"]:
        if r["row"] == "DeepFusion" and r["n"] == 32:
            r["log_ppl"] += 0.0095
    claim = next(c for c in paper_report.claims(res) if c["claim"].startswith("Better with more devices"))
    assert claim["verdict"] == "reproduced" and "medical, seed 0 at N = 16 / 32: 4.990 → 4.990" in claim["ours"]
    res["runs"] = [r for r in res["runs"] if not (r["case"] == "finance" and r["n"] == 32)]
    claim = next(c for c in paper_report.claims(res) if c["claim"].startswith("Better with more devices"))
    assert claim["verdict"] == "not testable here" and "finance" not in claim["ours"]


def test_a_claim_without_its_rows_is_not_testable():
    res = results()
    res["runs"] = [r for r in res["runs"] if r["row"] != "FedJETS"]
    v = verdicts(res)
    assert v["FedJETS needs 3.3-9.3× the device memory"] == "not testable here"
    assert v["Less communication than FedJETS"] == "not testable here"


def test_the_report_writes_every_file_and_says_when_threads_mix(tmp_path):
    res = results()
    paper_report.write(tmp_path, res)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "Table I analogue" in md and "Fig. 8 analogue" in md and "mixes thread settings" not in md
    assert "| medical | FedJETS compact MoE | 0 | 1 |" in md or "FedJETS compact MoE" in md
    assert all((tmp_path / p).stat().st_size > 1000 for p in paper_report.PLOTS)
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(res["runs"])
    assert json.loads((tmp_path / "results.json").read_text())["counts"] == [16, 32]
    assert "mixes thread settings" in paper_report.markdown(results(threads=(1, 2)))
    assert "torch 2.13.0, transformers 5.25.0, 2 CPU thread(s)" in md  # the versions the runs recorded


def test_the_header_names_each_transformers_version_and_rows_that_did_not_record_one():
    res = results()
    res["runs"][0]["transformers"] = None  # a row from before runs recorded it
    assert "transformers 5.25.0 / not recorded" in paper_report.markdown(res)


def test_local_only_is_read_from_deepfusions_device_reports():
    res = results()
    md = paper_report.markdown(res)
    line = next(x for x in md.splitlines() if x.startswith("| medical | local only |"))
    # log(ppl_own_source) = log_ppl + 1: at N = 16, seeds 0 and 1, 5.99 and 5.989
    assert line.split(" | ")[2] == f"{(5.99 + 5.989) / 2:.3f} ± {statistics.stdev([5.99, 5.989]):.3f}"


def test_a_failing_run_costs_its_row_only(tmp_path, monkeypatch):
    calls = []

    def fake_run(out, case, n, row, seed):
        calls.append(row.method)
        if row.method == "fedmkt":
            raise RuntimeError("boom")
        label = next(k for k, v in MADE.items() if v[0] == row.method) if row.method in {v[0] for v in MADE.values()} else None
        method, lp, acc, up, peak = MADE[label] if label else (row.method, 5.0, 20.0, 1, 1)
        return summary(method, case.name, lp, acc, up, peak)

    monkeypatch.setattr(paper, "run_one", fake_run)
    monkeypatch.setattr(paper, "paper_scale_projection", lambda out: {})  # its own tests: test_paper_scale.py
    plotted = []
    monkeypatch.setattr(paper_report, "plot", lambda out, res: plotted.append(len(res["runs"])))
    res = paper.run_bench(tmp_path, "paper-quick")
    assert len(plotted) == 4  # once per (case, N) cell
    assert len(calls) == 2 * 2 * len([r for r in paper.ROWS if r.quick])
    assert len(res["failed"]) == 4 and all("boom" in v for v in res["failed"].values())
    assert "## Runs that failed" in (tmp_path / "RESULTS.md").read_text()


def test_the_claims_quote_the_projection_at_the_papers_sizes():
    res = results()
    res["projection"] = {"settings": {"fedjets_rounds": 10}, "memory": [{"ratio": 2.4}, {"ratio": 15.2}],
                         "traffic": [{"case": "medical", "reduction_vs_fedjets_pct": 99.0},
                                     {"case": "medical", "reduction_vs_fedjets_pct": 98.0}]}
    ours = {c["claim"].split(" (")[0]: c["ours"] for c in paper_report.claims(res)}
    assert ours["Less communication than FedJETS"].endswith("at the paper's sizes (FedJETS 10 rounds): medical -99%")
    assert ours["FedJETS needs 3.3-9.3× the device memory"].endswith("at the paper's sizes: 2.4-15.2×")


def test_runs_in_a_committed_results_json_are_reused_on_a_fresh_clone(tmp_path, monkeypatch):
    def fake_run(out, case, n, row, seed):
        method, lp, acc, up, peak = MADE.get(row.label, (row.method, 5.0, 20.0, 1, 1))
        return summary(method, case.name, lp, acc, up, peak)

    monkeypatch.setattr(paper, "run_one", fake_run)
    monkeypatch.setattr(paper, "paper_scale_projection", lambda out: {})
    monkeypatch.setattr(paper_report, "plot", lambda out, res: None)
    first = paper.run_bench(tmp_path, "paper-quick")
    kept = [r for r in first["runs"] if r["n"] == 16]  # a bench stopped after its N = 16 cells
    old = {**first, "runs": [{**r, "commit": "0ld0ld0"} for r in kept]}
    (tmp_path / "results.json").write_text(json.dumps(old))
    calls = []
    monkeypatch.setattr(paper, "run_one", lambda out, case, n, row, seed: calls.append((case.name, n)) or
                        fake_run(out, case, n, row, seed))
    again = paper.run_bench(tmp_path, "paper-quick")
    assert set(calls) == {("medical", 32), ("finance", 32)}  # only what the earlier bench had not measured
    assert [r["commit"] for r in again["runs"] if r["n"] == 16] == ["0ld0ld0"] * len(kept)  # each keeps its commit
    assert len(again["runs"]) == len(first["runs"])


def test_a_bench_on_other_seeds_keeps_the_runs_it_did_not_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(paper, "run_one", lambda out, case, n, row, seed: summary(row.method, case.name, 5.0 + seed,
                                                                                   20.0, 1, 1))
    monkeypatch.setattr(paper, "paper_scale_projection", lambda out: {})
    monkeypatch.setattr(paper_report, "plot", lambda out, res: None)
    first = paper.run_bench(tmp_path, "paper-quick")
    seen = []  # what results.json holds after each run: never less than it held before
    monkeypatch.setattr(paper_report, "write", lambda out, res, plots: seen.append(len(res["runs"])))
    again = paper.run_bench(tmp_path, "paper-quick", seeds=[1])
    assert seen[0] == len(first["runs"]) + 1 and seen == sorted(seen)
    assert {r["seed"] for r in again["runs"]} == {0, 1} and again["seeds"] == [0, 1]
    assert len(again["runs"]) == 2 * len(first["runs"])


def test_runs_measured_before_but_planned_later_stay_in_the_results_until_reached(tmp_path, monkeypatch):
    monkeypatch.setattr(paper, "run_one", lambda out, case, n, row, seed: summary(row.method, case.name, 5.0, 20.0,
                                                                                   1, 1))
    monkeypatch.setattr(paper, "paper_scale_projection", lambda out: {})
    monkeypatch.setattr(paper_report, "plot", lambda out, res: None)
    first = paper.run_bench(tmp_path, "paper-quick")
    n32 = [r for r in first["runs"] if r["n"] == 32]  # a bench that measured N = 32 only: the plan reaches it last
    (tmp_path / "results.json").write_text(json.dumps({**first, "runs": n32}))
    seen = []
    monkeypatch.setattr(paper_report, "write", lambda out, res, plots: seen.append(len(res["runs"])))
    paper.run_bench(tmp_path, "paper-quick")
    assert seen[0] == len(n32) + 1 and seen[-1] == len(first["runs"]) and seen == sorted(seen)


def test_a_cell_gives_mean_and_an_unsigned_std():
    assert paper_report.cell([0.1, 0.2], "{:+.3f}") == "+0.150 ± 0.071"
    assert paper_report.cell([-1.0], "{:+.2f}") == "-1.00" and paper_report.cell([]) == "–"
