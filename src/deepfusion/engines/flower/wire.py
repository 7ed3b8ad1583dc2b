"""Flower plumbing shared by the ServerApp and the ClientApp: our bytes in Flower records, their sizes on the
wire, one exchange of messages with a deadline, and the run config.

Knowledge methods: every payload is our own bytes (`Setup.to_bytes`, `Instruction.to_bytes`,
`KnowledgePacket.to_bytes`) as one value of a ConfigRecord: Flower carries them and never sees a tensor of
ours, so the payload bytes are the local engine's bytes exactly, and the Flower overhead is measured on top
(`message_bytes`). Numbers the server only logs travel in a MetricRecord.

Hosting methods (fedavg-moe, expert-subset): a `WeightsPacket` travels as Flower records (`weights_content`):
    ArrayRecord "weights"     its tensors under their state-dict names, fp32 (Flower's Array: .npy bytes)
    ConfigRecord "deepfusion" device, round, hosted (JSON: layer -> expert ids, or null), settings (JSON)
    MetricRecord "metrics"    up only: num-examples (= tokens trained, FedAvg's weight) and the device's numbers
so Flower's own FedAvg can average the uploads. The payload is then the arrays' bytes (`payload_bytes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from deepfusion.config import FederationConfig, default_config_path, load_config
from deepfusion.errors import ConfigError

if TYPE_CHECKING:  # torch loads late on a node: a ClientApp process that only joins never imports it
    from deepfusion.wire.weights import WeightsPacket

RECORD = "deepfusion"  # the ConfigRecord with our bytes and strings
METRICS = "metrics"  # the MetricRecord with a device's numbers
WEIGHTS = "weights"  # the ArrayRecord with a WeightsPacket's tensors
NUM_EXAMPLES = "num-examples"  # FedAvg's weight (Flower's default weighted_by_key): tokens trained this round
PAYLOAD = ("setup", "instruction", "packet", "task", "embedding")  # ConfigRecord values that are our payload bytes
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


def payload_bytes(msg: Message) -> int:
    """Our payload in a message: the Setup, instruction or packet value (the local engine's bytes exactly);
    for weights, the arrays as Flower carries them (each tensor's fp32 data plus its 128-byte .npy header;
    Flower's own measure of an ArrayRecord), where the local engine counts the same data in one safetensors
    blob (one JSON header for every tensor)."""
    ours = msg.content.config_records.get(RECORD, {})
    arrays = sum(len(a.data) for record in msg.content.array_records.values() for a in record.values())
    return arrays + sum(len(v) for k, v in ours.items() if k in PAYLOAD)


def weights_content(packet: WeightsPacket, metrics: dict | None = None, **values) -> RecordDict:
    """A WeightsPacket as Flower records (layout above); `metrics` (up) gains num-examples = packet.tokens."""
    from deepfusion.wire.weights import hosted_to_json

    hosted = hosted_to_json(packet.hosted)
    record = content(None if metrics is None else {**metrics, NUM_EXAMPLES: packet.tokens}, device=packet.device_id,
                     round=packet.round, settings=json.dumps(packet.settings, sort_keys=True),
                     hosted=json.dumps(hosted), **values)
    record[WEIGHTS] = ArrayRecord({name: Array(t.detach().to("cpu").float().contiguous().numpy())
                                   for name, t in packet.tensors.items()})
    return record


def weights_packet(msg: Message) -> WeightsPacket:
    """The WeightsPacket a message carries; a defect is a PacketError naming it (the server rejects the upload)."""
    import torch

    from deepfusion.wire import PacketError
    from deepfusion.wire.weights import WeightsPacket, hosted_from_json

    try:
        got = values(msg)
        tensors = {name: torch.from_numpy(array.numpy()) for name, array in msg.content.array_records[WEIGHTS].items()}
        return WeightsPacket(str(got["device"]), int(got["round"]), tensors, int(metrics(msg).get(NUM_EXAMPLES, 0)),
                             hosted_from_json(json.loads(str(got["hosted"]))), json.loads(str(got["settings"])))
    except Exception as e:  # a malformed record from a node: any defect, named
        raise PacketError(f"not a valid weights message ({type(e).__name__}: {str(e)[:120]})") from None


def upload_content(blob: bytes, metrics: dict | None = None) -> RecordDict:
    """The paper's one upload (wire/upload.py) as Flower records: its weights in an ArrayRecord "weights"
    (fp16 as such; bf16, which numpy lacks, as its int16 bit pattern), the rest in our ConfigRecord."""
    import torch

    from deepfusion.wire.upload import Upload

    upload = Upload.from_bytes(blob)
    bf16 = upload.dtype() == torch.bfloat16
    record = content(metrics, device=upload.device_id, arch=upload.arch, config=json.dumps(upload.config),
                     info=json.dumps(upload.info), embedding=upload.embedding, bfloat16=bf16)
    record[WEIGHTS] = ArrayRecord({name: Array((t.view(torch.int16) if bf16 else t).contiguous().numpy())
                                   for name, t in upload.tensors.items()})
    return record


def upload_bytes(msg: Message) -> bytes:
    """The Upload a message carries, as the local engine's bytes (canonical: equal uploads, equal bytes); a
    defect is an UploadError naming it (the server then leaves the device out)."""
    import torch

    from deepfusion.wire.upload import Upload, UploadError

    try:
        got = values(msg)
        tensors = {name: torch.from_numpy(array.numpy().copy()) for name, array in msg.content.array_records[WEIGHTS].items()}
        if bool(got["bfloat16"]):
            tensors = {name: t.view(torch.bfloat16) for name, t in tensors.items()}
        return Upload(str(got["device"]), str(got["arch"]), json.loads(str(got["config"])), tensors,
                      bytes(got["embedding"]), json.loads(str(got["info"]))).to_bytes()
    except Exception as e:  # a malformed record from a node: any defect, named
        raise UploadError(f"not a valid upload message ({type(e).__name__}: {str(e)[:120]})") from None


def weights_digest(blob: bytes) -> str:
    """sha256 of a WeightsPacket's bytes: `WeightsPacket.to_bytes` writes them canonically (sorted header,
    as knowledge packets), so equal weights give equal digests."""
    return hashlib.sha256(blob).hexdigest()


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
    config: str = "multiround"  # federation TOML: a path or a shipped config's name (multiround, smoke-multiround)
    out: str = "runs/flower"  # output directory, on the machine that runs the ServerApp
    data_dir: str = ""  # data directory there; "" = the config's data.dir, $DEEPFUSION_DATA, ../shared/data, cache
    method: str = ""  # "" = the config's
    rounds: int = 0  # 0 = the config's
    seed: int = -1  # -1 = the config's
    node_timeout: float = 300.0  # seconds round 1 waits for every device's SuperNode to join
    round_timeout: float = 600.0  # seconds a round waits for packets (server.device_timeout wins if set)
    set: str = ""  # dotted overrides as the CLI's --set, separated by ';': "tune.loss=ce;server.lam=2.0"

    def federation(self) -> FederationConfig:
        path = self.config if self.config.endswith(".toml") else default_config_path(self.config)
        sets = [item for item in self.set.split(";") if item.strip()]
        return load_config(path, sets, set_by="run config set", method=self.method or None,
                           rounds=self.rounds or None, seed=self.seed if self.seed >= 0 else None)


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
