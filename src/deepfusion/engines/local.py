"""The in-process engine (the default): the whole federation in one Python process.

A recipe: set up data, devices and server, then per round: device steps, server step, evaluate,
checkpoint, log. Every message still goes through the same bytes as on a network
(`Instruction.to_bytes`, `KnowledgePacket.to_bytes`, `WeightsPacket.to_bytes`), so communication is
measured, not estimated.

What a round's device step is depends on the method (config.py):
    one-shot methods   deepfusion, its ablations and fedmkt: no rounds; recipes/deepfusion.py over `oneshot_send`,
                       one task down and one upload (the device's trained LLM) up per device
    knowledge methods  multiround-views, plain-fkd, device-kd: an instruction down, a knowledge packet up
    hosting methods    fedavg-moe, expert-subset, fedjets: weights down, trained weights up (baselines/hosting.py)
    server methods     proxy-only, centralized, centralized-converged: no devices
    local-only         devices train alone and are evaluated on their own domain; there is no global model
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from deepfusion.baselines import hosting
from deepfusion.baselines.centralized import EarlyStopping, pooled_blocks
from deepfusion.config import HOSTING_METHODS, KNOWLEDGE_METHODS, ONESHOT_METHODS, FederationConfig
from deepfusion.device import (Device, build_device, describe, device_state, evaluate_device, load_device_state,
                               local_train, measure_train_peak, run_round, train_peak_bytes)
from deepfusion.federation import (FederationData, device_documents, device_seed, prepare_data,
                                   public_blocks)
from deepfusion.ledger import Ledger
from deepfusion.models import n_params, resolve_device
from deepfusion.outputs import code_version, load_checkpoint, rewrite_metrics
from deepfusion.privacy import federation_report
from deepfusion.progress import RunProgress
from deepfusion.recipes.multiround import checkpoint_path, finish, retry_missing, run_rounds
from deepfusion.replay import Replay
from deepfusion.server import build_server, evaluate, load_server_state, server_round
from deepfusion.wire.instruction import Instruction

log = logging.getLogger("deepfusion")


def setup_devices(cfg: FederationConfig, data: FederationData, torch_device: torch.device) -> dict[str, Device]:
    from deepfusion.device import choose_size

    devices = {}
    for dc in cfg.devices:
        own = data.device_tokenizers.get(dc.id)  # its model reads its own ids, and has as many
        vocab = len(own if own is not None else data.tokenizer)
        size = dc.size if dc.size != "auto" else choose_size(dc, vocab, cfg.data.seq_len, torch_device)
        devices[dc.id] = build_device(dc, size, vocab, data.private[dc.id], data.proxy, device_seed(cfg, dc.id),
                                      torch_device, global_tokenizer=data.tokenizer, tokenizer=own)
    return devices


def setup_hosts(cfg: FederationConfig, data: FederationData, model, torch_device: torch.device
                ) -> tuple[dict[str, hosting.Host], dict[str, hosting.HostInfo]]:
    """fedavg-moe: every device hosts the whole MoE. expert-subset: each device measures how many routed
    experts per layer fit its memory and tells the server (HostInfo); the server picks which, by usage.
    fedjets: m is the server's, and each device measures that compact MoE's training peak."""
    hosts, infos = {}, {}
    vocab, subset = len(data.tokenizer), cfg.method in hosting.SUBSET_METHODS
    batch = torch.randint(vocab, (cfg.server.batch_size, cfg.data.seq_len), device=torch_device)
    whole = 0 if subset else train_peak_bytes(model, batch, hosting.moe_loss)  # the same on every device
    for i, dc in enumerate(cfg.devices):
        host = hosting.Host(dc, data.private[dc.id], torch.Generator().manual_seed(device_seed(cfg, dc.id)),
                            torch_device, model.config, None, peak_mem_bytes=whole)
        if subset:
            hosting.measure_host(host, cfg.method, cfg.server, vocab, batch)
        hosts[dc.id] = host
        infos[dc.id] = hosting.HostInfo(host.experts, offset=i)
    return hosts, infos


def run(cfg: FederationConfig, out_dir: Path, data_dir: str | None = None, progress: bool = True,
        resume: bool = False, replay: Path | None = None, tensorboard: Path | None = None) -> dict:
    """Run (or, with resume, continue after the last completed round) a federation; returns the summary.

    `progress`: live bars on a terminal (else one line per round or phase, progress.py); `tensorboard`: a
    log directory for the run's scalars. Either way the PNG curves go next to summary.json (plots.py).
    `replay` (knowledge methods): a directory of recorded device uploads (replay.py). A run whose device
    side is recorded there replays it without building devices; otherwise it runs them and records.
    """
    code_version()  # provenance: the code as this process loaded it, whatever is committed while it runs
    if cfg.method in ONESHOT_METHODS:  # the paper's protocol: one task and one upload per device, no rounds
        return run_oneshot(cfg, out_dir, data_dir, resume, progress, tensorboard, replay)
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch_device = resolve_device(cfg.device)
    data = prepare_data(cfg, data_dir)
    vocab, method = len(data.tokenizer), cfg.method
    recorded = Replay(replay, cfg) if replay and method in KNOWLEDGE_METHODS else None
    replaying = recorded is not None and recorded.complete(cfg.rounds)
    live = method in (*KNOWLEDGE_METHODS, "local-only") and not replaying
    devices = setup_devices(cfg, data, torch_device) if live else {}
    train_blocks = pooled_blocks(data) if method.startswith("centralized") else data.proxy
    server = build_server(cfg.server, method, vocab, train_blocks, [d.id for d in cfg.devices], cfg.seed,
                          torch_device, cfg.knowledge)
    hosts, infos = setup_hosts(cfg, data, server.model, torch_device) if method in HOSTING_METHODS else ({}, {})
    stopper = EarlyStopping(cfg.server.patience) if method == "centralized-converged" else None
    rounds = cfg.server.max_rounds if stopper else cfg.rounds
    log.info("global %s/%s: %.2fM params on %s; devices: %s%s", cfg.server.family, cfg.server.size,
             n_params(server.model) / 1e6, torch_device, [describe(d) for d in devices.values()] or list(hosts),
             f" (replaying {recorded.dir})" if replaying else "")

    ckpt = checkpoint_path(out_dir)
    ledger = Ledger((*devices, *hosts))
    records: list[dict] = []
    before: list[float] = []  # earlier stretches' seconds (a resumed run), each up to its last checkpoint
    if resume:
        state = load_checkpoint(ckpt)
        ledger, records = _restore(state, server, devices, hosts, infos, stopper)
        before = state.get("wall_seconds_stretches", [])
        log.info("resumed after round %d of %d from %s", len(records), rounds, ckpt)
    rewrite_metrics(out_dir, records)

    def step(r: int) -> dict:
        """This engine's round: the devices in-process (or their recorded uploads), then the server's step."""
        started = time.perf_counter()
        if replaying:
            payloads, t_devices = recorded.load_round(r, ledger)
            result = server_round(server, payloads, r)
        elif method in KNOWLEDGE_METHODS:
            payloads = _knowledge_exchange(cfg, server.proxy, devices, r, list(devices), ledger, tick)
            payloads = retry_missing(cfg, r, payloads, list(devices), lambda ids: _knowledge_exchange(
                cfg, server.proxy, devices, r, ids, ledger, lambda: None))
            t_devices = time.perf_counter() - started
            if recorded:
                recorded.save_round(r, payloads, ledger, t_devices)
            result = server_round(server, payloads, r)
        elif method in HOSTING_METHODS:
            result = _hosting_round(cfg, server, hosts, infos, r, ledger, tick)
            t_devices = result.pop("seconds_devices")
        elif method == "local-only":
            result, t_devices = _local_only_round(cfg, devices, r, ledger, tick), time.perf_counter() - started
        else:
            result, t_devices = server_round(server, {}, r), 0.0
        return {**result, "bytes_up": ledger.up_in_round(r), "seconds_devices": round(t_devices, 2)}

    def engine_state(records: list[dict]) -> dict:
        return {"devices": {d: device_state(dev) for d, dev in devices.items()}, "hosts": _hosts_state(hosts, infos),
                "stopper": stopper.state() if stopper else None, "comm": ledger.per_device,
                "wall_seconds_stretches": [*before, round(time.perf_counter() - start, 2)]}

    with RunProgress(out_dir, live=progress, tensorboard=tensorboard) as shown:
        shown.stage("ROUND", "round", rounds, done=len(records))
        tick = lambda: shown.advance(1 / (len(cfg.devices) + 1), line=False)  # noqa: E731  a device's share of a round
        evaluate_round = ((lambda: local_only_eval(devices, data)) if method == "local-only"
                          else lambda: evaluate(server.model, data.test_sets, torch_device))
        run_rounds(cfg, out_dir, server, step, evaluate_round, engine_state, shown, rounds, records, stopper,
                   lambda: evaluate(server.model, data.validation, torch_device))

    last, extra = records[-1], {}
    if stopper:  # the best round's weights are the converged model
        server.model.load_state_dict(stopper.best_state)
        last = evaluate(server.model, data.test_sets, torch_device)
        extra |= {"best_round": stopper.best_round, "steps": stopper.best_round * cfg.server.steps,
                  "converged": len(records) < rounds}  # False: max_rounds ended it, not patience
    if replaying:
        extra["replayed_from"] = str(recorded.dir)
    side = recorded.load_devices(cfg.rounds) if replaying else _devices_side(devices, hosts, infos, server, data)
    if recorded and not replaying:
        recorded.save_devices(cfg.rounds, side)
    result = finish(cfg, out_dir, server, data, torch_device, last, records, ledger.totals(), side,
                    [*before, round(time.perf_counter() - start, 2)], extra, export=method != "local-only")
    shown.finish()
    return result


def _devices_side(devices: dict[str, Device], hosts: dict[str, hosting.Host], infos: dict[str, hosting.HostInfo],
                  server, data: FederationData) -> dict:
    """What the summary says of the devices: peak memory, description, own perplexity, privacy spent."""
    side = {"peaks": {d: dev.peak_mem_bytes for d, dev in (*devices.items(), *hosts.items())}}
    side["devices"] = {d: _device_report(dev, data) for d, dev in devices.items()} or {
        d: {"id": d, "experts_per_layer": h.experts, "hosted_share": round(hosting.hosted_share(server.model, infos[d]), 4),
            "budget_bytes": h.budget_bytes, "fits_budget": not h.budget_bytes or h.peak_mem_bytes <= h.budget_bytes,
            "tokens_trained": h.tokens_trained} for d, h in hosts.items()}
    if devices:  # each device's (ε, δ) spent, and the federation's: its weakest device's
        side["privacy"] = federation_report({d: describe(dev)["privacy"] for d, dev in devices.items()})
    return side


# ---- the paper's one-shot protocol: one task per device, in-process ------------------------------------

def run_oneshot(cfg: FederationConfig, out_dir: Path, data_dir: str | None = None, resume: bool = False,
                progress: bool = True, tensorboard: Path | None = None, replay: Path | None = None) -> dict:
    """recipes/deepfusion.py over in-process devices: each device's task and upload go through their bytes.
    `replay`: record Phase 0's uploads in that directory, or replay them if this device side is recorded."""
    from deepfusion.recipes import deepfusion as recipe
    from deepfusion.replay import UploadReplay

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch_device = resolve_device(cfg.device)
    data = prepare_data(cfg, data_dir)
    with RunProgress(out_dir, live=progress, tensorboard=tensorboard) as shown:
        send = oneshot_send(cfg, data, torch_device, shown)
        if replay:
            recorded = UploadReplay(replay, cfg)
            log.info("Phase 0 %s %s", "replayed from" if recorded.complete() else "recorded in", recorded.dir)
            send = recorded.wrap(send)
        result = recipe.run(cfg, out_dir, data, send, torch_device, resume=resume, progress=shown)
    shown.finish()
    return result


def oneshot_send(cfg: FederationConfig, data: FederationData, torch_device: torch.device,
                 shown: RunProgress | None = None):
    """Deliver each task and collect each upload; a device that fails or misses device_timeout is left out.
    `shown` counts the devices as they answer (the recipe began its Phase 0 stage)."""
    from deepfusion import ondevice

    def device(device_id: str, task: bytes) -> bytes:
        dc = next(d for d in cfg.devices if d.id == device_id)
        texts = [doc.text for doc in device_documents(cfg, device_id, data.data_dir)]
        private = ondevice.PrivateData(texts, data.private[device_id], data.device_tokenizers.get(device_id))
        model = ondevice.public_model(cfg, dc, data.proxy, data.tokenizer, torch_device)
        return ondevice.run_task(cfg, device_id, task, private, model, device_seed(cfg, device_id), torch_device)

    def send(tasks: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, str]]:
        replies, failed = {}, {}
        for device_id, task in tasks.items():
            started = time.perf_counter()
            try:
                replies[device_id] = device(device_id, task)
                late = time.perf_counter() - started
                if cfg.server.device_timeout and late > cfg.server.device_timeout:
                    del replies[device_id]
                    raise TimeoutError(f"answered after {late:.1f}s > device_timeout {cfg.server.device_timeout}s")
            except Exception as e:  # a dead device must not stop the federation
                log.warning("[PHASE 0] device %r failed (%s: %s); the federation goes on without it",
                            device_id, type(e).__name__, e)
                failed[device_id] = f"{type(e).__name__}: {e}"
            if shown:
                shown.advance()
        return replies, failed

    return send


# ---- one round's device steps, per kind of method ---------------------------------------------------

def _exchange(cfg: FederationConfig, r: int, device_ids: list[str], ledger: Ledger, tick,
              down_of: Callable[[str], bytes], answer: Callable[[str, bytes], bytes]) -> dict[str, bytes]:
    """Every device gets its message as bytes and answers with bytes; a failing or late device is left out."""
    payloads = {}
    for device_id in device_ids:
        down = down_of(device_id)
        started = time.perf_counter()
        try:
            up = answer(device_id, down)
            late = cfg.server.device_timeout and time.perf_counter() - started > cfg.server.device_timeout
            if late:  # in-process we cannot pre-empt a straggler, but its late answer is dropped, as on a network
                raise TimeoutError(f"answered after {time.perf_counter() - started:.1f}s > device_timeout "
                                   f"{cfg.server.device_timeout}s")
        except Exception as e:  # a dead device must not stop the federation
            log.warning("[ROUND %d] device %r failed (%s: %s); the round goes on without it",
                        r, device_id, type(e).__name__, e)
            ledger.record(device_id, r, failed=str(e), down=len(down))
            continue
        tick()
        payloads[device_id] = up
        ledger.record(device_id, r, down=len(down), up=len(up))
    return payloads


def _knowledge_exchange(cfg: FederationConfig, proxy: torch.Tensor, devices: dict[str, Device], r: int,
                        device_ids: list[str], ledger: Ledger, tick) -> dict[str, bytes]:
    """Instructions down, knowledge packets up."""
    settings = {dc.id: dc for dc in cfg.devices}

    def down_of(device_id: str) -> bytes:
        return Instruction.for_device(cfg, settings[device_id], r, len(proxy)).to_bytes()

    return _exchange(cfg, r, device_ids, ledger, tick, down_of,
                     lambda device_id, down: run_round(devices[device_id], Instruction.from_bytes(down)).to_bytes())


def _hosting_round(cfg: FederationConfig, server, hosts: dict[str, hosting.Host], infos: dict[str, hosting.HostInfo],
                   r: int, ledger: Ledger, tick) -> dict:
    """Weights down, local training on the hosted MoE, weights up, FedAvg (per expert for the subset methods).
    fedjets first probes each new host's router usage with the same exchange (its own ledger entry)."""
    t0 = time.perf_counter()
    settings = hosting.round_settings(cfg.server, len(hosts))

    def exchange(sent: dict[str, hosting.WeightsPacket], tick) -> dict[str, bytes]:
        return _exchange(cfg, r, list(sent), ledger, tick, lambda d: sent[d].to_bytes(),
                         lambda d, down: hosting.host_round(hosts[d], down))

    probed = hosting.probe_first(cfg.method, server.model, infos, r, settings,
                                 lambda sent: exchange(sent, lambda: None))
    for d in probed:  # a fedjets probe is an exchange of its own: its bytes are the round's too, marked
        ledger.note(d, probe=True)
    sent = {d: hosting.offer(server.model, d, infos[d], r, settings) for d in hosts}
    payloads = exchange(sent, tick)
    seconds = time.perf_counter() - t0
    uploads, rejected = hosting.receive(payloads, sent, r)
    return {**hosting.conclude(server.model, infos, uploads, rejected, sent, r, cfg.server.min_devices),
            "seconds_devices": seconds}


def _local_only_round(cfg: FederationConfig, devices: dict[str, Device], r: int, ledger: Ledger, tick) -> dict:
    """Each device trains its own model on its own data; nothing is sent."""
    losses = {}
    for dc in cfg.devices:
        device = devices[dc.id]
        if device.peak_mem_bytes == 0:
            device.peak_mem_bytes = measure_train_peak(device, dc.batch_size)
        losses[dc.id] = round(local_train(device, dc.local_steps, dc.batch_size, dc.lr), 4)
        ledger.record(dc.id, r)
        tick()
    return {"local_loss": losses}


# ---- evaluation and reports ---------------------------------------------------------------------------

def domain_tests(data: FederationData, source: str, tokenizer=None) -> dict[str, tuple[str, torch.Tensor]]:
    """The held-out sets of every source in `source`'s domain; with a device's own tokenizer, the same text cut
    its way (its perplexity is then per its own token)."""
    domain = data.test_sets[source][0]
    return {s: (d, public_blocks(data.tokenizer, tokenizer, b))
            for s, (d, b) in data.test_sets.items() if d == domain}


def local_only_eval(devices: dict[str, Device], data: FederationData) -> dict:
    """local-only's perplexities: each device's own model on its own domain's held-out text; a domain's
    figure is the mean over its devices (a device drawn at random), its best device alongside."""
    by_device = {d: evaluate(dev.model, domain_tests(data, dev.cfg.source, _own(dev, data)), dev.torch_device)
                 for d, dev in devices.items()}
    ppl, by_source = {}, {}
    for result in by_device.values():
        for domain, p in result["ppl"].items():
            ppl.setdefault(domain, []).append(p)
        for source, p in result["ppl_by_source"].items():
            by_source.setdefault(source, []).append(p)
    mean = lambda xs: round(sum(xs) / len(xs), 2)  # noqa: E731
    return {"ppl": {d: mean(v) for d, v in ppl.items()}, "ppl_best": {d: min(v) for d, v in ppl.items()},
            "ppl_by_source": {s: mean(v) for s, v in by_source.items()},
            "ppl_by_device": {d: r["ppl"] for d, r in by_device.items()}}


def _own(device: Device, data: FederationData):
    """The device's own tokenizer (None: the federation's): its model reads only its own ids."""
    return data.device_tokenizers.get(device.cfg.id)


def _device_report(device: Device, data: FederationData) -> dict:
    """A device's description and its own model's perplexity on its source and on its whole domain."""
    tests = domain_tests(data, device.cfg.source, _own(device, data))
    (domain, ppl), = evaluate(device.model, tests, device.torch_device)["ppl"].items()
    return {**describe(device), "ppl_own_source": round(evaluate_device(device, tests[device.cfg.source][1]), 2),
            "domain": domain, "ppl_own_domain": ppl,
            **({"tokenizer": "own"} if _own(device, data) is not None else {})}


# ---- checkpoint ---------------------------------------------------------------------------------------

def _hosts_state(hosts: dict[str, hosting.Host], infos: dict[str, hosting.HostInfo]) -> dict:
    return {d: {"generator": h.generator.get_state(), "tokens_trained": h.tokens_trained,
                "usage": infos[d].usage} for d, h in hosts.items()}


def _restore(state: dict, server, devices: dict[str, Device], hosts: dict, infos: dict,
             stopper: EarlyStopping | None) -> tuple[Ledger, list[dict]]:
    load_server_state(server, state["server"])
    for d, dev in devices.items():
        load_device_state(dev, state["devices"][d])
    for d, h in hosts.items():
        saved = state["hosts"][d]
        h.generator.set_state(saved["generator"])
        h.tokens_trained, infos[d].usage = saved["tokens_trained"], saved["usage"]
    if stopper:
        stopper.load(state["stopper"])
    return Ledger.restore(state["comm"]), state["metrics"]
