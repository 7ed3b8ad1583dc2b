"""The DeepFusion ServerApp: Flower carries the messages, `deepfusion.server` does the science.

The local engine's recipe: set up data and the global MoE, then the round loop both engines share
(recipes/multiround.py) with this engine's step: new nodes join, the devices' step over Flower, the server
step. Outputs are the local engine's (summary.json, metrics.jsonl, model/), with the Flower message bytes next
to the payload bytes in comm_bytes.

What a round exchanges depends on the method, as in the local engine:
    knowledge methods  `_knowledge_round`: instructions out, packets back, `server_round` (validate, weight,
                       distil; it applies min_devices)
    hosting methods    `_hosting_round`: weights out and back as ArrayRecords, `hosting.receive` (validate),
                       then Flower's FedAvg (fedavg-moe) or `hosting.average` (expert-subset, fedjets)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from deepfusion.baselines import hosting
from deepfusion.config import HOSTING_METHODS, KNOWLEDGE_METHODS, ONESHOT_METHODS, FederationConfig
from deepfusion.engines.flower.roster import Roster
from deepfusion.engines.flower.wire import (RunSettings, content, run_settings, upload_bytes, weights_content,
                                            weights_digest, weights_packet)
from deepfusion.errors import ConfigError
from deepfusion.federation import prepare_data
from deepfusion.ledger import NETWORK, Ledger
from deepfusion.models import n_params, resolve_device
from deepfusion.outputs import load_checkpoint, rewrite_metrics, write_json_atomic
from deepfusion.progress import RunProgress
from deepfusion.recipes.multiround import checkpoint_path, finish, retry_missing, run_rounds
from deepfusion.server import build_server, evaluate, load_server_state, server_round
from deepfusion.wire import PacketError
from deepfusion.wire.instruction import Instruction
from deepfusion.wire.setup import make_setup
from deepfusion.wire.upload import UploadError

log = logging.getLogger("deepfusion")
FLOWER_METHODS = (*ONESHOT_METHODS, *KNOWLEDGE_METHODS, *HOSTING_METHODS)  # the methods whose devices exchange something


def make_app(cfg: FederationConfig | None = None, out_dir: Path | None = None, data_dir: str | None = None,
             settings: RunSettings | None = None, progress: bool = True, tensorboard: Path | None = None,
             resume: bool = False) -> ServerApp:
    """`flwr run` uses `app` below (everything from the run config); the simulation passes the CLI's config,
    --no-progress, --tensorboard and --resume."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings or run_settings(dict(context.run_config))
        if not logging.getLogger().handlers:  # a bare flwr-serverapp process: let our [ROUND] lines through
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
        run(grid, cfg or s.federation(), Path(out_dir or s.out), data_dir or s.data_dir or None, s, progress,
            tensorboard, resume)

    return app


app = make_app()


def check_method(cfg: FederationConfig) -> None:
    if cfg.method not in FLOWER_METHODS:
        raise ConfigError(f"config error: method = {cfg.method!r} does not run on the flower engine: its devices "
                          f"send nothing over a network; the flower engine runs {', '.join(FLOWER_METHODS)}; "
                          "run this method with --engine local")


def run(grid: Grid, cfg: FederationConfig, out_dir: Path, data_dir: str | None, s: RunSettings,
        progress: bool = True, tensorboard: Path | None = None, resume: bool = False) -> dict:
    """The federation over Flower; `resume` continues after the last round checkpointed in out_dir (the
    devices' states are the nodes': the simulation keeps them in out_dir/checkpoint/nodes)."""
    check_method(cfg)
    if cfg.method in ONESHOT_METHODS:
        return _oneshot(grid, cfg, out_dir, data_dir, s, progress, tensorboard, resume)
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch_device = resolve_device(cfg.device)
    data = prepare_data(cfg, data_dir, private=False)  # the server never packs a device's private blocks
    server = build_server(cfg.server, cfg.method, len(data.tokenizer), data.proxy, [d.id for d in cfg.devices],
                          cfg.seed, torch_device, cfg.knowledge)
    hosts = cfg.method in HOSTING_METHODS  # devices host (part of) the global MoE: its architecture goes in the Setup
    roster = Roster(cfg, make_setup(cfg, data, server.model if hosts else None).to_bytes())
    infos: dict[str, hosting.HostInfo] = {}  # hosting methods: what the server knows of each host
    log.info("global %s/%s: %.2fM params on %s; waiting for %d SuperNodes (%s)", cfg.server.family, cfg.server.size,
             n_params(server.model) / 1e6, torch_device, len(cfg.devices), [d.id for d in cfg.devices])

    timeout = cfg.server.device_timeout or s.round_timeout  # the config's straggler limit, else the run's
    records = _restore(checkpoint_path(out_dir), cfg, server, roster, infos) if resume else []
    rewrite_metrics(out_dir, records)
    first = len(records) + 1

    def step(r: int) -> dict:
        roster.join(grid, r, wait=s.node_timeout if r == first else 0.0, timeout=timeout)
        return (_hosting_round(grid, cfg, roster, server, infos, r, timeout) if hosts
                else _knowledge_round(grid, cfg, roster, server, r, timeout))

    def engine_state(records: list[dict]) -> dict:  # the server's part of the local engine's; devices keep theirs
        return {"engine": "flower", "comm": roster.ledger.per_device,
                "hosts": {d: {"experts": i.experts, "usage": i.usage} for d, i in infos.items()}}

    with RunProgress(out_dir, live=progress, tensorboard=tensorboard) as shown:
        shown.stage("ROUND", "round", cfg.rounds, done=len(records))
        run_rounds(cfg, out_dir, server, step, lambda: evaluate(server.model, data.test_sets, torch_device),
                   engine_state, shown, cfg.rounds, records)

    side = roster.devices_side()
    for device, info in infos.items():  # the share of the MoE a host held, as the local engine reports it
        if device in side["devices"]:
            side["devices"][device]["hosted_share"] = round(hosting.hosted_share(server.model, info), 4)
    result = finish(cfg, out_dir, server, data, torch_device, records[-1], records, roster.comm(), side,
                    [round(time.perf_counter() - start, 2)], {"engine": "flower"})
    shown.finish()
    return result


def _restore(ckpt: Path, cfg: FederationConfig, server, roster: Roster, infos: dict[str, hosting.HostInfo]
             ) -> list[dict]:
    """The server as it was after its last checkpointed round: weights, optimiser, bytes, hosts; its records."""
    state = load_checkpoint(ckpt)
    load_server_state(server, state["server"])
    roster.ledger = Ledger.restore(state["comm"], NETWORK)
    ids = [d.id for d in cfg.devices]
    for d, h in state["hosts"].items():
        infos[d] = hosting.HostInfo(h["experts"], h["usage"], offset=ids.index(d))
    log.info("resumed after round %d of %d from %s", len(state["metrics"]), cfg.rounds, ckpt)
    return state["metrics"]


def _oneshot(grid: Grid, cfg: FederationConfig, out_dir: Path, data_dir: str | None, s: RunSettings,
             progress: bool = True, tensorboard: Path | None = None, resume: bool = False) -> dict:
    """The paper's protocol on Flower (recipes/deepfusion.py): one train message per device with its Task, its
    trained LLM and data embedding back as records; Phases I-III then run here, as in the local engine."""
    from deepfusion.recipes import deepfusion as recipe

    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(cfg.device)
    data = prepare_data(cfg, data_dir, private=False)  # the server never packs a device's private blocks
    roster = Roster(cfg, make_setup(cfg, data).to_bytes())
    timeout = cfg.server.device_timeout or s.round_timeout
    roster.join(grid, 1, wait=s.node_timeout, timeout=timeout)

    def send(tasks: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, str]]:
        replies = roster.send(grid, 1, "train.oneshot", lambda d: content(task=tasks[d], device=d), timeout)
        uploads, failed = {}, {}
        for device in tasks:
            try:
                uploads[device] = upload_bytes(replies[device])
            except KeyError:
                failed[device] = roster.ledger.last(device).get("failed", "no answer")
            except UploadError as e:
                failed[device] = str(e)
        return uploads, failed

    with RunProgress(out_dir, live=progress, tensorboard=tensorboard) as shown:
        result = recipe.run(cfg, out_dir, data, send, torch_device, resume=resume, progress=shown, engine="flower")
    result.update(engine="flower", flower_comm_bytes=roster.comm())
    write_json_atomic(out_dir / "summary.json", result)
    shown.finish()
    return result


def _knowledge_round(grid: Grid, cfg: FederationConfig, roster: Roster, server, r: int, timeout: float) -> dict:
    """Instructions down, knowledge packets up, the local engine's server step. As the local engine does,
    below server.min_devices answers it asks the devices that failed again, at most server.round_retries times."""
    started = time.perf_counter()

    def ask(devices: list[str] | None) -> dict[str, bytes]:
        return roster.train(grid, r, lambda device: _instruction(cfg, device, r, len(server.proxy)), timeout, devices)

    payloads = retry_missing(cfg, r, ask(None), [d.id for d in cfg.devices], ask)
    seconds_devices = time.perf_counter() - started
    missing = {d.id: roster.ledger.last(d.id)["failed"] for d in cfg.devices if d.id not in payloads}
    if missing:
        log.warning("[ROUND %d/%d] expected packets from %d devices, got %d; missing %s: the round goes on with "
                    "the devices that answered (server.min_devices = %d decides whether it distils)", r, cfg.rounds,
                    len(cfg.devices), len(payloads), missing, cfg.server.min_devices)
    return {**server_round(server, payloads, r), "bytes_up": sum(len(p) for p in payloads.values()),
            "seconds_devices": round(seconds_devices, 2)}


def _hosting_round(grid: Grid, cfg: FederationConfig, roster: Roster, server, infos: dict[str, hosting.HostInfo],
                   r: int, timeout: float) -> dict:
    """Weights down, local training on the hosted MoE, weights up (ArrayRecords), the local engine's checks,
    then FedAvg weighted by tokens trained: Flower's own (FedAvg.aggregate_train, weighted by num-examples)
    for fedavg-moe; `hosting.average` for expert-subset and fedjets, which averages each expert over the hosts
    that held it (Flower's FedAvg averages every array over every reply). A device that joined since the last
    round first says what it can host (query.host); under fedjets it then answers a usage probe (a train.weights
    message with settings["probe"], hosting.probe_first). As in the local engine, a failed host is not asked again."""
    started = time.perf_counter()
    ids = [d.id for d in cfg.devices]
    new = [d for d in ids if d in roster.node_of and d not in infos]
    for device in roster.send(grid, r, "query.host", lambda d: content(device=d), timeout, new, setup=True):
        infos[device] = hosting.HostInfo(roster.info[device]["experts_per_layer"], offset=ids.index(device))
    waiting = [d for d in new if d not in infos]
    for device in waiting:
        roster.miss(device, r, 0, 0, "it has not said what it can host (query.host failed)")
    settings = hosting.round_settings(cfg.server, len(ids))  # the local engine's, over every configured host

    def probe(sent: dict[str, hosting.WeightsPacket]) -> dict[str, bytes]:  # fedjets' usage probe: the same message
        replies = roster.send(grid, r, "train.weights", lambda d: weights_content(sent[d]), timeout, list(sent))
        return {d: _packet_bytes(reply) for d, reply in replies.items()}

    for device in hosting.probe_first(cfg.method, server.model, infos, r, settings, probe):
        roster.ledger.note(device, probe=True)
    sent = {d: hosting.offer(server.model, d, infos[d], r, settings) for d in ids if d in infos}
    replies = roster.send(grid, r, "train.weights", lambda d: weights_content(sent[d]), timeout,
                          [d for d in ids if d not in waiting])
    seconds_devices = time.perf_counter() - started

    payloads, rejected = {}, {}  # each upload as the local engine's WeightsPacket bytes, checked as it checks them
    for device, reply in replies.items():
        try:
            payloads[device] = weights_packet(reply).to_bytes()
        except PacketError as e:
            rejected[device] = str(e)
            log.warning("[ROUND %d] rejected weights of device %r: %s; the round goes on without it", r, device, e)
            continue
        roster.ledger.note(device, sha256=weights_digest(payloads[device]))  # equal weights, equal digests
    uploads, refused = hosting.receive(payloads, sent, r)

    def flowers_fedavg(model, uploads) -> bool:
        try:
            arrays, _ = FedAvg().aggregate_train(r, [replies[d] for d in uploads])
        except InconsistentMessageReplies as e:
            log.warning("[ROUND %d/%d] Flower's FedAvg refused the replies (%s): averaging skipped this round",
                        r, cfg.rounds, e)
            return False
        model.load_state_dict(arrays.to_torch_state_dict())
        return True

    fedavg = flowers_fedavg if cfg.method == "fedavg-moe" else None
    result = hosting.conclude(server.model, infos, uploads, rejected | refused, sent, r, cfg.server.min_devices, fedavg)
    return {**result, "bytes_up": roster.ledger.up_in_round(r), "seconds_devices": round(seconds_devices, 2)}


def _packet_bytes(reply) -> bytes:
    """A reply's WeightsPacket as bytes; a malformed one as b"", which hosting.receive rejects, naming why."""
    try:
        return weights_packet(reply).to_bytes()
    except PacketError:
        return b""


def _instruction(cfg: FederationConfig, device: str, r: int, n_proxy: int) -> bytes:
    """The local engine's instruction, byte for byte: same round, proxy blocks and training settings."""
    dc = next(d for d in cfg.devices if d.id == device)
    return Instruction.for_device(cfg, dc, r, n_proxy).to_bytes()
