"""The paper profile's outputs (paper.py): results.json, results.csv, RESULTS.md and one PNG per figure.

    Table I    token log-perplexity (mean NLL) on test text and on QA answers, mean ± std over seeds
    Table II   token accuracy
    Fig. 7     device peak training memory per device type, against a FedJETS device's     fig7_device_memory.png
    Fig. 8     total communication per method as N grows                                     fig8_communication.png
    Fig. 9     DeepFusion against centralized: the gap in log-perplexity and accuracy       fig9_gap_to_centralized.png
    claims     each claim of the paper, its number, ours, and whether it holds here (claims())

Everything here reads the runs' summaries (figures()), never a run's objects: the report can be rebuilt from
results.json alone.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from pathlib import Path

log = logging.getLogger("deepfusion.bench")

METRICS = ("log_ppl", "qa_log_ppl", "accuracy", "qa_accuracy")
FEDERATED = ("FedJETS", "FedMKT")  # the paper's federated baselines DeepFusion is claimed to beat
PLOTS = ("fig7_device_memory.png", "fig8_communication.png", "fig9_gap_to_centralized.png")


def _transformers(runs: list[dict]) -> str:
    """The transformers version(s) the runs recorded (rows before the field existed: 'not recorded')."""
    versions = sorted({r.get("transformers") or "not recorded" for r in runs})
    return "transformers " + " / ".join(versions)


def figures(summary: dict, case: str, n: int, row: str, seed: int, seconds: float) -> dict:
    """What the tables read from one run: the case's figures, bytes, peaks per device type, time, provenance."""
    comm, devices = summary["comm_bytes"], summary.get("devices") or {}
    peaks = summary.get("device_peak_mem_bytes") or {}
    by_type: dict[str, int] = {}
    for d, peak in peaks.items():
        arch = devices.get(d, {}).get("arch", row)  # hosting methods' devices all hold the same compact MoE
        by_type[arch] = max(by_type.get(arch, 0), int(peak or 0))
    local = [math.log(r["ppl_own_source"]) for r in devices.values() if r.get("ppl_own_source")]
    p = summary.get("provenance", {})
    return {"case": case, "n": n, "row": row, "seed": seed, "method": summary["method"],
            **{m: (summary.get(m) or {}).get(case) for m in METRICS},
            "bytes_up": comm.get("up", 0), "bytes_down": comm.get("down", 0), "peak_by_type": by_type,
            "local_only_log_ppl": statistics.mean(local) if local and summary["method"] == "deepfusion" else None,
            "wall_seconds": summary.get("wall_seconds"), "phase_seconds": summary.get("phase_seconds"),
            "bench_seconds": seconds, "threads": p.get("threads"), "commit": p.get("commit"), "torch": p.get("torch"),
            "transformers": p.get("transformers")}


# ---- reading results ---------------------------------------------------------------------------------

def values(results: dict, case: str, n: int, row: str, key: str) -> dict[int, float]:
    """seed -> the run's figure, for the runs that have it."""
    return {r["seed"]: r[key] for r in results["runs"]
            if (r["case"], r["n"], r["row"]) == (case, n, row) and r.get(key) is not None}


def mean(results: dict, case: str, n: int, row: str, key: str) -> float | None:
    v = values(results, case, n, row, key)
    return statistics.mean(v.values()) if v else None


def cell(xs: list[float], fmt: str = "{:.3f}") -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.replace('+', '').format(statistics.stdev(xs))}"  # std: no sign


def paired(results: dict, case: str, n: int, row: str, key: str, against: str = "DeepFusion") -> list[float]:
    """The row minus `against` on the same seeds (same devices, same uploads)."""
    a, b = values(results, case, n, row, key), values(results, case, n, against, key)
    return [a[s] - b[s] for s in sorted(a) if s in b]


# ---- the files -----------------------------------------------------------------------------------------

def write(out: Path, results: dict, plots: bool = True) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_csv(out / "results.csv", results)
    try:
        if plots:
            plot(out, results)
    except Exception as e:  # a figure that cannot be drawn costs a warning, never the tables
        log.warning("bench paper: plots not written: %s", e)
    (out / "RESULTS.md").write_text(markdown(results))


def write_csv(path: Path, results: dict) -> None:
    keys = ("case", "n", "row", "seed", "method", *METRICS, "bytes_up", "bytes_down", "wall_seconds", "threads",
            "commit")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in results["runs"]:
            w.writerow([r.get(k) for k in keys])


def markdown(results: dict) -> str:
    from deepfusion.benchmarks.paper import CASES, DEVICE_SETTINGS

    from deepfusion.benchmarks.report import thread_setting

    commits = sorted({(r["commit"] or "?")[:7] for r in results["runs"]})
    lines = [f"# The paper's evaluation at CPU scale (`{results['profile']}`: seeds {results['seeds']}, "
             f"N = {results['counts']})", "",
             f"Command: `deepfusion bench --profile {results['profile']} --out OUT`; bench wall time "
             f"{results['bench_seconds']:.0f} s (reused runs count only their reading). Runs made at commit(s) "
             f"{', '.join(commits)}, torch {results['runs'][0]['torch'] if results['runs'] else '?'}, "
             f"{_transformers(results['runs'])}, "
             + thread_setting({f"{r['case']} N={r['n']} {r['row']} s{r['seed']}": r["threads"]
                               for r in results["runs"]}) + ".",
             "", "Setting: " + "; ".join(f"{c.name}: global {_family(c.name)}, device types "
                                         + ", ".join(f"{f}/{s}" for f, s in c.types) + ", sources "
                                         + ", ".join(c.sources) for c in CASES.values())
             + f". Each device draws one of its case's three types at random (per seed); device i reads source i mod 4;"
               " a source's private documents are dealt to its devices in Dirichlet(1) shares (every device gets one,"
               f" the rest by the shares). Phase 0: {DEVICE_SETTINGS['max_steps']} steps at most. Test text and QA "
               "answers are the same for every N and seed.", ""]
    lines += table(results, "Table I analogue: token log-perplexity (mean NLL, lower is better) on test text "
                   "[and on QA answers]", ("log_ppl", "qa_log_ppl"))
    lines += table(results, "Table II analogue: token accuracy (%, higher is better) on test text [and on QA "
                   "answers]", ("accuracy", "qa_accuracy"), fmt="{:.2f}")
    lines += paired_table(results)
    lines += memory_table(results) + comm_table(results) + gap_table(results) + time_table(results)
    lines += claims_table(results)
    if results.get("projection"):
        from deepfusion.benchmarks.paper_scale import markdown as projection

        lines += ["## Figs. 7-8 at the paper's own sizes (meta-device projection, paper_scale.py)", "",
                  projection(results["projection"])]
    if results.get("failed"):
        lines += ["## Runs that failed", ""] + [f"- {k}: {v}" for k, v in results["failed"].items()] + [""]
    return "\n".join(lines) + "\n"


def _family(case: str) -> str:
    return {"medical": "qwen_moe", "finance": "deepseek_moe"}[case]


def _rows(results: dict) -> list[str]:
    return [*results["rows"], "local only"]


def by_n_header(results: dict, title: str) -> list[str]:
    """A section whose table has a row per (case, row) and a column per N."""
    return [f"## {title}", "", "| case | row | " + " | ".join(f"N = {n}" for n in results["counts"]) + " |",
            "|---|---|" + "---|" * len(results["counts"])]


def table(results: dict, title: str, keys: tuple[str, str], fmt: str = "{:.3f}") -> list[str]:
    lines = by_n_header(results, title)
    for case in results["cases"]:
        for row in _rows(results):
            cells = []
            for n in results["counts"]:
                if row == "local only":
                    main = list(values(results, case, n, "DeepFusion", "local_only_log_ppl").values()) \
                        if keys[0] == "log_ppl" else []
                    cells.append(cell(main, fmt))
                    continue
                main = list(values(results, case, n, row, keys[0]).values())
                qa = list(values(results, case, n, row, keys[1]).values())
                cells.append(f"{cell(main, fmt)} [{cell(qa, fmt)}]" if main else "–")
            if any(c != "–" for c in cells):
                lines.append(f"| {case} | {row} | " + " | ".join(cells) + " |")
    lines.append("")
    if keys[0] == "log_ppl":
        lines += ["local only: each device's own model on its own source's test text, mean over devices (no QA "
                  "column: the device reports score test text only).", ""]
    return lines


def paired_table(results: dict) -> list[str]:
    lines = by_n_header(results, "Paired differences against DeepFusion (same seed, same devices), log-perplexity and accuracy")
    for case in results["cases"]:
        for row in results["rows"]:
            if row == "DeepFusion":
                continue
            cells = [f"{cell(paired(results, case, n, row, 'log_ppl'), '{:+.3f}')} / "
                     f"{cell(paired(results, case, n, row, 'accuracy'), '{:+.2f}')}" for n in results["counts"]]
            if any(c != "– / –" for c in cells):
                lines.append(f"| {case} | {row} | " + " | ".join(cells) + " |")
    return lines + ["", "Negative log-perplexity and positive accuracy differences: the row beats DeepFusion.", ""]


def peaks(results: dict, case: str, row: str) -> dict[str, int]:
    """Device type -> its largest measured training peak over every N and seed of the row."""
    out: dict[str, int] = {}
    for r in results["runs"]:
        if (r["case"], r["row"]) == (case, row):
            for arch, b in r["peak_by_type"].items():
                out[arch] = max(out.get(arch, 0), b)
    return out


def memory_table(results: dict) -> list[str]:
    lines = ["## Fig. 7 analogue: device peak training memory (MB, measured)", "",
             "| case | device | peak MB | FedJETS device / this device |", "|---|---|---|---|"]
    for case in results["cases"]:
        jets = max(peaks(results, case, "FedJETS").values(), default=0)
        for arch, b in sorted(peaks(results, case, "DeepFusion").items()):
            lines.append(f"| {case} | {arch} (DeepFusion) | {b / 1e6:.0f} | {jets / b:.2f}× |" if jets else
                         f"| {case} | {arch} (DeepFusion) | {b / 1e6:.0f} | – |")
        if jets:
            lines.append(f"| {case} | FedJETS compact MoE | {jets / 1e6:.0f} | 1 |")
    return lines + [""]


def total_bytes(results: dict, case: str, n: int, row: str) -> float | None:
    ups, downs = values(results, case, n, row, "bytes_up"), values(results, case, n, row, "bytes_down")
    return statistics.mean(ups[s] + downs[s] for s in ups if s in downs) if ups else None


def comm_table(results: dict) -> list[str]:
    lines = by_n_header(results, "Fig. 8 analogue: total communication, up + down (MB, counted from the real messages)")
    for case in results["cases"]:
        for row in results["rows"]:
            cells = [total_bytes(results, case, n, row) for n in results["counts"]]
            if any(c is not None for c in cells):
                lines.append(f"| {case} | {row} | " + " | ".join("–" if c is None else f"{c / 1e6:.1f}" for c in cells)
                             + " |")
    return lines + ["", "The server-only rows (centralized, public data only) move no bytes.", ""]


def gap_table(results: dict) -> list[str]:
    lines = ["## Fig. 9 analogue: DeepFusion minus centralized (log-perplexity / accuracy points)", "",
             "| case | " + " | ".join(f"N = {n}" for n in results["counts"]) + " |",
             "|---|" + "---|" * len(results["counts"])]
    for case in results["cases"]:
        cells = [f"{cell([-x for x in paired(results, case, n, 'centralized', 'log_ppl')], '{:+.3f}')} / "
                 f"{cell([-x for x in paired(results, case, n, 'centralized', 'accuracy')], '{:+.2f}')}"
                 for n in results["counts"]]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines + [""]


def time_table(results: dict) -> list[str]:
    lines = ["## Where the time goes (seconds per run, mean over seeds)", "",
             "| case | N | DeepFusion Phase 0 (devices) | Phase II | Phase III | " +
             " | ".join(r for r in results["rows"] if r != "DeepFusion") + " |",
             "|---|---|---|---|---|" + "---|" * (len(results["rows"]) - 1)]
    for case in results["cases"]:
        for n in results["counts"]:
            phases = [r["phase_seconds"] for r in results["runs"]
                      if (r["case"], r["n"], r["row"]) == (case, n, "DeepFusion") and r.get("phase_seconds")]
            if not phases:
                continue
            ph = [f"{statistics.mean(p.get(k, 0) for p in phases):.0f}" for k in ("phase0", "phase2", "phase3")]
            walls = [mean(results, case, n, r, "wall_seconds") for r in results["rows"] if r != "DeepFusion"]
            lines.append(f"| {case} | {n} | " + " | ".join(ph) + " | "
                         + " | ".join("–" if w is None else f"{w:.0f}" for w in walls) + " |")
    return lines + ["", "The one-shot rows replay DeepFusion's Phase 0, so their time is the server's alone.", ""]


# ---- the claims ----------------------------------------------------------------------------------------

def claims(results: dict) -> list[dict]:
    """Each claim of the paper, its number, ours, a verdict and one line of why (the rule is in `why`)."""
    cells = [(c, n) for c in results["cases"] for n in results["counts"]]

    def wins(row: str, key: str, lower: bool) -> tuple[int, int]:
        """(cells where DeepFusion's mean beats the row's, cells with both)."""
        pairs = [(mean(results, c, n, "DeepFusion", key), mean(results, c, n, row, key)) for c, n in cells]
        pairs = [(d, o) for d, o in pairs if d is not None and o is not None]
        return sum((d < o) if lower else (d > o) for d, o in pairs), len(pairs)

    out = []
    # close to centralized: the paper's medical accuracy is ≈ 92.5 against ≈ 97 (95 % of it): ours, as a ratio
    ratios = [(c, n, mean(results, c, n, "DeepFusion", "accuracy"), mean(results, c, n, "centralized", "accuracy"))
              for c, n in cells]
    ratios = [(c, n, d / z) for c, n, d, z in ratios if d is not None and z]
    out.append(_claim("DeepFusion comes close to centralized training (Fig. 9)", "accuracy ≈ 92.5 vs ≈ 97 "
                      "(medical): 95 % of centralized",
                      ", ".join(f"{c} N={n}: {r:.0%}" for c, n, r in ratios),
                      None if not ratios else all(r >= 0.9 for _, _, r in ratios),
                      "reproduced where DeepFusion's token accuracy is at least 90 % of centralized's in every cell"))
    def beats(claim: str, paper: str, rows: tuple[str, ...], key: str, rule: str) -> dict:
        """A claim that DeepFusion's mean beats each of `rows` in every cell (lower log-ppl, higher accuracy)."""
        tallies = {row: wins(row, key, key == "log_ppl") for row in rows}
        holds = all(w == t for w, t in tallies.values()) if all(t for _, t in tallies.values()) else None
        return _claim(claim, paper, "; ".join(f"beats {row} in {w} of {t} cells" for row, (w, t) in tallies.items()),
                      holds, rule)

    for key, word in (("log_ppl", "log-perplexity"), ("accuracy", "accuracy")):
        out.append(beats(f"DeepFusion beats the federated MoE baselines in {word} (Tables I-II)",
                         "better than FedJETS and FedMKT in every case and N", FEDERATED, key,
                         "reproduced if DeepFusion's mean is better in every cell against each baseline"))
    out.append(beats("VAA beats OFA-KD and FedMKT (Table I)", "lower log-perplexity than both (medical: OFA-KD ties "
                     "or wins at every N in the paper's own table)", ("OFA-KD", "FedMKT"), "log_ppl",
                     "reproduced if DeepFusion's mean log-perplexity is lower in every cell against each"))
    moved = [(c, n, total_bytes(results, c, n, "DeepFusion"), total_bytes(results, c, n, "FedJETS")) for c, n in cells]
    red = [(c, n, 1 - d / j) for c, n, d, j in moved if d and j]
    at_paper = projected(results)
    out.append(_claim("Less communication than FedJETS (Fig. 8)", "−71 % (medical), ≈ −46 % (finance)",
                      ", ".join(f"{c} N={n}: {-r:+.0%}" for c, n, r in red) + at_paper.get("comm", ""),
                      None if not red else all(r > 0 for *_, r in red),
                      "reproduced if DeepFusion moves fewer bytes in every cell; the size of the cut depends on "
                      "FedJETS's rounds and the models' sizes (see the projection at the paper's sizes)"))
    mem = []
    for c in results["cases"]:
        jets = max(peaks(results, c, "FedJETS").values(), default=0)
        mem += [(c, arch, jets / b) for arch, b in peaks(results, c, "DeepFusion").items() if jets and b]
    out.append(_claim("FedJETS needs 3.3-9.3× the device memory (Fig. 7)", "3.3-9.3×",
                      ", ".join(f"{c} {a}: {x:.1f}×" for c, a, x in mem) + at_paper.get("memory", ""),
                      None if not mem else all(x > 1 for *_, x in mem),
                      "reproduced if every device type needs less than a FedJETS device; the ratio's size is a matter "
                      "of model sizes (the projection gives it at the paper's)"))
    out.append(more_devices(results))
    best = []
    for c, n in cells:
        d = mean(results, c, n, "DeepFusion", "log_ppl")
        others = [mean(results, c, n, r, "log_ppl") for r in FEDERATED]
        others = [o for o in others if o is not None]
        if d is not None and others:
            best.append((c, n, (min(others) - d) / min(others)))
    out.append(_claim("The abstract's \"5.28 %\"", "5.28 % (its tables give no pair with this ratio)",
                      "DeepFusion's relative log-perplexity improvement on the best federated baseline: "
                      + ", ".join(f"{c} N={n}: {x:+.2%}" for c, n, x in best),
                      None, "not testable here: the number cannot be derived from the paper's own tables; it may be "
                      "a relative perplexity or accuracy gain over the best baseline, which we report instead"))
    return out


def more_devices(results: dict) -> dict:
    """'Better with more devices', on the seeds run at every N so far: a mean over 3 seeds at one N against 1 at
    the next would read a change of device draws as a trend. Testable once both cases have every N."""
    trend, ours = {}, []
    for c in results["cases"]:
        by_n = {n: values(results, c, n, "DeepFusion", "log_ppl") for n in results["counts"]}
        by_n = {n: v for n, v in by_n.items() if v}
        seeds = sorted(set.intersection(*map(set, by_n.values()))) if by_n else []
        if len(by_n) > 1 and seeds:
            ys = [statistics.mean(v[s] for s in seeds) for v in by_n.values()]
            ours.append(f"{c}, seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))} at N = "
                        f"{' / '.join(map(str, by_n))}: " + " → ".join(f"{y:.3f}" for y in ys))
            if len(by_n) == len(results["counts"]):
                trend[c] = ys
    complete = len(trend) == len(results["cases"]) and len(results["counts"]) > 1
    return _claim("Better with more devices (Table I: medical 0.1603 → 0.1494 from N = 16 to 128)",
                  "log-perplexity falls as N grows", "; ".join(ours),
                  all(all(b < a for a, b in zip(ys, ys[1:])) for ys in trend.values()) if complete else None,
                  "reproduced if DeepFusion's log-perplexity, on the seeds run at every N, falls at every step in N, "
                  "in both cases")


def projected(results: dict) -> dict[str, str]:
    """The projection's answers to the memory and communication claims, at the paper's own model sizes."""
    p = results.get("projection")
    if not p:
        return {}
    comm = {}
    for r in p["traffic"]:
        comm.setdefault(r["case"], r["reduction_vs_fedjets_pct"])
    ratios = [r["ratio"] for r in p["memory"]]
    return {"comm": "; at the paper's sizes (FedJETS " + f"{p['settings']['fedjets_rounds']} rounds): "
                    + ", ".join(f"{c} {-x:+.0f}%" for c, x in comm.items()),
            "memory": f"; at the paper's sizes: {min(ratios):.1f}-{max(ratios):.1f}×"}


def _claim(claim: str, paper: str, ours: str, holds: bool | None, why: str) -> dict:
    verdict = "not testable here" if holds is None else ("reproduced" if holds else "not reproduced")
    return {"claim": claim, "paper": paper, "ours": ours or "no runs yet", "verdict": verdict, "why": why}


def claims_table(results: dict) -> list[str]:
    lines = ["## The paper's claims, here", "", "| claim | paper | ours | verdict | rule |", "|---|---|---|---|---|"]
    for c in claims(results):
        lines.append(f"| {c['claim']} | {c['paper']} | {c['ours']} | **{c['verdict']}** | {c['why']} |")
    return lines + [""]


# ---- the figures ---------------------------------------------------------------------------------------

def plot(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        bars = {f"{a}": b / 1e6 for a, b in sorted(peaks(results, case, "DeepFusion").items())}
        bars |= {"FedJETS": b / 1e6 for b in peaks(results, case, "FedJETS").values()}
        jets = "FedJETS" in bars
        ax.bar(list(bars), list(bars.values()), color=["C0"] * (len(bars) - jets) + ["C3"] * jets)
        ax.set_title(f"{case}: device peak training memory")
        ax.set_ylabel("MB")
        ax.tick_params(axis="x", rotation=30)
    _save(fig, out / PLOTS[0])

    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for row in results["rows"]:
            pts = [(n, total_bytes(results, case, n, row)) for n in results["counts"]]
            pts = [(n, b / 1e6) for n, b in pts if b]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=row)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("devices N")
        ax.set_ylabel("total MB")
        ax.set_title(f"{case}: communication")
    axes[0][0].legend(fontsize=7)
    _save(fig, out / PLOTS[1])

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for case in cases:
        for ax, key, sign in ((axes[0], "log_ppl", -1), (axes[1], "accuracy", -1)):
            pts = [(n, statistics.mean(sign * x for x in paired(results, case, n, "centralized", key)))
                   for n in results["counts"] if paired(results, case, n, "centralized", key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=case)
    axes[0].set_title("DeepFusion − centralized: log-perplexity")
    axes[1].set_title("DeepFusion − centralized: accuracy (points)")
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices N")
        ax.legend(fontsize=8)
    _save(fig, out / PLOTS[2])


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
