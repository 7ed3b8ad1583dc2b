"""`deepfusion bench --profile pipeline`: the paper pipeline beside its ablations and the multi-round protocol.

Every row runs the default federation (configs/default.toml) with one change, for each seed; the one-shot rows
of a seed replay one recording of Phase 0 (replay.UploadReplay), so they distil the very same uploads and their
differences are the server's alone (paired). Runs already in OUT are reused: an interrupted bench continues.

    deepfusion bench --profile pipeline --out benchmarks/pipeline [--seeds 0 1 2]

The design rows (DESIGN_ROWS) run on the first seed only.

Writes OUT/results.json (every run's figures) and OUT/RESULTS.md: mean ± std over seeds per row, and each row's
paired (same-seed) difference against deepfusion, with the commit, command, torch threads and wall time.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import torch

from deepfusion.config import default_config_path, load_config

log = logging.getLogger("deepfusion.bench")

# (row, method, config changes): the paper pipeline, its ablations and the other protocol, on every seed
ROWS = (
    ("deepfusion", "deepfusion", ()),
    ("no VAA (α = 0)", "deepfusion-no-vaa", ()),
    ("OFA-KD in VAA's place", "ofa-kd", ()),
    ("logits only (β KL alone)", "deepfusion-logits-only", ()),
    ("multi-round protocol (multiround-views, 3 rounds)", "multiround-views", ("rounds=3", "server.steps=60")),
)
# Our own design choices (DESIGN §8), measured on the first seed only: three more runs a seed cost 15 minutes
DESIGN_ROWS = (
    ("no clustering (random domains)", "deepfusion-no-clustering", ()),
    ("tuning on CE alone (the paper's loss)", "deepfusion", ("tune.loss=ce",)),
    ("random router", "deepfusion", ("tune.router_init=random",)),
)
METRICS = ("log_ppl", "accuracy", "qa_log_ppl", "qa_accuracy")
DOMAINS = ("medical", "finance")


def plan(seeds: list[int]) -> list[tuple[str, str, tuple[str, ...], int]]:
    """Every row on every seed, seed by seed, then the design rows on the first seed."""
    return ([(row, method, sets, s) for s in seeds for row, method, sets in ROWS]
            + [(row, method, sets, seeds[0]) for row, method, sets in DESIGN_ROWS])


def run_one(out: Path, config: Path, row: str, method: str, sets: tuple[str, ...], seed: int) -> dict:
    from deepfusion.engines.local import run

    cfg = load_config(config, [*sets, f"seed={seed}"], method=method)
    where = out / "runs" / _slug(row) / f"s{seed}"
    if not (where / "summary.json").is_file():
        log.info("bench pipeline: %s seed %d", row, seed)
        run(cfg, where, progress=False, replay=out / "recordings")
    summary = json.loads((where / "summary.json").read_text())
    if "log_ppl" not in summary:  # a run from before every summary carried the paper's figures: measure its model
        summary |= figures_of_model(cfg, where / "model")
    return summary


def figures_of_model(cfg, model_dir: Path) -> dict:
    """The paper's figures (evaluation.paper_figures) of an exported model, on the run's own test and QA sets."""
    from deepfusion.evaluation import paper_figures
    from deepfusion.federation import prepare_data
    from deepfusion.models import load_model

    data = prepare_data(cfg, private=False)
    model = load_model(model_dir, torch.device("cpu"))
    return paper_figures(model, data.test_sets, data.qa_sets, torch.device("cpu"))


def _slug(row: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in row.split(" (")[0].lower()).strip("-")


def figures(summary: dict) -> dict:
    """What a table reads from one run: the paper's figures per domain (log-ppl = mean NLL; QA: answers only)."""
    return {"ppl": summary["ppl"], **{m: summary[m] for m in METRICS}, "wall_seconds": summary["wall_seconds"],
            "bytes_up": summary["comm_bytes"]["up"], "threads": summary.get("provenance", {}).get("threads")}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_bench(out: Path, config: Path | None = None, seeds: list[int] | None = None) -> dict:
    """Run (or reuse) every planned run; the tables are rewritten after each, so a stopped bench still reports."""
    out.mkdir(parents=True, exist_ok=True)
    config, seeds, start = Path(config or default_config_path("default")), seeds or [0, 1, 2], time.perf_counter()
    runs: dict[tuple[str, int], dict] = {}
    for row, method, sets, s in plan(seeds):
        runs[row, s] = figures(run_one(out, config, row, method, sets, s))
        results = publish(out, {"config": str(config), "seeds": seeds, "rows": [r for r, *_ in ROWS + DESIGN_ROWS]},
                          runs, start, report)
    return results


def publish(out: Path, head: dict, runs: dict, start: float, report) -> dict:
    """OUT/results.json (head, every (row, seed) run's figures, the bench's seconds) and OUT/RESULTS.md
    (report(results, runs)), rewritten after every run so that a stopped bench still reports."""
    results = {**head, "runs": [{"row": r, "seed": s, **f} for (r, s), f in runs.items()],
               "bench_seconds": round(time.perf_counter() - start, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "RESULTS.md").write_text(report(results, runs))
    return results


def report(results: dict, runs: dict) -> str:
    from deepfusion.benchmarks.report import thread_setting
    from deepfusion.outputs import provenance

    seeds, p = results["seeds"], provenance()
    lines = [f"# The paper pipeline, its ablations and the multi-round protocol (seeds {seeds})", "",
             f"Config `{results['config']}`; commit {p['commit']}, torch {p['torch']}, "
             f"{thread_setting({f'{r} s{s}': f['threads'] for (r, s), f in runs.items()})}; "
             f"bench wall time {results['bench_seconds']:.0f} s "
             "(reused runs count 0; each run's own commit and threads are in its summary.json `provenance`).", "",
             "Command: `deepfusion bench --profile pipeline --out OUT` (each row: `deepfusion run --config "
             "configs/default.toml --method M --seed S [--set ...] --replay OUT/recordings`).", "",
             "Test text and QA answers, per domain, mean ± std over the row's seeds (n; log-ppl = mean NLL: lower is "
             "better; accuracy in %). Paired: the row minus deepfusion on the same seeds, mean ± std. Up MB: what the "
             "devices sent in all; wall s: the run's own seconds (a one-shot row replays Phase 0 after its seed's "
             "first run, so its wall time is the server's alone).", "",
             "| row | n | log-ppl medical | log-ppl finance | QA log-ppl medical | QA log-ppl finance | accuracy medical "
             "| accuracy finance | paired log-ppl medical / finance | up MB | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        done = [s for s in seeds if (row, s) in runs]
        if not done:
            continue
        cost = (f"{statistics.mean(runs[row, s]['bytes_up'] for s in done) / 1e6:.1f} | "
                f"{statistics.mean(runs[row, s]['wall_seconds'] for s in done):.0f}")
        lines.append(f"| {row} | {len(done)} | " + " | ".join(metric_cells(runs, row, done, "deepfusion"))
                     + f" | {cost} |")
    lines += ["", "Per seed, log-ppl medical / finance:", ""]
    for row in results["rows"]:
        per = "; ".join(f"s{s} {runs[row, s]['log_ppl']['medical']:.3f} / {runs[row, s]['log_ppl']['finance']:.3f}"
                        for s in seeds if (row, s) in runs)
        if per:
            lines.append(f"- {row}: {per}")
    return "\n".join(lines) + "\n"


def metric_cells(runs: dict, row: str, done: list[int], base: str) -> list[str]:
    """A row's cells over its seeds `done`: log-ppl, QA log-ppl and accuracy per domain, then its log-ppl paired
    against row `base` on the seeds both have (empty for base itself). Shared by the pipeline and byo reports."""
    cells = [cell([runs[row, s][metric].get(d) for s in done]) for metric in ("log_ppl", "qa_log_ppl", "accuracy")
             for d in DOMAINS]
    both = [s for s in done if (base, s) in runs]
    paired = " / ".join(cell([runs[row, s]["log_ppl"][d] - runs[base, s]["log_ppl"][d] for s in both], signed=True)
                        for d in DOMAINS) if row != base and both else ""
    return cells + [paired]


def cell(xs: list[float | None], signed: bool = False) -> str:
    """mean ± std, or the one value when a row has one seed; n/a where a run lacks the figure."""
    if None in xs:
        return "n/a"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return fmt.format(xs[0]) if len(xs) == 1 else (fmt + " ± {:.3f}").format(*mean_std(xs))
