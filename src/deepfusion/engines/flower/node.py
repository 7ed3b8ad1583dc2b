"""One device on its own node: what it gets once from the server, its data, its state across rounds and restarts.

An engine that runs devices away from the server (the Flower ClientApp) calls these; nothing here imports
`flwr`. A device is built exactly as the local engine builds it (same config, tokenizer, proxy, seed
(federation.device_seed), same private blocks), so both engines send the same packet bytes.

Two kinds of device, by method:
    NodeDevice      knowledge methods (multiround-views, plain-fkd, device-kd): its own small LLM (device.py)
    hosting.Host    fedavg-moe, expert-subset, fedjets: it hosts the global MoE, or the part that fits its
                    memory (fedjets: the server's number of experts) (baselines/hosting.py); the weights come
                    from the server every round

A node starts from the server's `Setup` (wire/setup.py): the federation's config, tokenizer and proxy blocks.

On a node the device lives in a state directory, `<state-dir>/run-<run id>/`:
    <device>.data.pt   its private (and held-out) blocks, packed once (re-tokenising each round costs seconds)
    <device>.pt        its model, optimiser, RNG and counters, replaced after every round (write, then rename);
                       a host: its generator, tokens trained, and what it measured once (experts, budget, peak)
so a node that runs each message in a fresh process (a Flower SuperNode does), or that was killed and
restarted, continues exactly where its device was.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from deepfusion.baselines import hosting
from deepfusion.config import FederationConfig
from deepfusion.data import load_source, resolve_data_dir, split_documents
from deepfusion.device import (Device, build_device, choose_size, device_state, evaluate_device, load_device_state,
                               train_peak_bytes)
from deepfusion.federation import device_private, device_seed, held_out_blocks, own_tokenizer
from deepfusion.models import resolve_device
from deepfusion.wire.setup import Setup

log = logging.getLogger("deepfusion.node")


@dataclass
class NodeDevice:
    """A device as its node holds it: the model and optimiser, and its own held-out blocks."""

    device: Device
    test: torch.Tensor  # (N, T) held-out blocks of its own source: its own perplexity, as the local engine reports

    def ppl_own_source(self) -> float:
        return round(evaluate_device(self.device, self.test), 2)


def device_index(cfg: FederationConfig, device_id: str) -> int:
    ids = [d.id for d in cfg.devices]
    if device_id not in ids:
        raise ValueError(f"this node is device {device_id!r}, but the federation has {ids}; "
                         "start the SuperNode with --node-config 'device-id=\"<one of them>\"'")
    return ids.index(device_id)


def start_device(setup: Setup, device_id: str, data_dir: str | None,
                 blocks: tuple[torch.Tensor, torch.Tensor] | None = None) -> NodeDevice:
    """Build this node's device, initialised exactly as the local engine does, from its own source only.

    `blocks` (private, test) skips reading and tokenising the source again (a restored device passes them).
    """
    cfg = setup.config
    i = device_index(cfg, device_id)
    dc, d = cfg.devices[i], cfg.data
    tokenizer = setup.tokenizer()
    own = own_tokenizer(cfg, device_id, tokenizer)
    reads = own if own is not None else tokenizer  # its model reads its own ids, its held-out text too
    if blocks is None:  # the node's own data: its node config's data-dir, else found here (never the server's path)
        root = resolve_data_dir(data_dir)
        split = split_documents(load_source(dc.source, root, dc.domain), d.seed, d.proxy_frac, d.test_frac)
        blocks = device_private(cfg, device_id, tokenizer, root, split), held_out_blocks(reads, split.test, d)
    torch_device = resolve_device(cfg.device)
    size = dc.size if dc.size != "auto" else choose_size(dc, len(reads), d.seq_len, torch_device)
    device = build_device(dc, size, len(reads), blocks[0], setup.proxy, device_seed(cfg, dc.id), torch_device,
                          global_tokenizer=tokenizer, tokenizer=own)
    return NodeDevice(device, blocks[1])


def start_host(setup: Setup, device_id: str, data_dir: str | None) -> hosting.Host:
    """This node's host (fedavg-moe, expert-subset, fedjets), set up as engines/local.setup_hosts sets up each
    host: its own private blocks, the same generator seed, and one measurement of what it can hold: expert-subset
    the most routed experts per layer whose training step fits its memory (hosting.fit_experts), fedjets the
    training peak of the server's fixed number of experts (hosting.fix_host), fedavg-moe the whole MoE's. The
    local engine measures on one random batch drawn by the server; a node draws its own, seeded, so every node
    measures alike (the CPU measure itself varies by a few KB)."""
    cfg = setup.config
    i = device_index(cfg, device_id)
    dc, d = cfg.devices[i], cfg.data
    tokenizer, moe = setup.tokenizer(), setup.global_config()
    private = device_private(cfg, device_id, tokenizer, resolve_data_dir(data_dir))  # its own source only
    torch_device = resolve_device(cfg.device)
    host = hosting.Host(dc, private, torch.Generator().manual_seed(device_seed(cfg, dc.id)), torch_device, moe, None)
    vocab = len(tokenizer)
    batch = torch.randint(vocab, (cfg.server.batch_size, d.seq_len),
                          generator=torch.Generator().manual_seed(cfg.seed)).to(torch_device)
    if cfg.method in hosting.SUBSET_METHODS:
        hosting.measure_host(host, cfg.method, cfg.server, vocab, batch)
    else:  # the whole MoE; its weights are irrelevant to the measure
        whole = AutoModelForCausalLM.from_config(moe).to(torch_device)
        host.peak_mem_bytes = train_peak_bytes(whole, batch, hosting.moe_loss)
    log.info("device %r hosts %s (training peak %.1f MB%s)", device_id,
             "the whole MoE" if host.experts is None else f"{host.experts} routed experts per layer",
             host.peak_mem_bytes / 2**20, f", budget {host.budget_bytes / 2**20:.1f} MB" if host.budget_bytes else "")
    return host


def oneshot_upload(setup: Setup, device_id: str, task: bytes, data_dir: str | None) -> bytes:
    """The paper's Phase 0 on this node, exactly as the local engine runs it (same documents and blocks, same
    public checkpoint, same seed): the task in, the device's Upload bytes out."""
    from deepfusion import ondevice
    from deepfusion.federation import device_documents

    cfg = setup.config
    dc, d = cfg.devices[device_index(cfg, device_id)], cfg.data
    tokenizer, root = setup.tokenizer(), resolve_data_dir(data_dir)  # its own data, never the server's path
    split = split_documents(load_source(dc.source, root, dc.domain), d.seed, d.proxy_frac, d.test_frac)
    texts = [doc.text for doc in device_documents(cfg, device_id, root, split)]
    private = ondevice.PrivateData(texts, device_private(cfg, device_id, tokenizer, root, split),
                                   own_tokenizer(cfg, device_id, tokenizer))
    torch_device = resolve_device(cfg.device)
    model = ondevice.public_model(cfg, dc, setup.proxy, tokenizer, torch_device)
    return ondevice.run_task(cfg, device_id, task, private, model, device_seed(cfg, device_id), torch_device)


def host_report(host: hosting.Host) -> dict:
    """What the summary says of a host, as the local engine writes it (the server adds its hosted share)."""
    return {"id": host.cfg.id, "experts_per_layer": host.experts, "budget_bytes": host.budget_bytes,
            "fits_budget": not host.budget_bytes or host.peak_mem_bytes <= host.budget_bytes,
            "tokens_trained": host.tokens_trained}


# ---- persistence on the node ----------------------------------------------------------------------

def state_paths(state_dir: str | Path, run_key: str, device_id: str) -> tuple[Path, Path]:
    """(training state, data) files of one device in one run."""
    run = Path(state_dir) / f"run-{run_key}"
    return run / f"{device_id}.pt", run / f"{device_id}.data.pt"


def save_state(node: NodeDevice, state_dir: str | Path, run_key: str) -> None:
    """The device's training state after a round; its blocks the first time. Write-then-rename, so a node
    killed mid-write keeps its previous round's state."""
    dev = node.device
    path, data = state_paths(state_dir, run_key, dev.cfg.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not data.is_file():  # int32: half the bytes, and every vocabulary we build fits
        _atomic_save({"private": dev.private.int(), "test": node.test.int()}, data)
    _atomic_save({"device_id": dev.cfg.id, "arch": dev.arch, "device": device_state(dev)}, path)


def load_state(setup: Setup, device_id: str, state_dir: str | Path, run_key: str) -> NodeDevice | None:
    """The device as it was after its last round on this node, or None if it has no saved state here."""
    path, data = state_paths(state_dir, run_key, device_id)
    if not (path.is_file() and data.is_file()):
        return None
    state, blocks = torch.load(path, weights_only=False), torch.load(data)  # our own files (save_state)
    node = start_device(setup, device_id, None, (blocks["private"].long(), blocks["test"].long()))
    if node.device.arch != state["arch"]:
        raise ValueError(f"{path}: saved device is {state['arch']}, the config now builds {node.device.arch}; "
                         "delete the state directory to start this device afresh")
    load_device_state(node.device, state["device"])
    return node


def save_host(host: hosting.Host, state_dir: str | Path, run_key: str) -> None:
    """A host's state after a round (generator, tokens, what it measured); its private blocks the first time.
    No weights: the server sends them every round."""
    path, data = state_paths(state_dir, run_key, host.cfg.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not data.is_file():
        _atomic_save({"private": host.private.int()}, data)
    _atomic_save({"device_id": host.cfg.id, "host": {
        "generator": host.generator.get_state(), "tokens_trained": host.tokens_trained, "experts": host.experts,
        "budget_bytes": host.budget_bytes, "peak_mem_bytes": host.peak_mem_bytes}}, path)


def load_host(setup: Setup, device_id: str, state_dir: str | Path, run_key: str) -> hosting.Host | None:
    """The host as it was after its last round on this node, or None if it has no saved state here."""
    path, data = state_paths(state_dir, run_key, device_id)
    if not (path.is_file() and data.is_file()):
        return None
    state = torch.load(path, weights_only=False)  # our own files (save_host)
    if "host" not in state:
        raise ValueError(f"{path}: holds a knowledge device, not a host; delete the state directory to start "
                         "this device afresh")
    saved, cfg = state["host"], setup.config
    i = device_index(cfg, device_id)
    host = hosting.Host(cfg.devices[i], torch.load(data)["private"].long(), torch.Generator(),
                        resolve_device(cfg.device), setup.global_config(), saved["experts"], saved["budget_bytes"],
                        saved["peak_mem_bytes"], saved["tokens_trained"])
    host.generator.set_state(saved["generator"])
    return host


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
