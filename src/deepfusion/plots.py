"""A run's curves, read from its metrics.jsonl: PNG files next to summary.json, and TensorBoard scalars.

Both read the file the run writes anyway, never the run's objects, so a resumed run (whose metrics.jsonl
holds every stretch) plots and logs all of it, and so can any finished run directory afterwards.

What each protocol's metrics.jsonl holds, and what becomes of it:

    multi-round   one record per round          ppl_per_round.png     test perplexity per domain
                                                bytes_per_round.png   bytes the devices uploaded
                  TensorBoard, step = round:    ppl/<domain>, ppl_by_source/<source>, validation_ppl/<domain>,
                                                comm/bytes_up, time/seconds_round, server_loss/<term>,
                                                local_loss/<device>
    one-shot      "phase" 0, I, II, III         phase0_validation.png     each device's local validation loss
                                                phase2_distillation.png   each domain's Phase II loss terms
                                                phase3_tuning.png         validation perplexity per check
                  TensorBoard, step = the curve's own step:
                                                phase0/<device>/{val_loss,train_loss}, phase1/ari,
                                                phase2/domain<i>/{total,ce,fm,kl}, phase3/fused_ppl/<domain>,
                                                phase3/validation_ppl/<domain>, phase3/{ce,kl,aux}

Domains are numbered as in metrics.jsonl (from 0). A plot that cannot be drawn or written costs one
warning line, never the run: the results are already saved when plots are made.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

log = logging.getLogger("deepfusion")

MULTIROUND_PLOTS = ("ppl_per_round.png", "bytes_per_round.png")
ONESHOT_PLOTS = ("phase0_validation.png", "phase2_distillation.png", "phase3_tuning.png")
DISTILL_TERMS = ("total", "ce", "fm", "kl")  # crosskd's curve entries, in the order they are plotted


def read_records(out_dir: Path) -> list[dict]:
    """metrics.jsonl's records; a line a killed run left half-written is skipped (resume rewrites it)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def is_oneshot(records: list[dict]) -> bool:
    return any("phase" in r for r in records)


# ---- scalars: what TensorBoard logs -------------------------------------------------------------------------

def scalars(record: dict) -> Iterator[tuple[str, float, int]]:
    """(tag, value, step) for every number worth a curve in one metrics.jsonl record."""
    if "phase" in record:
        yield from _phase_scalars(record)
        return
    r = record["round"]
    for group in ("ppl", "ppl_by_source", "validation_ppl", "local_loss"):
        for name, value in _numbers(record.get(group)):
            yield f"{group}/{name}", value, r
    for name, value in _numbers(record.get("losses")):
        yield f"server_loss/{name}", value, r
    if _is_number(record.get("bytes_up")):
        yield "comm/bytes_up", record["bytes_up"], r
    if _is_number(record.get("seconds_round")):
        yield "time/seconds_round", record["seconds_round"], r


def _phase_scalars(record: dict) -> Iterator[tuple[str, float, int]]:
    phase = record["phase"]
    if phase == "0":
        for point in record.get("curve", []):
            for key in ("val_loss", "train_loss"):
                if _is_number(point.get(key)):
                    yield f"phase0/{record['device']}/{key}", point[key], point["step"]
    elif phase == "I" and _is_number(record.get("ari")):
        yield "phase1/ari", record["ari"], 0
    elif phase == "II":
        for point in record.get("curve", []):
            for key in DISTILL_TERMS:
                if _is_number(point.get(key)):
                    yield f"phase2/domain{record['domain']}/{key}", point[key], point["step"]
    elif phase == "III":
        for name, value in _numbers(record.get("fused_ppl")):
            yield f"phase3/fused_ppl/{name}", value, 0
        for point in record.get("tuning", {}).get("curve", []):
            for name, value in _numbers(point.get("validation_ppl")):
                yield f"phase3/validation_ppl/{name}", value, point["step"]
            for key in ("ce", "kl", "aux"):
                if _is_number(point.get(key)):
                    yield f"phase3/{key}", point[key], point["step"]


def _numbers(group) -> Iterator[tuple[str, float]]:
    if isinstance(group, dict):
        yield from ((str(k), v) for k, v in group.items() if _is_number(v))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class TensorBoard:
    """The run's scalars as TensorBoard events in `logdir`, written as metrics.jsonl grows (`sync` at each
    round or phase boundary), so `tensorboard --logdir` shows a run while it runs.

    Every writer starts with purge_step 0: TensorBoard then hides what earlier writers left in `logdir`
    (an earlier stretch of a resumed run, or an earlier run), and this one writes the whole metrics.jsonl
    again, so each step appears once."""

    def __init__(self, logdir: Path, out_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter  # late: loads tensorboard only when asked for
        except ImportError as e:
            from deepfusion.errors import ConfigError

            raise ConfigError(f"--tensorboard {logdir}: torch.utils.tensorboard cannot load ({e}); install the "
                              "tensorboard package (pip install tensorboard), or drop --tensorboard") from None
        self.out_dir, self.written = Path(out_dir), 0
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=0)

    def sync(self) -> None:
        """Write the records metrics.jsonl gained since the last sync (its earlier lines never change)."""
        records = read_records(self.out_dir)
        for record in records[self.written:]:
            for tag, value, step in scalars(record):
                self.writer.add_scalar(tag, value, step)
        self.written = max(self.written, len(records))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# ---- PNG files ----------------------------------------------------------------------------------------------

def write_plots(out_dir: Path) -> list[Path]:
    """The run's PNG curves in out_dir (names above); returns the files written. Never raises."""
    out_dir = Path(out_dir)
    try:
        records = read_records(out_dir)
        figures = _oneshot_figures(records) if is_oneshot(records) else _multiround_figures(records)
    except Exception as e:  # a plot must never fail a run whose results are saved
        log.warning("plots: none written in %s (%s: %s); the run's results are unaffected", out_dir,
                    type(e).__name__, e)
        return []
    written = []
    for name, draw in figures:
        try:
            written.append(_save(draw(), out_dir / name))
        except Exception as e:
            log.warning("plots: %s not written (%s: %s); the run's results are unaffected", name,
                        type(e).__name__, e)
    return written


def _multiround_figures(records: list[dict]) -> list:
    rounds = [r for r in records if "round" in r]
    out = []
    if any(isinstance(r.get("ppl"), dict) for r in rounds):
        out.append(("ppl_per_round.png", lambda: _ppl_per_round(rounds)))
    if any(_is_number(r.get("bytes_up")) for r in rounds):
        out.append(("bytes_per_round.png", lambda: _bytes_per_round(rounds)))
    return out


def _oneshot_figures(records: list[dict]) -> list:
    phase = lambda p: [r for r in records if r.get("phase") == p]  # noqa: E731
    out = []
    if any(r.get("curve") for r in phase("0")):
        out.append(("phase0_validation.png", lambda: _phase0(phase("0"))))
    if any(r.get("curve") for r in phase("II")):
        out.append(("phase2_distillation.png", lambda: _phase2(phase("II"))))
    if any(r.get("tuning", {}).get("curve") for r in phase("III")):
        out.append(("phase3_tuning.png", lambda: _phase3(phase("III")[-1])))
    return out


def _figure(panels: int = 1):
    """A figure of `panels` axes, two to a row."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in Flower's ServerApp thread

    cols, rows = min(panels, 2), -(-panels // 2)
    fig = Figure(figsize=(7 if cols == 1 else 11, 4 if rows == 1 else 3.5 * rows))
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]


def _ppl_per_round(rounds: list[dict]):
    fig, (ax,) = _figure()
    domains = list(dict.fromkeys(d for r in rounds for d in (r.get("ppl") or {})))
    for domain in domains:
        points = [(r["round"], r["ppl"][domain]) for r in rounds if _is_number((r.get("ppl") or {}).get(domain))]
        ax.plot(*zip(*points), marker="o", ms=3, label=domain)
    ax.set(title="test perplexity per domain", xlabel="round", ylabel="perplexity")
    ax.legend()
    _integer_ticks(ax)
    return fig


def _bytes_per_round(rounds: list[dict]):
    fig, (ax,) = _figure()
    points = [(r["round"], r["bytes_up"]) for r in rounds if _is_number(r.get("bytes_up"))]
    ax.bar(*zip(*points))
    ax.set(title="bytes uploaded per round (all devices)", xlabel="round", ylabel="bytes")
    _integer_ticks(ax)
    return fig


def _phase0(devices: list[dict]):
    fig, (ax,) = _figure()
    for r in devices:
        points = [(p["step"], p["val_loss"]) for p in r.get("curve", []) if _is_number(p.get("val_loss"))]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=f"{r['device']} ({r.get('arch', '?')})")
    ax.set(title="Phase 0: each device's local validation loss", xlabel="local training step",
           ylabel="validation loss (nats/token)")
    ax.legend(fontsize=7)
    return fig


def _phase2(domains: list[dict]):
    terms = [t for t in DISTILL_TERMS if any(t in p for r in domains for p in r.get("curve", []))]
    fig, axes = _figure(len(terms))
    for ax, term in zip(axes, terms):
        for r in domains:
            points = [(p["step"], p[term]) for p in r.get("curve", []) if _is_number(p.get(term))]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=f"domain {r['domain']}")
        ax.set(title=f"Phase II: {term}", xlabel="distillation step", ylabel="loss")
    axes[0].legend(fontsize=7)
    return fig


def _phase3(record: dict):
    tuning = record["tuning"]
    fig, (ax,) = _figure()
    curve = tuning["curve"]
    for domain in dict.fromkeys(d for p in curve for d in (p.get("validation_ppl") or {})):
        points = [(p["step"], p["validation_ppl"][domain]) for p in curve
                  if _is_number((p.get("validation_ppl") or {}).get(domain))]
        ax.plot(*zip(*points), marker="o", ms=3, label=domain)
    if _is_number(tuning.get("best_step")):
        ax.axvline(tuning["best_step"], color="grey", linestyle=":", label=f"kept: step {tuning['best_step']}")
    ax.set(title="Phase III: validation perplexity while tuning", xlabel="tuning step", ylabel="perplexity")
    ax.legend(fontsize=7)
    return fig


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> Path:
    """Write then rename: a full disk or a kill never leaves half a PNG (a *.tmp, which --overwrite removes)."""
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
