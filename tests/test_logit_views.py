import torch

from deepfusion.models import build_global_moe
from deepfusion.logit_views import LogitViews, stage_layers, stage_logits


def test_stage_layers_are_evenly_spaced_and_include_the_last():
    assert stage_layers(4, 4) == [1, 2, 3, 4]
    assert stage_layers(4, 2) == [2, 4]
    assert stage_layers(6, 3) == [2, 4, 6]
    assert stage_layers(2, 4) == [1, 2]


def forward(model, x):
    out = model(input_ids=x, output_hidden_states=True)
    layers = stage_layers(model.config.num_hidden_layers, 4)
    feats, logits = stage_logits(out.hidden_states, out.logits, layers, model.model.norm, model.lm_head)
    return out, feats, logits


def test_shapes_and_identity_at_init():
    torch.manual_seed(0)
    model = build_global_moe("qwen_moe", "tiny", 50)
    out, feats, logits = forward(model, torch.randint(50, (2, 7)))
    S, N = feats.shape[:2]
    assert (S, N) == (2, 14) and logits.shape == (2, 14, 50)
    torch.testing.assert_close(logits[-1], out.logits.flatten(0, 1))  # the last stage is the final head
    lv = LogitViews(64, num_views=3, num_stages=S)
    views = lv(feats, logits)
    assert views.shape == (3, 14, 50)
    for k in range(3):  # zero-initialised gate: every view starts as the MoE's own final head
        torch.testing.assert_close(views[k], out.logits.flatten(0, 1))


def test_gradients_reach_early_backbone_layers_and_views_differ():
    torch.manual_seed(0)
    model = build_global_moe("qwen_moe", "tiny", 50)
    lv = LogitViews(64, num_views=2, num_stages=2)
    with torch.no_grad():  # as after some training: views open their gates differently
        lv.gate.copy_(torch.tensor([0.5, -0.8]))
        lv.stage_bias[0].fill_(2.0)
        lv.log_temp.copy_(torch.tensor([0.3, -0.2]))
    _, feats, logits = forward(model, torch.randint(50, (2, 7)))
    views = lv(feats, logits)
    assert not torch.allclose(views[0], views[1])
    target = torch.randn_like(views)
    ((views - target) ** 2).mean().backward()
    first = model.model.layers[0].self_attn.q_proj.weight.grad
    assert first is not None and first.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in (lv.gate, lv.log_temp, lv.stage_bias, lv.view_embedding))


def test_view_subset_selects_views():
    lv = LogitViews(8, num_views=4, num_stages=2)
    with torch.no_grad():
        lv.gate.copy_(torch.linspace(-1, 1, 4))
    feats, logits = torch.randn(2, 5, 8), torch.randn(2, 5, 11)
    full = lv(feats, logits)
    torch.testing.assert_close(lv(feats, logits, torch.tensor([3, 1])), full[[3, 1]])


def test_views_are_few_parameters():
    lv = LogitViews(192, num_views=6, num_stages=4, heads=2, dim=16)
    per_view = sum(p[0].numel() for p in (lv.view_embedding, lv.stage_bias, lv.gate, lv.log_temp))
    assert per_view == 2 * 16 + 2 * 4 + 2  # a view expresses its view, not the device's knowledge
    assert len(lv.describe()) == 6
