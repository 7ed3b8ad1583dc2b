import pytest
import torch

from deepfusion.errors import ConfigError
from deepfusion.models import build_dense_base, build_device_model, global_moe_config
from deepfusion.vaa import ViewAlignedAttention, patch_length, pool_patches, stage_ends, stage_features

V, B, T = 64, 2, 16


def features(model, x, stages):
    out = model(input_ids=x, output_hidden_states=True)
    return stage_features(out.hidden_states, stage_ends(len(out.hidden_states) - 1, stages))


def tiny_student():
    return build_dense_base(global_moe_config("qwen_moe", "tiny", V))  # d_S = 64, 2 layers


def test_stage_ends_spread_depth_and_repeat_shallow_models():
    assert stage_ends(4, 4) == [1, 2, 3, 4]
    assert stage_ends(4, 2) == [2, 4]
    assert stage_ends(6, 4) == [2, 3, 5, 6]  # half rounds up (Python's round would give 4 for 4.5)
    assert stage_ends(2, 4) == [1, 1, 2, 2]
    assert stage_ends(1, 4) == [1, 1, 1, 1]  # never the embeddings


def test_pool_patches_means_then_standardises():
    h = torch.randn(2, 12, 5) * 7 + 3
    pooled = pool_patches(h, 3)  # p = 4 tokens per patch
    assert pooled.shape == (2, 3, 5)
    manual = h[:, 4:8].mean(1)
    standard = (manual - manual.mean(-1, keepdim=True)) / manual.std(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(pooled[:, 1], standard, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("family, size, d_t", [("gpt2", "tiny", 32), ("llama", "tinyllama", 128)])
def test_shapes_for_unequal_widths_and_depths(stages, family, size, d_t):
    torch.manual_seed(0)
    student, teacher = tiny_student(), build_device_model(family, size, V)
    x = torch.randint(V, (B, T))
    s, t = features(student, x, stages), features(teacher, x, stages)
    assert len(s) == len(t) == stages and s[0].shape == (B, T, 64) and t[0].shape == (B, T, d_t)
    patches = 4 * stages  # 4 patches per stage, p = 4 tokens
    vaa = ViewAlignedAttention(64, d_t, T, stages=stages, patches=patches, dim=16, heads=2)
    out = vaa(s)
    assert len(out) == stages and all(o.shape == (B, 4, d_t) for o in out)
    loss = vaa.loss(s, t)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_patches_do_not_see_later_positions(causal):
    torch.manual_seed(0)
    stages, per_stage, p = 2, 4, 4  # patches of tokens 0-3, 4-7, 8-11, 12-15
    vaa = ViewAlignedAttention(24, 8, T, stages=stages, patches=stages * per_stage, dim=16, heads=2, causal=causal)
    feats = [torch.randn(B, T, 24) for _ in range(stages)]
    later = [f.clone() for f in feats]
    later[0][:, 8:] += torch.randn(B, 8, 24)  # perturb stage 1 from patch 2 on; stage 2 untouched
    before, after = vaa(feats), vaa(later)
    early_same = all(torch.allclose(b[:, :2], a[:, :2], atol=1e-6) for b, a in zip(before, after))
    assert early_same == causal  # without the mask, stage 2's early patches attend to stage 1's later ones
    assert not torch.allclose(before[1][:, 2:], after[1][:, 2:])  # later patches of the other stage do see it


def test_feature_loss_reaches_every_student_stage_and_every_vaa_parameter():
    torch.manual_seed(0)
    student, teacher = tiny_student(), build_device_model("gpt2", "small", V)  # teacher: 4 x 128
    x = torch.randint(V, (B, T))
    with torch.no_grad():
        t = features(teacher, x, 2)
    vaa = ViewAlignedAttention(64, 128, T, stages=2, patches=8, dim=16, heads=2)
    vaa.loss(features(student, x, 2), t).backward()
    for i, layer in enumerate(student.model.layers):  # stage 1 ends at layer 1, stage 2 at layer 2
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"layer {i} {name}"
    assert student.lm_head.weight.grad is None  # the feature term does not touch the head
    for name, p in vaa.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_patch_grid_that_does_not_tile_the_sequence_is_a_clear_error():
    assert patch_length(128, 32, 4) == 16
    with pytest.raises(ConfigError, match=r"patches = 32 .* T = 100 tokens, not a multiple of 8.*e\.g\. 20\)"):
        ViewAlignedAttention(64, 32, 100, stages=4, patches=32)
    ViewAlignedAttention(64, 32, 100, stages=4, patches=20)  # the suggested value works
