"""OFA-KD (Hao et al., NeurIPS 2023, "One-for-All"): the paper's cross-architecture baseline (§V-A).

Instead of matching features, OFA-KD reads every student stage out into logit space with a small branch and
aligns each branch's prediction with the teacher's final prediction, where heterogeneous architectures
already agree on the meaning of every coordinate (the vocabulary):

    L_OFA = -(1 + p^T_y)^gamma log p^S_y - sum_{c != y} p^T_c log p^S_c        y: the true next token

gamma > 1 raises the target class's weight when the teacher is confident in it; at gamma = 0 it is the
cross-entropy with soft target (1 at y, p^T_c elsewhere). We implement this equation, as OFA-KD's paper writes
it; the authors' released code weighs class c by (p^T_c + 1[c=y])^gamma - 1[c=y] instead, which also raises
the non-target probabilities to gamma and, at gamma = 1, drops the one-hot part (plain soft cross-entropy).

Branch design: stage j's features -> Linear(d_S, d_S) (identity at init) -> the student's final norm -> the
student's LM head. Borrowing the head costs no V x d_S matrix per stage (OFA's branches end in their own
classifier; ours would be 1.6 M numbers each at V = 8192) and starts each branch as the logit lens of its
stage. The borrowed norm and head are used with their weights detached: they belong to the exported model and
should answer to its final-logit losses, not to J-1 read-outs of earlier stages. A stage that ends at the
last layer has no branch: its read-out is the student's own final logits, which OFA-KD also supervises.
Branches are training-only (crosskd.py discards them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def ofa_weights(teacher_logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """The soft target of L_OFA: p^T_c, and (1 + p^T_y)^gamma at the true token. (N, V), (N,) -> (N, V)."""
    pt = F.softmax(teacher_logits.float(), dim=-1)  # (N, V)
    pt_y = pt.gather(1, target[:, None])  # (N, 1)
    return pt.scatter(1, target[:, None], (1 + pt_y) ** gamma)  # (N, V)


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             gamma: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L_OFA over positions. student/teacher logits (N, V), target (N,) token ids -> scalar.

    `weights` (from ofa_weights) saves recomputing the teacher's side when several stages share it."""
    if weights is None:
        weights = ofa_weights(teacher_logits, target, gamma)
    log_ps = F.log_softmax(student_logits.float(), dim=-1)  # (N, V): log-space, finite on extreme logits
    return -(weights * log_ps).sum(-1).mean()


class OFABranches(nn.Module):
    """One branch per student stage that ends before the last layer; the last stage reads the final logits."""

    def __init__(self, student_dim: int, ends: list[int], num_layers: int):
        super().__init__()
        self.ends = ends
        self.branch = nn.ModuleDict({str(j): nn.Linear(student_dim, student_dim) for j, e in enumerate(ends)
                                     if e < num_layers})
        for lin in self.branch.values():  # the logit lens of its stage at init
            nn.init.eye_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, hidden_states: tuple[torch.Tensor, ...], final_logits: torch.Tensor, norm: nn.Module,
                head: nn.Module) -> list[torch.Tensor]:
        """J stage predictions, each (B, T, V)."""
        frozen_norm = {k: v.detach() for k, v in norm.named_parameters()}
        frozen_head = {k: v.detach() for k, v in head.named_parameters()}
        logits = []
        for j, end in enumerate(self.ends):
            if str(j) not in self.branch:
                logits.append(final_logits)
                continue
            h = self.branch[str(j)](hidden_states[end])  # (B, T, d_S)
            logits.append(functional_call(head, frozen_head, (functional_call(norm, frozen_norm, (h,)),)))  # (B, T, V)
        return logits

    def loss(self, hidden_states: tuple[torch.Tensor, ...], final_logits: torch.Tensor, norm: nn.Module,
             head: nn.Module, teacher_logits: torch.Tensor, input_ids: torch.Tensor, gamma: float) -> torch.Tensor:
        """Sum over stages of L_OFA against the teacher's final logits, on positions that have a next token."""
        target = input_ids[:, 1:].flatten()  # (B*(T-1),)
        teacher = teacher_logits[:, :-1].flatten(0, 1)  # (B*(T-1), V)
        weights = ofa_weights(teacher, target, gamma)  # (B*(T-1), V), once for all stages
        stages = self(hidden_states, final_logits, norm, head)
        return sum(ofa_loss(s[:, :-1].flatten(0, 1), teacher, target, gamma, weights) for s in stages)
