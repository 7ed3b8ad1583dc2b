"""The ServerApp's view of the SuperNodes: which node is which device, and what every message cost.

A node becomes a device by answering the Setup with its device id. A node not seen before (a new
SuperNode, or one restarted after a crash: it registers anew) gets the Setup at the start of a round,
so a device whose node died rejoins in a later round. Bytes are counted twice per message: the payload
(our bytes, as the local engine counts them; for weights, the arrays) and the Flower message as serialised
for the wire.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Callable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from deepfusion.config import KNOWLEDGE_METHODS, FederationConfig
from deepfusion.engines.flower.wire import (NO_SETUP, content, exchange, failure, message_bytes, metrics, payload_bytes,
                                            values)
from deepfusion.ledger import NETWORK, Ledger
from deepfusion.privacy import federation_report

log = logging.getLogger("deepfusion")


class Roster:
    def __init__(self, cfg: FederationConfig, setup: bytes):
        self.cfg, self.setup = cfg, setup
        self.node_of: dict[str, int] = {}  # device id -> node id
        self.seen: set[tuple[int, str]] = set()  # (node, activation time) of nodes sent the Setup, answered or not
        self.info: dict[str, dict] = {}  # device id -> what it last reported (arch, params, peak memory, ...)
        self.ledger = Ledger([d.id for d in cfg.devices], NETWORK, setup=True)  # payload and message bytes

    def join(self, grid: Grid, r: int, wait: float, timeout: float) -> None:
        """Set up nodes not seen before; with wait > 0, keep looking until every device has joined."""
        deadline = time.monotonic() + wait
        while True:
            # a restarted SuperNode that keeps its node id (an authenticated one does) is activated anew
            new = {(n.node_id, n.last_activated_at) for n in grid.get_nodes()} - self.seen
            if new:
                self.seen |= new
                self._setup(grid, sorted(node for node, _ in new), r, timeout)
            if len(self.node_of) == len(self.cfg.devices) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        absent = [d.id for d in self.cfg.devices if d.id not in self.node_of]
        if absent and wait:
            log.warning("[ROUND %d/%d] expected a SuperNode for each of %d devices, %d joined within %.0fs; "
                        "no node yet for %s: going on without them (a node that joins later gets the setup "
                        "at the start of a round)", r, self.cfg.rounds, len(self.cfg.devices), len(self.node_of),
                        wait, absent)

    def _setup(self, grid: Grid, nodes: list[int], r: int, timeout: float) -> None:
        devices = [d.id for d in self.cfg.devices]  # a simulated node finds its device by partition id
        sent = {n: Message(content(setup=self.setup, devices=devices), dst_node_id=n, message_type="query.setup",
                           ttl=timeout) for n in nodes}
        replies = exchange(grid, sent.values(), timeout)
        for node, msg in sent.items():
            reply = replies.get(msg.metadata.message_id)
            if why := failure(reply, timeout):
                log.warning("[ROUND %d] node %d did not take the setup (%s); it is left out", r, node, why)
                continue
            device = str(values(reply)["device"])
            if device not in self.ledger.per_device:
                log.warning("[ROUND %d] node %d says it is device %r, which this federation does not have; "
                            "it is left out", r, node, device)
                continue
            if device in self.node_of:  # a restarted SuperNode (or, misconfigured, a second one naming the device)
                log.info("[ROUND %d] device %r rejoined on node %d (was node %d)", r, device, node, self.node_of[device])
            self.node_of[device] = node
            self.ledger.count_setup(device, **_sizes(len(self.setup), 0, msg, reply))

    def train(self, grid: Grid, r: int, instruction: Callable[[str], bytes], timeout: float,
              devices: list[str] | None = None) -> dict[str, bytes]:
        """Knowledge methods: send every device (or `devices`) its instruction; {device: packet bytes} of those
        that answered. Each round entry records the packet's digest (equal bytes, equal digests)."""
        final = r == self.cfg.rounds
        replies = self.send(grid, r, "train", lambda d: content(instruction=instruction(d), device=d, final=final),
                            timeout, devices)
        payloads = {device: bytes(values(reply)["packet"]) for device, reply in replies.items()}
        for device, packet in payloads.items():
            self.ledger.note(device, sha256=hashlib.sha256(packet).hexdigest())
        return payloads

    def send(self, grid: Grid, r: int, message_type: str, build: Callable[[str], RecordDict], timeout: float,
             devices: list[str] | None = None, setup: bool = False) -> dict[str, Message]:
        """Send every device (or `devices`) the content `build(device)` makes; {device: reply} of those that
        answered. Every message is counted, payload (`payload_bytes`) and Flower message bytes: in the device's
        round entry, or with its setup (setup=True: a once-per-node query). A reply's report and numbers
        become what the summary says of the device."""
        online = set(grid.get_node_ids())
        sent = {}
        for device in self.ledger.per_device if devices is None else devices:
            node = self.node_of.get(device)
            if node is None or node not in online:
                if not setup:
                    self.miss(device, r, 0, 0, "no SuperNode online for this device")
                continue
            sent[device] = Message(build(device), dst_node_id=node, message_type=message_type, group_id=str(r),
                                   ttl=timeout)
        replies = exchange(grid, sent.values(), timeout) if sent else {}
        answered = {}
        for device, msg in sent.items():
            reply = replies.get(msg.metadata.message_id)
            if why := failure(reply, timeout):
                if NO_SETUP in why:  # the node lost its setup (restarted unnoticed): set it up again next round
                    self.seen = {key for key in self.seen if key[0] != msg.metadata.dst_node_id}
                if setup:
                    log.warning("[ROUND %d] device %r did not answer %s (%s); it sits this round out", r, device,
                                message_type, why)
                else:
                    self.miss(device, r, payload_bytes(msg), message_bytes(msg), why)
                continue
            answer = values(reply)
            if "report" in answer:
                self.info[device] = {**json.loads(str(answer["report"])), **metrics(reply)}
            sizes = _sizes(payload_bytes(msg), payload_bytes(reply), msg, reply)
            if setup:
                self.ledger.count_setup(device, **sizes)
            else:
                self.ledger.record(device, r, **sizes)
            answered[device] = reply
        return answered

    def miss(self, device: str, r: int, down: int, down_message: int, why: str) -> None:
        """The device sent nothing this round: what went down (if anything) and why."""
        self.ledger.record(device, r, failed=why, down=down, down_message=down_message)

    def devices_side(self) -> dict:
        """What the summary says of the devices, as each last reported it: peak memory, description, own
        perplexity, privacy spent (and the federation's: its weakest device's; knowledge methods only, as in
        the local engine). A device never seen is absent."""
        reported = {d: self.info[d] for d in self.ledger.per_device if d in self.info}
        numbers = ("peak_mem_bytes", "local_loss", "seconds", "num-examples")
        side = {"peaks": {d: info["peak_mem_bytes"] for d, info in reported.items()},
                "devices": {d: {k: v for k, v in info.items() if k not in numbers} for d, info in reported.items()}}
        if self.cfg.method in KNOWLEDGE_METHODS:  # a host uploads weights: no DP accounting (as the local engine)
            side["privacy"] = federation_report({d: info.get("privacy") for d, info in reported.items()})
        return side

    def comm(self) -> dict:
        """comm_bytes as the local engine writes it (payload up/down), plus the Flower message bytes; the
        totals include each device's setup, which per_device[d]["setup"] shows apart."""
        return self.ledger.totals()


def _sizes(down: int, up: int, msg: Message, reply: Message) -> dict[str, int]:
    """A message and its reply: our payload bytes, and Flower's message bytes around them."""
    return {"down": down, "up": up, "down_message": message_bytes(msg), "up_message": message_bytes(reply)}
