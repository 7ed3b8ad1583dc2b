"""The Flower engine in Flower's Simulation Runtime, against the local engine on the smoke federation.

Same science whatever the transport: both engines build every device from the same seed, send it the same
instruction and run the same server step, so each device's knowledge packet is the same bytes in every
round (compared by SHA-256) and the held-out perplexities agree. Measured on this machine (CPU): equal to
every printed digit; the test allows 0.1 % (REL_PPL) for thread scheduling on other hardware.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from deepfusion.cli import main
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow

REL_PPL = 1e-3
OFFLINE = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}  # no network here, nor wait for one


def smoke_path():
    from deepfusion.config import default_config_path

    return default_config_path("smoke-multiround")


def smoke(**overrides):
    from deepfusion.config import load_config

    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA}")
    cfg = load_config(smoke_path(), **overrides)
    cfg.data.dir = str(SHARED_DATA)
    return cfg


@pytest.fixture
def local_run(smoke_multiround) -> tuple[dict, dict[str, list[str]]]:
    """The local engine's smoke run (the suite's shared one, tests/conftest.py): its summary and each device's
    packet digest per round, read off the payloads its server step received. The deployment test compares
    against the same run."""
    return smoke_multiround.summary(), smoke_multiround.digests


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    """A 2-round Flower run, stopped after round 1 (as a kill after its checkpoint leaves it) and resumed: every
    test below compares it with the local engine's unbroken run, so each also checks that a resumed Flower run
    (the server from its checkpoint, every device from its saved state) is the unbroken run, byte for byte."""
    smoke()  # skips without the corpora
    out = tmp_path_factory.mktemp("flower")
    common = ["--data-dir", str(SHARED_DATA), "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        assert main(["run", "--engine", "flower", "--config", str(smoke_path()), "--rounds", "1", "--out", str(out),
                     *common]) == 0
        (out / "summary.json").unlink()  # as if killed after round 1's checkpoint
        assert main(["run", "--resume", str(out), "--rounds", "2", *common]) == 0  # its engine from its checkpoint
    return out


def test_flower_run_writes_the_local_engines_outputs(flower_run):
    summary = json.loads((flower_run / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["method"] == "multiround-views" and summary["rounds"] == 2
    assert set(summary["ppl"]) == {"medical", "finance"}
    assert set(summary["devices"]) == set(summary["device_peak_mem_bytes"]) == {"cdc", "nhlbi", "finance"}
    assert all(d["ppl_own_source"] > 1 and d["arch"].endswith("/tiny") for d in summary["devices"].values())
    assert summary["privacy"] == {"epsilon": None, "delta": None, "devices_without_dp": ["cdc", "finance", "nhlbi"]}
    lines = [json.loads(x) for x in (flower_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    assert all(x["accepted"] == ["cdc", "finance", "nhlbi"] and x["losses"]["kd"] > 0 for x in lines)
    assert lines[-1]["ppl"] == summary["ppl"]
    model = AutoModelForCausalLM.from_pretrained(flower_run / "model")
    views = ("view_embedding", "stage_bias", "log_temp")  # LogitViews' own parameters: training-only
    assert model.config.model_type == "qwen2_moe" and not any(k.endswith(views) for k in model.state_dict())


def test_same_packet_bytes_and_perplexities_as_the_local_engine(flower_run, local_run):
    local_summary, local_digests = local_run
    summary = json.loads((flower_run / "summary.json").read_text())
    flower_digests = {d: [r["sha256"] for r in v["rounds"]] for d, v in summary["comm_bytes"]["per_device"].items()}
    assert flower_digests == local_digests and all(len(v) == 2 for v in local_digests.values())
    for key in ("ppl", "ppl_by_source"):
        for name, ppl in local_summary[key].items():
            assert summary[key][name] == pytest.approx(ppl, rel=REL_PPL), (key, name)
    for device, info in local_summary["devices"].items():
        assert summary["devices"][device]["ppl_own_source"] == pytest.approx(info["ppl_own_source"], rel=REL_PPL)


def test_comm_bytes_give_payload_and_flower_message_bytes(flower_run, local_run):
    """Payload = the local engine's bytes exactly; the Flower message around it adds a bounded envelope."""
    local_per = local_run[0]["comm_bytes"]["per_device"]
    comm = json.loads((flower_run / "summary.json").read_text())["comm_bytes"]
    for device, v in comm["per_device"].items():
        for mine, local in zip(v["rounds"], local_per[device]["rounds"], strict=True):
            assert (mine["up"], mine["down"]) == (local["up"], local["down"])
            assert mine["up"] < mine["up_message"] < mine["up"] + 2048  # metadata, device report, numbers
            assert mine["down"] < mine["down_message"] < mine["down"] + 1024
        assert v["setup"]["down"] > 10_000 and v["setup"]["down_message"] > v["setup"]["down"]  # tokenizer + proxy
        assert v["up"] == sum(r["up"] for r in v["rounds"])
        assert v["down"] == v["setup"]["down"] + sum(r["down"] for r in v["rounds"])
    assert comm["up_message"] == sum(v["up_message"] for v in comm["per_device"].values())


def test_device_kd_runs_on_flower(tmp_path, monkeypatch):
    """multiround-views runs above, plain-fkd in the deployment test; the third method that crosses a network."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    from deepfusion.engines.flower.simulation import run

    summary = run(smoke(method="device-kd", rounds=1), tmp_path, progress=False)
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert summary["method"] == "device-kd" and line["accepted"] == ["cdc", "finance", "nhlbi"]
    assert line["losses"]["kd"] > 0 and "views" not in line  # per-device KD, no logit views
    assert torch.isfinite(torch.tensor(list(summary["ppl"].values()))).all()


def test_a_method_without_devices_is_refused_before_ray_starts(tmp_path, capsys):
    assert main(["run", "--engine", "flower", "--method", "proxy-only", "--config", str(smoke_path()),
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "method = 'proxy-only'" in err and "--engine local" in err
