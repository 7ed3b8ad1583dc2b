"""`deepfusion bench --recheck DIR`: re-run every run a published table was made from; report each figure that moved.

    deepfusion bench --recheck benchmarks/pipeline [--threads 2] [--only deepfusion] [--seeds 0]
                     [--tolerance 0.001] [--recheck-out OUT]

DIR is a profile's output directory (pipeline, quick, full): every DIR/runs/**/summary.json holds the run's
complete `config` and its `provenance` (commit, torch, threads). The runs are not committed (.gitignore): for a
committed table without them, results.json's rows rebuild each run (pipeline profile: pipeline.ROWS and the config
file; paper profiles: paper.ROWS and the cell configs committed in DIR/configs).
Each is re-run from its config into OUT/runs/<same path> (OUT: --recheck-out, default DIR/recheck), replaying
DIR/recordings where the run's device side is recorded there, as the bench did (one-shot rows distil the very same
uploads); else recording afresh into OUT/recordings. Then the paper's figures (log_ppl, accuracy, qa_log_ppl, qa_accuracy per domain, and ppl)
are compared with the published summary's.

Comparison: summary.json stores every figure rounded to 4 significant digits (evaluation._round), and that is
what is compared. --tolerance 0 (the default): a figure must equal its published digits. --tolerance t: it may
move by |now / published - 1| <= t (one unit in the 4th digit is 0.01-0.1 %). A run is DIFFERS when any of its
figures moves beyond that, or a published figure is missing now.

The thread count alone moves results (issue 10): each row says when the run was published under another thread
count (or commit) than the recheck's; --threads N runs the recheck under the published setting.

Writes DIR/recheck.json and DIR/RECHECK.md (the table); `deepfusion bench` prints it and exits 1 when any run
differs. A rerun already in OUT of the same config, made at the same commit, torch and thread count is reused: an
interrupted recheck continues (delete OUT to start over).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch

from deepfusion.errors import ConfigError, DataError

log = logging.getLogger("deepfusion.bench")

FIGURES = ("log_ppl", "accuracy", "qa_log_ppl", "qa_accuracy", "ppl")


def recheck(root: Path, out: Path | None = None, tolerance: float = 0.0, only: list[str] | None = None,
            seeds: list[int] | None = None, threads: int | None = None, command: str = "",
            data_dir: str | None = None) -> dict:
    """Re-run, compare, write DIR/recheck.json and DIR/RECHECK.md; returns the recheck object."""
    root, out = Path(root), Path(out) if out else Path(root) / "recheck"
    check(root, tolerance, threads)
    published = published_runs(root, only or [], seeds or [], skip=out)
    before = torch.get_num_threads()
    if threads:  # the published setting, forced: the thread count alone moves results
        torch.set_num_threads(threads)
    try:
        from deepfusion.outputs import provenance

        now = provenance()
        runs = [compare(name, then, *rerun(root, out, name, then, now, data_dir), tolerance)
                for name, then in published]
    finally:
        torch.set_num_threads(before)
    result = {"dir": str(root), "out": str(out), "command": command, "tolerance": tolerance,
              "now": {k: now[k] for k in ("commit", "dirty", "torch", "threads")}, "runs": runs,
              "differ": sum(r["differs"] for r in runs)}
    (root / "recheck.json").write_text(json.dumps(result, indent=1))
    (root / "RECHECK.md").write_text(markdown(result))
    return result


def check(root: Path, tolerance: float, threads: int | None) -> None:
    if not (tolerance >= 0):  # also refuses nan
        raise ConfigError(f"--tolerance {tolerance}: must be >= 0 (a relative change, e.g. 0.001 = 0.1 %)")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: must be >= 1 (the CPU threads torch may use)")
    if not (root / "runs").is_dir() and not (root / "results.json").is_file():
        raise DataError(f"--recheck {root}: no {root / 'runs'} and no results.json; give a profile's output "
                        "directory (the --out of `deepfusion bench --profile ...`)")


def published_runs(root: Path, only: list[str], seeds: list[int], skip: Path) -> list[tuple[str, dict]]:
    """(path under DIR/runs, summary) of each run to recheck: DIR/runs/**/summary.json, and (the runs stay on
    the machine that made them: .gitignore) what results.json says of the runs DIR/runs lacks (from_results)."""
    found = []
    for path in sorted((root / "runs").rglob("summary.json")):
        if skip.resolve() not in path.resolve().parents:  # a recheck-out inside DIR/runs holds reruns, not the table
            found.append((path.parent.relative_to(root / "runs").as_posix(), _read(path)))
    here = {name for name, _ in found}
    found += [(name, summary) for name, summary in from_results(root, fallback=not found) if name not in here]
    found = [(name, summary) for name, summary in found if (not only or any(o in name for o in only))
             and (not seeds or summary.get("seed") in seeds)]
    if not found:
        raise ConfigError(f"--recheck {root}: no run under {root / 'runs'} matches"
                          + (f" --only {' '.join(only)}" if only else "") + (f" --seeds {seeds}" if seeds else ""))
    return found


def _read(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
        summary["config"]["devices"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}: no readable config (not a summary.json written by `deepfusion run`)") from None
    return summary


def from_results(root: Path, fallback: bool) -> list[tuple[str, dict]]:
    """A committed table's runs that DIR/runs lacks: results.json names each run, and the pipeline and paper
    profiles say how each was configured. The published figures and threads are results.json's. A paper cell's
    config is committed as written, so its rows always count; the pipeline's are rebuilt on today's config file,
    so only as the fallback when DIR/runs holds nothing."""
    from deepfusion.benchmarks import paper

    if not (root / "results.json").is_file():
        return []
    results = json.loads((root / "results.json").read_text())
    runs = results.get("runs") if isinstance(results.get("runs"), list) else []
    if runs and results.get("profile") in paper.PROFILES:
        checked: set[Path] = set()  # each cell's config is compared with today's once, not once per row
        return [_paper_run(root, r, checked) for r in runs]
    return _pipeline_runs(results, runs, root) if fallback else []


def _pipeline_runs(results: dict, runs: list[dict], root: Path) -> list[tuple[str, dict]]:
    """pipeline.ROWS gives each row's method and config changes on results.json's config (today's file); the
    commit is unknown per run."""
    from deepfusion.benchmarks import pipeline
    from deepfusion.config import load_config, to_dict

    known = {row: (method, sets) for row, method, sets in pipeline.ROWS + pipeline.DESIGN_ROWS}
    if not runs or any(r.get("row") not in known for r in runs):
        raise DataError(f"--recheck {root}: no runs/ here, and results.json is neither the pipeline profile's nor "
                        "the paper profile's (only theirs can be rebuilt from results.json); recheck on the machine "
                        "that holds DIR/runs")
    found = []
    for r in runs:
        method, sets = known[r["row"]]
        cfg = load_config(results["config"], [*sets, f"seed={r['seed']}"], method=method)
        found.append((f"{pipeline._slug(r['row'])}/s{r['seed']}",
                      {"seed": r["seed"], "method": method, "config": to_dict(cfg),
                       **{k: r[k] for k in FIGURES if k in r}, "provenance": {"threads": r.get("threads")}}))
    return found


def _paper_run(root: Path, r: dict, checked: set[Path]) -> tuple[str, dict]:
    """One paper-profile row: its cell's config as the bench wrote it (DIR/configs, committed beside the table),
    the row's method and changes (paper.ROWS), and the row's one-domain figures under its case's domain."""
    from deepfusion.benchmarks import paper
    from deepfusion.config import load_config, to_dict

    rows = {row.label: row for row in paper.ROWS}
    if r.get("case") not in paper.CASES or r.get("row") not in rows:
        raise DataError(f"--recheck {root}: results.json row {r.get('case')} N={r.get('n')} {r.get('row')!r} is "
                        f"not one of the paper profile's cases {list(paper.CASES)} and rows {list(rows)}")
    case, row = paper.CASES[r["case"]], rows[r["row"]]
    path = paper.case_config_path(root, case, r["n"], r["seed"])
    if not path.is_file():
        raise DataError(f"--recheck {root}: {path} is missing (the bench writes each cell's config there)")
    if path not in checked and path.read_text() != paper.case_config_text(case, r["n"], r["seed"]):
        log.warning("recheck: %s differs from what today's paper bench writes; rechecking the published one", path)
    checked.add(path)
    cfg = load_config(path, [*row.sets, f"seed={r['seed']}"], method=row.method)
    name = paper.run_dir(Path(), case, r["n"], row, r["seed"]).relative_to("runs").as_posix()
    return name, {"seed": r["seed"], "method": row.method, "config": to_dict(cfg),
                  **{k: {case.name: r[k]} for k in FIGURES if r.get(k) is not None},
                  "provenance": {k: r.get(k) for k in ("threads", "commit", "torch")}}


def rerun(root: Path, out: Path, name: str, then: dict, now: dict, data_dir: str | None) -> tuple[dict, Path | None]:
    """The run's config once more, into OUT/runs/NAME: its new summary (reused if OUT already holds it, of this
    config, made at this commit, torch and thread count) and the recordings it replayed or recorded."""
    from deepfusion.config import from_dict
    from deepfusion.engines.local import run

    cfg = from_dict(then["config"])
    where, replay = out / "runs" / name, recordings(root, out, cfg)
    if (where / "summary.json").is_file():
        done = json.loads((where / "summary.json").read_text())
        same = ("commit", "dirty", "torch", "threads")
        if done.get("config") == then["config"] and all(done.get("provenance", {}).get(k) == now[k] for k in same):
            return done, replay
    shutil.rmtree(where, ignore_errors=True)  # a stopped or stale rerun: ours to replace, never DIR's own
    log.info("recheck: %s (method %s, seed %d; uploads: %s)", name, cfg.method, cfg.seed, replay)
    run(cfg, where, data_dir=data_dir, progress=False, replay=replay)
    return json.loads((where / "summary.json").read_text()), replay


def recordings(root: Path, out: Path, cfg) -> Path | None:
    """DIR/recordings where this device side is recorded there (the bench replayed it: same uploads), else
    OUT/recordings (recorded afresh; DIR is never written); None for a method that uploads no knowledge."""
    from deepfusion.config import KNOWLEDGE_METHODS, ONESHOT_METHODS
    from deepfusion.replay import Replay, UploadReplay

    published = root / "recordings"
    if cfg.method in ONESHOT_METHODS and UploadReplay(published, cfg).complete():
        return published
    if cfg.method in KNOWLEDGE_METHODS and Replay(published, cfg).complete(cfg.rounds):
        return published
    return out / "recordings" if cfg.method in (*ONESHOT_METHODS, *KNOWLEDGE_METHODS) else None


def compare(name: str, then: dict, now: dict, uploads: Path | None, tolerance: float) -> dict:
    """One run's figures, published beside rerun, and whether any moved beyond the tolerance."""
    figures = []
    for key in FIGURES:
        for domain in sorted({*(then.get(key) or {}), *(now.get(key) or {})}):
            a, b = (then.get(key) or {}).get(domain), (now.get(key) or {}).get(domain)
            rel = None if a is None or b is None else (b - a) / abs(a) if a else (0.0 if b == a else float("inf"))
            moved = a is not None and (b is None or (b != a if tolerance == 0 else abs(rel) > tolerance + 1e-12))
            figures.append({"figure": f"{key} {domain}", "published": a, "now": b, "rel": rel, "differs": moved})
    p, q = then.get("provenance", {}), now.get("provenance", {})
    seed = then.get("seed", then["config"].get("seed"))
    return {"row": re.sub(rf"[/-]s{seed}$", "", name), "name": name, "seed": seed, "method": then.get("method"),
            "figures": figures, "differs": any(f["differs"] for f in figures),
            "threads": [p.get("threads"), q.get("threads")], "commit": [_commit(p), _commit(q)],
            "torch": [p.get("torch"), q.get("torch")], "uploads": uploads and str(uploads)}


def _commit(p: dict) -> str:
    c = p.get("commit")
    return "unknown" if not c else c[:7] + ("+dirty" if p.get("dirty") else "")


# ---- the report ----------------------------------------------------------------------------------------

def _num(x) -> str:
    return "n/a" if x is None else f"{x:g}"


def _rel(x) -> str:
    return "n/a" if x is None else "0" if x == 0 else f"{100 * x:+.3g} %"


def _pair(pair: list, then_now: str = "") -> str:
    a, b = (_num(x) if isinstance(x, (int, float)) or x is None else x for x in pair)
    return f"{a} → {b}" + ("" if a == b else f" ({then_now or 'differs'})")


def table(result: dict) -> list[str]:
    lines = ["| row | seed | figure | published | now | rel. diff | threads then → now | commit then → now | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        threads, commit = _pair(r["threads"], "THREADS DIFFER"), _pair(r["commit"], "other commit")
        lines += [f"| {r['row']} | {r['seed']} | {f['figure']} | {_num(f['published'])} | {_num(f['now'])} | "
                  f"{_rel(f['rel'])} | {threads} | {commit} | {'**DIFFERS**' if f['differs'] else 'same'} |"
                  for f in r["figures"]]
    return lines


def verdict(result: dict) -> list[str]:
    """What a reader needs from the table: which runs differ, and which ran under another thread count."""
    runs = result["runs"]
    differ = [f"{r['row']} s{r['seed']}" for r in runs if r["differs"]]
    lines = [f"{len(differ)} of {len(runs)} runs DIFFER: {', '.join(differ)}." if differ
             else f"All {len(runs)} runs regenerate their published figures."]
    other = sorted({r["threads"][0] for r in runs if r["threads"][0] != r["threads"][1]}, key=str)
    if other:
        lines.append(f"{sum(r['threads'][0] != r['threads'][1] for r in runs)} run(s) were published under "
                     f"{' / '.join(_num(t) for t in other)} thread(s), this recheck ran under "
                     f"{result['now']['threads']}: the thread count alone moves results; recheck under the published "
                     f"setting with --threads {_num(other[0])}.")
    return lines


def markdown(result: dict) -> str:
    tol = result["tolerance"]
    rule = ("every figure must equal its published digits (summary.json keeps 4 significant digits)" if tol == 0
            else f"a figure may move by at most {100 * tol:g} % (relative, on the 4-significant-digit figures)")
    now = result["now"]
    return "\n".join([
        f"# Recheck of {result['dir']}", "",
        f"Command: `{result['command'] or 'deepfusion bench --recheck ' + result['dir']}`; reruns in "
        f"`{result['out']}`; now: commit {_commit(now)}, torch {now['torch']}, {now['threads']} CPU thread(s). "
        f"Tolerance {tol:g}: {rule}.", "",
        *verdict(result), "", *table(result), ""])


def check_arguments(args) -> None:
    """The recheck's own options mean nothing to a profile or a micro-benchmark, and the reverse."""
    if args.recheck and (args.micro or args.profile or args.out or args.config or args.seed is not None):
        raise ConfigError("bench --recheck DIR re-runs DIR's own runs with their own configs: drop "
                          "--profile / --out / --config / --seed / MICRO (it takes --recheck-out, --tolerance, "
                          "--only, --seeds, --threads)")
    given = [flag for flag, v in (("--recheck-out", args.recheck_out), ("--tolerance", args.tolerance),
                                  ("--only", args.only), ("--threads", args.threads)) if v is not None]
    if given and not args.recheck:
        raise ConfigError(f"bench: {' '.join(given)} belong to --recheck DIR (re-run a published table)")
