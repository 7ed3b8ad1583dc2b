"""Phase III's tuning: the teachers' mixture as targets, the experts frozen, the best validation step kept."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deepfusion.pipeline_config import TuneConfig
from deepfusion.models import build_dense_base, global_moe_config
from deepfusion.tuning import teacher_targets, tune
from deepfusion.upcycling import expert_parameter_names, fuse

V, T = 300, 16


class Oracle(nn.Module):
    """A teacher that knows the next token of blocks whose first token is even (or odd) and nothing else."""

    def __init__(self, parity: int):
        super().__init__()
        self.parity = parity

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, V)
        nxt = torch.roll(input_ids, -1, dims=1)
        knows = (input_ids[:, :1] % 2 == self.parity).float().unsqueeze(-1)  # (B, 1, 1)
        logits.scatter_(-1, nxt.unsqueeze(-1), 8.0)
        return SimpleNamespace(logits=logits * knows)


def blocks(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(V, (n, T), generator=torch.Generator().manual_seed(seed))


def test_teacher_targets_mix_by_who_explains_the_block():
    public = blocks(12)
    targets = teacher_targets([(0, Oracle(0)), (1, Oracle(1))], public, 2, 4, torch.device("cpu"), batch=5)
    assert targets.ids.shape == (12, T - 1, 4) and targets.tail.shape == (12, T - 1)
    assert torch.equal(targets.block_domain, public[:, 0] % 2)  # each block goes to the teacher that knows it
    truth = public[:, 1:]
    assert (targets.ids[..., 0] == truth).float().mean() > 0.99  # the mixture's top token is the knowing teacher's
    assert torch.allclose(targets.probs.sum(-1) + targets.tail, torch.ones(12, T - 1), atol=1e-5)


def moe():
    config = global_moe_config("qwen_moe", "tiny", V)
    torch.manual_seed(0)
    students = [build_dense_base(config) for _ in range(2)]
    return fuse(config, students)


def test_tuning_freezes_the_experts_and_keeps_the_best_validation_step():
    model = moe()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in expert_parameter_names(model)}
    free = {n: p.detach().clone() for n, p in model.named_parameters() if n not in frozen}
    public = blocks(16)
    validation = {"a": ("a", blocks(4, seed=1))}
    targets = teacher_targets([(0, Oracle(0)), (1, Oracle(1))], public, 2, 4, torch.device("cpu"))
    cfg = TuneConfig(steps=6, batch_size=4, lr=1e-2, eval_every=2, patience=5)
    report = tune(model, public, validation, targets, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    assert [c["step"] for c in report["curve"]] == [0, 2, 4, 6]
    best = min(report["curve"], key=lambda c: c["validation_ppl"]["a"])
    assert report["best_step"] == best["step"]
    changed = any(not torch.equal(after[n], p) for n, p in free.items())
    assert changed == (report["best_step"] > 0)  # the kept weights are the best check's, step 0 = the fused model
    assert all(p.requires_grad for p in model.parameters())  # handed back trainable


def test_the_papers_loss_runs_without_teachers():
    model = moe()
    cfg = TuneConfig(steps=2, batch_size=2, eval_every=1, loss="ce")
    report = tune(model, blocks(8), {"a": ("a", blocks(2, seed=1))}, None, cfg, torch.Generator().manual_seed(0),
                  torch.device("cpu"))
    assert all(c.get("kl", 0.0) == 0.0 for c in report["curve"])


def test_a_teacher_silent_at_a_position_leaves_it_to_the_others_or_to_the_real_token():
    from deepfusion.tuning import _spoken_mixture

    torch.manual_seed(0)
    M, B, T1, Vs = 2, 1, 3, 5
    logp = torch.randn(M, B, T1, Vs).log_softmax(-1)
    blocks = torch.tensor([[0, 2, 4, 1]])
    truth = logp.gather(-1, blocks[:, 1:].expand(M, -1, -1).unsqueeze(-1)).squeeze(-1)
    spoken = [None, torch.tensor([[True, False, False]])]
    logp[0, 0, 2] = -1e30  # teacher 0 says nothing useful at position 2 ...
    spoken[0] = torch.tensor([[True, True, False]])  # ... and is silent there, as is teacher 1
    score, mixture = _spoken_mixture(logp, truth, spoken, blocks)
    assert score[1, 0] == pytest.approx(float(truth[1, 0, 0]))  # teacher 1's score: its one spoken position
    assert torch.allclose(mixture[0, 1], logp[0, 0, 1].exp())  # only teacher 0 speaks at position 1
    assert torch.equal(mixture[0, 2], torch.nn.functional.one_hot(torch.tensor(1), Vs).float())  # nobody: truth
    assert torch.allclose(mixture.sum(-1), torch.ones(B, T1))
