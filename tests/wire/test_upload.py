"""The one-shot wire: a task down, an upload up; the server rejects every defect with one reason."""

import json

import pytest
import torch

from deepfusion.config import DeviceConfig
from deepfusion.models import build_device_model
from deepfusion.ondevice import make_upload
from deepfusion.wire.upload import Task, Upload, UploadError, expected_parameters, receive_upload

V, EMB = 300, 34
DEVICES = {"a", "b"}


def upload(family="gpt2", dtype="float16", device="a") -> Upload:
    torch.manual_seed(0)
    model = build_device_model(family, "tiny", V)
    dc = DeviceConfig(id=device, source="medquad:cdc", family=family, size="tiny", upload_dtype=dtype)
    return make_upload(dc, model, bytes(range(EMB)), {"steps": 3})


def receive(blob: bytes, sender: str = "a", **kw):
    return receive_upload(blob, sender, devices=DEVICES, vocab_size=V, embedding_bytes=EMB, **kw)


@pytest.mark.parametrize("family", ["gpt2", "llama", "olmo", "bloom", "qwen2"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_an_upload_round_trips_and_is_accepted(family, dtype):
    up = upload(family, dtype)
    blob = up.to_bytes()
    got, config = receive(blob)
    assert got.to_bytes() == blob and config.model_type == family
    assert set(got.tensors) == set(expected_parameters(config)) and got.dtype() == getattr(torch, dtype)
    assert got.embedding == up.embedding and got.info == {"steps": 3}


def test_equal_uploads_are_equal_bytes_and_the_task_round_trips():
    assert upload().to_bytes() == upload().to_bytes()
    task = Task("a", b"\x00\x01basis")
    assert Task.from_bytes(task.to_bytes()) == task


def _with(up: Upload, **changes) -> bytes:
    for k, v in changes.items():
        setattr(up, k, v)
    return up.to_bytes()


def _tensor(up: Upload, fn) -> bytes:
    name = sorted(up.tensors)[0]
    up.tensors[name] = fn(up.tensors[name])
    return up.to_bytes()


BAD = {
    "not safetensors": (lambda: b"\x00" * 40, "not valid safetensors|header"),
    "truncated": (lambda: upload().to_bytes()[:-100], "not valid safetensors"),
    "other sender": (lambda: upload(device="b").to_bytes(), "claims device 'b'"),
    "unknown architecture": (lambda: _with(upload(), config={**upload().config, "model_type": "t5"}), "not a causal LM built into transformers"),
    "other vocabulary": (lambda: _with(upload(), config={**upload().config, "vocab_size": 512}), "vocab 512"),
    "wrong shape": (lambda: _tensor(upload(), lambda t: t[:-1]), "has shape"),
    "wrong dtype": (lambda: _tensor(upload(), lambda t: t.float()), "float16 or bfloat16"),
    "non-finite": (lambda: _tensor(upload(), lambda t: t.clone().fill_(float("nan"))), "NaN or inf"),
    "missing tensor": (lambda: _with(upload(), tensors=dict(list(upload().tensors.items())[1:])), "names differ"),
    "extra tensor": (lambda: _with(upload(), tensors={**upload().tensors, "spy": torch.zeros(2, dtype=torch.float16)}),
                     "names differ"),
    "short embedding": (lambda: _with(upload(), embedding=b"\x01" * 3), "data embedding is 3 bytes"),
}


@pytest.mark.parametrize("defect", sorted(BAD))
def test_a_bad_upload_is_rejected_with_one_reason(defect):
    make, reason = BAD[defect]
    with pytest.raises(UploadError, match=reason):
        receive(make())


def test_an_oversize_upload_is_refused_unread():
    blob = upload().to_bytes()
    with pytest.raises(UploadError, match="over the"):
        receive(blob, max_bytes=len(blob) - 1)


def test_a_device_outside_the_federation_is_refused():
    blob = upload(device="z").to_bytes()
    with pytest.raises(UploadError, match="not in this federation"):
        receive(blob, sender="z")


def test_the_architecture_description_is_the_models_config():
    up = upload("bloom")
    assert json.loads(json.dumps(up.config))["n_layer"] == 1


# ---- a device's own tokenizer travels with its model ----------------------------------------------------

def own_tokenizer(dirs):
    from deepfusion.data.tokenizer import load_tokenizer

    return load_tokenizer(dirs["unigram"])


def test_an_upload_with_its_own_tokenizer_round_trips_and_the_server_reads_it(byo_tokenizers):
    from deepfusion.wire.upload import read_tokenizer, wire_tokenizer

    tok = own_tokenizer(byo_tokenizers)
    torch.manual_seed(0)
    model = build_device_model("llama", "tiny", len(tok) + 4)  # padded past its tokenizer, as models are
    dc = DeviceConfig(id="a", source="medquad:cdc", family="llama", size="tiny")
    blob = make_upload(dc, model, bytes(range(EMB)), {}, tok).to_bytes()
    got, config = receive(blob)  # the federation's vocabulary (V) is not the device's: accepted with its own
    back = read_tokenizer(got.tokenizer)
    text = "Stratification of 1,452 naïve cases"
    assert back(text)["input_ids"] == tok(text)["input_ids"] and back.eos_token == tok.eos_token
    assert got.arch.startswith("llama/tiny+tok:") and len(got.tokenizer) == len(wire_tokenizer(tok))
    assert len(blob) > len(make_upload(dc, model, bytes(range(EMB)), {}).to_bytes())  # counted in its bytes
    assert read_tokenizer(bytes(got.tokenizer)) is back  # parsed once per distinct tokenizer, however often read


def test_a_bad_own_tokenizer_is_one_reason(byo_tokenizers):
    tok = own_tokenizer(byo_tokenizers)
    torch.manual_seed(0)
    dc = DeviceConfig(id="a", source="medquad:cdc", family="llama", size="tiny")
    small = make_upload(dc, build_device_model("llama", "tiny", len(tok) - 1), bytes(range(EMB)), {}, tok)
    with pytest.raises(UploadError, match="smaller than its own tokenizer"):
        receive(small.to_bytes())
    broken = make_upload(dc, build_device_model("llama", "tiny", len(tok)), bytes(range(EMB)), {}, tok)
    broken.tokenizer = b"not a tokenizer"
    for _ in range(2):  # a failure is not cached: it fails every time
        with pytest.raises(UploadError, match="its tokenizer does not load"):
            receive(broken.to_bytes())
