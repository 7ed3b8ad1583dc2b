"""The in-process engine (the default): the whole federation in one Python process.

A recipe: set up data, devices and server, then per round: send instructions, device steps, server
step, evaluate, checkpoint, log. Every message still goes through the same bytes as on a network
(`Instruction.to_bytes`, `KnowledgePacket.to_bytes`), so communication is measured, not estimated.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deepfusion.config import FederationConfig, to_dict
from deepfusion.device import (Device, Instruction, build_device, describe, device_state, evaluate_device,
                               load_device_state, run_round)
from deepfusion.federation import (FederationData, append_metrics, load_checkpoint, prepare_data, rewrite_metrics,
                                   save_checkpoint, summary, write_json_atomic)
from deepfusion.models import export_model, n_params, resolve_device
from deepfusion.server import build_server, evaluate, load_server_state, server_round, server_state

log = logging.getLogger("deepfusion")


def setup_devices(cfg: FederationConfig, data: FederationData, torch_device: torch.device) -> dict[str, Device]:
    from deepfusion.device import choose_size

    devices = {}
    vocab = len(data.tokenizer)
    for i, dc in enumerate(cfg.devices):
        size = dc.size if dc.size != "auto" else choose_size(dc, vocab, cfg.data.seq_len, torch_device)
        devices[dc.id] = build_device(dc, size, vocab, data.private[dc.id], data.proxy, cfg.seed * 1000 + i + 1,
                                      torch_device)
    return devices


def run(cfg: FederationConfig, out_dir: Path, data_dir: str | None = None, progress: bool = True,
        resume: bool = False) -> dict:
    """Run (or, with resume, continue after the last completed round) a federation; returns the summary."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch_device = resolve_device(cfg.device)
    data = prepare_data(cfg, data_dir)
    vocab = len(data.tokenizer)
    federated = cfg.method != "proxy-only"
    devices = setup_devices(cfg, data, torch_device) if federated else {}
    server = build_server(cfg.server, cfg.method, vocab, data.proxy, [d.id for d in cfg.devices], cfg.seed,
                          torch_device)
    log.info("global %s/%s: %.2fM params on %s; devices: %s", cfg.server.family, cfg.server.size,
             n_params(server.model) / 1e6, torch_device, [describe(d) for d in devices.values()])

    ckpt = out_dir / "checkpoint" / "state.pt"
    per_device = {d: {"up": 0, "down": 0, "rounds": []} for d in devices}
    records: list[dict] = []
    if resume:
        per_device, records = _restore(load_checkpoint(ckpt), server, devices)
        log.info("resumed after round %d of %d from %s", len(records), cfg.rounds, ckpt)
    rewrite_metrics(out_dir, records)
    with _progress(progress) as bar:
        task = bar.add_task(f"{cfg.method}: devices + server", total=cfg.rounds * (len(devices) + 1),
                            completed=len(records) * (len(devices) + 1))
        for r in range(len(records) + 1, cfg.rounds + 1):
            t_round = time.perf_counter()
            payloads = _device_steps(cfg, server.proxy, devices, r, per_device, lambda: bar.advance(task))
            payloads = _retry(cfg, r, payloads, list(devices), lambda ids: _device_steps(
                cfg, server.proxy, {d: devices[d] for d in ids}, r, per_device, lambda: None))
            t_devices = time.perf_counter() - t_round
            result = server_round(server, payloads, r)
            metrics = evaluate(server.model, data.test_sets, torch_device)
            records.append({"round": r, **metrics, **result, "bytes_up": sum(len(p) for p in payloads.values()),
                            "seconds_devices": round(t_devices, 2),
                            "seconds_round": round(time.perf_counter() - t_round, 2)})
            append_metrics(out_dir, records[-1])
            save_checkpoint(ckpt, {"config": to_dict(cfg), "round": r, "server": server_state(server),
                                   "devices": {d: device_state(dev) for d, dev in devices.items()},
                                   "comm": per_device, "metrics": records})
            log.info("[ROUND %d/%d] ppl %s | accepted %d rejected %d | %.1fs", r, cfg.rounds, metrics["ppl"],
                     len(result["accepted"]), len(result["rejected"]), records[-1]["seconds_round"])
            bar.advance(task)

    export_model(server.model, data.tokenizer, out_dir / "model")
    comm = {"up": sum(v["up"] for v in per_device.values()), "down": sum(v["down"] for v in per_device.values()),
            "per_device": per_device}
    peaks = {d: dev.peak_mem_bytes for d, dev in devices.items()}
    extra = {"global_params": n_params(server.model), "vocab_size": vocab,
             "devices": {d: {**describe(dev), "ppl_own_source": round(evaluate_device(
                 dev, data.test_sets[dev.cfg.source][1]), 2)} for d, dev in devices.items()}}
    result = summary(cfg, records[-1], comm, peaks, time.perf_counter() - start, extra)
    write_json_atomic(out_dir / "summary.json", result)
    return result


def _restore(state: dict, server, devices: dict[str, Device]) -> tuple[dict, list[dict]]:
    load_server_state(server, state["server"])
    for d, dev in devices.items():
        load_device_state(dev, state["devices"][d])
    return state["comm"], state["metrics"]


def _device_steps(cfg: FederationConfig, proxy: torch.Tensor, devices: dict[str, Device], r: int,
                  per_device: dict, tick) -> dict[str, bytes]:
    """Every device gets its instruction as bytes and answers with packet bytes; a failing device is skipped."""
    payloads = {}
    for dc in cfg.devices:
        if dc.id not in devices:
            continue
        down = Instruction(round=r, proxy_indices=list(range(len(proxy))), local_steps=dc.local_steps,
                           batch_size=dc.batch_size, lr=dc.lr, topk=cfg.server.topk,
                           temperature=cfg.server.temperature).to_bytes()
        started = time.perf_counter()
        try:
            packet = run_round(devices[dc.id], Instruction.from_bytes(down)).to_bytes()
            late = cfg.server.device_timeout and time.perf_counter() - started > cfg.server.device_timeout
            if late:  # in-process we cannot pre-empt a straggler, but its late answer is dropped, as on a network
                raise TimeoutError(f"answered after {time.perf_counter() - started:.1f}s > device_timeout "
                                   f"{cfg.server.device_timeout}s")
        except Exception as e:  # a dead device must not stop the federation
            log.warning("[ROUND %d] device %r failed (%s: %s); the round goes on without it",
                        r, dc.id, type(e).__name__, e)
            per_device[dc.id]["rounds"].append({"round": r, "down": len(down), "up": 0, "failed": str(e)})
            per_device[dc.id]["down"] += len(down)
            continue
        tick()
        payloads[dc.id] = packet
        per_device[dc.id]["up"] += len(packet)
        per_device[dc.id]["down"] += len(down)
        per_device[dc.id]["rounds"].append({"round": r, "down": len(down), "up": len(packet)})
    return payloads


def _retry(cfg: FederationConfig, r: int, payloads: dict[str, bytes], device_ids: list[str],
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


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)
