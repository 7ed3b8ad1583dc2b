"""checkpoints.py: content keys, bit-identical builds, the cache (reuse, corruption, kills, concurrent
builders), users' directories, and `deepfusion pretrain`. Tiny presets on the real public text."""

import dataclasses
import json
import logging
import multiprocessing as mp
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from deepfusion import checkpoints
from deepfusion.checkpoints import (checkpoint_key, fetch_or_build, load_public, mean_loss, public_checkpoint,
                                    read_record)
from deepfusion.pipeline_config import PretrainConfig
from deepfusion.errors import ConfigError
from deepfusion.models import DEVICE_PRESETS, build_dense_base, dense_base_config, global_moe_config

PRE = PretrainConfig(steps=4, batch_size=4, lr=3e-3, seed=0)
GOLDEN_SEED = 200792353584609779  # what public-checkpoint-v1 under transformers 5.24.0 drew for the preset below


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """The smoke federation's public proxy and validation blocks (real MedQuAD and TAT-QA text, vocab 512)."""
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA}")
    from deepfusion.config import default_config_path, load_config
    from deepfusion.federation import prepare_data

    cfg = load_config(default_config_path("smoke"))
    cfg.data.dir = str(SHARED_DATA)
    data = prepare_data(cfg, private=False)
    return data.proxy, torch.cat([b for _, b in data.validation.values()]), len(data.tokenizer)


def gpt2(vocab):  # GPT-2 has LayerNorm, whose CPU backward depends on the thread count
    return DEVICE_PRESETS["gpt2"]["tiny"](vocab)


def weights(path):
    return (path / "model.safetensors").read_bytes()


@pytest.mark.parametrize("make", [gpt2, lambda v: DEVICE_PRESETS["bloom"]["tiny"](v),
                                  lambda v: dense_base_config(global_moe_config("deepseek_moe", "tiny", v))],
                         ids=["gpt2", "bloom", "deepseek-dense-base"])
def test_same_inputs_give_the_same_key_and_bit_identical_files(tmp_path, public, make):
    blocks, _, vocab = public
    config = make(vocab)
    assert checkpoint_key(config, blocks, PRE) == checkpoint_key(make(vocab), blocks.clone(), PRE)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the callers' thread counts differ: the build must not
        a, built_a = fetch_or_build(config, blocks, PRE, tmp_path / "a")
        torch.set_num_threads(2)
        b, built_b = fetch_or_build(make(vocab), blocks, PRE, tmp_path / "b")
        assert torch.get_num_threads() == 2  # restored after the build
    finally:
        torch.set_num_threads(threads)
    assert built_a and built_b and a.name == b.name
    assert weights(a) == weights(b)
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()


def test_different_data_settings_or_model_give_different_keys(public):
    blocks, _, vocab = public
    key = checkpoint_key(gpt2(vocab), blocks, PRE)
    changed = blocks.clone()
    changed[0, 0] = (changed[0, 0] + 1) % vocab
    others = [
        checkpoint_key(gpt2(vocab), changed, PRE),  # one token differs
        checkpoint_key(gpt2(vocab), blocks.reshape(-1, blocks.shape[1] * 2), PRE),  # same bytes, other shape
        checkpoint_key(gpt2(vocab), blocks.to(torch.int32), PRE),
        checkpoint_key(gpt2(vocab + 1), blocks, PRE),
        checkpoint_key(DEVICE_PRESETS["llama"]["tiny"](vocab), blocks, PRE),
        checkpoint_key(gpt2(vocab), blocks, PRE, backend="cuda"),
        *(checkpoint_key(gpt2(vocab), blocks, dataclasses.replace(PRE, **change))
          for change in ({"steps": 5}, {"batch_size": 8}, {"lr": 1e-3}, {"seed": 1})),
    ]
    assert len({key, *others}) == len(others) + 1
    named = gpt2(vocab)
    named._name_or_path = "/somewhere/else"  # where a config was read from does not change the weights
    assert checkpoint_key(named, blocks, PRE) == key


def test_a_library_upgrade_changes_the_key_but_not_the_draw(tmp_path, monkeypatch):
    """transformers 5.24.0 -> 5.25.0 used to redraw every checkpoint (the seed was the key, versions in it) and
    moved DeepFusion's medical log-ppl by 0.17 (issue 10). Now the cache entry is rebuilt under the new key, from
    the same seed, so the weights change only by the library's own numerics."""
    blocks = torch.arange(64).remainder(50).view(4, 16)
    before = checkpoint_key(gpt2(64), blocks, PRE), checkpoint_key(gpt2(64), blocks, PRE, basis=checkpoints.SEED_BASIS)
    seed = checkpoints.build_seed(gpt2(64), blocks, PRE)
    monkeypatch.setattr(checkpoints.transformers, "__version__", "9.9.9")
    monkeypatch.setattr(checkpoints.torch, "__version__", "9.9.9+cpu")
    assert checkpoint_key(gpt2(64), blocks, PRE) != before[0]  # the entry is rebuilt ...
    assert checkpoints.build_seed(gpt2(64), blocks, PRE) == seed  # ... with the same draw
    assert checkpoint_key(gpt2(64), blocks, PRE, basis=checkpoints.SEED_BASIS) == before[1]
    assert checkpoints.build_seed(gpt2(64), blocks, dataclasses.replace(PRE, seed=1)) != seed  # [pretrain] seed
    assert checkpoints.build_seed(gpt2(65), blocks, PRE) != seed  # and what the checkpoint is still count


def test_the_build_seed_is_the_one_the_committed_tables_were_drawn_with():
    """SEED_BASIS is the format and versions the committed tables were made under (public-checkpoint-v1,
    torch 2.13.0+cpu, transformers 5.24.0): the draw of this preset is the one those versions' key gave. A
    change of the seed rule fails here, since it would redraw every table's checkpoints."""
    blocks = torch.arange(64).remainder(50).view(4, 16)
    assert checkpoints.SEED_BASIS == {"format": "public-checkpoint-v1", "torch": "2.13.0+cpu",
                                      "transformers": "5.24.0"}
    assert checkpoints.build_seed(gpt2(64), blocks, PRE) == GOLDEN_SEED


def test_second_call_reuses_the_cache_without_training(tmp_path, public, monkeypatch):
    blocks, _, vocab = public
    path, built = fetch_or_build(gpt2(vocab), blocks, PRE, tmp_path, name="gpt2/tiny")
    record = read_record(path)
    assert built and record["what"] == "gpt2/tiny" and len(record["curve"]) == PRE.steps
    assert record["key"] == path.name and record["seconds"] > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a cached checkpoint was trained again")

    monkeypatch.setattr(checkpoints, "pretrain", no_training)
    assert fetch_or_build(gpt2(vocab), blocks, PRE, tmp_path) == (path, False)
    assert public_checkpoint(gpt2(vocab), blocks, PRE, tmp_path) == path


def test_default_cache_follows_xdg_cache_home(tmp_path, public, monkeypatch):
    blocks, _, vocab = public
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = public_checkpoint(gpt2(vocab), blocks, dataclasses.replace(PRE, steps=1))
    assert path.parent == tmp_path / "deepfusion" / "checkpoints"


@pytest.mark.parametrize("damage", ["garble", "truncate", "delete-weights", "delete-record"])
def test_a_broken_cache_entry_is_reported_once_and_rebuilt(tmp_path, public, caplog, damage):
    blocks, _, vocab = public
    path, _ = fetch_or_build(gpt2(vocab), blocks, PRE, tmp_path)
    good = weights(path)
    target = path / ("record.json" if damage == "delete-record" else "model.safetensors")
    if damage == "garble":
        raw = bytearray(good)
        raw[len(raw) // 2] ^= 0xFF  # one byte inside a tensor: the header still parses
        target.write_bytes(bytes(raw))
    elif damage == "truncate":
        target.write_bytes(good[: len(good) // 2])
    else:
        target.unlink()
    with caplog.at_level(logging.WARNING, logger="deepfusion"):
        again, built = fetch_or_build(gpt2(vocab), blocks, PRE, tmp_path)
    broken = [r for r in caplog.records if "broken" in r.getMessage()]
    assert built and again == path and len(broken) == 1 and str(path) in broken[0].getMessage()
    assert weights(path) == good


def test_a_killed_build_leaves_no_entry_and_the_next_call_builds(tmp_path, public, monkeypatch):
    blocks, _, vocab = public

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while writing

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_or_build(gpt2(vocab), blocks, PRE, tmp_path)
    monkeypatch.undo()
    key = checkpoint_key(gpt2(vocab), blocks, PRE)
    assert not (tmp_path / key).exists() and not list(tmp_path.glob(f".{key}-*"))
    (tmp_path / f".{key}-killed").mkdir()  # what a SIGKILLed builder leaves: its temp dir
    (tmp_path / f".{key}-killed" / "model.safetensors").write_bytes(b"half")
    assert fetch_or_build(gpt2(vocab), blocks, PRE, tmp_path)[1]
    assert not list(tmp_path.glob(f".{key}-*"))


def _build_in_child(cache, blocks, vocab, barrier, results):
    barrier.wait()  # both ask at the same moment
    path, built = fetch_or_build(gpt2(vocab), blocks, dataclasses.replace(PRE, steps=30), cache)
    results.put((str(path), built))


@pytest.mark.slow  # two spawned interpreters import torch: ~45 s on the 2-core CPU
def test_two_concurrent_builders_end_with_one_build(tmp_path, public):
    blocks, _, vocab = public
    ctx = mp.get_context("spawn")  # fork after torch's threads started is unsafe
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(tmp_path, blocks, vocab, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[0][0] == got[1][0]
    assert sorted(built for _, built in got) == [False, True]
    assert checkpoints.problem(tmp_path / got[0][0].rsplit("/", 1)[1], got[0][0].rsplit("/", 1)[1]) is None


def test_pretraining_lowers_the_loss_on_held_out_public_text(tmp_path, public):
    blocks, validation, vocab = public
    pre = dataclasses.replace(PRE, steps=40, batch_size=8)
    path = public_checkpoint(gpt2(vocab), blocks, pre, tmp_path)
    torch.manual_seed(read_record(path)["seed"])  # the pretrained model's own starting weights
    fresh = GPT2LMHeadModel(gpt2(vocab))
    trained = load_public(path, gpt2(vocab))
    assert read_record(path)["final_loss"] < read_record(path)["curve"][0]
    assert mean_loss(trained, validation) < mean_loss(fresh, validation) - 0.5


# ---- users' directories ---------------------------------------------------------------------------

@pytest.mark.parametrize("case, needles", [
    ("wrong-vocab", ["vocab 600 != federation vocab 512", "data.tokenizer"]),
    ("not-a-model-dir", ["no config.json"]),
    ("missing-dir", ["no config.json"]),
    ("wrong-family", ["model type 'llama' != expected 'gpt2'"]),
    ("wrong-size", ["shape", "configured size"]),
    ("garbled-weights", ["cannot load its weights"]),
])
def test_a_wrong_local_directory_is_one_clear_config_error(tmp_path, case, needles):
    where, path = "[[devices]] #3 checkpoint", tmp_path / "model"
    if case == "wrong-vocab":
        GPT2LMHeadModel(gpt2(600)).save_pretrained(path)
    elif case == "not-a-model-dir":
        path.mkdir()
        (path / "notes.txt").write_text("not a model")
    elif case == "wrong-family":
        AutoModelForCausalLM.from_config(DEVICE_PRESETS["llama"]["tiny"](512)).save_pretrained(path)
    elif case == "wrong-size":
        GPT2LMHeadModel(DEVICE_PRESETS["gpt2"]["small"](512)).save_pretrained(path)
    elif case == "garbled-weights":
        GPT2LMHeadModel(gpt2(512)).save_pretrained(path)
        (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ConfigError) as e:
        load_public(path, gpt2(512), where)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"config error: {where} = {str(path)!r}: ")
    for needle in needles:
        assert needle in msg


def test_a_good_local_directory_loads_and_the_dense_base_is_checked_by_shape(tmp_path):
    GPT2LMHeadModel(gpt2(512)).save_pretrained(tmp_path / "gpt2")
    assert isinstance(load_public(tmp_path / "gpt2", gpt2(512), "[devices.0] checkpoint"), GPT2LMHeadModel)
    build_dense_base(global_moe_config("qwen_moe", "tiny", 512)).save_pretrained(tmp_path / "base")
    load_public(tmp_path / "base", dense_base_config(global_moe_config("qwen_moe", "tiny", 512)))
    with pytest.raises(ConfigError, match=r"\[server\] dense_base = .*shape"):  # qwen2 too, but not the MoE's
        load_public(tmp_path / "base", dense_base_config(global_moe_config("qwen_moe", "small", 512)),
                    "[server] dense_base")


# ---- deepfusion pretrain --------------------------------------------------------------------------

def smoke_copy(tmp_path, device0=""):
    """configs/smoke.toml with 3 pretraining steps (and lines added to its first device)."""
    from deepfusion.config import default_config_path

    text = re.sub(r"\[pretrain\]\n(?:[^\[].*\n|\n)*", "", default_config_path("smoke").read_text())
    text = text.replace("[[devices]]\n", f"[pretrain]\nsteps = 3\nbatch_size = 2\n\n[[devices]]\n{device0}", 1)
    path = tmp_path / "smoke.toml"
    path.write_text(text)
    return path


def test_cli_pretrain_prints_every_checkpoint_as_json_and_reuses_them(tmp_path, data_dir, capsys):
    from deepfusion.cli import main
    from deepfusion.config import load_config

    config = smoke_copy(tmp_path)
    cfg = load_config(config)
    assert cfg.pretrain.steps == 3
    argv = ["pretrain", "--config", config, "--data-dir", data_dir, "--cache", tmp_path / "cache"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert set(first) == {f"{d.family}/{d.size}" for d in cfg.devices} | {"dense_base(qwen_moe/tiny)"}
    for entry in first.values():
        assert not entry["cached"] and entry["params"] > 0 and entry["final_loss"] > 0 and entry["seconds"] >= 0
        assert (tmp_path / "cache").resolve() in Path(entry["path"]).resolve().parents
        assert read_record(Path(entry["path"]))["pretrain"]["steps"] == 3
        assert set(entry["val_loss"]) == {"medical", "finance"}
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert all(e["cached"] for e in second.values())
    assert {k: e["path"] for k, e in second.items()} == {k: e["path"] for k, e in first.items()}


def test_cli_pretrain_names_a_wrong_device_checkpoint_in_one_line(tmp_path, data_dir, capsys):
    from deepfusion.cli import main

    AutoModelForCausalLM.from_config(DEVICE_PRESETS["llama"]["tiny"](600)).save_pretrained(tmp_path / "llama")
    config = smoke_copy(tmp_path, device0=f'checkpoint = "{tmp_path / "llama"}"\n')
    capsys.readouterr()  # the save's progress bar: not the command's output
    assert main(["pretrain", "--config", config, "--data-dir", data_dir, "--cache", tmp_path / "cache"]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]  # stderr also carries the log lines
    assert out == "" and "Traceback" not in err and sum(x.startswith("deepfusion:") for x in lines) == 1
    assert f"[[devices]] #1 (id 'cdc-a') checkpoint = '{tmp_path / 'llama'}'" in lines[-1]
    assert "the device's model has vocab 600" in lines[-1]  # family/size are ignored: its config.json decides


def test_cli_pretrain_builds_a_preset_with_its_own_tokenizer_as_the_run_does(tmp_path, data_dir, capsys, monkeypatch,
                                                                             byo_tokenizers):
    """The preset's checkpoint is made from the public text cut by its tokenizer, in its vocabulary; the run's
    public_model then finds it in the cache instead of training it again."""
    from deepfusion import checkpoints, ondevice
    from deepfusion.cli import main
    from deepfusion.config import load_config
    from deepfusion.federation import prepare_data

    config = smoke_copy(tmp_path, device0=f'tokenizer = "{byo_tokenizers["unigram"]}"\n')
    assert main(["pretrain", "--config", config, "--data-dir", data_dir, "--cache", tmp_path / "cache"]) == 0
    built = json.loads(capsys.readouterr().out)
    cfg = load_config(config)
    dc = cfg.devices[0]
    own = [k for k in built if "tokenizer" in k]
    assert own == [f"{dc.family}/{dc.size} (tokenizer {byo_tokenizers['unigram']})"]
    assert set(built[own[0]]["val_loss"]) == {"medical", "finance"} and not built[own[0]]["cached"]
    assert json.loads((Path(built[own[0]]["path"]) / "config.json").read_text())["vocab_size"] == 800

    def no_training(*a, **k):
        raise AssertionError("the run trained a checkpoint pretrain had built")

    monkeypatch.setattr(checkpoints, "pretrain", no_training)
    monkeypatch.setattr(checkpoints, "default_cache", lambda: tmp_path / "cache")
    data = prepare_data(cfg, data_dir, private=False)
    model = ondevice.public_model(cfg, dc, data.proxy, data.tokenizer, torch.device("cpu"))
    assert model.get_input_embeddings().num_embeddings == 800


def test_cli_pretrain_scores_a_given_checkpoint_in_its_own_tokenizer(tmp_path, data_dir, capsys, byo_tokenizers):
    import shutil

    from deepfusion.cli import main
    from deepfusion.config import load_config
    from deepfusion.federation import prepare_data, public_blocks
    from deepfusion.data import load_tokenizer

    ckpt = tmp_path / "llama"
    AutoModelForCausalLM.from_config(DEVICE_PRESETS["llama"]["tiny"](800)).save_pretrained(ckpt)
    for f in byo_tokenizers["unigram"].iterdir():
        shutil.copy(f, ckpt / f.name)
    config = smoke_copy(tmp_path, device0=f'checkpoint = "{ckpt}"\n')
    capsys.readouterr()
    assert main(["pretrain", "--config", config, "--data-dir", data_dir, "--cache", tmp_path / "cache"]) == 0
    entry = json.loads(capsys.readouterr().out)[f"checkpoint:{ckpt}"]
    data = prepare_data(load_config(config), data_dir, private=False)
    model, own = AutoModelForCausalLM.from_pretrained(ckpt), load_tokenizer(ckpt)
    _, blocks = data.validation["medical"]
    assert entry["val_loss"]["medical"] == round(mean_loss(model, public_blocks(data.tokenizer, own, blocks)), 4)
