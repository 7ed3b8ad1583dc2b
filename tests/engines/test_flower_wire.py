"""The Flower engine's small parts, without a runtime: the run config, message sizes and
the reasons the server logs. Fast: no Ray, no SuperLink."""

import pytest
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from deepfusion.errors import ConfigError
from deepfusion.engines.flower.wire import content, failure, message_bytes, run_settings, values


@pytest.fixture
def as_a_task(monkeypatch):
    """Flower stamps every message with the identity of the task that makes it; outside a runtime, set one."""
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)


def test_run_config_becomes_typed_settings_and_names_bad_keys():
    s = run_settings({"config": "smoke-multiround", "rounds": 3, "round-timeout": 30, "seed": 1})
    assert (s.config, s.rounds, s.round_timeout, s.seed) == ("smoke-multiround", 3, 30.0, 1)
    assert s.federation().rounds == 3 and s.federation().seed == 1 and s.federation().name == "smoke-multiround"
    assert run_settings({}).federation().method == "multiround-views"  # the app's default config runs on Flower
    with pytest.raises(ConfigError, match="unknown key 'round'; allowed: config, out"):
        run_settings({"round": 3})
    with pytest.raises(ConfigError, match="rounds = '3': must be int"):
        run_settings({"rounds": "3"})
    with pytest.raises(ConfigError, match="node-timeout = 0.0: must be > 0"):
        run_settings({"node-timeout": 0.0})


def test_message_bytes_wrap_the_payload_in_a_small_envelope(as_a_task):
    payload = bytes(range(256)) * 40
    msg = Message(content({"seconds": 1.5}, packet=payload, report="{}"), dst_node_id=7, message_type="train")
    assert bytes(values(msg)["packet"]) == payload
    assert len(payload) < message_bytes(msg) < len(payload) + 1024


def test_failures_say_what_happened(as_a_task):
    msg = Message(content(instruction=b"x"), dst_node_id=7, message_type="train")
    assert failure(None, 45) == "no answer within 45s"
    assert failure(Message(Error(ErrorCode.MESSAGE_UNAVAILABLE, "long text"), reply_to=msg), 45) == "no answer within 45s"
    assert "offline" in failure(Message(Error(ErrorCode.NODE_UNAVAILABLE, "long text"), reply_to=msg), 45)
    raised = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "ValueError: bad"), reply_to=msg)
    assert failure(raised, 45) == "ValueError: bad"
    assert failure(Message(content(packet=b"p"), reply_to=msg), 45) is None


def test_run_config_set_overrides_any_config_key_as_the_cli_does():
    s = run_settings({"config": "smoke", "set": "tune.loss=ce; distill.alpha=0.5;knowledge.topk=16;"})
    cfg = s.federation()
    assert (cfg.tune.loss, cfg.distill.alpha, cfg.knowledge.topk) == ("ce", 0.5, 16)
    assert run_settings({"config": "smoke", "set": ""}).federation().tune.loss == "keep"  # the file's
    with pytest.raises(ConfigError, match=r"\[tune\] loss = 'mse': allowed: keep, ce"):
        run_settings({"config": "smoke", "set": "tune.loss=mse"}).federation()
    with pytest.raises(ConfigError, match=r"run config set 'lam': expected SECTION.KEY=VALUE"):
        run_settings({"config": "smoke", "set": "lam"}).federation()
    with pytest.raises(ConfigError, match=r"run config set 'vaa.alpha=1': no section \[vaa\]"):
        run_settings({"config": "smoke", "set": "vaa.alpha=1"}).federation()


def test_the_app_config_in_pyproject_is_every_run_setting_at_its_default():
    import tomllib
    from pathlib import Path

    from deepfusion.engines.flower.wire import RunSettings

    app = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert run_settings(app) == RunSettings() and len(app) == len(RunSettings.__dataclass_fields__)
