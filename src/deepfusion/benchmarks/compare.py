"""`deepfusion bench --profile quick|full`: the paper's comparison at CPU scale, every method side by side.

    deepfusion bench --profile quick --out DIR    both global families, every method, one seed
    deepfusion bench --profile full  --out DIR    3 seeds, λ tuned per method, paired differences, ablations,
                                                  heterogeneity sweep

Every run sees the same data, splits, tokenizer and budgets (configs/bench-quick.toml). The knowledge
methods replay one recording of the devices' uploads per seed (replay.py), so they distil identical
knowledge: a paired comparison. Budgets: each round the global model trains on server.steps x
server.batch_size blocks, whatever the method (README: Methods). A run already in DIR is reused, so an
interrupted bench continues where it stopped.

Writes DIR/results.json (every run), DIR/results.csv and DIR/RESULTS.md (the table, mean ± std over
seeds, paired differences, targets met or missed) and DIR/*.png (report.py).
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from pathlib import Path

from deepfusion.config import (GLOBAL_FAMILIES, HOSTING_METHODS, KNOWLEDGE_METHODS, FederationConfig, default_config_path,
                               load_config)

log = logging.getLogger("deepfusion.bench")

FAMILIES = GLOBAL_FAMILIES
VIEWS = "multiround-views"  # the method the bench's targets, pairs and sweeps are about
OTHER_KD = tuple(m for m in KNOWLEDGE_METHODS if m != VIEWS)  # the distillation baselines VIEWS is paired with
# Table order: the upper bounds, the federated-MoE baselines, the floor, the distillation methods, the reference
# (local-only is read off the VIEWS run just before it). The one-shot methods have their own bench (pipeline.py).
METHODS = ("centralized-converged", "centralized", *HOSTING_METHODS, "proxy-only", *OTHER_KD[::-1], VIEWS, "local-only")
LAMBDAS = (0.5, 1.0, 2.0, 4.0)  # the grid each distillation method's λ is tuned over (full profile)


def run_one(base: FederationConfig, root: Path, family: str, method: str, seed: int, tag: str = "",
            change=None) -> dict:
    """One federation run (reused if DIR already holds it); returns its row of raw measurements."""
    from deepfusion.engines.local import run

    cfg = copy.deepcopy(base)
    cfg.method, cfg.seed, cfg.server.family = method, seed, family
    if change:
        change(cfg)
    out = root / "runs" / (tag or "main") / family / f"{method}-s{seed}"
    if not (out / "summary.json").is_file():
        log.info("bench: %s %s seed %d %s", family, method, seed, tag)
        run(cfg, out, progress=False, replay=root / "recordings" if method in KNOWLEDGE_METHODS else None)
    return row(json.loads((out / "summary.json").read_text()), out, family, tag)


def per_device_round(per_device: dict) -> list[dict]:
    """One entry per (device, round): a fedjets device's round-1 usage probe is its own ledger entry, counted
    with the round it belongs to (else the average per device per round would come out low)."""
    merged: dict[tuple[str, int], dict] = {}
    for d, v in per_device.items():
        for x in v["rounds"]:
            m = merged.setdefault((d, x["round"]), {"up": 0, "down": 0})
            m["up"], m["down"] = m["up"] + x["up"], m["down"] + x["down"]
    return list(merged.values())


def row(summary: dict, out: Path, family: str, tag: str) -> dict:
    """The measurements a table needs from one run's summary.json and metrics.jsonl."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per = summary["comm_bytes"]["per_device"]
    rounds = per_device_round(per)
    device_seconds = sum(x["seconds_devices"] for x in lines)
    return {
        "tag": tag, "method": summary["method"], "family": family, "seed": summary["seed"],
        "lam": summary["config"]["server"]["lam"], "ppl": summary["ppl"],
        "validation_ppl": summary.get("validation_ppl"), "rounds": summary["rounds"],
        "bytes_total": summary["comm_bytes"]["up"] + summary["comm_bytes"]["down"],
        "bytes_per_device_round": (sum(x["up"] + x["down"] for x in rounds) / len(rounds)) if rounds else 0,
        "device_peak_mem_bytes": max(summary["device_peak_mem_bytes"].values(), default=0),
        # a replayed run did not spend its devices' time again: add what the recording measured
        "wall_seconds": summary["wall_seconds"] + (device_seconds if "replayed_from" in summary else 0),
        "ppl_by_round": [x["ppl"] for x in lines], "bytes_by_round": [x["bytes_up"] for x in lines],
        "devices": summary.get("devices", {}), "converged": summary.get("converged"),
        "threads": summary.get("provenance", {}).get("threads"),  # report.thread_setting: one setting per table
    }


def host_steps_rows(base: FederationConfig, root: Path, seeds: list[int]) -> list[dict]:
    """fedavg-moe and expert-subset given each device's own local_steps per round instead of a share of the
    matched budget (qwen_moe): K times the tokens, to show what the matched budget costs them."""
    steps = max(d.local_steps for d in base.devices)
    return [run_one(base, root, "qwen_moe", method, seed, tag=f"host_steps={steps}",
                    change=lambda c: setattr(c.server, "host_steps", steps))
            for seed in seeds for method in HOSTING_METHODS]


def local_only_row(knowledge: dict) -> dict:
    """local-only, read off a knowledge run: its devices trained exactly as local-only's do (labelling the proxy
    does not change a model), and each reported its own model's perplexity on its domain's test text. A
    domain's figure is the mean over its devices, as `deepfusion run --method local-only` reports it."""
    by_domain: dict[str, list[float]] = {}
    for d in knowledge["devices"].values():
        by_domain.setdefault(d["domain"], []).append(d["ppl_own_domain"])
    return {**knowledge, "method": "local-only", "lam": None, "validation_ppl": None, "bytes_total": 0,
            "bytes_per_device_round": 0, "ppl_by_round": [], "bytes_by_round": [], "wall_seconds": 0.0,
            "ppl": {d: round(statistics.fmean(v), 2) for d, v in by_domain.items()}}


def tune_lambda(base: FederationConfig, root: Path, family: str, method: str) -> float:
    """The λ of LAMBDAS with the best validation perplexity (seed 0; never the test split)."""
    from deepfusion.baselines.centralized import validation_score

    scores = {}
    for lam in LAMBDAS:
        r = run_one(base, root, family, method, 0, tag=f"tune-lam{lam}", change=lambda c: setattr(c.server, "lam", lam))
        scores[lam] = validation_score(r["validation_ppl"])
    best = min(scores, key=scores.get)
    log.info("bench: %s %s: validation score by λ %s -> λ = %s", family, method, scores, best)
    return best


def main_table(base: FederationConfig, root: Path, seeds: list[int], tune: bool) -> tuple[list[dict], dict]:
    """Every method x family x seed. The multiround-views run of each seed records the devices' uploads first."""
    rows, lams = [], {}
    for family in FAMILIES if tune else ():
        for method in KNOWLEDGE_METHODS:
            lams[family, method] = tune_lambda(base, root, family, method)
    for seed in seeds:
        for family in FAMILIES:
            for method in METHODS:
                if method == "local-only":  # the knowledge runs' devices are local-only's: same seeds, same steps
                    rows.append(local_only_row(next(r for r in rows if (r["method"], r["family"], r["seed"]) ==
                                                    (VIEWS, family, seed))))
                    continue
                lam = lams.get((family, method), base.server.lam)
                rows.append(run_one(base, root, family, method, seed, change=lambda c, lam=lam: setattr(c.server, "lam", lam)))
    return rows, {f"{f}/{m}": v for (f, m), v in lams.items()}


# ---- ablations and the heterogeneity sweep (full profile) ---------------------------------------

def _uniform(c: FederationConfig) -> None:  # every device the same model
    for d in c.devices:
        d.family, d.size = "qwen2", "small"


def _two_families(c: FederationConfig) -> None:  # two families, one size
    for i, d in enumerate(c.devices):
        d.family, d.size = ("qwen2", "llama")[i % 2], "small"


def _miscalibrated(c: FederationConfig) -> None:  # the default mix, half the devices trained 6x less: flatter predictions
    for i, d in enumerate(c.devices):
        d.local_steps = max(1, d.local_steps // 6) if i % 2 else d.local_steps


# multiround-views (qwen_moe) with one knob changed at a time, device-kd beside it (k and T change the devices' side).
ABLATIONS = {
    "views_stages=2": lambda c: setattr(c.server, "views_stages", 2),
    "views_dim=4": lambda c: setattr(c.server, "views_dim", 4),
    "views_dim=64": lambda c: setattr(c.server, "views_dim", 64),
    "views_mix=1.0": lambda c: setattr(c.server, "views_mix", 1.0),
    "reliability=off": lambda c: setattr(c.server, "reliability", False),
    "topk=2": lambda c: setattr(c.knowledge, "topk", 2),
    "topk=32": lambda c: setattr(c.knowledge, "topk", 32),
    "temperature=2": lambda c: setattr(c.knowledge, "temperature", 2.0),
}
# From one family and size to mixed families, sizes and calibration: where do the logit views beat device-kd?
HETEROGENEITY = {"1-uniform": _uniform, "2-families": _two_families, "3-families+sizes": None,
                 "4-+calibration": _miscalibrated}


def sweep(base: FederationConfig, root: Path, seeds: list[int], prefix: str, changes: dict) -> list[dict]:
    """multiround-views and device-kd (paired, replayed) under each change, qwen_moe."""
    return [run_one(base, root, "qwen_moe", method, seed, tag=f"{prefix}-{name}", change=change)
            for name, change in changes.items() for seed in seeds for method in (VIEWS, "device-kd")]


# ---- summarising ------------------------------------------------------------------------------------

def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(rows: list[dict]) -> list[dict]:
    """One line per (tag, family, method): mean ± std over seeds of every measurement."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["tag"], r["family"], r["method"]), []).append(r)
    out = []
    for (tag, family, method), rs in groups.items():
        line = {"tag": tag, "family": family, "method": method, "seeds": sorted(r["seed"] for r in rs), "lam": rs[0]["lam"],
                "capped": any(r.get("converged") is False for r in rs)}
        for domain in ("medical", "finance"):
            line[f"ppl_{domain}"] = mean_std([r["ppl"][domain] for r in rs])
        for key in ("bytes_total", "bytes_per_device_round", "device_peak_mem_bytes", "wall_seconds"):
            line[key] = statistics.fmean(r[key] for r in rs)
        out.append(line)
    return out


def paired(rows: list[dict], a: str, b: str, family: str, tag: str = "", tag_b: str | None = None) -> dict:
    """Per domain: mean ± std over seeds of (ppl_a / ppl_b - 1) in %, same seed paired; negative: a wins.
    a's runs come from `tag`, b's from `tag_b` (default: the same tag)."""
    tag_b = tag if tag_b is None else tag_b
    runs = {(r["method"], r["tag"], r["seed"]): r for r in rows if r["family"] == family}
    seeds = sorted(s for m, t, s in runs if (m, t) == (a, tag) and (b, tag_b, s) in runs)
    diffs = {}
    for domain in ("medical", "finance"):
        diffs[domain] = mean_std([100 * (runs[a, tag, s]["ppl"][domain] / runs[b, tag_b, s]["ppl"][domain] - 1)
                                  for s in seeds]) if seeds else None
    return {"a": a, "b": b, "family": family, "tag": tag_b, "seeds": seeds, "pct": diffs}


def _shown(path: Path) -> str:
    """A path as a reader of RESULTS.md can use it: relative to the working directory when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def run_bench(profile: str, out: Path, config: Path | None = None, seeds: list[int] | None = None) -> dict:
    """Run the quick or full profile and write its results; returns the results object."""
    from deepfusion.benchmarks import report

    out.mkdir(parents=True, exist_ok=True)
    base = load_config(config or default_config_path("bench-quick"))
    seeds = seeds or ([0] if profile == "quick" else [0, 1, 2])
    start = time.perf_counter()
    rows, lams = main_table(base, out, seeds, tune=profile == "full")
    extra = host_steps_rows(base, out, seeds)
    if profile == "full":
        extra += sweep(base, out, seeds, "ablation", ABLATIONS) + sweep(base, out, seeds, "hetero", HETEROGENEITY)
    pairs = [paired(rows, VIEWS, b, f) for f in FAMILIES for b in (*OTHER_KD, *HOSTING_METHODS, "centralized-converged")]
    for tag in sorted({r["tag"] for r in extra}):
        if tag.startswith("host_steps"):  # main multiround-views against the hosts given more steps
            pairs += [paired(rows + extra, VIEWS, m, "qwen_moe", "", tag) for m in HOSTING_METHODS]
        else:
            pairs.append(paired(extra, VIEWS, "device-kd", "qwen_moe", tag))
    results = {"profile": profile, "config": _shown(config or default_config_path("bench-quick")), "seeds": seeds,
               "lambda": lams, "rows": rows + extra, "table": aggregate(rows + extra), "paired": pairs,
               "bench_seconds": round(time.perf_counter() - start, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report.write(results, out)
    return results
