"""Record a federation's device uploads once; replay them, byte for byte, for other server-side methods.

Why: in the knowledge methods (multiround-views, device-kd, plain-fkd) devices train and label the proxy set
the same way whatever the server later does with their knowledge, and whichever global MoE it trains.
So the benchmark records one run's upload bytes per round and device, and feeds the same bytes to every
other knowledge method and global family: the same experiment, paired (every method distils identical
knowledge), at a fraction of the CPU time. tests/test_replay.py checks a replayed run equals a live one.

A recording is keyed by everything the devices' side depends on (data, devices, seed, k, T, privacy,
fault settings) and nothing the server alone decides (method, global family, steps, λ, the logit views).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from deepfusion.config import FederationConfig, to_dict

_DEVICE_SIDE_SERVER_KEYS = ("topk", "temperature", "device_timeout", "min_devices", "round_retries")


def device_key(cfg: FederationConfig) -> str:
    """A short hash of the config's device side."""
    raw = to_dict(cfg)
    side = {k: v for k, v in raw.items() if k not in ("name", "method", "rounds", "server")}
    side["server"] = {k: raw["server"].get(k) for k in _DEVICE_SIDE_SERVER_KEYS}
    return hashlib.sha256(json.dumps(side, sort_keys=True).encode()).hexdigest()[:16]


class Replay:
    """A directory of recorded rounds: r{round}/{device}.bin (the upload), r{round}/comm.json (bytes and
    seconds), and devices-{rounds}.json (what the devices reported at the end of a run of that length)."""

    def __init__(self, root: Path, cfg: FederationConfig):
        self.dir = Path(root) / device_key(cfg)

    def complete(self, rounds: int) -> bool:
        return all((self.dir / f"r{r}" / "comm.json").is_file() for r in range(1, rounds + 1)) and \
            (self.dir / f"devices-{rounds}.json").is_file()

    def save_round(self, r: int, payloads: dict[str, bytes], per_device: dict, seconds: float) -> None:
        folder = self.dir / f"r{r}"
        folder.mkdir(parents=True, exist_ok=True)
        for device_id, blob in payloads.items():
            (folder / f"{device_id}.bin").write_bytes(blob)
        comm = {d: [x for x in v["rounds"] if x["round"] == r] for d, v in per_device.items()}
        (folder / "comm.json").write_text(json.dumps({"comm": comm, "seconds_devices": seconds}))  # last: marks done

    def load_round(self, r: int, per_device: dict) -> tuple[dict[str, bytes], float]:
        """The round's uploads, with its byte counts added to per_device as if the devices had just sent them."""
        folder = self.dir / f"r{r}"
        saved = json.loads((folder / "comm.json").read_text())
        for device_id, entries in saved["comm"].items():
            per_device.setdefault(device_id, {"up": 0, "down": 0, "rounds": []})
            for entry in entries:
                per_device[device_id]["rounds"].append(entry)
                per_device[device_id]["up"] += entry["up"]
                per_device[device_id]["down"] += entry["down"]
        payloads = {p.stem: p.read_bytes() for p in sorted(folder.glob("*.bin"))}
        return payloads, saved["seconds_devices"]

    def save_devices(self, rounds: int, report: dict) -> None:
        (self.dir / f"devices-{rounds}.json").write_text(json.dumps(report))

    def load_devices(self, rounds: int) -> dict:
        return json.loads((self.dir / f"devices-{rounds}.json").read_text())
