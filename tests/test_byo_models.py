"""Bring your own checkpoints: devices of any causal-LM family and the server's MoE + dense base, each from a
local save_pretrained directory (tests/byo_models.py), through the Auto classes and the project's own paths."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deepfusion import upcycling
from deepfusion.checkpoints import dense_base_model, device_model
from deepfusion.config import DeviceConfig, ServerConfig, default_config_path, load_config
from deepfusion.crosskd import final_norm
from deepfusion.errors import ConfigError
from deepfusion.models import export_model, server_moe_config
from deepfusion.ondevice import hold_out, make_upload, train_until_converged
from deepfusion.pipeline_config import PretrainConfig
from deepfusion.wire.upload import receive_upload
from tests import byo_models as byo

WHERE = "[[devices]] #1 (id 'd')"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("byo-models")


@pytest.fixture(scope="module")
def tok(root):
    return byo.tokenizer(root)


def load_device(path, vocab):
    return device_model("ignored", "ignored", vocab, torch.zeros(1, 2, dtype=torch.long), PretrainConfig(),
                        checkpoint=str(path), where=WHERE)


def one_line_error(call, *needles):
    with pytest.raises(ConfigError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config error: "), msg
    for needle in needles:
        assert needle in msg, msg


# ---- devices --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(byo.DEVICE_FAMILIES))
def test_a_device_of_any_family_loads_trains_and_uploads(root, tok, family):
    V = byo.vocab_of(tok)
    model = load_device(byo.device_dir(root, family, tok), V)
    assert model.config.model_type == family
    # the generic accessors the server relies on: hidden states, the head, the norm before it
    x = torch.randint(V, (2, 8))
    seen = {}
    hook = final_norm(model).register_forward_hook(lambda m, a, out: seen.setdefault("norm", out))
    out = model.eval()(input_ids=x, output_hidden_states=True)
    hook.remove()
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(seen["norm"], out.hidden_states[-1])
    torch.testing.assert_close(model.get_output_embeddings()(out.hidden_states[-1]), out.logits)
    # Phase 0's device path: family/size are ignored with a checkpoint; a train step; an upload the server takes
    dc = DeviceConfig("d", "medquad:cdc", family="whatever", size="any", checkpoint=str(root / family),
                      max_steps=1, eval_every=1, batch_size=2)
    gen = torch.Generator().manual_seed(0)
    train, val = hold_out(torch.randint(V, (6, 8), generator=gen), 0.2, gen)
    report = train_until_converged(model, train, val, dc, gen, torch.device("cpu"))  # keeps the best weights
    assert report["steps"] == 1 and torch.isfinite(torch.tensor(report["curve"][-1]["train_loss"]))
    blob = make_upload(dc, model, b"\0" * 4, {}).to_bytes()
    upload, config = receive_upload(blob, "d", devices={"d"}, vocab_size=V, embedding_bytes=4)
    assert upload.arch == f"{family}:{family}" and config.model_type == family


def test_a_device_with_another_vocabulary_and_no_tokenizer_of_its_own_is_one_clear_error(root, tok):
    path = byo.device_dir(root / "other-vocab", "llama", tok, vocab=byo.vocab_of(tok) + 20)
    one_line_error(lambda: load_device(path, byo.vocab_of(tok)), WHERE, f"vocab {byo.vocab_of(tok) + 20}",
                   f"tokenizer {byo.vocab_of(tok)}", "save the device's own tokenizer")


# ---- the server: every supported MoE class, upcycled from its dense base ------------------------------

@pytest.mark.parametrize("kind", sorted(byo.MOE_KINDS))
def test_each_moe_class_upcycles_from_its_dense_base_and_exports(root, tok, tmp_path, kind):
    V = byo.vocab_of(tok)
    moe_dir, dense_dir = byo.moe_dirs(root, kind, tok)
    moe = server_moe_config(ServerConfig(pretrained=str(moe_dir)), V)
    base = dense_base_model(moe, torch.zeros(1, 2, dtype=torch.long), PretrainConfig(), given=str(dense_dir)).eval()
    K = upcycling.num_domains(moe)
    fused = upcycling.fuse(moe, [base] * K).eval()
    upcycling.random_router(fused, torch.Generator().manual_seed(0), std=1.0)
    x = torch.randint(V, (2, 12))
    with torch.no_grad():
        logits = fused(input_ids=x).logits
        if kind != "deepseek_v2":  # its top-k weights are the plain softmax: exact only with a sure router
            torch.testing.assert_close(logits, base(input_ids=x).logits, atol=1e-5, rtol=1e-4)
    export_model(fused, AutoTokenizer.from_pretrained(tok, local_files_only=True), tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True).eval()
    assert type(loaded).__name__ == type(fused).__name__ == upcycling.MOE_LAYOUTS[kind].cls
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, logits)


def test_a_dense_model_given_as_the_moe_is_one_clear_error(root, tok):
    path = byo.device_dir(root / "not-moe", "llama", tok)
    one_line_error(lambda: server_moe_config(ServerConfig(pretrained=str(path)), byo.vocab_of(tok)),
                   "LlamaForCausalLM", "'llama'", "Qwen2MoeForCausalLM (qwen2_moe)", "MixtralForCausalLM (mixtral)")


def test_a_dense_base_that_does_not_match_its_moe_names_the_field(root, tok):
    import transformers as tf

    V = byo.vocab_of(tok)
    moe_dir, _ = byo.moe_dirs(root, "qwen3_moe", tok)
    moe = server_moe_config(ServerConfig(pretrained=str(moe_dir)), V)
    shallow = tf.Qwen3Config(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16, intermediate_size=64)
    AutoModelForCausalLM.from_config(shallow).save_pretrained(root / "shallow")
    one_line_error(lambda: dense_base_model(moe, torch.zeros(1, 2, dtype=torch.long), PretrainConfig(),
                                            given=str(root / "shallow")),
                   "[server] dense_base", "num_hidden_layers = 1", "needs 2")


# ---- the whole run ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_federation_of_local_checkpoints_runs_end_to_end(root, tok, tmp_path, data_dir):
    from deepfusion.engines import local

    moe_dir, dense_dir = byo.moe_dirs(root, "qwen3_moe", tok)
    cfg = load_config(default_config_path("smoke"))
    cfg.data.dir, cfg.data.tokenizer, cfg.device = str(data_dir), str(tok), "cpu"
    cfg.server.pretrained, cfg.server.dense_base = str(moe_dir), str(dense_dir)
    families = {"cdc-a": "gpt2", "cdc-b": "qwen3", "fin-a": "olmo"}
    cfg.devices = [d for d in cfg.devices if d.id in families]
    for d in cfg.devices:
        d.checkpoint = str(byo.device_dir(root / d.id, families[d.id], tok))
    summary = local.run(cfg.validate(), tmp_path / "out", progress=False)
    assert summary["domains"] == 2
    assert {r["arch"] for r in summary["devices"].values()} == {f"{f}:{f}" for f in families.values()}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model", local_files_only=True)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["method"] == "deepfusion"


@pytest.mark.slow
def test_three_families_with_three_tokenizers_run_the_paper_pipeline(root, tok, tmp_path, data_dir, byo_tokenizers):
    """gpt2 + byte-level BPE, qwen3 + Unigram, olmo + WordPiece, none the global tokenizer: Phase II aligns each
    over character spans, Phase III mixes them where they speak, and the MoE exports."""
    from deepfusion.engines import local

    moe_dir, dense_dir = byo.moe_dirs(root, "qwen3_moe", tok)
    cfg = load_config(default_config_path("smoke"))
    cfg.data.dir, cfg.data.tokenizer, cfg.device = str(data_dir), str(tok), "cpu"
    cfg.server.pretrained, cfg.server.dense_base = str(moe_dir), str(dense_dir)
    own = {"cdc-a": ("gpt2", "bpe"), "cdc-b": ("qwen3", "unigram"), "fin-a": ("olmo", "wordpiece")}
    for d in cfg.devices:
        if d.id in own:
            family, kind = own[d.id]
            d.checkpoint = str(byo.device_dir(root / f"own-{d.id}", family, byo_tokenizers[kind]))
        else:  # a preset with its own tokenizer: its public checkpoint is pretrained on the public text cut its way
            d.tokenizer = str(byo_tokenizers["bpe"])
    summary = local.run(cfg.validate(), tmp_path / "out", progress=False)
    devices = summary["devices"]
    assert all(r["tokenizer"] == "own" and r["tokenizer_bytes"] > 0 for r in devices.values())
    assert len({r["arch"] for r in devices.values()}) == 4  # four models, three vocabularies: none averaged
    assert {r["arch"].split("+tok:")[0] for r in devices.values()} == {f"{f}:{f}" for f, _ in own.values()} | {
        "bloom/tiny"}
    curves = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    phase2 = [c for r in curves if r["phase"] == "II" for c in r["curve"]]
    assert phase2 and all(torch.isfinite(torch.tensor([c["kl"], c["fm"]])).all() for c in phase2)
    assert any(c["kl"] > 0 and c["fm"] > 0 for c in phase2)  # the aligned terms are there, not silently zero
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model", local_files_only=True)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert all(v == v and v > 0 for v in summary["ppl"].values())


@pytest.mark.slow
def test_three_families_with_three_tokenizers_run_the_multi_round_protocol(root, tok, tmp_path, data_dir,
                                                                           byo_tokenizers):
    """The same kind of federation in the protocol where no weights leave a device: each checkpoint starts from
    its own weights, answers in the global vocabulary at the global positions, and every packet is accepted."""
    from deepfusion.engines import local

    moe_dir, _ = byo.moe_dirs(root, "qwen3_moe", tok)
    cfg = load_config(default_config_path("smoke-multiround"))
    cfg.data.dir, cfg.data.tokenizer, cfg.device = str(data_dir), str(tok), "cpu"
    cfg.server.pretrained = str(moe_dir)
    own = {"cdc": ("gpt2", "bpe"), "nhlbi": ("qwen3", "unigram"), "finance": ("olmo", "wordpiece")}
    for d in cfg.devices:
        family, kind = own[d.id]
        d.checkpoint = str(byo.device_dir(root / f"mr-{d.id}", family, byo_tokenizers[kind]))
    summary = local.run(cfg.validate(), tmp_path / "out", progress=False)
    rounds = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == cfg.rounds
    assert all(sorted(r["accepted"]) == sorted(own) and not r["rejected"] for r in rounds)
    devices = summary["devices"]
    assert {d: r["arch"] for d, r in devices.items()} == {d: f"{f}:{f}" for d, (f, _) in own.items()}
    assert all(r["tokenizer"] == "own" and r["ppl_own_source"] > 1 for r in devices.values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model", local_files_only=True)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
