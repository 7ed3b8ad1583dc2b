"""The DeepFusion ServerApp: Flower carries the messages, `deepfusion.server` does the science.

The same recipe as engines/local.py: set up data and the global MoE, then per round: new nodes join,
instructions out, packets back, `server_round` (validate, weight, distil; it applies min_devices),
evaluate, checkpoint, log. Outputs are the local engine's (summary.json, metrics.jsonl, model/), with the
Flower message bytes next to the payload bytes in comm_bytes.

Knowledge methods exchange packets (`_knowledge_round`). A method that exchanges weights adds its own
round function next to it: ArrayRecords down and up, aggregated with a Flower strategy.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from deepfusion.config import ConfigError, FederationConfig, to_dict
from deepfusion.device import Instruction
from deepfusion.engines.flower.roster import Roster
from deepfusion.engines.flower.wire import RunSettings, run_settings
from deepfusion.federation import append_metrics, prepare_data, save_checkpoint, summary, write_json_atomic
from deepfusion.models import export_model, n_params, resolve_device
from deepfusion.node import make_setup
from deepfusion.server import build_server, evaluate, server_round, server_state

log = logging.getLogger("deepfusion")
FLOWER_METHODS = ("deepfusion", "plain-fkd", "device-kd")  # devices exchange knowledge packets


def make_app(cfg: FederationConfig | None = None, out_dir: Path | None = None, data_dir: str | None = None,
             settings: RunSettings | None = None) -> ServerApp:
    """`flwr run` uses `app` below (everything from the run config); the simulation passes the CLI's config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings or run_settings(dict(context.run_config))
        if not logging.getLogger().handlers:  # a bare flwr-serverapp process: let our [ROUND] lines through
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
        run(grid, cfg or s.federation(), Path(out_dir or s.out), data_dir or s.data_dir or None, s)

    return app


app = make_app()


def check_method(cfg: FederationConfig) -> None:
    if cfg.method not in FLOWER_METHODS:
        raise ConfigError(f"config error: method = {cfg.method!r} does not run on the flower engine yet; "
                          f"it runs {', '.join(FLOWER_METHODS)} (devices exchange knowledge packets); "
                          "run this method with --engine local")


def run(grid: Grid, cfg: FederationConfig, out_dir: Path, data_dir: str | None, s: RunSettings) -> dict:
    check_method(cfg)
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)
    torch_device = resolve_device(cfg.device)
    data = prepare_data(cfg, data_dir, private=False)  # the server never packs a device's private blocks
    server = build_server(cfg.server, cfg.method, len(data.tokenizer), data.proxy, [d.id for d in cfg.devices],
                          cfg.seed, torch_device)
    roster = Roster(cfg, make_setup(cfg, data).to_bytes())
    log.info("global %s/%s: %.2fM params on %s; waiting for %d SuperNodes (%s)", cfg.server.family, cfg.server.size,
             n_params(server.model) / 1e6, torch_device, len(cfg.devices), [d.id for d in cfg.devices])

    timeout = cfg.server.device_timeout or s.round_timeout  # the config's straggler limit, else the run's
    records: list[dict] = []
    for r in range(1, cfg.rounds + 1):
        t_round = time.perf_counter()
        roster.join(grid, r, wait=s.node_timeout if r == 1 else 0.0, timeout=timeout)
        result = _knowledge_round(grid, cfg, roster, server, r, timeout)
        metrics = evaluate(server.model, data.test_sets, torch_device)
        records.append({"round": r, **metrics, **result, "seconds_round": round(time.perf_counter() - t_round, 2)})
        append_metrics(out_dir, records[-1])
        # the server's part of the local engine's checkpoint; device states stay on their nodes
        save_checkpoint(out_dir / "checkpoint" / "state.pt", {"config": to_dict(cfg), "round": r,
                        "server": server_state(server), "comm": roster.per_device, "metrics": records})
        log.info("[ROUND %d/%d] ppl %s | accepted %d rejected %d | %.1fs", r, cfg.rounds, metrics["ppl"],
                 len(result["accepted"]), len(result["rejected"]), records[-1]["seconds_round"])

    export_model(server.model, data.tokenizer, out_dir / "model")
    side = roster.devices_side()
    extra = {"global_params": n_params(server.model), "vocab_size": len(data.tokenizer), **side, "engine": "flower"}
    result = summary(cfg, records[-1], roster.comm(), side.pop("peaks"), time.perf_counter() - start, extra)
    write_json_atomic(out_dir / "summary.json", result)
    return result


def _knowledge_round(grid: Grid, cfg: FederationConfig, roster: Roster, server, r: int, timeout: float) -> dict:
    """Instructions down, knowledge packets up, the local engine's server step. As the local engine does,
    below server.min_devices answers it asks the devices that failed again, at most server.round_retries times."""
    started = time.perf_counter()

    def ask(devices: list[str] | None) -> dict[str, bytes]:
        return roster.train(grid, r, lambda device: _instruction(cfg, device, r, len(server.proxy)), timeout, devices)

    payloads = ask(None)
    for attempt in range(1, cfg.server.round_retries + 1):
        missing = [d.id for d in cfg.devices if d.id not in payloads]
        if len(payloads) >= cfg.server.min_devices or not missing:
            break
        log.warning("[ROUND %d] %d answers of the %d a round needs (server.min_devices); retry %d/%d: asking %s "
                    "again", r, len(payloads), cfg.server.min_devices, attempt, cfg.server.round_retries,
                    ", ".join(missing))
        payloads = {**payloads, **ask(missing)}
    seconds_devices = time.perf_counter() - started
    missing = {d.id: roster.per_device[d.id]["rounds"][-1]["failed"] for d in cfg.devices if d.id not in payloads}
    if missing:
        log.warning("[ROUND %d/%d] expected packets from %d devices, got %d; missing %s: the round goes on with "
                    "the devices that answered (server.min_devices = %d decides whether it distils)", r, cfg.rounds,
                    len(cfg.devices), len(payloads), missing, cfg.server.min_devices)
    return {**server_round(server, payloads, r), "bytes_up": sum(len(p) for p in payloads.values()),
            "seconds_devices": round(seconds_devices, 2)}


def _instruction(cfg: FederationConfig, device: str, r: int, n_proxy: int) -> bytes:
    """The local engine's instruction, byte for byte: same round, proxy blocks and training settings."""
    dc = next(d for d in cfg.devices if d.id == device)
    return Instruction(round=r, proxy_indices=list(range(n_proxy)), local_steps=dc.local_steps,
                       batch_size=dc.batch_size, lr=dc.lr, topk=cfg.server.topk,
                       temperature=cfg.server.temperature).to_bytes()
