"""Record a federation's device uploads once; replay them, byte for byte, for other server-side methods.

Why: in the knowledge methods (multiround-views, device-kd, plain-fkd) devices train and label the proxy set
the same way whatever the server later does with their knowledge, and whichever global MoE it trains.
So the benchmark records one run's upload bytes per round and device, and feeds the same bytes to every
other knowledge method and global family: the same experiment, paired (every method distils identical
knowledge), at a fraction of the CPU time. tests/test_replay.py checks a replayed run equals a live one.

A recording is keyed by everything the devices' side depends on (data, devices, seed, [knowledge], privacy,
fault settings) and nothing the server alone decides (method, global family, steps, λ, the logit views).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from deepfusion.config import FederationConfig, to_dict
from deepfusion.ledger import Ledger

_DEVICE_SIDE_SERVER_KEYS = ("device_timeout", "min_devices", "round_retries")  # which answers a round keeps
_DEVICE_SIDE_CLUSTERING_KEYS = ("embed_dim", "embed_texts")  # the task's basis and what a device embeds
_SERVER_ONLY = ("name", "method", "rounds", "server", "clustering", "distill", "tune")
# device keys added later, left out of the key at their defaults: recordings made before them stay valid
_LATER_DEVICE_DEFAULTS = {"finetune": "full", "lora_rank": 0, "upload": "merged"}


def device_key(cfg: FederationConfig) -> str:
    """A short hash of the config's device side (the server's phases and the method are not part of it)."""
    raw = to_dict(cfg)
    side = {k: v for k, v in raw.items() if k not in _SERVER_ONLY}
    side["server"] = {k: raw["server"].get(k) for k in _DEVICE_SIDE_SERVER_KEYS}
    side["devices"] = [{k: v for k, v in d.items() if _LATER_DEVICE_DEFAULTS.get(k, ...) != v} for d in raw["devices"]]
    side["clustering"] = {k: raw["clustering"].get(k) for k in _DEVICE_SIDE_CLUSTERING_KEYS}
    return hashlib.sha256(json.dumps(side, sort_keys=True).encode()).hexdigest()[:16]


class UploadReplay:
    """The one-shot protocol's Phase 0, recorded: oneshot/{device}.bin (each upload as received) and
    oneshot/phase0.json (who failed and why, the tasks' sizes). Every ablation and server-side variant of the
    paper pipeline then distils the very same uploads (a paired comparison at a fraction of the CPU time)."""

    def __init__(self, root: Path, cfg: FederationConfig):
        self.dir = Path(root) / device_key(cfg) / "oneshot"

    def complete(self) -> bool:
        return (self.dir / "phase0.json").is_file()

    def wrap(self, send):
        """`send` as it is if nothing is recorded yet (recording what it returns), else the recording."""
        if self.complete():
            return self._replay
        def record(tasks: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, str]]:
            replies, failed = send(tasks)
            self.dir.mkdir(parents=True, exist_ok=True)
            for device, blob in replies.items():
                (self.dir / f"{device}.bin").write_bytes(blob)
            (self.dir / "phase0.json").write_text(json.dumps({"failed": failed, "tasks": sorted(tasks)}))  # last
            return replies, failed
        return record

    def _replay(self, tasks: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, str]]:
        saved = json.loads((self.dir / "phase0.json").read_text())
        if saved["tasks"] != sorted(tasks):
            raise ValueError(f"{self.dir}: recorded for devices {saved['tasks']}, asked for {sorted(tasks)}")
        return {p.stem: p.read_bytes() for p in sorted(self.dir.glob("*.bin"))}, saved["failed"]


class Replay:
    """A directory of recorded rounds: r{round}/{device}.bin (the upload), r{round}/comm.json (bytes and
    seconds), and devices-{rounds}.json (what the devices reported at the end of a run of that length)."""

    def __init__(self, root: Path, cfg: FederationConfig):
        self.dir = Path(root) / device_key(cfg)

    def complete(self, rounds: int) -> bool:
        return all((self.dir / f"r{r}" / "comm.json").is_file() for r in range(1, rounds + 1)) and \
            (self.dir / f"devices-{rounds}.json").is_file()

    def save_round(self, r: int, payloads: dict[str, bytes], ledger: Ledger, seconds: float) -> None:
        folder = self.dir / f"r{r}"
        folder.mkdir(parents=True, exist_ok=True)
        for device_id, blob in payloads.items():
            (folder / f"{device_id}.bin").write_bytes(blob)
        comm = ledger.of_round(r)
        (folder / "comm.json").write_text(json.dumps({"comm": comm, "seconds_devices": seconds}))  # last: marks done

    def load_round(self, r: int, ledger: Ledger) -> tuple[dict[str, bytes], float]:
        """The round's uploads, with its byte counts added to the ledger as if the devices had just sent them."""
        folder = self.dir / f"r{r}"
        saved = json.loads((folder / "comm.json").read_text())
        for device_id, entries in saved["comm"].items():
            for entry in entries:
                ledger.add(device_id, entry)
        payloads = {p.stem: p.read_bytes() for p in sorted(folder.glob("*.bin"))}
        return payloads, saved["seconds_devices"]

    def save_devices(self, rounds: int, report: dict) -> None:
        (self.dir / f"devices-{rounds}.json").write_text(json.dumps(report))

    def load_devices(self, rounds: int) -> dict:
        return json.loads((self.dir / f"devices-{rounds}.json").read_text())
