"""Fault injection on the smoke federation: devices that die, straggle, and come back on a retry.

Time is virtual: a straggler adds 100 s to the engine's clock instead of sleeping, so the test neither
waits nor depends on how loaded the machine is.
"""

import json
import logging
import time

import pytest

import deepfusion.engines.local as local
from deepfusion.engines.local import run

pytestmark = pytest.mark.slow


class VirtualClock:
    """The `time` module, except that perf_counter runs `skew` seconds ahead of the real one."""

    def __init__(self):
        self.skew = 0.0

    def perf_counter(self):
        return time.perf_counter() + self.skew

    def __getattr__(self, name):
        return getattr(time, name)


def test_dropouts_stragglers_and_retries(smoke_config, tmp_path, monkeypatch, caplog, shared_prepare_data):
    """Round 1: nhlbi dies once; 2 of the 2 needed answers came, so the round goes on without it.
    Round 2: cdc straggles every time and finance dies once; 1 answer < 2 needed, a retry brings finance back.
    Round 3: cdc and nhlbi die every time; the retry cannot help and the round is skipped, model untouched."""
    clock = VirtualClock()
    real = local.run_round
    tries = {}

    def faulty(device, instruction):
        d, r = device.cfg.id, instruction.round
        tries[d, r] = tries.get((d, r), 0) + 1
        if (d, r) == ("nhlbi", 1) and tries[d, r] == 1 or (d, r) == ("finance", 2) and tries[d, r] == 1:
            raise RuntimeError("battery died")
        if r == 3 and d in ("cdc", "nhlbi"):
            raise ConnectionError("unreachable")
        packet = real(device, instruction)
        if (d, r) == ("cdc", 2):
            clock.skew += 100.0  # answers 100 s late, every time
        return packet

    monkeypatch.setattr(local, "run_round", faulty)
    monkeypatch.setattr(local, "time", clock)
    cfg = smoke_config
    cfg.rounds, cfg.server.min_devices, cfg.server.round_retries, cfg.server.device_timeout = 3, 2, 1, 60.0
    with caplog.at_level(logging.WARNING):
        summary = run(cfg, tmp_path, progress=False)

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert lines[0]["accepted"] == ["cdc", "finance"] and not lines[0].get("skipped")
    assert lines[1]["accepted"] == ["finance", "nhlbi"] and not lines[1].get("skipped")
    assert lines[2]["accepted"] == ["finance"] and lines[2]["skipped"] and lines[2]["losses"] == {}
    assert lines[2]["ppl"] == lines[1]["ppl"]  # a skipped round leaves the global model as it was
    # who was asked how often: no retry while enough answered; one retry per short round, only of the missing
    assert tries[("nhlbi", 1)] == 1 and tries[("cdc", 1)] == 1
    assert tries[("cdc", 2)] == 2 and tries[("finance", 2)] == 2 and tries[("nhlbi", 2)] == 1
    assert tries[("cdc", 3)] == tries[("nhlbi", 3)] == 2 and tries[("finance", 3)] == 1
    cdc = [x for x in summary["comm_bytes"]["per_device"]["cdc"]["rounds"] if x["round"] == 2]
    assert len(cdc) == 2 and all("device_timeout" in x["failed"] and x["up"] == 0 for x in cdc)
    messages = [r.getMessage() for r in caplog.records]
    assert any("[ROUND 2]" in m and "retry 1/1" in m and "cdc, finance" in m for m in messages)
    assert any("[ROUND 3]" in m and "skips this round" in m for m in messages)
    assert not any("[ROUND 1]" in m and "retry" in m for m in messages)


def test_round_retries_is_validated(tmp_path):
    from deepfusion.config import load_config
    from deepfusion.errors import ConfigError

    path = tmp_path / "c.toml"
    path.write_text('[server]\nround_retries = -1\n[[devices]]\nid = "a"\nsource = "medquad:cdc"\n')
    with pytest.raises(ConfigError, match="round_retries = -1"):
        load_config(path)
