"""Evaluation as the paper measures it (§V, Tables I-II): token perplexity and token accuracy.

    log_ppl    mean next-token NLL (natural log) over held-out token blocks; ppl = exp(log_ppl)
    accuracy   % of next tokens whose argmax prediction is the reference token
    qa_*       the same on QA answers alone, the question given as context (data/qa.py): what the paper scores

Per source, and per domain token-weighted over its sources (a domain's figure is its tokens' mean, so a
source with more held-out text weighs more). One forward pass gives NLL and argmax together; the
(B, T, V) logits are scored in row chunks so the float32 copies stay bounded whatever the vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from deepfusion.models import autocast

CHUNK_ELEMENTS = 1 << 24  # logits scored at once: 64 MiB of float32; at V = 8192 a whole (16, 128) batch
IGNORE = -100  # cross_entropy's ignore_index: a position whose next token is not scored


def _round(x: float) -> float:
    return float(f"{x:.4g}")


@torch.no_grad()
def _score(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None, torch_device: torch.device,
           batch: int) -> tuple[float, int, int]:
    """(sum of NLL, argmax hits, scored tokens) over the rows of ids (N, T).

    mask (N, T) marks the positions whose next token is scored; None scores every next token.
    """
    model.eval()
    nll, hits, count = 0.0, 0, 0
    for s in range(0, len(ids), batch):
        b = ids[s:s + batch].to(torch_device)  # (B, T)
        target = b[:, 1:]  # (B, T-1)
        if mask is not None:
            m = mask[s:s + batch, :-1].to(torch_device)  # (B, T-1)
            if not m.any():
                continue
            end = int(m.any(0).nonzero().max()) + 2  # columns past the last scored target are never read
            b, target = b[:, :end], target[:, :end - 1].masked_fill(~m[:, :end - 1], IGNORE)
        with autocast(torch_device):
            logits = model(input_ids=b).logits[:, :-1]  # (B, T-1, V)
        logits, target = logits.flatten(0, 1), target.flatten()  # (B*(T-1), V), (B*(T-1),)
        rows = max(1, CHUNK_ELEMENTS // logits.shape[-1])
        for r in range(0, len(target), rows):
            chunk, t = logits[r:r + rows].float(), target[r:r + rows]  # (rows, V), (rows,)
            nll += F.cross_entropy(chunk, t, reduction="sum").item()  # ignored positions add 0
            hits += (chunk.argmax(-1) == t).sum().item()  # an ignored target (-100) never matches
            count += (t != IGNORE).sum().item()
    return nll, hits, count


def _figures(scores: dict[str, tuple[str, float, int, int]], prefix: str, ppl: bool) -> dict:
    """Per-source and token-weighted per-domain figures from source -> (domain, nll, hits, count)."""
    totals: dict[str, list] = {}
    for domain, nll, hits, count in scores.values():
        t = totals.setdefault(domain, [0.0, 0, 0])
        t[0], t[1], t[2] = t[0] + nll, t[1] + hits, t[2] + count
    levels = {"": {d: tuple(t) for d, t in totals.items()},
              "_by_source": {s: (nll, hits, count) for s, (_, nll, hits, count) in scores.items()}}
    out = {}
    for suffix, level in levels.items():
        level = {k: v for k, v in level.items() if v[2] > 0}  # nothing scored: no figure, not a division by 0
        out[f"{prefix}log_ppl{suffix}"] = {k: _round(nll / n) for k, (nll, _, n) in level.items()}
        out[f"{prefix}accuracy{suffix}"] = {k: _round(100 * hits / n) for k, (_, hits, n) in level.items()}
        if ppl:
            out[f"{prefix}ppl{suffix}"] = {k: _round(math.exp(nll / n)) for k, (nll, _, n) in level.items()}
    return out


def lm_metrics(model: PreTrainedModel, test_sets: dict[str, tuple[str, torch.Tensor]],
               qa_sets: dict[str, tuple[str, tuple[torch.Tensor, torch.Tensor]]], torch_device: torch.device,
               batch: int = 16) -> dict:
    """Token log-perplexity, perplexity and accuracy (%) on held-out blocks; log-perplexity and accuracy on QA answers.

    test_sets: source -> (domain, (N, T) blocks); qa_sets: source -> (domain, (ids (M, T), mask (M, T))).
    Keys: ppl, log_ppl, accuracy, qa_log_ppl, qa_accuracy, each per domain, and each again as <key>_by_source.
    """
    text = {s: (domain, *_score(model, blocks, None, torch_device, batch))
            for s, (domain, blocks) in test_sets.items()}
    qa = {s: (domain, *_score(model, ids, mask, torch_device, batch))
          for s, (domain, (ids, mask)) in qa_sets.items()}
    return {**_figures(text, "", ppl=True), **_figures(qa, "qa_", ppl=False)}


def paper_figures(model: PreTrainedModel, test_sets: dict[str, tuple[str, torch.Tensor]],
                  qa_sets: dict[str, tuple[str, tuple[torch.Tensor, torch.Tensor]]], torch_device: torch.device) -> dict:
    """What a summary reports beside ppl, for every method alike: log_ppl, accuracy, qa_log_ppl, qa_accuracy,
    per domain and <key>_by_source (the paper's Table I and II figures)."""
    return {k: v for k, v in lm_metrics(model, test_sets, qa_sets, torch_device).items()
            if k not in ("ppl", "ppl_by_source")}


def evaluate(model: PreTrainedModel, test_sets: dict[str, tuple[str, torch.Tensor]], torch_device: torch.device,
             batch: int = 16) -> dict:
    """Token perplexity exp(mean next-token NLL) per source and per domain (token-weighted)."""
    m = lm_metrics(model, test_sets, {}, torch_device, batch)
    return {"ppl": m["ppl"], "ppl_by_source": m["ppl_by_source"]}
