"""The byte ledger of the multi-round protocols: what each device was sent and sent back, in all and round by round.

One type for both engines and replay; the checkpoint keeps its plain dict and the summary's `comm_bytes` is its
totals. Per device:

    {"up": n, "down": n, "rounds": [{"round": r, "down": n, "up": n, "failed": why (if it sent nothing)}, ...]}

Payload bytes are ours, as the local engine counts them. A network engine also counts the Flower message around
each payload (NETWORK: up_message, down_message) and each node's once-only setup apart (per_device[d]["setup"]).
(The one-shot pipeline has no rounds: its bytes are Phase 0's, recipes/deepfusion.py.)
"""

from __future__ import annotations

PAYLOAD = ("up", "down")
NETWORK = ("up", "down", "up_message", "down_message")


class Ledger:
    def __init__(self, devices, counts: tuple[str, ...] = PAYLOAD, setup: bool = False):
        self.counts = counts
        self.per_device = {d: {**dict.fromkeys(counts, 0), **({"setup": dict.fromkeys(counts, 0)} if setup else {}),
                               "rounds": []} for d in devices}

    @classmethod
    def restore(cls, per_device: dict, counts: tuple[str, ...] = PAYLOAD) -> Ledger:
        """The ledger a checkpoint kept (its `comm`)."""
        ledger = cls((), counts)
        ledger.per_device = per_device
        return ledger

    def record(self, device: str, r: int, failed: str | None = None, **sizes: int) -> None:
        """Round r's entry for `device`: its byte counts (those not given are 0) and, if it sent nothing, why."""
        entry = {"round": r, **{k: sizes.get(k, 0) for k in self.counts}}
        self.add(device, entry if failed is None else {**entry, "failed": failed})

    def add(self, device: str, entry: dict) -> None:
        """An entry as recorded elsewhere (a replayed round), added to the device's totals."""
        mine = self.per_device.setdefault(device, {**dict.fromkeys(self.counts, 0), "rounds": []})
        mine["rounds"].append(entry)
        for k in self.counts:
            mine[k] += entry.get(k, 0)

    def count_setup(self, device: str, **sizes: int) -> None:
        """A node's setup message (network engines): apart from the rounds, inside the totals."""
        mine = self.per_device[device]
        for k, n in sizes.items():
            mine["setup"][k] += n
            mine[k] += n

    def note(self, device: str, **fields) -> None:
        """Add to the device's latest entry (the digest of what it sent)."""
        self.per_device[device]["rounds"][-1].update(fields)

    def last(self, device: str) -> dict:
        return self.per_device[device]["rounds"][-1]

    def of_round(self, r: int) -> dict[str, list[dict]]:
        return {d: [e for e in v["rounds"] if e["round"] == r] for d, v in self.per_device.items()}

    def up_in_round(self, r: int) -> int:
        return sum(e["up"] for entries in self.of_round(r).values() for e in entries)

    def totals(self) -> dict:
        """comm_bytes: each count summed over devices, and per_device."""
        return {**{k: sum(v[k] for v in self.per_device.values()) for k in self.counts}, "per_device": self.per_device}
