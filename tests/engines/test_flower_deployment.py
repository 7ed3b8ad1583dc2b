"""The Flower deployment engine on loopback: a real SuperLink, one SuperNode per device, `flwr run`, over TLS.

One run of the smoke federation, as README "Run across machines" says to start it, with certificates made
here. Its method is plain-fkd (deepfusion runs in the simulation test; a device's packets do not depend on
the server's method, so they still compare byte for byte with the local engine's). The SuperNode of device
`finance` is SIGKILLed while its device trains in round 1 and started again at once: round 1 must complete
with the other two devices once the SuperLink marks the dead node offline (SuperNodes heartbeat at Flower's
10 s minimum here: ~20 s) or after the round timeout, whichever comes first, and `finance` must rejoin in round 2.

Every process is started in its own process group and killed at the end, with whatever it started
(Flower's SuperExec and its ServerApp / ClientApp processes), pass or fail.
"""

import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tests.conftest import ROOT, SHARED_DATA
from tests.engines.test_flower_simulation import OFFLINE, smoke_path

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr, flower-superexec
DEVICES = ("cdc", "nhlbi", "finance")
KILLED = "finance"
ROUND_TIMEOUT = 45.0  # a live device answers in 5-25 s here (2 loaded cores); a SIGKILLed node never does
DEADLINE = 420.0  # the whole run, generously, on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost signed by it: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: str, signer, ca: bool):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            import ipaddress

            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_cert = cert("deepfusion test CA", ca_key, "deepfusion test CA", ca_key, ca=True)
    server = cert("127.0.0.1", key, "deepfusion test CA", ca_key, ca=False)
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


# flower-supernode at Flower's least heartbeat interval, 10 s (HEARTBEAT_MIN_INTERVAL) instead of its 30 s default:
# the SuperLink marks a node offline once it misses two of the intervals the node announced, so a killed node
# leaves its round ~20 s after the kill rather than ~60 s (what each deployment test waited). The console script
# has no flag for it: this is that script with the interval set in the two modules of the node's own heartbeat,
# the interval it announces (fleet_http_connection) and the period it sends at (heartbeat). Flower's constant
# itself stays 30 s: the SuperNode also judges its ClientApps' task heartbeats by it, and those processes still
# beat every 30 s. A Flower that moves these names fails here, loudly.
SUPERNODE_10S_HEARTBEAT = """
import sys

import flwr.supercore.heartbeat
import flwr.supernode.fleet_http_connection
from flwr.common.constant import HEARTBEAT_MIN_INTERVAL
from flwr.supernode.cli import flower_supernode

for module in (flwr.supercore.heartbeat, flwr.supernode.fleet_http_connection):
    assert hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"), module
    module.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_MIN_INTERVAL
sys.argv[0] = "flower-supernode"
sys.exit(flower_supernode())
"""


class Processes:
    """What this test started, each in its own session, and everything those started in turn."""

    def __init__(self, logs: Path, env: dict):
        self.logs, self.env, self.started = logs, env, {}

    def start(self, name: str, *args: str, code: str | None = None) -> Path:
        """Start the console script args[0] of this venv with args[1:]; with `code`, run that Python instead of
        the script (it reads args[1:] as the script would)."""
        exe = BIN / args[0]
        if not exe.is_file():
            pytest.skip(f"{exe} not found: the Flower CLIs come with flwr in this venv")
        log = self.logs / f"{name}-{sum(n.startswith(name) for n in self.started)}.log"
        command = [sys.executable, "-c", code, *args[1:]] if code else [str(exe), *args[1:]]
        with open(log, "w") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=self.logs, start_new_session=True)
        self.started[f"{name}#{proc.pid}"] = proc
        return log

    def kill(self, name: str) -> None:
        for key, proc in list(self.started.items()):
            if key.startswith(f"{name}#"):
                _kill_tree(proc.pid)
                proc.wait()

    def stop_all(self) -> None:
        for proc in self.started.values():
            if proc.returncode is None:  # a reaped process's pid may belong to someone else's process by now
                _kill_tree(proc.pid)
        for proc in self.started.values():
            proc.wait(timeout=30)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants. Flower detaches some of them (the SuperLink's SuperExec runs in
    its own session), so walk /proc for children rather than trust the process group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(condition, timeout: float, what: str, logs: Path, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(step)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def loopback_env(tmp: Path, link: int, ca: Path, **extra: str) -> dict[str, str]:
    """The environment of every process on the loopback: a FLWR_HOME whose config points the flwr CLI at the
    SuperLink over TLS (SuperLink and SuperNodes unpack the app there too), offline, unbuffered logs."""
    flwr_home = tmp / "flwr"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\n'
        f'root-certificates = "{ca}"\n')
    return {**os.environ, **OFFLINE, "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1", **extra,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # the SuperLink starts flower-superexec


def supernode(procs: Processes, device: str, link: int, ca: Path, tmp: Path) -> Path:
    config = f'device-id="{device}" data-dir="{SHARED_DATA}" state-dir="{tmp / "nodes" / device}"'
    return procs.start(f"supernode-{device}", "flower-supernode", "--root-certificates", str(ca),
                       "--superlink", f"127.0.0.1:{link}", "--port", str(free_port()), "--node-config", config,
                       code=SUPERNODE_10S_HEARTBEAT)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA}")
    tmp = tmp_path_factory.mktemp("deployment")
    logs, out = tmp / "logs", tmp / "out"
    logs.mkdir()
    ca, cert, key = make_certificates(tmp)
    link = free_port()
    env = loopback_env(tmp, link, ca)
    procs = Processes(logs, env)
    try:
        procs.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
                    "--ssl-keyfile", str(key), "--port", str(link), "--disable-runtime-dependency-installation")
        wait_for(lambda: _accepts(link), 60, "the SuperLink's port", logs)
        node_logs = {d: supernode(procs, d, link, ca, tmp) for d in DEVICES}
        run_config = (f'config="{smoke_path()}" out="{out}" data-dir="{SHARED_DATA}" method="plain-fkd" '
                      f'round-timeout={ROUND_TIMEOUT} node-timeout=120.0')
        started = time.monotonic()
        procs.start("flwr-run", "flwr", "run", str(ROOT), "loopback", "--run-config", run_config, "--stream")
        wait_for(lambda: "Receiving: train message" in node_logs[KILLED].read_text(), DEADLINE,
                 f"{KILLED}'s round-1 instruction", logs)
        procs.kill(f"supernode-{KILLED}")  # mid-round: its ClientApp is still loading or training
        supernode(procs, KILLED, link, ca, tmp)
        wait_for(lambda: (out / "summary.json").is_file(), DEADLINE - (time.monotonic() - started), "summary.json",
                 logs, step=1.0)
        yield {"out": out, "logs": logs, "ca": ca, "link": link, "seconds": time.monotonic() - started}
    finally:
        procs.stop_all()


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_deployment_writes_the_local_engines_outputs(deployment):
    out = deployment["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["method"] == "plain-fkd" and summary["rounds"] == 2
    assert set(summary["ppl"]) == {"medical", "finance"} and set(summary["devices"]) == set(DEVICES)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2] and lines[-1]["ppl"] == summary["ppl"]
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.model_type == "qwen2_moe"


def test_a_killed_supernode_does_not_stall_the_round_and_rejoins(deployment):
    out = deployment["out"]
    first, second = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert first["accepted"] == ["cdc", "nhlbi"] and first["losses"]["kd"] > 0  # min_devices = 1: it distilled
    assert first["seconds_devices"] < ROUND_TIMEOUT + 15  # the round waited for the dead node, then went on
    assert second["accepted"] == ["cdc", "finance", "nhlbi"]
    rounds = json.loads((out / "summary.json").read_text())["comm_bytes"]["per_device"][KILLED]["rounds"]
    assert rounds[0]["failed"] in (f"no answer within {ROUND_TIMEOUT:.0f}s", "its SuperNode went offline (missed its "
                                   "heartbeats)") and rounds[1]["up"] > 0
    assert "rejoined" in (deployment["logs"] / "flwr-run-0.log").read_text()


def test_deployment_sends_the_local_engines_packet_bytes(deployment, smoke_multiround):
    local = smoke_multiround.digests  # the local engine's run of the same federation (multiround-views)
    per_device = json.loads((deployment["out"] / "summary.json").read_text())["comm_bytes"]["per_device"]
    for device in ("cdc", "nhlbi"):  # the devices that were never killed, in both rounds
        assert [r["sha256"] for r in per_device[device]["rounds"]] == local[device]
    assert per_device[KILLED]["rounds"][1]["up_message"] > per_device[KILLED]["rounds"][1]["up"]


def test_the_superlink_speaks_tls_only(deployment):
    """The SuperLink's port answers a TLS handshake verified against the test CA, and refuses plain HTTP."""
    context = ssl.create_default_context(cafile=str(deployment["ca"]))
    with socket.create_connection(("127.0.0.1", deployment["link"])) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection(("127.0.0.1", deployment["link"]), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            answer = raw.recv(64)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/")
