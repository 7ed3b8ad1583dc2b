"""The ServerApp's round logic against a scripted Grid: nodes join and say which device they are, dead nodes
and failing devices leave the round without stalling it, a restarted node rejoins, and below min_devices the
failed devices are asked again. Fast: the Grid is ours, the Roster and the round function are the real ones."""

import json
import uuid
from types import SimpleNamespace

import pytest
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from deepfusion.config import default_config_path, load_config
from deepfusion.engines.flower import server_app
from deepfusion.engines.flower.roster import Roster
from deepfusion.engines.flower.wire import NO_SETUP, content, values

TIMEOUT = 0.5  # seconds a round waits here: only for the nodes scripted to stay silent


@pytest.fixture(autouse=True)
def as_a_task(monkeypatch):
    """Flower stamps every message with the identity of the task that makes it; outside a runtime, set one."""
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)


class ScriptedGrid:
    """Just the Grid calls the roster makes. nodes: node id -> (device it says it is, activation stamp);
    `train(node, msg)` answers a train message: a Message, or None for a node that never answers."""

    def __init__(self, nodes: dict[int, str], train):
        self.nodes = {n: (device, "t0") for n, device in nodes.items()}
        self.train, self.pending, self.sent = train, {}, []

    def get_nodes(self):
        return [SimpleNamespace(node_id=n, last_activated_at=stamp) for n, (_, stamp) in self.nodes.items()]

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.pending[msg.metadata.message_id] = msg
            self.sent.append((msg.metadata.message_type, msg.metadata.dst_node_id))
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        replies = []
        for i in list(ids):
            msg = self.pending.pop(i)
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == "query.setup":
                reply = Message(content(device=self.nodes[node][0]), reply_to=msg) if node in self.nodes else None
            else:
                reply = self.train(node, msg)
            if reply is None:
                self.pending[i] = msg  # silent: it stays unanswered
            else:
                replies.append(reply)
        return replies


def packet(msg: Message, device: str) -> Message:
    return Message(content({"peak_mem_bytes": 1000, "local_loss": 2.0, "seconds": 0.1},
                           packet=f"packet of {device}".encode(), report=json.dumps({"id": device})), reply_to=msg)


def cfg():
    return load_config(default_config_path("smoke-multiround"))  # devices cdc, nhlbi, finance


def test_nodes_join_as_the_devices_they_name_and_an_unknown_one_is_left_out(caplog):
    grid = ScriptedGrid({1: "cdc", 2: "nhlbi", 3: "finance", 4: "mallory"}, lambda n, m: None)
    roster = Roster(cfg(), b"setup bytes")
    roster.join(grid, 1, wait=5.0, timeout=TIMEOUT)
    assert roster.node_of == {"cdc": 1, "nhlbi": 2, "finance": 3}
    assert "node 4 says it is device 'mallory', which this federation does not have" in caplog.text
    assert roster.ledger.per_device["cdc"]["setup"]["down"] == len(b"setup bytes")
    assert roster.ledger.per_device["cdc"]["setup"]["down_message"] > len(b"setup bytes")


def test_a_silent_node_and_a_failing_device_do_not_stall_the_round():
    def train(node, msg):
        if node == 2:
            return None  # killed: never answers
        if node == 3:
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "ValueError: disk full"), reply_to=msg)
        return packet(msg, "cdc")

    grid = ScriptedGrid({1: "cdc", 2: "nhlbi", 3: "finance"}, train)
    roster = Roster(cfg(), b"setup")
    roster.join(grid, 1, wait=1.0, timeout=TIMEOUT)
    payloads = roster.train(grid, 1, lambda device: b"instruction", TIMEOUT)
    assert payloads == {"cdc": b"packet of cdc"}
    rounds = {d: v["rounds"] for d, v in roster.ledger.per_device.items()}
    assert rounds["nhlbi"][0]["failed"] == f"no answer within {TIMEOUT:.0f}s"
    assert rounds["finance"][0]["failed"] == "ValueError: disk full"
    assert rounds["cdc"][0]["up"] == len(b"packet of cdc") < rounds["cdc"][0]["up_message"]
    assert len(rounds["cdc"][0]["sha256"]) == 64 and roster.info["cdc"]["peak_mem_bytes"] == 1000


def test_a_restarted_node_rejoins_next_round_new_id_or_same_id():
    grid = ScriptedGrid({1: "cdc", 2: "nhlbi", 3: "finance"}, lambda node, msg: packet(msg, "x"))
    roster = Roster(cfg(), b"setup")
    roster.join(grid, 1, wait=1.0, timeout=TIMEOUT)
    del grid.nodes[3]  # finance's SuperNode dies ...
    grid.nodes[7] = ("finance", "t1")  # ... and comes back as a new node
    roster.join(grid, 2, wait=0.0, timeout=TIMEOUT)
    assert roster.node_of["finance"] == 7
    grid.nodes[1] = ("cdc", "t2")  # an authenticated node keeps its id but is activated anew
    grid.sent.clear()
    roster.join(grid, 3, wait=0.0, timeout=TIMEOUT)
    assert grid.sent == [("query.setup", 1)]


def test_a_node_that_lost_its_setup_gets_it_again_next_round():
    def train(node, msg):
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"RuntimeError: this node {NO_SETUP} 1"),
                       reply_to=msg) if node == 1 else packet(msg, "x")

    grid = ScriptedGrid({1: "cdc", 2: "nhlbi", 3: "finance"}, train)
    roster = Roster(cfg(), b"setup")
    roster.join(grid, 1, wait=1.0, timeout=TIMEOUT)
    roster.train(grid, 1, lambda device: b"instruction", TIMEOUT)
    grid.sent.clear()
    roster.join(grid, 2, wait=0.0, timeout=TIMEOUT)
    assert grid.sent == [("query.setup", 1)]


def test_below_min_devices_the_failed_devices_are_asked_again(monkeypatch):
    tries = {"finance": 0}

    def train(node, msg):
        device = values(msg)["device"]
        if device == "finance" and tries["finance"] == 0:
            tries["finance"] += 1
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "OSError: flaky"), reply_to=msg)
        return packet(msg, device)

    config = cfg()
    config.server.min_devices, config.server.round_retries = 3, 1
    grid = ScriptedGrid({1: "cdc", 2: "nhlbi", 3: "finance"}, train)
    roster = Roster(config, b"setup")
    roster.join(grid, 1, wait=1.0, timeout=TIMEOUT)
    received = {}
    monkeypatch.setattr(server_app, "server_round", lambda server, payloads, r: received.update(payloads) or
                        {"accepted": sorted(payloads), "rejected": {}})
    result = server_app._knowledge_round(grid, config, roster, SimpleNamespace(proxy=[0] * 24), 1, TIMEOUT)
    assert sorted(received) == ["cdc", "finance", "nhlbi"] and result["accepted"] == sorted(received)
    assert [r.get("failed") for r in roster.ledger.per_device["finance"]["rounds"]] == ["OSError: flaky", None]
    assert [t for t, _ in grid.sent].count("train") == 4  # three, then finance again
