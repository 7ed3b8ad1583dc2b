"""Phase 0 on a device: hold out, train until local validation stops improving, keep the best, upload once."""

import pytest
import torch

from deepfusion.config import DeviceConfig
from deepfusion.models import build_device_model
from deepfusion.ondevice import hold_out, make_upload, mean_loss, train_until_converged

V, T = 300, 16


def blocks(n: int, seed: int = 0) -> torch.Tensor:
    """Text with structure a tiny model can learn: each token follows the one before it, mostly."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(V, (n, 1), generator=g)
    steps = torch.randint(1, 3, (n, T - 1), generator=g)
    return (start + torch.cat([torch.zeros(n, 1, dtype=torch.long), steps.cumsum(1)], 1)) % V


def test_hold_out_keeps_a_seeded_share_apart():
    b = blocks(20)
    train, val = hold_out(b, 0.1, torch.Generator().manual_seed(1))
    assert len(val) == 2 and len(train) == 18
    assert not {tuple(r) for r in val.tolist()} & {tuple(r) for r in train.tolist()}
    again = hold_out(b, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(again[1], val)
    with pytest.raises(ValueError, match="one to train on and one to validate on"):
        hold_out(b[:1], 0.1, torch.Generator())


def test_training_improves_local_validation_and_keeps_the_best_weights():
    torch.manual_seed(0)
    model = build_device_model("gpt2", "tiny", V)
    train, val = blocks(64), blocks(8, seed=1)
    dc = DeviceConfig(id="a", source="x", family="gpt2", size="tiny", lr=1e-2, max_steps=60, eval_every=10, patience=2)
    report = train_until_converged(model, train, val, dc, torch.Generator().manual_seed(0), torch.device("cpu"))
    losses = [c["val_loss"] for c in report["curve"]]
    assert report["val_loss"] == min(losses) < losses[0]
    assert abs(mean_loss(model, val, torch.device("cpu")) - report["val_loss"]) < 1e-3  # the best weights are kept
    assert report["steps"] <= 60 and report["tokens_trained"] == report["steps"] * dc.batch_size * T


def test_training_stops_when_validation_stops_improving():
    torch.manual_seed(0)
    model = build_device_model("gpt2", "tiny", V)
    dc = DeviceConfig(id="a", source="x", family="gpt2", size="tiny", lr=1e-9, max_steps=500, eval_every=5, patience=2)
    report = train_until_converged(model, blocks(16), blocks(4, seed=1), dc, torch.Generator().manual_seed(0),
                                   torch.device("cpu"))
    assert report["stopped"] == "patience" and report["steps"] < 500


def test_an_upload_carries_the_weights_once_in_the_upload_dtype():
    model = build_device_model("llama", "tiny", V)  # tied embeddings: one tensor on the wire
    dc = DeviceConfig(id="a", source="x", family="llama", size="tiny", upload_dtype="bfloat16")
    up = make_upload(dc, model, b"e" * 34, {})
    assert set(up.tensors) == {n for n, _ in model.named_parameters()} and "lm_head.weight" not in up.tensors
    assert {t.dtype for t in up.tensors.values()} == {torch.bfloat16} and up.arch == "llama/tiny"


def test_an_upload_does_not_carry_the_directory_the_model_was_loaded_from(tmp_path):
    from deepfusion.wire.upload import describe

    build_device_model("gpt2", "tiny", V).save_pretrained(tmp_path / "ckpt")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert str(tmp_path) in model.config._name_or_path  # what would leak
    dc = DeviceConfig(id="a", source="x", family="gpt2", size="tiny")
    up = make_upload(dc, model, b"e" * 34, {})
    assert str(tmp_path) not in up.to_bytes().decode("latin-1") and "_name_or_path" not in up.config
    assert describe(up.config).to_dict()["n_embd"] == model.config.n_embd  # still describes the architecture
