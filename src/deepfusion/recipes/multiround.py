"""The multi-round protocols as one loop: every engine's rounds run here, so a round means the same everywhere.

    for r in the rounds not yet done (all of them, or those after a resumed run's last):
        result  = step(r)          the engine: messages out, answers back, the server's step on them
                                   (knowledge methods: instructions and packets, server.server_round;
                                   hosting methods: weights and FedAvg; local-only, server-only methods)
        metrics = evaluate()       the global model on the held-out text (local-only: the devices' own)
        early stopping             centralized-converged: validation perplexity, server.patience rounds
        one record                 metrics.jsonl, one line per completed round
        checkpoint                 checkpoint/state.pt: the server, the records, and what the engine keeps
        log, progress

The engine passes what only it knows as functions (its step, what it checkpoints beside the server); the
loop imports no engine and no transport. At the end `finish` exports the global model and writes summary.json,
with what the engine's devices reported.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from deepfusion.baselines.centralized import validation_score
from deepfusion.config import FederationConfig, to_dict
from deepfusion.evaluation import paper_figures
from deepfusion.models import export_model, n_params
from deepfusion.outputs import append_metrics, save_checkpoint, summary, write_json_atomic
from deepfusion.progress import RunProgress
from deepfusion.server import evaluate, server_state

log = logging.getLogger("deepfusion")


def checkpoint_path(out_dir: Path) -> Path:
    return out_dir / "checkpoint" / "state.pt"


def run_rounds(cfg: FederationConfig, out_dir: Path, server, step: Callable[[int], dict],
               evaluate: Callable[[], dict], engine_state: Callable[[list[dict]], dict], shown: RunProgress,
               rounds: int, records: list[dict], stopper=None, validate: Callable[[], dict] | None = None
               ) -> list[dict]:
    """Run rounds len(records)+1 .. rounds; returns every round's record, the earlier ones included.

    `step(r)` returns the round's result (it says `seconds_devices` and `bytes_up`); `engine_state(records)`
    what the engine checkpoints beside the server (devices, hosts, bytes, wall time); `stopper` with
    `validate` stops when validation perplexity has not improved for server.patience rounds."""
    for r in range(len(records) + 1, rounds + 1):
        started = time.perf_counter()
        result = step(r)
        metrics = evaluate()
        stop = False
        if stopper:
            result["validation_ppl"] = validate()["ppl"]
            stop = stopper.update(server.model, validation_score(result["validation_ppl"]), r)
        records.append({"round": r, **metrics, **result, "seconds_round": round(time.perf_counter() - started, 2)})
        append_metrics(out_dir, records[-1])
        save_checkpoint(checkpoint_path(out_dir), {"config": to_dict(cfg), "round": r, "server": server_state(server),
                                                   "metrics": records, **engine_state(records)})
        log.info("[ROUND %d/%d] ppl %s | accepted %d rejected %d | %.1fs", r, rounds, metrics["ppl"],
                 len(result.get("accepted", [])), len(result.get("rejected", {})), records[-1]["seconds_round"])
        shown.update(r)
        if stop:
            log.info("[ROUND %d] validation perplexity has not improved for %d rounds (best: round %d): stopping",
                     r, stopper.patience, stopper.best_round)
            break
    return records


def retry_missing(cfg: FederationConfig, r: int, payloads: dict[str, bytes], device_ids: list[str],
                  ask: Callable[[list[str]], dict[str, bytes]]) -> dict[str, bytes]:
    """Below server.min_devices answers, ask the devices that failed or timed out again, at most
    server.round_retries times; then the server skips the round. A device whose packet the server rejects
    is not asked again: it answered, and would send the same bytes."""
    need, retries = cfg.server.min_devices, cfg.server.round_retries
    for attempt in range(1, retries + 1):
        missing = [d for d in device_ids if d not in payloads]
        if len(payloads) >= need or not missing:
            break
        log.warning("[ROUND %d] %d answers of the %d a round needs (server.min_devices); retry %d/%d: asking %s "
                    "again", r, len(payloads), need, attempt, retries, ", ".join(missing))
        payloads = {**payloads, **ask(missing)}
    if len(payloads) < need:
        log.warning("[ROUND %d] %d answers after %d retries, %d needed (server.min_devices): the server skips "
                    "this round; raise server.round_retries or device_timeout, or lower min_devices", r,
                    len(payloads), retries, need)
    return payloads


def finish(cfg: FederationConfig, out_dir: Path, server, data, torch_device, last: dict, records: list[dict],
           comm: dict, side: dict, stretches: list[float], extra: dict, export: bool = True) -> dict:
    """The run's end, alike on both engines: the global model's paper figures and validation perplexity, the
    model exported (not for local-only, which trains no global model), then summary.json, written last: its
    presence means the run finished. `last`: the figures the summary's ppl come from; `side`: what the
    devices reported (their peaks, descriptions, privacy); `stretches`: wall seconds per stretch of a resumed run."""
    extra = {"global_params": n_params(server.model), "vocab_size": len(data.tokenizer), **extra}
    if export:  # validation text is what a benchmark may tune on, never the test split
        extra["validation_ppl"] = evaluate(server.model, data.validation, torch_device)["ppl"]
        extra |= paper_figures(server.model, data.test_sets, data.qa_sets, torch_device)
        export_model(server.model, data.tokenizer, out_dir / "model")
    result = summary(cfg, last, comm, side.pop("peaks"), sum(stretches),
                     {**extra, **side, "wall_seconds_stretches": stretches})
    result["rounds"] = len(records)
    write_json_atomic(out_dir / "summary.json", result)
    return result
