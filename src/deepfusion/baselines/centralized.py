"""Centralized MoE training: every device's private blocks pooled with the proxy set — what federation
approximates without moving any text.

centralized            the server's own step (server.distill with no teacher) on the pool for R rounds of
                       `steps`: exactly the federated methods' step budget. At CPU scale this is not an upper
                       bound: the pool is mostly medical text, and soft labels carry more per token.
centralized-converged  the same until the validation perplexity stops improving for `patience` rounds (at
                       most `max_rounds`); the best round's weights are kept. The true upper bound.

Validation is proxy text the proxy set left out (data.val_blocks per domain): never trained on, and never
the test split, so stopping does not peek at the numbers we report.
"""

from __future__ import annotations

import copy
import math

import torch

from deepfusion.federation import FederationData


def pooled_blocks(data: FederationData) -> torch.Tensor:
    """(N, T) every device's private blocks and the proxy blocks, in one pool."""
    return torch.cat([*data.private.values(), data.proxy])


def validation_score(ppl: dict[str, float]) -> float:
    """One number to stop on: the geometric mean of the domains' perplexities (each domain counts the same,
    as in the balanced proxy, so the medical-heavy pool cannot trade finance away unseen)."""
    return math.exp(sum(math.log(p) for p in ppl.values()) / len(ppl))


class EarlyStopping:
    """Keep the best weights by validation score; say stop after `patience` rounds without a better one."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_round, self.best_state = patience, math.inf, 0, None

    def update(self, model: torch.nn.Module, score: float, round: int) -> bool:
        """Record this round's score; True when training should stop."""
        if score < self.best:
            self.best, self.best_round = score, round
            self.best_state = copy.deepcopy(model.state_dict())
        return round - self.best_round >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_round": self.best_round, "best_state": self.best_state}

    def load(self, state: dict) -> None:
        self.best, self.best_round, self.best_state = state["best"], state["best_round"], state["best_state"]
