"""Replaying recorded uploads is the same experiment as running the devices."""

import copy

import pytest

from deepfusion.replay import Replay, device_key


def test_the_key_is_the_device_side_only(smoke_config):
    base = device_key(smoke_config)
    server_only = copy.deepcopy(smoke_config)
    server_only.method, server_only.server.family, server_only.server.lam = "plain-fkd", "deepseek_moe", 3.0
    server_only.server.steps, server_only.rounds = 99, 7
    assert device_key(server_only) == base
    for change in (lambda c: setattr(c.knowledge, "topk", 2), lambda c: setattr(c, "seed", 5),
                   lambda c: setattr(c.devices[0], "local_steps", 9), lambda c: setattr(c.data, "seq_len", 16)):
        other = copy.deepcopy(smoke_config)
        change(other)
        assert device_key(other) != base


@pytest.mark.slow
def test_a_replayed_run_equals_a_live_one(smoke_config, tmp_path, shared_prepare_data):
    from deepfusion.engines.local import run

    recordings = tmp_path / "recordings"
    run(smoke_config, tmp_path / "record", progress=False, replay=recordings)  # deepfusion records
    assert Replay(recordings, smoke_config).complete(smoke_config.rounds)
    smoke_config.method = "device-kd"
    live = run(smoke_config, tmp_path / "live", progress=False)
    replayed = run(smoke_config, tmp_path / "replayed", progress=False, replay=recordings)
    assert "replayed_from" in replayed and "replayed_from" not in live
    for key in ("ppl", "ppl_by_source", "comm_bytes", "device_peak_mem_bytes", "devices"):
        assert replayed[key] == live[key], key


def test_replay_is_refused_where_there_is_nothing_to_replay(tmp_path, capsys):
    from deepfusion.cli import main
    from deepfusion.config import default_config_path

    args = ["run", "--config", str(default_config_path("smoke-multiround")), "--replay", str(tmp_path / "r"), "--out", str(tmp_path / "o")]
    assert main([*args, "--method", "proxy-only"]) == 2
    assert "--replay" in capsys.readouterr().err
