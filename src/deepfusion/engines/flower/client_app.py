"""The DeepFusion ClientApp: one device on its own SuperNode.

query.setup    the server's Setup (tokenizer, proxy, config) goes into Flower's node-local `context.state`;
               the node answers with its device id. Light on purpose: no torch, so joining is quick.
train          knowledge methods: build or restore the device, train it on its own private data, label the
               proxy, answer with the KnowledgePacket bytes (`engines/flower/node.py` and `deepfusion.device` work).
query.host     hosting methods, once: build the host (its private data; what of the MoE fits its memory,
               measured) and say so: the server then knows which experts it can send it.
train.oneshot  the paper's protocol (deepfusion and its ablations), once: Phase 0 on this node (its own data,
               its type's public checkpoint, trained until local validation stops improving), answered with
               its weights (ArrayRecord) and its data embedding (`node.oneshot_upload`).
train.weights  hosting methods: rebuild the WeightsPacket from the ArrayRecord, run `hosting.host_round` on
               its bytes (the local engine's device step), answer with the trained weights as an ArrayRecord
               and num-examples (tokens trained), FedAvg's weight.

The device (or host) persists across rounds: the process keeps it in `_DEVICES` (the simulation's Ray actor
runs every device), and `engines/flower/node.py` saves it after every round under a state directory: a
SuperNode's, where Flower starts a fresh ClientApp process per message and a restarted node goes on where its
device was; the simulation's, in its run's checkpoint/, so `deepfusion run --resume` continues every device.

Node config (flower-supernode --node-config): device-id (required on a SuperNode), data-dir, state-dir.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from deepfusion.engines.flower.wire import NO_SETUP, content, upload_content, values, weights_content, weights_packet

if TYPE_CHECKING:
    from deepfusion.baselines.hosting import Host
    from deepfusion.engines.flower.node import NodeDevice

STATE = "deepfusion"  # our ConfigRecord in context.state: the Setup bytes and this node's device id
_DEVICES: dict[tuple[int, str], NodeDevice | Host] = {}  # (run id, device id) -> device, for this process's lifetime


def make_app(data_dir: str | None = None, state_dir: Path | None = None, run_key: str | None = None) -> ClientApp:
    """`flwr run` uses `app` below (settings from the node config); the simulation passes its data dir, and
    the state directory and run key its devices keep their state under (so a resumed simulation finds them)."""
    app = ClientApp()
    store = (state_dir, run_key)

    @app.query("setup")
    def setup(msg: Message, context: Context) -> Message:
        got = values(msg)
        device = _device_id(context, [str(d) for d in got["devices"]])
        context.state[STATE] = ConfigRecord({"setup": got["setup"], "device": device})
        return Message(content(device=device), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from deepfusion.device import describe, run_round  # late: torch loads only to train
        from deepfusion.wire.instruction import Instruction

        asked = values(msg)
        node = _device(context, str(asked["device"]), data_dir, store=store)
        started = time.perf_counter()
        packet = run_round(node.device, Instruction.from_bytes(asked["instruction"]))
        _keep(context, str(asked["device"]), node, store)
        report = {**describe(node.device), **({"ppl_own_source": node.ppl_own_source()} if asked["final"] else {})}
        numbers = {"peak_mem_bytes": node.device.peak_mem_bytes, "tokens_trained": node.device.tokens_trained,
                   "local_loss": node.device.history[-1]["local_loss"], "seconds": time.perf_counter() - started}
        return Message(content(numbers, packet=packet.to_bytes(), report=json.dumps(report)), reply_to=msg)

    @app.train("oneshot")
    def train_oneshot(msg: Message, context: Context) -> Message:
        from deepfusion.engines.flower.node import oneshot_upload  # late: torch loads only to train
        from deepfusion.wire.setup import Setup

        asked, device = values(msg), str(values(msg)["device"])
        mine = _setup_of(context, device)
        started = time.perf_counter()
        blob = oneshot_upload(Setup.from_bytes(bytes(mine["setup"])), device, bytes(asked["task"]),
                              str(context.node_config.get("data-dir", "")) or data_dir)
        return Message(upload_content(blob, {"seconds": time.perf_counter() - started}), reply_to=msg)

    @app.query("host")
    def host(msg: Message, context: Context) -> Message:
        from deepfusion.engines.flower.node import host_report

        device = str(values(msg)["device"])
        mine = _device(context, device, data_dir, host=True, store=store)
        _keep(context, device, mine, store)
        return Message(content({"peak_mem_bytes": mine.peak_mem_bytes}, report=json.dumps(host_report(mine))),
                       reply_to=msg)

    @app.train("weights")
    def train_weights(msg: Message, context: Context) -> Message:
        from deepfusion.baselines.hosting import host_round
        from deepfusion.wire.weights import WeightsPacket
        from deepfusion.engines.flower.node import host_report

        device = str(values(msg)["device"])
        mine = _device(context, device, data_dir, host=True, store=store)
        started = time.perf_counter()
        up = WeightsPacket.from_bytes(host_round(mine, weights_packet(msg).to_bytes()))
        _keep(context, device, mine, store)
        numbers = {"peak_mem_bytes": mine.peak_mem_bytes, "seconds": time.perf_counter() - started}
        return Message(weights_content(up, numbers, report=json.dumps(host_report(mine))), reply_to=msg)

    return app


app = make_app()


def _device_id(context: Context, devices: list[str]) -> str:
    """A SuperNode names its device; in the simulation, partition i is the config's i-th device."""
    if "device-id" in context.node_config:
        return str(context.node_config["device-id"])
    if "partition-id" in context.node_config:
        return devices[int(context.node_config["partition-id"])]
    raise ValueError("this SuperNode names no device: start it with --node-config 'device-id=\"<id from the config>\"'")


Store = tuple[Path | None, str | None]  # (state dir, run key) the simulation gives; (None, None) on a SuperNode


def _state_dir(context: Context, store: Store) -> Path | None:
    """Where a node keeps its device between messages: the simulation's own directory (in its run's
    checkpoint/), a SuperNode's state-dir, else ~/.cache/deepfusion/nodes."""
    if store[0] is not None:
        return store[0]
    if "state-dir" in context.node_config:
        return Path(str(context.node_config["state-dir"]))
    if "partition-id" in context.node_config:
        return None
    from deepfusion.federation import cache_dir

    return cache_dir() / "nodes"


def _run_key(context: Context, store: Store) -> str:
    """The name of this run's states: the simulation's key outlives Flower's run id, which a resume changes."""
    return store[1] or str(context.run_id)


def _device(context: Context, device_id: str, data_dir: str | None, host: bool = False,
            store: Store = (None, None)) -> NodeDevice | Host:
    """This node's device (a host, for the hosting methods): kept in memory, restored from the state
    directory, or built from the Setup."""
    from deepfusion.engines.flower.node import load_host, load_state, start_device, start_host
    from deepfusion.wire.setup import Setup

    mine = _setup_of(context, device_id)
    if (context.run_id, device_id) in _DEVICES:
        return _DEVICES[(context.run_id, device_id)]
    setup, where = Setup.from_bytes(bytes(mine["setup"])), _state_dir(context, store)
    load, start = (load_host, start_host) if host else (load_state, start_device)
    node = load(setup, device_id, where, _run_key(context, store)) if where else None
    return node or start(setup, device_id, str(context.node_config.get("data-dir", "")) or data_dir)


def _setup_of(context: Context, device_id: str) -> ConfigRecord:
    """This node's setup record (the server's Setup bytes and its device id), checked against the message."""
    if STATE not in context.state:
        raise RuntimeError(f"device {device_id!r}: this node {NO_SETUP} {context.run_id} (it restarted?); "
                           "the server sends it the setup at the start of the next round")
    mine = context.state[STATE]
    if mine["device"] != device_id:
        raise RuntimeError(f"the server sent device {device_id!r}'s instruction to this node, which is device "
                           f"{mine['device']!r}; the round goes on without this answer")
    return mine


def _keep(context: Context, device_id: str, node: NodeDevice | Host, store: Store = (None, None)) -> None:
    _DEVICES[(context.run_id, device_id)] = node
    if where := _state_dir(context, store):
        from deepfusion.engines.flower.node import NodeDevice, save_host, save_state

        (save_state if isinstance(node, NodeDevice) else save_host)(node, where, _run_key(context, store))
