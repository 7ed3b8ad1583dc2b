import math
from pathlib import Path

import pytest
import torch

from deepfusion.pipeline_config import DistillConfig
from deepfusion.errors import ConfigError
from deepfusion.crosskd import distill_domain, teacher_kl
from deepfusion.data import load_medquad, pack_blocks, train_tokenizer
from deepfusion.models import build_dense_base, build_device_model, global_moe_config

V, T = 512, 32
CPU = torch.device("cpu")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # as conftest's data_dir


def small_cfg(**kw) -> DistillConfig:
    return DistillConfig(**{"steps": 40, "batch_size": 8, "lr": 3e-3, "stages": 2, "patches": 8, "dim": 32,
                            "heads": 2, **kw})


def student() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_dense_base(global_moe_config("qwen_moe", "tiny", V))


@pytest.fixture(scope="module")
def medquad(tmp_path_factory):
    """CDC's MedQuAD pages in 32-token blocks, and a GPT-2 teacher trained on them (a few seconds)."""
    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA}")
    docs = load_medquad(SHARED_DATA, "cdc")
    tok = train_tokenizer([d.text for d in docs], V, tmp_path_factory.mktemp("tok"))
    blocks = pack_blocks(tok, docs, T)
    public, held = blocks[:-16], blocks[-16:]
    torch.manual_seed(0)
    teacher = build_device_model("gpt2", "tiny", V)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = public[torch.randint(len(public), (16,), generator=gen)]
        teacher(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return public, held, teacher.eval()


def test_distillation_lowers_the_kl_to_a_trained_teacher_and_leaves_no_vaa_behind(medquad):
    public, held, teacher = medquad
    distilled, ce_only = student(), student()
    before = teacher_kl(distilled, [teacher], held)
    curve = distill_domain(distilled, [teacher], public, small_cfg(), torch.Generator().manual_seed(0), CPU)
    distill_domain(ce_only, [teacher], public, small_cfg(features="none", beta=0.0),
                   torch.Generator().manual_seed(0), CPU)
    after, baseline = teacher_kl(distilled, [teacher], held), teacher_kl(ce_only, [teacher], held)
    assert after < 0.5 * before  # measured 1.40 -> 0.39
    assert after < 0.85 * baseline  # the teacher, not the text alone, did it (CE only: 0.57)
    assert [c["step"] for c in curve] == [1, 10, 20, 30, 40]
    assert curve[-1]["fm"] < 0.5 * curve[0]["fm"]  # VAA's MSE fell (measured 2.6 -> 0.35)
    fresh = build_dense_base(global_moe_config("qwen_moe", "tiny", V))
    assert distilled.state_dict().keys() == fresh.state_dict().keys()  # VAA is training-only
    assert sum(1 for _ in distilled.modules()) == sum(1 for _ in fresh.modules())


@pytest.mark.parametrize("features, ce", [("none", True), ("ofa", True), ("none", False)])
def test_ablations_train(medquad, features, ce):
    public, held, teacher = medquad
    s = student()
    before = teacher_kl(s, [teacher], held)
    curve = distill_domain(s, [teacher], public, small_cfg(steps=20, features=features, ce=ce),
                           torch.Generator().manual_seed(0), CPU)
    assert all(math.isfinite(v) for c in curve for v in c.values())
    assert (curve[-1]["fm"] > 0) == (features == "ofa")
    assert teacher_kl(s, [teacher], held) < 0.7 * before


def test_logits_only_ablation_optimises_the_kl_alone(medquad):
    public, held, teacher = medquad
    curve = distill_domain(student(), [teacher], public, small_cfg(steps=1, features="none", ce=False),
                           torch.Generator().manual_seed(0), CPU)
    assert curve[0]["total"] == curve[0]["kl"] != curve[0]["ce"]


def test_same_generator_same_student_with_several_teachers():
    torch.manual_seed(0)
    teachers = [build_device_model("gpt2", "tiny", V), build_device_model("llama", "small", V)]
    public = torch.randint(V, (20, T), generator=torch.Generator().manual_seed(3))
    runs = []
    for _ in range(2):
        s, gen = student(), torch.Generator().manual_seed(7)
        curve = distill_domain(s, teachers, public, small_cfg(steps=3), gen, CPU)
        runs.append((s.state_dict(), curve, gen.get_state()))
    (a, curve_a, gen_a), (b, curve_b, gen_b) = runs
    assert curve_a == curve_b and torch.equal(gen_a, gen_b)  # the lead resumes from the generator's state
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(a[key], student().state_dict()[key])  # and it did train


def test_clear_errors():
    s, teacher = student(), build_device_model("gpt2", "tiny", V)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="T = 30 tokens, not a multiple of 4"):
        distill_domain(s, [teacher], torch.randint(V, (4, 30)), small_cfg(), gen, CPU)
    with pytest.raises(ConfigError, match="vocab 300, the student 512"):
        distill_domain(s, [build_device_model("gpt2", "tiny", 300)], torch.randint(V, (4, T)), small_cfg(), gen, CPU)
    with pytest.raises(ConfigError, match="nothing to train"):
        distill_domain(s, [teacher], torch.randint(V, (4, T)), small_cfg(ce=False, beta=0.0, features="none"), gen, CPU)


def test_time_steps_reports_a_ratio_per_feature_term():
    from deepfusion.crosskd import time_steps

    rows = time_steps(repeats=1, vocab=V, batch=2, seq=T, teacher=("gpt2", "tiny"), cfg=small_cfg(batch_size=2))
    assert [r["features"] for r in rows] == ["none", "vaa", "ofa"]
    assert rows[0]["ratio_to_none"] == 1.0 and all(r["seconds_per_step"] > 0 for r in rows)
    assert rows[0]["aligner_params"] == 0 < rows[2]["aligner_params"] < rows[1]["aligner_params"]


# ---- a teacher with its own tokenizer ---------------------------------------------------------------------

def identity_tokens(public: torch.Tensor):
    """TeacherTokens whose 'own' tokenizer cuts every block exactly as the global one (one character per token):
    the aligned KL and VAA must then be the shared-tokenizer terms, to float precision."""
    from deepfusion import alignment as al
    from deepfusion.crosskd import TeacherTokens

    views = []
    for row in public.tolist():
        tz = al.Tokenization("x" * len(row), tuple(row), tuple((i, i + 1) for i in range(len(row))),
                             (False,) * len(row))
        views.append(al.BlockView(torch.tensor(row), al.align(tz, tz)))
    return TeacherTokens(views, torch.arange(V), 0, V)


@pytest.mark.parametrize("features", ["vaa", "none"])
def test_an_identity_alignment_gives_the_shared_tokenizer_losses(features):
    from deepfusion.crosskd import kd_losses, make_aligners

    torch.manual_seed(0)
    public = torch.randint(V, (6, T))
    s, t = student(), build_device_model("gpt2", "tiny", V).eval()
    cfg = small_cfg(features=features)
    aligners = make_aligners(s, [t], T, cfg, torch.Generator().manual_seed(0))
    idx = torch.tensor([4, 1, 3])
    shared = kd_losses(s, [t], aligners, public[idx], cfg, CPU)
    aligned = kd_losses(s, [t], aligners, public[idx], cfg, CPU, [identity_tokens(public)], idx)
    for k in ("ce", "fm", "kl", "total"):
        assert aligned[k].item() == pytest.approx(shared[k].item(), rel=1e-4, abs=1e-6), k


def test_own_tokenizer_teachers_are_refused_where_they_cannot_be_aligned():
    torch.manual_seed(0)
    public = torch.randint(V, (4, T))
    s, t = student(), build_device_model("gpt2", "tiny", V + 8)
    with pytest.raises(ConfigError, match="no tokenizer of its own"):
        distill_domain(s, [t], public, small_cfg(steps=1), torch.Generator(), CPU)
    with pytest.raises(ConfigError, match="OFA-KD's branches compare logits token by token"):
        distill_domain(s, [t], public, small_cfg(steps=1, features="ofa"), torch.Generator(), CPU,
                       [identity_tokens(public)])
