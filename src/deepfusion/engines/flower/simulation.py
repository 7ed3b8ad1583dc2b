"""`deepfusion run --engine flower`: the Flower app in Flower's Simulation Runtime, on this machine.

One virtual SuperNode per configured device (partition i is device i). All devices run in one Ray actor,
one after another as in the local engine: the actor keeps every device in memory across rounds, and a
single actor with all the CPUs gives device training the threads the local engine gives it. Each device's
state is also saved after every round in the run's checkpoint/nodes/ (a simulation runs on one machine), so
`deepfusion run --resume` continues a killed Flower run, devices and server, as the local engine does.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from deepfusion.config import FederationConfig
from deepfusion.engines.flower.wire import RunSettings

log = logging.getLogger("deepfusion")


def run(cfg: FederationConfig, out_dir: Path, data_dir: str | None = None, progress: bool = True,
        settings: RunSettings | None = None, tensorboard: Path | None = None, resume: bool = False) -> dict:
    """Run the federation in the simulation; same outputs, progress and plots as engines.local.run."""
    _quiet_flower()
    from flwr.simulation import run_simulation  # late: flwr and Ray load only for this engine

    from deepfusion.data import resolve_data_dir
    from deepfusion.engines.flower import client_app, server_app

    server_app.check_method(cfg)  # before Ray starts: a wrong method fails in a second, not after a minute
    out_dir = Path(out_dir)
    data_dir = data_dir or cfg.data.dir
    resolve_data_dir(data_dir)  # likewise a data directory without the corpora (the apps resolve it again)
    cpus = os.cpu_count() or 1
    gpus = 1.0 if cfg.device != "cpu" and torch.cuda.is_available() else 0.0
    backend = {"client_resources": {"num_cpus": cpus, "num_gpus": gpus},  # one actor: devices persist in it
               "init_args": {"num_cpus": cpus, "num_gpus": int(gpus), "logging_level": "error"}}
    # run_simulation is deprecated in favour of `flwr run` against a simulation SuperLink, which takes its
    # settings from pyproject.toml and the run config only: this CLI's --config/--out/... would not reach it.
    app = server_app.make_app(cfg, out_dir, data_dir, settings or RunSettings(), progress, tensorboard, resume)
    devices = client_app.make_app(data_dir=data_dir, state_dir=out_dir / "checkpoint" / "nodes", run_key="simulation")
    run_simulation(server_app=app, client_app=devices, num_supernodes=len(cfg.devices),
                   backend_name="ray", backend_config=backend)
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the Flower simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())


def _quiet_flower() -> None:
    """Flower logs to its own console handler; its DEBUG records would also reach ours, line by line."""
    logging.getLogger("flwr").propagate = False
    for noisy in ("alembic", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
