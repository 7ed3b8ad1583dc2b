"""The paper's one-shot protocol deployed on loopback: a real SuperLink over TLS, one SuperNode per device, `flwr run`.

The smoke federation (configs/smoke.toml with a cheaper Phase II and III, written here): four devices, two on
CDC pages and two on TAT-QA, each sent one train.oneshot message. Device cdc-b's SuperNode is SIGKILLed once it
has its task and is not started again: the server must leave it out (the SuperLink marks it offline after its
missed heartbeats, or the round timeout ends the wait) and cluster, distil and fuse the three uploads it has.
The three live devices' uploads must be the local engine's bytes for the same config.

The local reference (`deepfusion run`, a process of its own) runs while the server waits for the dead node and
reuses the public checkpoints the SuperNodes built (XDG_CACHE_HOME, set by the suite's conftest, is everyone's).
It cannot be the suite's shared local run of configs/smoke.toml (`smoke_deepfusion`): that one runs in the pytest
process, on whatever threads it has, and a device's upload differs in its last bits between one thread and two.
Every process runs on one thread (OMP_NUM_THREADS=1): the same thread count gives bit-identical arithmetic, and
four processes on two cores do not fight over threads. The SuperNodes heartbeat at Flower's 10 s minimum
(test_flower_deployment's SUPERNODE_10S_HEARTBEAT), so the SuperLink marks the dead node offline ~20 s after the
kill. Every process is killed at the end, pass or fail (the deployment test's `Processes`). Measured here (2
cores, load ~7, 30 s heartbeats): the SuperNode is killed ~40 s after the SuperLink starts, the summary is
written ~95 s after, 110 s for the module.
"""

import json
import time

import pytest
from transformers import AutoModelForCausalLM

from deepfusion.config import default_config_path
from tests.conftest import ROOT, SHARED_DATA
from tests.engines.test_flower_deployment import (Processes, _accepts, free_port, loopback_env, make_certificates,
                                                  supernode, wait_for)

pytestmark = pytest.mark.slow

DEVICES = ("cdc-a", "cdc-b", "fin-a", "fin-b")
KILLED = "cdc-b"
ROUND_TIMEOUT = 180.0  # a live device's Phase 0 takes 10-60 s here; the dead node is marked offline within ~20 s
DEADLINE = 420.0  # the whole run, generously, on a loaded 2-core machine
CHEAPER = {"[distill]\nsteps = 6": "[distill]\nsteps = 2", "[tune]\nsteps = 6": "[tune]\nsteps = 3"}


def write_config(path):
    """configs/smoke.toml with fewer Phase II and III steps: this test is about the transport, not the science."""
    text = default_config_path("smoke").read_text()
    for old, new in CHEAPER.items():
        assert old in text, f"configs/smoke.toml no longer has {old!r}: update CHEAPER"
        text = text.replace(old, new)
    path.write_text(text)
    return path


def started(procs, name):
    return next(p for key, p in procs.started.items() if key.startswith(f"{name}#"))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA}")
    tmp = tmp_path_factory.mktemp("oneshot-deployment")
    config, logs, out, local = write_config(tmp / "federation.toml"), tmp / "logs", tmp / "out", tmp / "local"
    logs.mkdir()
    ca, cert, key = make_certificates(tmp)
    link = free_port()
    env = loopback_env(tmp, link, ca, OMP_NUM_THREADS="1")
    procs = Processes(logs, env)
    try:
        begin = time.monotonic()
        procs.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
                    "--ssl-keyfile", str(key), "--port", str(link), "--disable-runtime-dependency-installation")
        wait_for(lambda: _accepts(link), 60, "the SuperLink's port", logs)
        node_logs = {d: supernode(procs, d, link, ca, tmp) for d in DEVICES}
        run_config = (f'config="{config}" out="{out}" data-dir="{SHARED_DATA}" round-timeout={ROUND_TIMEOUT} '
                      'node-timeout=120.0')
        procs.start("flwr-run", "flwr", "run", str(ROOT), "loopback", "--run-config", run_config, "--stream")
        flwr_run = started(procs, "flwr-run")
        wait_for(lambda: "Receiving: train.oneshot message" in node_logs[KILLED].read_text()
                 or flwr_run.poll() is not None, DEADLINE, f"{KILLED}'s task", logs)
        procs.kill(f"supernode-{KILLED}")  # its ClientApp is still importing torch or training: it never answers
        killed = time.monotonic() - begin
        # the local engine on the same config, while the server waits for the dead node to be marked offline
        # (two missed 10 s heartbeats)
        procs.start("local", "deepfusion", "run", "--config", str(config), "--data-dir", str(SHARED_DATA), "--out",
                    str(local), "--no-progress")
        # a failed run ends `flwr run` without a summary: fail then, with the logs, rather than at the deadline
        wait_for(lambda: (out / "summary.json").is_file() or flwr_run.poll() is not None,
                 DEADLINE - (time.monotonic() - begin), "summary.json", logs, step=1.0)
        seconds = time.monotonic() - begin
        if not (out / "summary.json").is_file():  # fail now, with every log's tail
            wait_for(lambda: False, 0, f"summary.json (flwr run exited {flwr_run.returncode} without one)", logs)
        reference = started(procs, "local")
        wait_for(lambda: reference.poll() is not None, DEADLINE - (time.monotonic() - begin), "the local run", logs)
        if reference.returncode:
            wait_for(lambda: False, 0, f"the local run to succeed (it exited {reference.returncode})", logs)
        yield {"out": out, "local": local, "logs": logs, "seconds": {"kill": round(killed), "summary": round(seconds),
               "local": round(time.monotonic() - begin)}}
    finally:
        procs.stop_all()


def test_the_server_leaves_out_the_killed_device_and_finishes(deployment):
    summary = json.loads((deployment["out"] / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["method"] == "deepfusion" and summary["domains"] == 2
    why = summary["comm_bytes"]["per_device"][KILLED]["failed"]
    assert why in (f"no answer within {ROUND_TIMEOUT:.0f}s", "its SuperNode went offline (missed its heartbeats)")
    assert summary["clustering"]["devices"] == ["cdc-a", "fin-a", "fin-b"]
    assert set(summary["devices"]) == {"cdc-a", "fin-a", "fin-b"}
    # its task went down, nothing came up; the live devices' uploads are counted
    flower = summary["flower_comm_bytes"]["per_device"]
    [entry] = flower[KILLED]["rounds"]
    assert entry["failed"] == why and entry["down"] > 0 and entry["up"] == 0
    assert flower[KILLED]["setup"]["up_message"] > 0  # it had joined: it was killed with its task, not before
    assert all(flower[d]["rounds"][0]["up"] > 0 for d in summary["clustering"]["devices"])
    assert summary["phase_seconds"]["phase0"] < ROUND_TIMEOUT + 60  # the wait for the dead node ended
    assert not (deployment["out"] / "checkpoint" / "uploads" / f"{KILLED}.bin").exists()
    print(f"\nseconds since the SuperLink's start: {deployment['seconds']}; the run's: {summary['phase_seconds']}; "
          f"{KILLED}: {why}")


def test_the_live_devices_upload_the_local_engines_bytes(deployment):
    uploads = deployment["out"] / "checkpoint" / "uploads"
    for device in ("cdc-a", "fin-a", "fin-b"):
        local = (deployment["local"] / "checkpoint" / "uploads" / f"{device}.bin").read_bytes()
        assert (uploads / f"{device}.bin").read_bytes() == local, f"{device}'s upload differs from the local engine's"


def test_the_exported_model_loads(deployment):
    model = AutoModelForCausalLM.from_pretrained(deployment["out"] / "model")
    assert model.config.model_type == "qwen2_moe"
