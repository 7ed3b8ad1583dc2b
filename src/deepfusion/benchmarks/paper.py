"""`deepfusion bench --profile paper` (and `paper-quick`): the paper's evaluation (§V) at the scale of this CPU.

    deepfusion bench --profile paper-quick --out runs/paper-quick     one seed, N = 16 and 32, the main rows
                                                                      (DeepFusion, FedMKT, FedJETS, centralized, floor)
    deepfusion bench --profile paper --out benchmarks/paper           3 seeds, N = 16, 32, 64, 128, every row

Two case studies (§V-A), each its own federation and global MoE (configs/paper-medical.toml, paper-finance.toml):

    medical   qwen_moe       devices of the paper's medical types: GPT-2, GPT-2 Medium, TinyLlama    MedQuAD
    finance   deepseek_moe   devices of its finance types: TinyLlama, OLMo, BLOOM                    TAT-QA

For each case, N and seed (a *cell*) the profile writes the federation (case_config: each device drawn one of its
case's three types at random, sources dealt round-robin, each source's documents shared by its devices in
Dirichlet(1) shares), then runs every row on it. Phase 0 is trained once per cell and replayed by every one-shot
row (replay.UploadReplay), so their differences are the server's alone; the other rows train their own devices
(FedJETS, the multi-round protocol) or none (centralized, public data only). Runs already in OUT are reused: an
interrupted bench continues where it stopped, and the tables are rewritten after every run (paper_report.py).
runs/ and recordings/ stay on the machine that made them; a run measured in OUT/results.json (committed) is
reused too, with the commit it ran at, so the full profile can be continued from a fresh clone. A one-shot row
run there after its cell's DeepFusion row was reused records Phase 0 anew: the same devices, seeds and data.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepfusion.config import default_config_path, load_config

log = logging.getLogger("deepfusion.bench")


@dataclass(frozen=True)
class Case:
    name: str  # also the domain its test text is scored under
    types: tuple[tuple[str, str], ...]  # (family, size): the paper's three device LLMs of this case, at CPU scale
    sources: tuple[str, ...]  # private data sources, dealt to devices round-robin


CASES = {
    "medical": Case("medical", (("gpt2", "small"), ("gpt2", "medium"), ("llama", "tinyllama")),
                    ("medquad:cancergov", "medquad:gard", "medquad:ninds", "medquad:nhlbi")),
    "finance": Case("finance", (("llama", "tinyllama"), ("olmo", "small"), ("bloom", "small")),
                    tuple(f"tatqa:{g}/4" for g in range(4))),
}
# Phase 0 on each device: from its type's public checkpoint, at most 30 steps, local validation every 10
DEVICE_SETTINGS = {"max_steps": 30, "eval_every": 10, "batch_size": 8}


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    quick: bool = True  # also in paper-quick
    sets: tuple[str, ...] = ()


ROWS = (
    Row("DeepFusion", "deepfusion"),
    Row("no VAA", "deepfusion-no-vaa", quick=False),
    Row("logits only", "deepfusion-logits-only", quick=False),
    Row("no clustering", "deepfusion-no-clustering", quick=False),
    Row("OFA-KD", "ofa-kd", quick=False),  # the paper's VAA ablation; quick keeps the federated comparison in 25 min
    Row("FedMKT", "fedmkt"),
    Row("FedJETS", "fedjets"),
    Row("centralized", "centralized-converged"),  # the upper bound: pooled private + public data, early-stopped
    Row("public data only", "proxy-only"),  # the floor: the server alone, rounds x steps on the public set
    Row("multi-round protocol", "multiround-views", quick=False),
)
# local-only, the paper's last reference, needs no run: DeepFusion's device reports score each uploaded model
# on its own source's test text (paper_report.local_only)


@dataclass(frozen=True)
class Profile:
    seeds: tuple[int, ...]
    counts: tuple[int, ...]
    quick: bool


PROFILES = {"paper": Profile((0, 1, 2), (16, 32, 64, 128), quick=False),
            "paper-quick": Profile((0,), (16, 32), quick=True)}


# ---- the federations -----------------------------------------------------------------------------------

def case_devices(case: Case, n: int, seed: int) -> list[dict]:
    """N devices: device i reads source i mod S and is one of the case's three types, drawn at random per seed."""
    rng = np.random.default_rng([seed, n, zlib.crc32(case.name.encode())])
    kinds = rng.integers(len(case.types), size=n)
    return [{"id": f"{case.name[:3]}-{i:03d}", "source": case.sources[i % len(case.sources)],
             "family": case.types[k][0], "size": case.types[k][1], **DEVICE_SETTINGS} for i, k in enumerate(kinds)]


def case_config_text(case: Case, n: int, seed: int) -> str:
    """The case's shipped config with its [[devices]] replaced by this cell's N devices."""
    template = default_config_path(f"paper-{case.name}").read_text()
    head = template.split("\n[[devices]]")[0].split("\n# N = ")[0].rstrip() + "\n"  # the template's own devices go
    return head + "".join("\n[[devices]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in d.items())
                          for d in case_devices(case, n, seed))


def _toml(v) -> str:
    return json.dumps(v)  # the values here are strings and integers, whose JSON is also TOML


def case_config_path(out: Path, case: Case, n: int, seed: int) -> Path:
    return out / "configs" / f"{case.name}-N{n}-s{seed}.toml"


def write_case_config(out: Path, case: Case, n: int, seed: int) -> Path:
    path = case_config_path(out, case, n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = case_config_text(case, n, seed)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


# ---- the runs ------------------------------------------------------------------------------------------

def plan(profile: Profile) -> list[tuple[int, Case, int, Row]]:
    """N by N, then seed by seed, case by case, row by row: a stopped bench has its smaller device counts on
    every seed (rows with a std) rather than one seed of everything. DeepFusion first in each cell: it records
    the cell's Phase 0."""
    rows = [r for r in ROWS if r.quick or not profile.quick]
    return [(s, c, n, r) for n in profile.counts for s in profile.seeds for c in CASES.values() for r in rows]


def run_dir(out: Path, case: Case, n: int, row: Row, seed: int) -> Path:
    return out / "runs" / case.name / f"N{n}" / row.method / f"s{seed}"


def run_one(out: Path, case: Case, n: int, row: Row, seed: int) -> dict:
    from deepfusion.engines.local import run

    where = run_dir(out, case, n, row, seed)
    if not (where / "summary.json").is_file():
        cfg = load_config(write_case_config(out, case, n, seed), [*row.sets, f"seed={seed}"], method=row.method)
        log.info("bench paper: %s N=%d %s seed %d", case.name, n, row.label, seed)
        run(cfg, where, progress=False, replay=out / "recordings")
        # a finished run needs no resume checkpoint: at N = 128 it holds every upload again (hundreds of MB a run)
        shutil.rmtree(where / "checkpoint", ignore_errors=True)
    return json.loads((where / "summary.json").read_text())


def run_bench(out: Path, profile_name: str = "paper", seeds: list[int] | None = None) -> dict:
    """Run (or reuse) every planned run; results.json, results.csv, RESULTS.md and the figures are rewritten
    after each, so a stopped bench still reports what it has."""
    from deepfusion.benchmarks import paper_report

    profile = PROFILES[profile_name]
    if seeds:
        profile = Profile(tuple(seeds), profile.counts, profile.quick)
    out.mkdir(parents=True, exist_ok=True)
    start, runs, earlier = time.perf_counter(), [], measured(out)
    projection = paper_scale_projection(out)
    failed: dict[str, str] = {}
    planned = plan(profile)
    keys = [(c.name, n, r.label, s) for s, c, n, r in planned]
    # runs an earlier bench measured outside this plan (other seeds, say) stay in the results; those inside it
    # wait in `pending` (plan order) until the loop reaches them, so a stopped bench still lists them all
    others = [r for k, r in earlier.items() if k not in set(keys)]
    pending = {k: earlier[k] for k in keys if k in earlier}
    for i, ((seed, case, n, row), key) in enumerate(zip(planned, keys)):
        t = time.perf_counter()
        pending.pop(key, None)
        try:
            if key in earlier and not (run_dir(out, case, n, row, seed) / "summary.json").is_file():
                runs.append(earlier[key])
            else:
                summary = run_one(out, case, n, row, seed)
                runs.append(paper_report.figures(summary, case.name, n, row.label, seed,
                                                 round(time.perf_counter() - t, 1)))
        except Exception as e:  # one broken run (a method's bug, too few documents at large N) costs its row only
            failed[f"{case.name} N={n} {row.label} s{seed}"] = f"{type(e).__name__}: {e}"
            log.error("bench paper: %s N=%d %s seed %d failed: %s", case.name, n, row.label, seed, e)
        results = {"profile": profile_name, "seeds": sorted({*profile.seeds, *(r["seed"] for r in others)}),
                   "counts": sorted({*profile.counts, *(r["n"] for r in others)}),
                   "cases": list(CASES), "rows": [r.label for r in ROWS if r.quick or not profile.quick],
                   "runs": others + runs + list(pending.values()), "failed": failed, "projection": projection,
                   "bench_seconds": round(time.perf_counter() - start, 1)}
        cell_done = i + 1 == len(planned) or planned[i + 1][:3] != (seed, case, n)
        paper_report.write(out, results, plots=cell_done)  # the figures once per cell: they take seconds
    return results


def measured(out: Path) -> dict[tuple[str, int, str, int], dict]:
    """(case, N, row, seed) -> a run's figures from an earlier OUT/results.json (empty when there is none)."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    return {(r["case"], r["n"], r["row"], r["seed"]): r for r in json.loads(path.read_text())["runs"]}


def paper_scale_projection(out: Path) -> dict:
    """Figs. 7-8 arithmetic at the paper's own model sizes (paper_scale.py, about a minute), made once per OUT."""
    from deepfusion.benchmarks import paper_scale

    path = out / "paper_scale.json"
    return json.loads(path.read_text()) if path.is_file() else paper_scale.project(out)
