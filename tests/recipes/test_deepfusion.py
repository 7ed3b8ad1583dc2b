"""The paper pipeline end to end on the smoke federation: phases, outputs, bad uploads, dead devices, and a
SIGKILL inside Phase II that resumes to the unbroken run's weights."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM

from deepfusion.cli import main
from deepfusion.config import default_config_path, load_config
from deepfusion.engines import local
from deepfusion.replay import UploadReplay
from tests.conftest import smoke_deepfusion_flags

pytestmark = pytest.mark.slow


def run(tmp_path, data_dir, name="out", *extra):
    out = tmp_path / name
    assert main(["run", "--config", str(default_config_path("smoke")), "--data-dir", str(data_dir), "--out", str(out),
                 "--no-progress", *extra]) == 0
    return out, json.loads((out / "summary.json").read_text())


def recorded_send(smoke):
    """local.oneshot_send's stand-in: each device asked answers with its upload in smoke_deepfusion's recording
    of Phase 0 (these tests are about what the server does with the uploads, not about training devices)."""
    def oneshot_send(cfg, data, torch_device, *shown):
        recorded = UploadReplay(smoke.recordings, cfg)
        assert recorded.complete(), f"no recording of this device side in {smoke.recordings}"
        return lambda tasks: ({d: (recorded.dir / f"{d}.bin").read_bytes() for d in tasks}, {})
    return oneshot_send


def test_the_paper_pipeline_runs_end_to_end(smoke_deepfusion):
    out, summary = smoke_deepfusion.out, smoke_deepfusion.summary()  # the shared run, its Phase 0 live
    assert summary["method"] == "deepfusion" and summary["rounds"] == 1
    for key in ("log_ppl", "accuracy", "qa_log_ppl", "qa_accuracy", "ppl"):
        assert set(summary[key]) == {"medical", "finance"}, key
    assert summary["clustering"]["ari"] == 1.0  # two CDC devices, two TAT-QA devices: two domains recovered
    per_device = summary["comm_bytes"]["per_device"]
    uploads = {d: (out / "checkpoint" / "uploads" / f"{d}.bin").stat().st_size for d in per_device}
    assert summary["comm_bytes"]["up"] == sum(uploads.values()) == sum(v["up"] for v in per_device.values())
    assert summary["comm_bytes"]["embedding_bytes"] == 4 * 34  # e_n: 32 int8 + an fp16 scale per device
    assert all(summary["device_peak_mem_bytes"][d] > 0 for d in per_device)
    phases = [json.loads(line)["phase"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["0"] * 4 + ["I", "II", "II", "III"]

    model = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.norm_topk_prob
    fresh = AutoModelForCausalLM.from_config(model.config)
    assert set(model.state_dict()) == set(fresh.state_dict())  # no VAA / OFA weight in the export


def test_a_bad_upload_and_a_dead_device_are_left_out(tmp_path, data_dir, monkeypatch, capsys, smoke_deepfusion):
    real = recorded_send(smoke_deepfusion)

    def send_with_faults(cfg, data, torch_device, *shown):
        deliver = real(cfg, data, torch_device, *shown)

        def send(tasks):
            replies, failed = deliver({d: t for d, t in tasks.items() if d != "cdc-b"})
            failed["cdc-b"] = "ConnectionError: device vanished"
            replies["fin-b"] = replies["fin-b"][:-64]  # truncated on the way
            return replies, failed
        return send

    monkeypatch.setattr(local, "oneshot_send", send_with_faults)
    out, summary = run(tmp_path, data_dir, "out", "--set", f"data.dir={data_dir}")
    per_device = summary["comm_bytes"]["per_device"]
    assert "not valid safetensors" in per_device["fin-b"]["rejected"] and "vanished" in per_device["cdc-b"]["failed"]
    assert summary["clustering"]["devices"] == ["cdc-a", "fin-a"] and (out / "model" / "config.json").is_file()
    assert "rejected the upload of device 'fin-b'" in capsys.readouterr().err


def test_too_few_uploads_for_the_domains_stop_with_one_line(tmp_path, data_dir, monkeypatch, capsys, smoke_deepfusion):
    real = recorded_send(smoke_deepfusion)
    monkeypatch.setattr(local, "oneshot_send", lambda cfg, data, dev, *shown: (
        lambda tasks: (real(cfg, data, dev, *shown)({"cdc-a": tasks["cdc-a"]})[0], {})))
    out = tmp_path / "few"
    assert main(["run", "--config", str(default_config_path("smoke")), "--data-dir", str(data_dir), "--out", str(out),
                 "--no-progress", "--set", f"data.dir={data_dir}"]) == 2
    assert "1 valid uploads, but 2 domains need at least 2 devices" in capsys.readouterr().err


def test_ablations_change_one_part_of_the_pipeline(tmp_path, data_dir, smoke_deepfusion):
    from deepfusion.recipes.deepfusion import VARIANTS, variant

    cfg = load_config(default_config_path("smoke"))
    for method in VARIANTS:
        cfg.method = method
        v = variant(cfg)
        changed = {(s, k) for s in ("distill", "clustering") for k, x in vars(getattr(v, s)).items()
                   if x != vars(getattr(cfg, s))[k]}
        assert changed == {(s, k) for s, c in VARIANTS[method].items() for k in c}
    _, summary = run(tmp_path, data_dir, "ofa", "--method", "ofa-kd", *smoke_deepfusion_flags(smoke_deepfusion))
    assert summary["config"]["distill"]["features"] == "ofa"
    assert [json.loads(x)["phase"] for x in (tmp_path / "ofa" / "metrics.jsonl").read_text().splitlines()][-1] == "III"


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read(path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_sigkill_inside_phase_ii_resumes_to_the_same_weights(tmp_path, data_dir, smoke_deepfusion):
    config = tmp_path / "c.toml"  # longer distillation, so the run can be killed between two domains
    config.write_text(default_config_path("smoke").read_text().replace("[distill]\nsteps = 6", "[distill]\nsteps = 80"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count: bit-identical arithmetic
    # both runs replay smoke_deepfusion's Phase 0 (the same uploads; the server's side is what is killed)
    common = ["--config", str(config), "--data-dir", str(data_dir), "--no-progress",
              *smoke_deepfusion_flags(smoke_deepfusion)]
    cli = [sys.executable, "-m", "deepfusion.cli", "run"]
    # the unbroken run goes alongside the broken one (one thread each, two cores); it only slows the broken
    # run's Phase II, which widens the window for the kill between its two domains
    with open(tmp_path / "whole.log", "w") as log:
        whole = subprocess.Popen([*cli, *common, "--out", str(tmp_path / "whole")], env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        broken = tmp_path / "broken"
        first, second = broken / "checkpoint" / "student0.json", broken / "checkpoint" / "student1.json"
        proc = subprocess.Popen([*cli, *common, "--out", str(broken)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            # wait for the progress line, written just after student0.json: killing between the two would
            # resume just as well, but the words checked below would not be there yet
            progress_file, deadline = broken / "checkpoint" / "progress.json", time.time() + 300
            while time.time() < deadline and not (first.exists() and "domain 1 of 2" in _read(progress_file)):
                time.sleep(0.02)
            assert first.exists(), "the run never distilled its first domain"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert not second.exists() and not (broken / "summary.json").exists()  # killed inside Phase II
        kept = (broken / "checkpoint" / "student0.safetensors").stat()
        progress = json.loads((broken / "checkpoint" / "progress.json").read_text())
        assert progress["saved"] == "Phase II, domain 1 of 2 distilled"

        subprocess.run([*cli, "--resume", str(broken), "--data-dir", str(data_dir), "--no-progress"], check=True,
                       env=env, capture_output=True, timeout=600)
        assert whole.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    finally:
        if whole.poll() is None:
            os.killpg(whole.pid, signal.SIGKILL)
            whole.wait()
    again = (broken / "checkpoint" / "student0.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # domain 1 was not redone
    assert digest(broken / "model" / "model.safetensors") == digest(tmp_path / "whole" / "model" / "model.safetensors")
    whole, resumed = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "whole", broken))
    assert resumed["ppl"] == whole["ppl"] and resumed["qa_log_ppl"] == whole["qa_log_ppl"]


def test_phase_0_is_recorded_once_and_replayed_for_the_ablations(tmp_path, data_dir, monkeypatch, smoke_deepfusion):
    live, first = smoke_deepfusion.out, smoke_deepfusion.summary()  # recorded its Phase 0 as it ran it
    assert UploadReplay(smoke_deepfusion.recordings, load_config(default_config_path("smoke"),
                                                                 [f"data.dir={data_dir}"])).complete()
    trained = []
    monkeypatch.setattr(local, "oneshot_send", lambda *a, **k: trained.append(1) or (lambda tasks: ({}, {})))
    again, second = run(tmp_path, data_dir, "replayed", "--method", "deepfusion-no-vaa",
                        *smoke_deepfusion_flags(smoke_deepfusion))
    assert trained == [1]  # the engine built its send function, and the recording answered instead of it
    for upload in (live / "checkpoint" / "uploads").iterdir():
        assert upload.read_bytes() == (again / "checkpoint" / "uploads" / upload.name).read_bytes()
    assert second["comm_bytes"] == first["comm_bytes"] and second["clustering"] == first["clustering"]
    assert second["config"]["distill"]["features"] == "none"
