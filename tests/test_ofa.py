import torch
import torch.nn.functional as F

from deepfusion.models import build_dense_base, global_moe_config
from deepfusion.ofa import OFABranches, ofa_loss
from deepfusion.vaa import stage_ends

N, V = 6, 11


def test_gamma_zero_is_cross_entropy_with_soft_targets():
    torch.manual_seed(0)
    s, t, y = torch.randn(N, V), torch.randn(N, V), torch.randint(V, (N,))
    soft = t.softmax(-1)
    soft[torch.arange(N), y] = 1.0  # 1 at the true token, the teacher's probability elsewhere
    torch.testing.assert_close(ofa_loss(s, t, y, gamma=0.0), F.cross_entropy(s, soft))


def test_gamma_one_is_cross_entropy_plus_soft_kd():
    torch.manual_seed(1)
    s, t, y = torch.randn(N, V), torch.randn(N, V), torch.randint(V, (N,))
    expected = F.cross_entropy(s, y) + F.cross_entropy(s, t.softmax(-1))
    torch.testing.assert_close(ofa_loss(s, t, y, gamma=1.0), expected)


def test_minimal_when_student_follows_the_teacher_off_target():
    torch.manual_seed(2)
    t, y, gamma = torch.randn(N, V), torch.randint(V, (N,)), 1.5
    pt = t.softmax(-1)
    w = pt.clone()
    w[torch.arange(N), y] = (1 + pt[torch.arange(N), y]) ** gamma
    best = (w / w.sum(-1, keepdim=True)).log().requires_grad_()  # student ∝ teacher off target, boosted at y
    loss = ofa_loss(best, t, y, gamma)
    loss.backward()
    assert best.grad.abs().max() < 1e-6  # a stationary point
    for _ in range(5):
        assert ofa_loss(best.detach() + 0.1 * torch.randn(N, V), t, y, gamma) > loss  # and a minimum
    # the student that copies the teacher exactly is not the minimum: the true token gets extra weight
    assert ofa_loss(t, t, y, gamma) > loss


def test_finite_on_extreme_logits():
    s = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 1e4]])
    loss = ofa_loss(s, t, torch.tensor([1, 0]), gamma=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_branches_start_as_the_logit_lens_and_spare_the_head():
    torch.manual_seed(0)
    student = build_dense_base(global_moe_config("qwen_moe", "tiny", 50))  # 2 layers
    ends = stage_ends(2, 4)  # [1, 1, 2, 2]
    x = torch.randint(50, (2, 9))
    out = student(input_ids=x, output_hidden_states=True)
    branches = OFABranches(64, ends, 2)
    assert set(branches.branch) == {"0", "1"}  # stages that end at the last layer read the final logits
    logits = branches(out.hidden_states, out.logits, student.model.norm, student.lm_head)
    assert len(logits) == 4 and all(z.shape == (2, 9, 50) for z in logits)
    torch.testing.assert_close(logits[0], student.lm_head(student.model.norm(out.hidden_states[1])))
    assert logits[3] is out.logits
    loss = branches.loss(out.hidden_states, out.logits, student.model.norm, student.lm_head,
                         torch.randn(2, 9, 50), x, gamma=1.0)
    loss.backward()
    assert branches.branch["0"].weight.grad.abs().sum() > 0
    assert student.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    # the head still learns, but only from the final stage's loss: remove it and the head gets nothing
    student.zero_grad(set_to_none=True)
    early = OFABranches(64, [1], 2)
    out = student(input_ids=x, output_hidden_states=True)
    loss = early.loss(out.hidden_states, out.logits, student.model.norm, student.lm_head, torch.randn(2, 9, 50), x, 1.0)
    loss.backward()
    assert student.lm_head.weight.grad is None and student.model.norm.weight.grad is None
