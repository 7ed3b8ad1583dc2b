"""LoRA devices (lora.py): the plan chosen from measured peaks, merged and adapter uploads, the server's rebuild
and its refusals, and the config keys."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from deepfusion import embedding, lora
from deepfusion.config import DeviceConfig, FederationConfig
from deepfusion.device import lm_loss
from deepfusion.errors import ConfigError
from deepfusion.models import build_device_model
from deepfusion.ondevice import PrivateData, make_upload, run_task
from deepfusion.recipes import deepfusion as recipe
from deepfusion.wire.upload import Task, Upload, UploadError, receive_upload

V, T, E_N = 300, 16, b"e" * 34
MB = 2**20


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny steps run fastest on one thread, and the same thread count keeps two runs bit-identical."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def wide_gpt2() -> GPT2LMHeadModel:
    """One wide block: LoRA's ranks differ by MBs of measured peak, so whole-MB budgets separate them."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=512, n_layer=1, n_head=8,
                                      bos_token_id=None, eos_token_id=None))


def device(**keys) -> DeviceConfig:
    return DeviceConfig(**{"id": "d", "source": "x", "family": "gpt2", "size": "tiny", "batch_size": 2, **keys})


# ---- choosing from the budget ------------------------------------------------------------------------

def test_auto_picks_full_when_the_budget_is_ample_and_the_largest_fitting_rank_when_tight():
    model, batch = wide_gpt2(), torch.randint(V, (2, T))
    peaks = {r: lora.lora_peak(model, r, batch, lm_loss, 1e-3) for r in (64, 32)}
    ample = lora.choose(device(finetune="auto", memory_mb=10_000), model, batch, lm_loss, "here")
    assert ample.finetune == "full" and ample.rank == 0 and ample.peak > peaks[64]
    tight = math.ceil(peaks[32] / MB)
    assert tight * MB < peaks[64]  # a budget between rank 32's peak and rank 64's
    plan = lora.choose(device(finetune="auto", memory_mb=tight), model, batch, lm_loss, "here")
    assert (plan.finetune, plan.rank, plan.peak) == ("lora", 32, peaks[32])
    fixed = lora.choose(device(finetune="lora", lora_rank=8), model, batch, lm_loss, "here")
    assert fixed.rank == 8 and fixed.peak < peaks[32]  # a given rank without a budget is taken as given


def test_auto_stops_with_one_line_when_even_the_smallest_rank_does_not_fit():
    model, batch = wide_gpt2(), torch.randint(V, (2, T))
    with pytest.raises(ConfigError, match=r"\[\[devices\]\] \(id 'd'\): memory_mb = 1 is too small to train: the "
                                          r"smallest measured peak, LoRA rank 4, needs [\d.]+ MB at batch_size 2"):
        lora.choose(device(finetune="auto", memory_mb=1), model, batch, lm_loss, "[[devices]] (id 'd')")


def test_ranks_above_the_smallest_projection_are_not_tried():
    assert lora.useful_ranks(build_device_model("llama", "tiny", V)) == [32, 16, 8, 4]  # hidden 32
    assert lora.useful_ranks(wide_gpt2()) == list(lora.RANKS)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "olmo", "bloom"])
def test_targets_are_every_projection_but_the_lm_head(family):
    targets = lora.target_modules(build_device_model(family, "tiny", V))
    assert "lm_head" not in targets and len(targets) >= 3  # attention in, attention out, the MLP's


# ---- Phase 0 on a device and the server's rebuild ----------------------------------------------------

def private_blocks(n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    start = torch.randint(V, (n, 1), generator=g)
    return (start + torch.arange(T)) % V  # each token follows the one before it


def public_base(seed: int = 0):
    torch.manual_seed(seed)
    return build_device_model("gpt2", "tiny", V)


def phase0(monkeypatch, **keys) -> bytes:
    """One device's run_task on a tiny GPT-2 (its 'public checkpoint' a seeded fresh model), e_n stubbed."""
    monkeypatch.setattr(embedding, "load_encoder", lambda: None)
    monkeypatch.setattr(embedding.Basis, "from_bytes", staticmethod(lambda b: None))
    monkeypatch.setattr(embedding, "embed_device", lambda *a: E_N)
    dc = device(lr=1e-2, max_steps=20, eval_every=10, **keys)
    cfg = FederationConfig(devices=[dc])
    return run_task(cfg, "d", Task("d", b"basis").to_bytes(), PrivateData(["text"], private_blocks()), public_base(),
                    seed=0, torch_device=torch.device("cpu"))


def receive(blob: bytes) -> tuple[Upload, object]:
    return receive_upload(blob, "d", devices={"d"}, vocab_size=V, embedding_bytes=len(E_N))


def rebuilt(upload: Upload, config):
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict({k: v.float() for k, v in upload.tensors.items()}, strict=False)
    model.tie_weights()
    return model.eval()


def test_a_lora_merged_upload_is_the_whole_model_and_reports_its_plan(monkeypatch):
    upload, config = receive(phase0(monkeypatch, finetune="lora", lora_rank=4))
    info = upload.info
    assert (info["finetune"], info["lora_rank"], info["upload"]) == ("lora", 4, "merged")
    assert 0 < info["trainable_params"] < info["params"] and info["peak_mem_bytes"] > 0
    assert info["val_loss"] < info["curve"][0]["val_loss"]  # the adapters learned
    assert set(upload.tensors) == {n for n, _ in public_base().named_parameters()}


def test_a_full_device_uploads_as_before_and_auto_with_room_trains_every_weight(monkeypatch):
    full, _ = receive(phase0(monkeypatch))
    assert not {"finetune", "upload", "lora_rank"} & set(full.info)  # the upload's bytes as before the keys
    auto, _ = receive(phase0(monkeypatch, finetune="auto", memory_mb=10_000, upload="adapter"))
    assert auto.info == full.info and auto.tensors.keys() == full.tensors.keys()  # no adapter: the whole model


def test_a_merged_upload_round_trips_to_the_lora_models_outputs():
    model = lora.attach(public_base(), 4).eval()  # GPT-2's dropout off
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter something to merge
                p.normal_(0, 0.05)
        blocks = private_blocks(4)
        want = model(input_ids=blocks).logits
        before = public_base().eval()(input_ids=blocks).logits
        blob = make_upload(device(), model.merge_and_unload(), E_N, {}).to_bytes()
        got = rebuilt(*receive(blob))(input_ids=blocks).logits
    assert not torch.allclose(want, before, atol=1e-2)  # the adapter changed the outputs
    assert torch.allclose(got, want, atol=1e-2)  # and the upload carries that change (fp16 on the wire)


def test_an_adapter_upload_is_small_and_the_server_rebuilds_the_merged_weights(monkeypatch):
    merged_blob = phase0(monkeypatch, finetune="lora", lora_rank=4)
    adapter_blob = phase0(monkeypatch, finetune="lora", lora_rank=4, upload="adapter")
    assert len(adapter_blob) * 3 < len(merged_blob)
    adapter, config = receive(adapter_blob)
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter.tensors) and adapter.info["upload"] == "adapter"
    assert adapter.info["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    server = lora.merge_upload(adapter, public_base())
    merged, _ = receive(merged_blob)
    assert set(server.tensors) == set(merged.tensors)
    for name, t in merged.tensors.items():  # the device merged in fp32 and sent fp16; the server merged fp16 adapters
        assert torch.allclose(server.tensors[name], t.float(), atol=2e-3, rtol=1e-3), name


def test_an_adapter_on_another_base_or_with_wrong_shapes_is_refused_by_name(monkeypatch):
    blob = phase0(monkeypatch, finetune="lora", lora_rank=4, upload="adapter")
    adapter, config = receive(blob)
    with pytest.raises(ValueError, match="trained on a base .* the server does not hold"):
        lora.merge_upload(adapter, public_base(seed=1))
    # the recipe turns it into the UploadError that leaves the device out (and its log names the device)
    monkeypatch.setattr(recipe, "device_model", lambda *a, **k: public_base(seed=1))
    cfg = FederationConfig(devices=[device(finetune="lora", lora_rank=4, upload="adapter")])
    data = SimpleNamespace(tokenizer=[0] * V, proxy=torch.zeros(2, T, dtype=torch.long))
    with pytest.raises(UploadError, match="LoRA adapter upload: its adapter was trained on a base"):
        recipe.with_base(cfg, data, adapter, {}, torch.device("cpu"))

    def tampered(info=None, **tensors) -> bytes:
        return Upload("d", adapter.arch, adapter.config, {**adapter.tensors, **tensors}, E_N,
                      {**adapter.info, **(info or {})}).to_bytes()

    name = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    with pytest.raises(UploadError, match=rf"{name} has shape \(8, 32\), the architecture has \(4, 32\)"):
        receive(tampered(**{name: torch.zeros(8, 32, dtype=torch.float16)}))
    with pytest.raises(UploadError, match=r"LoRA adapter upload: lora_rank 0 is not an integer"):
        receive(tampered({"lora_rank": 0}))
    with pytest.raises(UploadError, match=r"target_modules \['lm_head'\] are not projections of a gpt2 model"):
        receive(tampered({"target_modules": ["c_attn", "lm_head"]}))
    with pytest.raises(UploadError, match="LoRA adapter upload: base_sha256"):
        receive(tampered({"base_sha256": None}))
    with pytest.raises(UploadError, match="parameter names differ"):
        receive(tampered(**{"transformer.wte.weight": torch.zeros(V, 32, dtype=torch.float16)}))


# ---- config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, message", [
    ({"finetune": "qlora"}, "finetune = 'qlora': allowed: full, lora, auto"),
    ({"finetune": "auto"}, "memory_mb = None: finetune = 'auto' needs a memory budget"),
    ({"finetune": "lora"}, "lora_rank = 0: finetune = 'lora' needs a rank, or memory_mb"),
    ({"finetune": "lora", "lora_rank": -1}, "lora_rank = -1: must be in"),
    ({"upload": "diff"}, "upload = 'diff': allowed: merged, adapter"),
    ({"upload": "adapter"}, "upload = 'adapter': an adapter exists only with finetune = 'lora' or 'auto'"),
    ({"upload": "adapter", "finetune": "lora", "lora_rank": 4, "checkpoint": "/x"}, "the server rebuilds an adapter"),
])
def test_config_errors_name_the_key(keys, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        device(**keys)


def test_lora_is_refused_outside_the_one_shot_protocol():
    with pytest.raises(ConfigError, match="finetune = 'lora': applies to the one-shot methods' Phase 0"):
        FederationConfig(method="plain-fkd", devices=[device(finetune="lora", lora_rank=4)])


# ---- end to end ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_smoke_federation_runs_with_an_adapter_device_and_a_budgeted_one(tmp_path, data_dir):
    import json

    from deepfusion.cli import main
    from deepfusion.config import default_config_path

    text = default_config_path("smoke").read_text()  # --set cannot address a device: a config of our own
    text = text.replace('id = "cdc-a"\n', 'id = "cdc-a"\nfinetune = "lora"\nlora_rank = 4\nupload = "adapter"\n')
    text = text.replace('id = "fin-b"\n', 'id = "fin-b"\nfinetune = "auto"\nmemory_mb = 1\n')  # full needs 1.4 MB
    (tmp_path / "lora.toml").write_text(text)
    out = tmp_path / "out"
    assert main(["run", "--config", str(tmp_path / "lora.toml"), "--data-dir", str(data_dir), "--out", str(out),
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    devices, per_device = summary["devices"], summary["comm_bytes"]["per_device"]
    assert set(summary["clustering"]["devices"]) == {"cdc-a", "cdc-b", "fin-a", "fin-b"}  # the adapter was merged
    assert (devices["cdc-a"]["finetune"], devices["cdc-a"]["upload"]) == ("lora", "adapter")
    assert per_device["cdc-a"]["up"] == devices["cdc-a"]["upload_bytes"] < per_device["cdc-b"]["up"] / 4
    assert devices["fin-b"]["finetune"] == "lora" and devices["fin-b"]["peak_mem_bytes"] <= 2**20
    assert devices["cdc-b"]["finetune"] == "full" and devices["cdc-b"]["trainable_params"] == devices["cdc-b"]["params"]
