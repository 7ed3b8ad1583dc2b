"""What a run shows while it runs, and what it leaves to look at: progress on stderr, TensorBoard, plots.

Both protocols and both engines report through one `RunProgress`, in stages:

    multi-round   stage("ROUND", "round", R)                     one step per round
    one-shot      stage("PHASE 0", "Phase 0: device", N)         one step per device that answered
                  stage("PHASE I", "Phase I: clustering", 1)
                  stage("PHASE II", "Phase II: domain", K)       one step per distilled domain
                  stage("PHASE III", "Phase III: tuning step", S)  one step per tuning step

On a terminal each stage is a live bar on stderr with its count, elapsed time and ETA ("Phase II: domain
2/4 ... ETA 1m30s"), and log records print above it. Anywhere else (stderr piped to a file, or
--no-progress) each step that ends a unit of work is one plain log line, as it happens:

    [ROUND 3/5] 2m10s elapsed, ~1m30s left
    [PHASE II 2/4] 40s elapsed, ~40s left in Phase II (run 3m12s)

The ETA is the stage's mean time per step in this stretch times the steps left: steps a resumed run
found done count as done, not as fast. Results never go here: stdout carries them alone.

At each such step the TensorBoard events (--tensorboard DIR) catch up with metrics.jsonl; `finish`, once
summary.json is written, writes the last events and the PNG curves (plots.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from deepfusion import plots

log = logging.getLogger("deepfusion")


@dataclass
class Stage:
    key: str  # the prefix of its plain lines: "ROUND", "PHASE II"
    label: str  # what the live bar counts: "round", "Phase II: domain"
    total: int
    base: float  # steps already done when the stage began (a resumed run): they say nothing of speed
    started: float
    done: float = 0.0
    printed: float = 0.0  # the count of the last plain line: one line per step, however often it is updated
    updated: float = 0.0  # when the last step was done
    task: int | None = None  # the live bar's task


class RunProgress:
    """A run's progress on stderr (live bars on a terminal when `live`, else plain log lines), its
    TensorBoard events (`tensorboard`: a log directory, or None) and, at `finish`, its PNG curves."""

    def __init__(self, out_dir: Path, live: bool = True, tensorboard: Path | None = None,
                 console: Console | None = None):
        self.out_dir, self.started, self.current = Path(out_dir), time.perf_counter(), None
        console = console or Console(stderr=True)  # stdout carries results only
        self.live = live and console.is_terminal
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             EtaColumn(), console=console, disable=not self.live, transient=False)
        self.board = plots.TensorBoard(Path(tensorboard), self.out_dir) if tensorboard else None

    def __enter__(self) -> RunProgress:
        if self.live:
            self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self._end_stage()
        self.bars.stop()
        if self.board:
            self.board.writer.flush()  # a failed or interrupted run keeps the events it had

    def stage(self, key: str, label: str, total: int, done: int = 0) -> None:
        """Begin a stage of `total` steps, `done` of them already done (a resumed run); ends the last one."""
        self._end_stage(finished=True)
        now = time.perf_counter()
        self.current = Stage(key, label, max(1, total), base=done, started=now, done=done, printed=done)
        if self.live:
            self.current.task = self.bars.add_task(label, total=self.current.total, completed=done, base=done)

    def update(self, done: float, line: bool = True) -> None:
        """`done` steps of the stage are done. line: this step ends a unit of work (a round, a device, a
        domain, a validation check), which gets a plain line and a TensorBoard catch-up; False for the
        steps in between, which only move the live bar."""
        s = self.current
        if s is None:
            return
        s.done, s.updated = min(done, s.total), time.perf_counter()
        if self.live:
            self.bars.update(s.task, completed=s.done)
        if not (line or s.done >= s.total):  # a stage's last step always ends a unit of work
            return
        if not self.live and s.done > s.printed:
            s.printed = s.done
            log.info("%s", self.line())
        if self.board:
            self.board.sync()

    def advance(self, steps: float = 1, line: bool = True) -> None:
        if self.current is not None:
            self.update(self.current.done + steps, line)

    def line(self) -> str:
        """The current stage as one plain line: its count, time spent, time left; for a phase, the run's time."""
        s, now = self.current, time.perf_counter()
        elapsed, run = duration(now - s.started), f" (run {duration(now - self.started)})"
        head = f"[{s.key}]" if s.total == 1 else f"[{s.key} {int(s.done)}/{s.total}]"
        if s.done >= s.total:
            return f"{head} done in {elapsed}" + run
        text = f"{head} {elapsed} elapsed, ~{eta(now - s.started, s.done - s.base, s.total - s.done)} left"
        return text + (f" in Phase {s.key.split()[1]}{run}" if s.key.startswith("PHASE") else "")

    def finish(self) -> list[Path]:
        """After summary.json: the last TensorBoard events and the PNG curves (a plot never fails a run)."""
        self._end_stage(finished=True)
        if self.board:
            self.board.sync()
            self.board.close()
        return plots.write_plots(self.out_dir)

    def _end_stage(self, finished: bool = False) -> None:
        """finished: the stage's work is over (not an error), though maybe short of its total: early stopping."""
        s = self.current
        if s is not None and s.task is not None:
            self.bars.stop_task(s.task)  # its elapsed time stops; the bar stays, with its count
        if finished and s is not None and not self.live and s.base < s.done < s.total:
            log.info("[%s %d/%d] ended early (early stopping) after %s", s.key, s.done, s.total,
                     duration(s.updated - s.started))
        self.current = None


class EtaColumn(ProgressColumn):
    """The time left from this stretch's mean step time (rich's own estimate forgets steps over 30 s old)."""

    def render(self, task) -> Text:
        if task.finished:
            return Text("")
        left = eta(task.elapsed or 0.0, task.completed - task.fields.get("base", 0), task.total - task.completed)
        return Text(f"ETA {left}", style="progress.remaining")


def eta(elapsed: float, done: float, left: float) -> str:
    """Time for `left` more steps at the pace of the `done` ones, or '?' before any step is done."""
    return duration(elapsed / done * left) if done > 0 else "?"


def duration(seconds: float) -> str:
    """4.2s, 2m10s, 1h05m: short, and exact enough to plan by."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
