"""Flower plumbing shared by the ServerApp and the ClientApp: our bytes in Flower records, their sizes on the
wire, one exchange of messages with a deadline, and the run config.

Every payload is our own bytes (`Setup.to_bytes`, `Instruction.to_bytes`, `KnowledgePacket.to_bytes`) as one
value of a ConfigRecord: Flower carries them and never sees a tensor of ours, so the payload bytes are the
local engine's bytes exactly, and the Flower overhead is measured on top (`message_bytes`). Numbers the
server only logs travel in a MetricRecord.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Iterable

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from deepfusion.config import ConfigError, FederationConfig, default_config_path, load_config

RECORD = "deepfusion"  # the ConfigRecord with our bytes and strings
METRICS = "metrics"  # the MetricRecord with a device's numbers
NO_SETUP = "has no setup for this run"  # a node says this when it must be set up (again) before it can train
POLL_SECONDS = 0.2  # how often the server looks for replies (Grid.send_and_receive waits 3 s between looks)


def content(metrics: dict | None = None, **values) -> RecordDict:
    records = {RECORD: ConfigRecord(values)}
    if metrics is not None:
        records[METRICS] = MetricRecord(metrics)
    return RecordDict(records)


def values(msg: Message) -> ConfigRecord:
    return msg.content.config_records[RECORD]


def metrics(msg: Message) -> dict:
    return dict(msg.content.metric_records.get(METRICS, {}))


def message_bytes(msg: Message) -> int:
    """The message's bytes as Flower serialises it for the wire: every object of its tree (the message with
    its metadata, the RecordDict, each record), in Flower's own protobuf serde with its object header. This
    is what pushing or pulling the message moves, less the HTTP/TLS framing around it."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> dict[str, Message]:
    """Push messages, then collect replies until all came or `timeout` seconds passed; {message id: reply}.

    A reply may carry an error (the ClientApp raised, or the SuperLink found the node offline). Messages
    live `ttl` seconds (set by the sender): an instruction nobody fetched in time expires on the SuperLink.
    """
    pending = {i for i in grid.push_messages(list(messages)) if i}
    replies: dict[str, Message] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            replies[reply.metadata.reply_to_message_id] = reply
            pending.discard(reply.metadata.reply_to_message_id)
        if pending:
            time.sleep(POLL_SECONDS)
    return replies


def failure(reply: Message | None, timeout: float) -> str | None:
    """Why a reply brings nothing usable, or None if it does. Flower's own reasons are long; say what happened."""
    if reply is not None and not reply.has_error():
        return None
    if reply is None or reply.error.code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
        return f"no answer within {timeout:.0f}s"
    if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
        return "its SuperNode went offline (missed its heartbeats)"
    return reply.error.reason


# ---- run config: [tool.flwr.app.config] in pyproject.toml, overridable with `flwr run --run-config` -------

@dataclass
class RunSettings:
    config: str = "default"  # federation TOML: a path, or the name of a shipped config (default, smoke)
    out: str = "runs/flower"  # output directory, on the machine that runs the ServerApp
    data_dir: str = ""  # data directory there; "" = the config's data.dir, $DEEPFUSION_DATA, ../shared/data, cache
    method: str = ""  # "" = the config's
    rounds: int = 0  # 0 = the config's
    seed: int = -1  # -1 = the config's
    node_timeout: float = 300.0  # seconds round 1 waits for every device's SuperNode to join
    round_timeout: float = 600.0  # seconds a round waits for packets (server.device_timeout wins if set)

    def federation(self) -> FederationConfig:
        path = self.config if self.config.endswith(".toml") else default_config_path(self.config)
        return load_config(path, method=self.method or None, rounds=self.rounds or None,
                           seed=self.seed if self.seed >= 0 else None)


def run_settings(run_config: dict) -> RunSettings:
    """The flat run config as typed settings; a wrong key or value names itself (got / allowed)."""
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(RunSettings)}
    kwargs = {}
    for key, value in run_config.items():
        if key not in fields:
            raise ConfigError(f"run config error: unknown key {key!r}; allowed: {', '.join(fields)}")
        kind = type(fields[key].default)
        if isinstance(value, bool) or not isinstance(value, (kind, int) if kind is float else kind):
            raise ConfigError(f"run config error: {key} = {value!r}: must be {kind.__name__}")
        kwargs[fields[key].name] = kind(value)
    s = RunSettings(**kwargs)
    for key in ("node_timeout", "round_timeout"):
        if not getattr(s, key) > 0:
            raise ConfigError(f"run config error: {key.replace('_', '-')} = {getattr(s, key)}: must be > 0 seconds")
    return s
