"""End to end on the smoke federation: the CLI contract, the exported model, every method."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deepfusion.cli import main
from deepfusion.engines.local import run

pytestmark = pytest.mark.slow


@pytest.fixture
def smoke_run(smoke_multiround):
    """The suite's one `deepfusion run` of configs/smoke-multiround.toml (tests/conftest.py): read it, never change it."""
    return smoke_multiround.out


def test_outputs_follow_the_contract(smoke_run):
    summary = json.loads((smoke_run / "summary.json").read_text())
    for key in ("method", "global_family", "rounds", "ppl", "ppl_by_source", "comm_bytes",
                "device_peak_mem_bytes", "wall_seconds"):
        assert key in summary
    assert summary["method"] == "multiround-views" and summary["global_family"] == "qwen_moe"
    assert set(summary["ppl"]) == {"medical", "finance"}
    assert set(summary["ppl_by_source"]) == {"medquad:cdc", "medquad:nhlbi", "tatqa:0/2"}
    devices = {"cdc", "nhlbi", "finance"}
    assert set(summary["comm_bytes"]["per_device"]) == devices == set(summary["device_peak_mem_bytes"])
    per = summary["comm_bytes"]["per_device"]
    assert summary["comm_bytes"]["up"] == sum(v["up"] for v in per.values()) > 0
    assert all(len(v["rounds"]) == summary["rounds"] for v in per.values())
    lines = [json.loads(x) for x in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    assert lines[-1]["ppl"] == summary["ppl"]
    # the paper's figures, as every method reports them: log-ppl is the log of the same model's perplexity
    for domain, ppl in summary["ppl"].items():
        assert math.exp(summary["log_ppl"][domain]) == pytest.approx(ppl, rel=1e-3)
        assert 0 <= summary["accuracy"][domain] <= 100 and summary["qa_log_ppl"][domain] > 0


def test_bytes_up_are_the_serialised_packets(smoke_run):
    """24 proxy blocks of 32 tokens = 744 positions; k = 4 with a 512 vocab: uint16 ids, fp16 probs + tail."""
    summary = json.loads((smoke_run / "summary.json").read_text())
    for r in summary["comm_bytes"]["per_device"]["cdc"]["rounds"]:
        payload = 744 * (4 * 2 + 4 * 2 + 2)
        assert payload < r["up"] < payload + 2048  # + header and metadata


def test_exported_model_loads_with_auto_classes_and_generates(smoke_run, capsys):
    model = AutoModelForCausalLM.from_pretrained(smoke_run / "model")
    tok = AutoTokenizer.from_pretrained(smoke_run / "model")
    assert model.config.model_type == "qwen2_moe"
    views = ("view_embedding", "stage_bias", "log_temp")  # LogitViews' own parameters
    assert not any(k.endswith(views) for k in model.state_dict())  # the logit views are training-only
    ids = tok("The heart", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tok)
    assert main(["generate", "--model", str(smoke_run / "model"), "--prompt", "The heart", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()


def test_eval_command_reproduces_the_summary(smoke_run, capsys):
    from deepfusion.config import default_config_path
    from tests.conftest import SHARED_DATA

    assert main(["eval", "--model", str(smoke_run / "model"), "--config", str(default_config_path("smoke-multiround")),
                 "--data-dir", str(SHARED_DATA)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((smoke_run / "summary.json").read_text())
    for domain, ppl in summary["ppl"].items():
        assert printed["ppl"][domain] == pytest.approx(ppl, rel=1e-3)


@pytest.mark.parametrize("method", ["plain-fkd", "device-kd", "proxy-only"])
def test_every_method_runs(smoke_config, tmp_path, method, shared_prepare_data):
    smoke_config.method = method
    summary = run(smoke_config, tmp_path, progress=False)
    assert summary["method"] == method
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["ppl"].values())
    if method == "proxy-only":
        assert summary["comm_bytes"]["up"] == 0
    else:
        assert summary["comm_bytes"]["up"] > 0


@pytest.mark.parametrize("method", ["plain-fkd", "multiround-views"])
def test_devices_with_their_own_tokenizers_take_part_in_every_round(smoke_config, tmp_path, method, byo_tokenizers,
                                                                   shared_prepare_data):
    """cdc reads byte-level BPE ids, nhlbi WordPiece ids, finance the federation's: every packet is accepted every
    round, the two with their own tokenizer send one mask byte a position more, and the MoE trains on them."""
    smoke_config.method = method
    own = {"cdc": "bpe", "nhlbi": "wordpiece"}
    for d in smoke_config.devices:
        d.tokenizer = str(byo_tokenizers[own[d.id]]) if d.id in own else None
    summary = run(smoke_config, tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["accepted"] for x in lines] == [["cdc", "finance", "nhlbi"]] * 2 and not lines[-1]["rejected"]
    assert all(math.isfinite(v) for x in lines for v in x["losses"].values()) and lines[-1]["losses"]["kd"] > 0
    per, n = summary["comm_bytes"]["per_device"], smoke_config.data.proxy_blocks * (smoke_config.data.seq_len - 1)
    for d in own:
        extra = [a["up"] - b["up"] for a, b in zip(per[d]["rounds"], per["finance"]["rounds"])]
        assert all(0 < e - n < 160 for e in extra), extra
    assert all(math.isfinite(v) for v in summary["ppl"].values())


def test_a_dead_device_does_not_stop_the_federation(smoke_config, tmp_path, monkeypatch, shared_prepare_data):
    import deepfusion.engines.local as local

    real = local.run_round

    def flaky(device, instruction):
        if device.cfg.id == "nhlbi" and instruction.round == 1:
            raise RuntimeError("battery died")
        return real(device, instruction)

    monkeypatch.setattr(local, "run_round", flaky)
    summary = run(smoke_config, tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["accepted"] == ["cdc", "finance"] and lines[1]["accepted"] == ["cdc", "finance", "nhlbi"]
    assert "battery died" in summary["comm_bytes"]["per_device"]["nhlbi"]["rounds"][0]["failed"]


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('rounds = "many"\n')
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "rounds" in err and "Traceback" not in err
    cfg = tmp_path / "c.toml"
    cfg.write_text('method = "multiround-views"\n[[devices]]\nid = "a"\nsource = "medquad:cdc"\n')
    assert main(["run", "--config", str(cfg), "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err
