"""FedMKT as a one-shot baseline: MinCE picks the right teacher per block, and a smoke run reports the packets'
bytes, the paper's figures and a loadable model."""

import json

import pytest
import torch

from deepfusion.baselines.fedmkt import knowledge_packet, min_ce, select
from deepfusion.federation import prepare_data
from deepfusion.server import truth_log_likelihood
from deepfusion.wire.knowledge import KnowledgePacket
from deepfusion.wire.upload import receive_upload


def test_min_ce_picks_per_block_the_device_that_explains_its_tokens_best():
    V = 10
    proxy = torch.tensor([[1, 2, 3], [4, 5, 6]])  # 2 blocks, next tokens (2, 3) and (5, 6)
    # device 0 is right on block 0, device 1 on block 1; a miss leaves its tail over the V - k other ids
    ids = torch.tensor([[[[2, 0], [3, 0]], [[0, 1], [0, 1]]],
                        [[[0, 1], [0, 1]], [[5, 0], [6, 0]]]])  # (M=2, P=2, T-1=2, k=2)
    probs = torch.tensor([[[[0.6, 0.2], [0.6, 0.2]], [[0.5, 0.3], [0.5, 0.3]]],
                          [[[0.5, 0.3], [0.5, 0.3]], [[0.9, 0.05], [0.9, 0.05]]]])
    tail = 1 - probs.sum(-1)
    assert min_ce(ids, probs, tail, proxy, V).tolist() == [0, 1]
    # CE by hand, (device, block): a hit costs -log p, a miss -log(tail / (V - k)) = -log(0.2 / 8)
    ce = -truth_log_likelihood(ids, probs, tail, proxy, V)
    want = -torch.tensor([[0.6, 0.2 / 8], [0.2 / 8, 0.9]]).log()
    assert torch.allclose(ce, want)
    probs[1, 1, :, 0] = 0.01  # device 1 now gives block 1's tokens 0.01 < device 0's 0.2 / 8 = 0.025
    tail = 1 - probs.sum(-1)
    assert min_ce(ids, probs, tail, proxy, V).tolist() == [0, 0]
    chosen = select(ids, probs, tail, torch.tensor([0, 1]))
    assert torch.equal(chosen.ids[0], ids[0, 0]) and torch.equal(chosen.ids[1], ids[1, 1])
    assert torch.equal(chosen.tail[1], tail[1, 1]) and chosen.block_domain.tolist() == [0, 1]


def test_a_tie_goes_to_the_first_device():
    proxy = torch.tensor([[0, 1]])
    ids = torch.tensor([[[[1]]], [[[1]]]])
    probs = torch.full((2, 1, 1, 1), 0.5)
    assert min_ce(ids, probs, 1 - probs.sum(-1), proxy, 4).tolist() == [0]


def test_min_ce_scores_only_aligned_positions_and_masked_teacher_positions_teach_the_truth():
    from deepfusion.baselines.fedmkt import truth_where_unaligned

    V = 10
    proxy = torch.tensor([[1, 2, 3], [4, 5, 6]])  # next tokens (2, 3) and (5, 6)
    ids = torch.tensor([[[[2, 0], [9, 0]], [[5, 0], [6, 0]]],
                        [[[2, 0], [3, 0]], [[0, 1], [0, 1]]]])  # (M=2, P=2, T-1=2, k=2)
    probs = torch.tensor([[[[0.9, 0.05], [0.9, 0.05]], [[0.9, 0.05], [0.9, 0.05]]],
                          [[[0.5, 0.3], [0.5, 0.3]], [[0.5, 0.3], [0.5, 0.3]]]])
    tail = 1 - probs.sum(-1)
    # device 0 misses block 0's second token, so on every position device 1 wins block 0 ...
    assert min_ce(ids, probs, tail, proxy, V).tolist() == [1, 0]
    # ... but device 0 does not align that position: over the one it aligns it is the better teacher
    aligned = torch.tensor([[[True, False], [True, True]], [[True, True], [False, False]]])
    teacher = min_ce(ids, probs, tail, proxy, V, aligned)
    assert teacher.tolist() == [0, 0]
    chosen = truth_where_unaligned(select(ids, probs, tail, teacher), aligned, proxy, V)
    assert chosen.ids[0, 1].tolist() == [3, 4] and chosen.probs[0, 1].tolist() == [1.0, 0.0]
    assert chosen.tail[0, 1] == 0  # the one-hot truth where the teacher does not align
    assert torch.equal(chosen.ids[0, 0], ids[0, 0, 0]) and torch.equal(chosen.ids[1], ids[0, 1])
    # a block no device aligns: the first device, teaching the truth everywhere
    none = torch.zeros_like(aligned)
    teacher = min_ce(ids, probs, tail, proxy, V, none)
    chosen = truth_where_unaligned(select(ids, probs, tail, teacher), none, proxy, V)
    assert teacher.tolist() == [0, 0] and torch.equal(chosen.ids[..., 0], proxy[:, 1:])


@pytest.mark.slow
def test_fedmkt_runs_with_devices_that_bring_their_own_tokenizers(tmp_path, byo_tokenizers):
    """Three devices with three different tokenizers and one with the federation's: each answers in the global
    vocabulary where it aligns, MinCE picks among all four, and the run completes."""
    from deepfusion.config import default_config_path, load_config
    from deepfusion.engines.local import run
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip("real corpora not found")
    cfg = load_config(default_config_path("smoke"), method="fedmkt")
    cfg.data.dir, cfg.device = str(SHARED_DATA), "cpu"
    own = {"cdc-a": "bpe", "cdc-b": "unigram", "fin-a": "wordpiece"}  # fin-b: the federation's
    for d in cfg.devices:
        d.tokenizer = str(byo_tokenizers[own[d.id]]) if d.id in own else None
    summary = run(cfg.validate(), tmp_path / "out", progress=False)
    per_device, P, T = summary["comm_bytes"]["per_device"], cfg.data.proxy_blocks, cfg.data.seq_len
    assert not any("rejected" in v for v in per_device.values()) and sum(summary["fedmkt"]["teachers"].values()) == P
    for d in own:  # the same packet plus its mask, one byte a position, and the mask's header entries
        assert 0 < per_device[d]["up"] - per_device["fin-b"]["up"] - P * (T - 1) < 160, d
    assert all(v == v and v > 0 for v in summary["ppl"].values())


@pytest.fixture(scope="module")
def fedmkt_run(smoke_deepfusion, tmp_path_factory):
    """fedmkt on the smoke federation, its Phase 0 replayed from the suite's shared deepfusion run (one recording
    replays for both: the uploads are the very ones deepfusion distilled)."""
    from deepfusion.config import default_config_path, load_config
    from deepfusion.engines.local import run
    from tests.conftest import SHARED_DATA

    cfg = load_config(default_config_path("smoke"), method="fedmkt")
    cfg.data.dir = str(SHARED_DATA)
    root = tmp_path_factory.mktemp("fedmkt")
    return cfg, smoke_deepfusion, root, run(cfg, root / "out", progress=False, replay=smoke_deepfusion.recordings)


@pytest.mark.slow
def test_fedmkt_smoke_reports_packet_bytes_and_the_papers_figures(fedmkt_run):
    cfg, smoke, root, summary = fedmkt_run
    out = root / "out"
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["method"] == "fedmkt" and summary["rounds"] == 1 and "comm_note" in summary
    for key in ("log_ppl", "accuracy", "qa_log_ppl", "qa_accuracy", "ppl"):
        assert set(summary[key]) == {"medical", "finance"}, key
    comm, P, T = summary["comm_bytes"], cfg.data.proxy_blocks, cfg.data.seq_len
    per_device = comm["per_device"]
    assert set(per_device) == {d.id for d in cfg.devices} and not any("rejected" in v for v in per_device.values())
    # up: each device's packet, rebuilt here from its recorded Phase 0 upload, byte for byte its size
    data = prepare_data(cfg, private=False)
    embedding_bytes = json.loads((out / "checkpoint" / "phase0.json").read_text())["embedding_bytes"]
    for d, v in per_device.items():
        blob = (out / "checkpoint" / "uploads" / f"{d}.bin").read_bytes()
        upload, config = receive_upload(blob, d, devices=set(per_device), vocab_size=len(data.tokenizer),
                                        embedding_bytes=embedding_bytes)
        packet = knowledge_packet(cfg, data, d, upload, config, torch.device("cpu"))
        assert v["up"] == len(packet) and v["model_upload"] == len(blob) != len(packet)
        assert KnowledgePacket.from_bytes(packet).n_positions == P * (T - 1)
    k = cfg.knowledge.topk  # the packet's arrays: uint16 ids (vocab 512), fp16 probs, fp16 tail
    assert all(0 < v["up"] - P * (T - 1) * (2 * k + 2 * k + 2) < 1024 for v in per_device.values())  # + header
    assert comm["up"] == sum(v["up"] for v in per_device.values())
    assert comm["down"] == sum(v["down"] for v in per_device.values()) > 0
    assert summary["devices"]["cdc-a"]["upload_bytes"] == per_device["cdc-a"]["up"]
    # MinCE chose a teacher for every proxy block; the server trained every parameter for deepfusion's budget
    assert sum(summary["fedmkt"]["teachers"].values()) == P
    assert summary["fedmkt"]["steps_budget"] == 2 * cfg.distill.steps + cfg.tune.steps
    assert summary["tuning"]["trainable_params"] == summary["global_params"]
    phases = [json.loads(line)["phase"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["0"] * 4 + ["FedMKT"]


@pytest.mark.slow
def test_the_exported_fedmkt_model_loads_and_scores_as_reported(fedmkt_run):
    from transformers import AutoModelForCausalLM

    from deepfusion.evaluation import evaluate

    cfg, _, root, summary = fedmkt_run
    out = root / "out"
    model = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.norm_topk_prob
    data = prepare_data(cfg, private=False)
    assert evaluate(model, data.test_sets, torch.device("cpu"))["ppl"] == pytest.approx(summary["ppl"], rel=1e-3)


@pytest.mark.slow
def test_a_replayed_phase_0_gives_the_same_fedmkt_run(fedmkt_run):
    """fedmkt replays deepfusion's recording: the uploads are the live deepfusion run's, byte for byte, counted
    alike (model_upload, down); and a second replay is the same fedmkt run."""
    from deepfusion.engines.local import run

    cfg, smoke, root, summary = fedmkt_run
    live = smoke.summary()["comm_bytes"]["per_device"]
    for d, v in summary["comm_bytes"]["per_device"].items():
        blob = (root / "out" / "checkpoint" / "uploads" / f"{d}.bin").read_bytes()
        assert blob == (smoke.out / "checkpoint" / "uploads" / f"{d}.bin").read_bytes(), d
        assert v["model_upload"] == live[d]["up"] and v["down"] == live[d]["down"], d
    again = run(cfg, root / "replayed", progress=False, replay=smoke.recordings)
    for key in ("comm_bytes", "fedmkt", "log_ppl", "qa_log_ppl", "validation_ppl"):
        assert again[key] == summary[key], key
