"""The benchmark's report: RESULTS.md (tables, paired differences, targets), results.csv and PNG plots.

Pure presentation of compare.py's results object: nothing here runs a model.
"""

from __future__ import annotations

import csv
import platform
from pathlib import Path

import torch

from deepfusion.config import HOSTING_METHODS, KNOWLEDGE_METHODS

# The targets, checked for the multi-round knowledge protocol on every report (met or missed, never hidden).
VIEWS = "multiround-views"
NEAR_CENTRALIZED = 0.05  # within 5% of centralized-converged
BEAT_FEDERATED_MOE = 0.0528  # at least 5.28% below the best of fedavg-moe / expert-subset
BYTES_SAVED = 0.90  # bytes per device per round at least 90% below the lightest federated MoE baseline
MEMORY_SHARE = 0.25  # device peak memory at most 25% of fedavg-moe's


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def thread_setting(threads: dict[str, int | None]) -> str:
    """A table header's one thread setting: `threads` maps each run to its provenance.threads. The thread count
    alone moves a figure (by up to 8 %, issue 10), so a table whose runs used different counts says so loudly."""
    by: dict[int | None, list[str]] = {}
    for run, n in threads.items():
        by.setdefault(n, []).append(run)
    named = lambda n: "unknown thread count" if n is None else f"{n} CPU thread(s)"  # noqa: E731
    if len(by) <= 1:
        return f"{named(next(iter(by), None))} in every run"
    parts = "; ".join(f"{named(n)}: " + (", ".join(runs) if len(runs) <= 6 else f"{len(runs)} runs")
                      for n, runs in sorted(by.items(), key=lambda kv: -len(kv[1])))
    return (f"**⚠ this table mixes thread settings: {parts}** (the thread count alone moves results; "
            "`deepfusion bench --recheck DIR --threads N` re-runs its runs under one setting)")


def _pm(ms: tuple[float, float], seeds: int) -> str:
    return f"{ms[0]:.1f} ± {ms[1]:.1f}" if seeds > 1 else f"{ms[0]:.1f}"


def table(results: dict, tag: str = "") -> list[str]:
    lines = []
    for family in dict.fromkeys(t["family"] for t in results["table"] if t["tag"] == tag):
        rows = {t["method"]: t for t in results["table"] if t["tag"] == tag and t["family"] == family}
        top = rows.get("centralized-converged")
        lines += [f"\n### {family}\n", "| method | λ | ppl medical | ppl finance | vs centralized (med / fin) | "
                  "bytes total | bytes / device / round | device peak memory | wall s |", "|" + "---|" * 9]
        for method, t in rows.items():
            n = len(t["seeds"])
            if t.get("capped"):
                method += " (max_rounds reached)"
            rel = " / ".join(f"{100 * (t[f'ppl_{d}'][0] / top[f'ppl_{d}'][0] - 1):+.1f}%" for d in ("medical", "finance")) if top else "-"
            lam = f"{t['lam']:g}" if method in KNOWLEDGE_METHODS else "-"
            lines.append(f"| {method} | {lam} | {_pm(t['ppl_medical'], n)} | {_pm(t['ppl_finance'], n)} | {rel} | "
                         f"{human(t['bytes_total'])} | {human(t['bytes_per_device_round'])} | "
                         f"{human(t['device_peak_mem_bytes'])} | {t['wall_seconds']:.0f} |")
    return lines


def targets(results: dict) -> list[str]:
    """Each target of the issue, per family: the measured value and met / MISSED."""
    lines = ["| family | target | measured | |", "|---|---|---|---|"]
    for family in dict.fromkeys(t["family"] for t in results["table"] if t["tag"] == ""):
        t = {x["method"]: x for x in results["table"] if x["tag"] == "" and x["family"] == family}
        if not {*KNOWLEDGE_METHODS, *HOSTING_METHODS, "centralized-converged"} <= set(t):
            continue
        df = t[VIEWS]
        ppl = lambda m, d: t[m][f"ppl_{d}"][0]  # noqa: E731
        checks = []
        for d in ("medical", "finance"):
            rel = ppl(VIEWS, d) / ppl("centralized-converged", d) - 1
            checks.append((f"{d}: within 5% of centralized-converged", f"{100 * rel:+.1f}%", rel <= NEAR_CENTRALIZED))
            best = min(ppl(m, d) for m in HOSTING_METHODS)
            gain = 1 - ppl(VIEWS, d) / best
            checks.append((f"{d}: ≥ 5.28% below the best federated MoE", f"{100 * gain:.1f}% below", gain >= BEAT_FEDERATED_MOE))
            for m in (m for m in KNOWLEDGE_METHODS if m != VIEWS):
                checks.append((f"{d}: below {m}", f"{ppl(VIEWS, d):.1f} vs {ppl(m, d):.1f}", ppl(VIEWS, d) < ppl(m, d)))
        lightest = min(t[m]["bytes_per_device_round"] for m in HOSTING_METHODS)
        saved = 1 - df["bytes_per_device_round"] / lightest
        checks.append(("bytes / device / round ≥ 90% below the lightest federated MoE", f"{100 * saved:.1f}% below", saved >= BYTES_SAVED))
        share = df["device_peak_mem_bytes"] / t["fedavg-moe"]["device_peak_mem_bytes"]
        checks.append(("device peak memory ≤ 25% of fedavg-moe's", f"{100 * share:.0f}%", share <= MEMORY_SHARE))
        lines += [f"| {family} | {what} | {value} | {'met' if ok else '**MISSED**'} |" for what, value, ok in checks]
    return lines


def paired_lines(results: dict) -> list[str]:
    lines = ["| family | runs | multiround-views vs | Δ ppl medical | Δ ppl finance | seeds |", "|---|---|---|---|---|---|"]
    for p in results["paired"]:
        if not p["seeds"]:
            continue
        cell = lambda d: f"{p['pct'][d][0]:+.1f}% ± {p['pct'][d][1]:.1f}" if len(p["seeds"]) > 1 else f"{p['pct'][d][0]:+.1f}%"  # noqa: E731
        lines.append(f"| {p['family']} | {p['tag'] or 'main'} | {p['b']} | {cell('medical')} | {cell('finance')} | {p['seeds']} |")
    return lines


def write(results: dict, out: Path, command: str | None = None) -> None:
    """results.csv, RESULTS.md and the plots, into out."""
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tag", "family", "method", "seed", "lam", "ppl_medical", "ppl_finance", "bytes_total",
                    "bytes_per_device_round", "device_peak_mem_bytes", "wall_seconds"])
        for r in results["rows"]:
            w.writerow([r["tag"], r["family"], r["method"], r["seed"], r["lam"], r["ppl"]["medical"], r["ppl"]["finance"],
                        r["bytes_total"], round(r["bytes_per_device_round"]), r["device_peak_mem_bytes"], round(r["wall_seconds"], 1)])
    plots = plot(results, out)
    command = command or f"deepfusion bench --profile {results['profile']} --out {out}"
    md = [f"# DeepFusion benchmark: profile `{results['profile']}`", "",
          f"Command: `{command}` (config `{results['config']}`, seeds {results['seeds']}); "
          f"{results['bench_seconds'] / 60:.1f} min on {machine()}; "
          f"{thread_setting({_run_name(r): r.get('threads') for r in results['rows'] if r['method'] != 'local-only'})}.",
          "",
          "Perplexity is token perplexity on held-out test text per domain; `vs centralized` is relative to "
          "`centralized-converged` (the upper bound); bytes count serialised messages both ways; device peak "
          "memory is the largest device's measured training step; wall time includes the devices' time "
          "(replayed knowledge runs add the recording's). Mean ± std over seeds where there are several. Budget: "
          "every method trains the global model on server.steps × batch blocks per round (fedavg-moe / "
          "expert-subset split them over their hosts; the host_steps table gives each host its own steps "
          "instead); centralized-converged trains until validation stops improving or max_rounds.", "",
          "## Methods", *table(results), "", "## Targets", "",
          "The issue's targets for multiround-views, checked as measured; the README's Results section and "
          "benchmarks/NOTES.md discuss every miss and what we tried.", "", *targets(results), "",
          "## Paired differences (same seed, same device uploads)", *paired_lines(results), ""]
    for tag in sorted({t["tag"] for t in results["table"] if t["tag"]}):
        md += [f"## {tag}", *table(results, tag), ""]
    if results.get("lambda"):
        md += ["## λ tuned on validation text (seed 0)", "", *[f"- {k}: λ = {v}" for k, v in results["lambda"].items()], ""]
    md += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    (out / "RESULTS.md").write_text("\n".join(md))


def _run_name(r: dict) -> str:
    return f"{r['tag'] or 'main'}/{r['family']}/{r['method']}-s{r['seed']}"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import os

    return f"{platform.machine()} {os.cpu_count()}-core CPU, {gpu}, torch {torch.__version__}"


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in results["rows"] if r["tag"] == "" and r["seed"] == results["seeds"][0]]
    paths = []
    for family in dict.fromkeys(r["family"] for r in main):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, domain in zip(axes, ("medical", "finance")):
            for r in (r for r in main if r["family"] == family and r["ppl_by_round"]):
                ys = [p[domain] for p in r["ppl_by_round"]]
                ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, label=r["method"])
            ax.set(title=f"{family}: {domain}", xlabel="round", ylabel="test perplexity", yscale="log")
        axes[1].legend(fontsize=7)
        paths.append(_save(fig, out / f"ppl_per_round_{family}.png"))
    for key, name, label in (("bytes_per_device_round", "bytes_per_round", "bytes per device per round (up + down)"),
                             ("device_peak_mem_bytes", "device_peak_memory", "device peak training memory (bytes)")):
        fig, ax = plt.subplots(figsize=(10, 4))
        rows = [t for t in results["table"] if t["tag"] == "" and t[key] > 0]
        families = list(dict.fromkeys(t["family"] for t in rows))
        methods = list(dict.fromkeys(t["method"] for t in rows))
        for i, family in enumerate(families):
            vals = {t["method"]: t[key] for t in rows if t["family"] == family}
            ax.bar([m + i * 0.4 for m in range(len(methods))], [vals.get(m, 0) for m in methods], 0.4, label=family)
        ax.set_xticks([m + 0.2 for m in range(len(methods))], methods, rotation=20, fontsize=8)
        ax.set(yscale="log", ylabel=label)
        ax.legend()
        paths.append(_save(fig, out / f"{name}.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
