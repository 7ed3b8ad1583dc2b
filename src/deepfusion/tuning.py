"""Phase III, second half (paper §IV-D): tune the fused MoE with its experts frozen.

After the merge (upcycling.py) the experts hold the domains' distilled knowledge; the paper then fine-tunes
"the embedding, self-attention, gate, and output layers" on the public data with the experts frozen.

    loss = "ce"    the paper's:   CE(public next tokens) + router load-balancing loss
    loss = "keep"  ours (DESIGN §2): + λ · KL(teachers' mixture ‖ MoE), the devices' knowledge kept in the loss

Why "keep": a CPU probe of this pipeline found that cross-entropy alone on a small public set undoes the
fusion within a few hundred steps (medical perplexity 199 -> 301) while the same tuning with a KL to the
devices' predictions reached 139. Both are offered and measured (README). Either way, validation text
(never the test split) is checked every `eval_every` steps and the best weights are kept.

The teachers' mixture is computed once over the public blocks (`teacher_targets`): per block, each domain
teacher's distribution weighted by how well that teacher explains the block's real next tokens (a softmax
over teachers of their mean log-likelihood: medical blocks lean on medical teachers), kept as top-k + tail
so the tuning step uses the same exact, cheap KL as the multi-round protocol (losses.topk_kl_shared).
The same scores give each public block a domain: the one whose teachers explain it best (router init).
A teacher with its own tokenizer (crosskd.TeacherTokens) speaks only at the global positions that end an
aligned character span, its distribution projected onto the global vocabulary: its score is its mean over
those positions, a position's mixture is over the teachers that speak there, and a position none speaks at
gets the real next token as its target (plain CE there).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepfusion.baselines.centralized import EarlyStopping, validation_score
from deepfusion.pipeline_config import TuneConfig
from deepfusion.evaluation import evaluate
from deepfusion.losses import topk_kl_shared
from deepfusion.models import autocast
from deepfusion.server import router_aux_loss
from deepfusion.upcycling import expert_parameter_names


@dataclass
class TeacherTargets:
    """The domain teachers' mixture on the public blocks, as top-k + tail per next-token position."""

    ids: torch.Tensor  # (N, T-1, k) long
    probs: torch.Tensor  # (N, T-1, k) float
    tail: torch.Tensor  # (N, T-1) float
    block_domain: torch.Tensor  # (N,) long: the domain whose teachers explain each block best


@torch.no_grad()
def teacher_targets(teachers: list[tuple[int, torch.nn.Module]], public: torch.Tensor, num_domains: int, k: int,
                    torch_device: torch.device, batch: int = 4, tokens: list | None = None) -> TeacherTargets:
    """teachers: (domain, model) pairs; tokens[i]: teacher i's own tokenizer (crosskd.TeacherTokens) or None.
    A few blocks at a time: n_teachers x (B, T-1, V) probabilities."""
    tokens = tokens or [None] * len(teachers)
    ids, probs, tails, domains = [], [], [], []
    for start in range(0, len(public), batch):
        blocks = public[start:start + batch].to(torch_device)  # (B, T)
        idx = torch.arange(start, start + len(blocks))
        said = [_log_probs(model, blocks, torch_device) if own is None
                else _aligned_log_probs(model, own, idx, public.shape[1], torch_device)
                for (_, model), own in zip(teachers, tokens)]
        logp = torch.stack([lp for lp, _ in said])  # (M, B, T-1, V)
        truth = logp.gather(-1, blocks[:, 1:].expand(len(teachers), -1, -1).unsqueeze(-1)).squeeze(-1)  # (M, B, T-1)
        if all(on is None for _, on in said):
            score = truth.mean(-1)  # (M, B): each teacher's mean log-likelihood of the block
            weight = score.softmax(dim=0)  # (M, B)
            mixture = (weight[..., None, None] * logp.exp()).sum(0)  # (B, T-1, V)
        else:
            score, mixture = _spoken_mixture(logp, truth, [on for _, on in said], blocks)
        top_p, top_i = mixture.topk(k, dim=-1)  # (B, T-1, k)
        ids.append(top_i.cpu())
        probs.append(top_p.cpu())
        tails.append((1.0 - top_p.sum(-1)).clamp_min(0.0).cpu())
        domains.append(_domain_scores(score, [d for d, _ in teachers], num_domains).argmax(0).cpu())
    return TeacherTargets(torch.cat(ids), torch.cat(probs), torch.cat(tails), torch.cat(domains))


def _log_probs(model, blocks: torch.Tensor, torch_device: torch.device) -> tuple[torch.Tensor, None]:
    model.eval()
    with autocast(torch_device):
        logits = model(input_ids=blocks).logits[:, :-1]  # (B, T-1, V)
    return logits.float().log_softmax(-1), None


def _aligned_log_probs(model, own, idx: torch.Tensor, T: int, torch_device: torch.device):
    """A teacher with its own tokenizer on blocks idx: (B, T-1, V) log-probs in the global vocabulary at the
    positions that end an aligned span, and that mask (B, T-1); elsewhere log 0 clamped (the mask says so)."""
    from deepfusion.alignment import project_probs

    model.eval()
    views, ids, attention = own.batch(idx)
    with autocast(torch_device):
        logits = model(input_ids=ids.to(torch_device), attention_mask=attention.to(torch_device)).logits.float()
    probs = logits.new_zeros(len(views), T, own.global_size)
    on = torch.zeros(len(views), T, dtype=torch.bool, device=logits.device)
    for b, v in enumerate(views):
        a, g = v.alignment.a, v.alignment.b
        probs[b, g.last] = project_probs(logits[b, a.last].softmax(-1), own.vocab_map, probs.shape[-1])
        on[b, g.last] = True
    return probs[:, :-1].clamp_min(1e-30).log(), on[:, :-1]


def _spoken_mixture(logp: torch.Tensor, truth: torch.Tensor, spoken: list, blocks: torch.Tensor):
    """Scores and mixture when some teachers speak only at some positions (their own tokenizer)."""
    on = torch.stack([torch.ones_like(truth[0], dtype=torch.bool) if s is None else s for s in spoken]).float()
    score = (truth * on).sum(-1) / on.sum(-1).clamp_min(1)  # (M, B): mean over the positions it speaks at
    weight = score.softmax(dim=0)[..., None] * on  # (M, B, T-1)
    total = weight.sum(0)  # (B, T-1)
    mixture = (weight[..., None] * logp.exp()).sum(0) / total.clamp_min(1e-30)[..., None]  # (B, T-1, V)
    silent = total == 0  # no teacher speaks: the real next token
    mixture[silent] = F.one_hot(blocks[:, 1:][silent], mixture.shape[-1]).to(mixture.dtype)
    return score, mixture


def _domain_scores(score: torch.Tensor, domain_of: list[int], num_domains: int) -> torch.Tensor:
    """(K, B): a domain's score on a block is its teachers' mean score (a domain without teachers: -inf)."""
    out = torch.full((num_domains, score.shape[1]), -torch.inf, device=score.device)
    for d in set(domain_of):
        rows = [i for i, x in enumerate(domain_of) if x == d]
        out[d] = score[rows].mean(0)
    return out


def freeze_experts(moe) -> list[torch.nn.Parameter]:
    """Freeze the routed and shared experts; return what tunes (embeddings, attention, router, norms, output)."""
    frozen = expert_parameter_names(moe)
    for name, p in moe.named_parameters():
        p.requires_grad_(name not in frozen)
    return [p for p in moe.parameters() if p.requires_grad]


def tune(moe, public: torch.Tensor, validation: dict, targets: TeacherTargets | None, cfg: TuneConfig,
         generator: torch.Generator, torch_device: torch.device, on_step=None, train_experts: bool = False) -> dict:
    """Tune in place; returns the curve and the kept step. targets None: the paper's CE-only loss.
    on_step(step), if given, after each step (the run's progress display counts them).
    train_experts: every parameter trains (fedmkt's server step), not only what freeze_experts leaves."""
    keep = cfg.loss == "keep" and targets is not None
    params = [p.requires_grad_(True) for p in moe.parameters()] if train_experts else freeze_experts(moe)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    stopper = EarlyStopping(cfg.patience)
    curve, start = [], time.perf_counter()
    _check(moe, validation, torch_device, 0, stopper, curve, {})  # the fused model itself may be the best
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(public), (cfg.batch_size,), generator=generator)
        losses = _step(moe, public[idx].to(torch_device), targets if keep else None, idx, cfg, optimizer, params,
                       torch_device)
        if on_step:
            on_step(step)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if _check(moe, validation, torch_device, step, stopper, curve, losses):
                break
    moe.load_state_dict(stopper.best_state)
    for p in moe.parameters():
        p.requires_grad_(True)
    best = curve[stopper.best_round]  # EarlyStopping counts checks, the curve has one entry per check
    return {"curve": curve, "best_step": best["step"], "steps": curve[-1]["step"],
            "validation_ppl": best["validation_ppl"], "seconds": round(time.perf_counter() - start, 2),
            "trainable_params": sum(p.numel() for p in params)}


def _step(moe, blocks: torch.Tensor, targets: TeacherTargets | None, idx: torch.Tensor, cfg: TuneConfig,
          optimizer, params, torch_device: torch.device) -> dict:
    moe.train()
    with autocast(torch_device):
        out = moe(input_ids=blocks, output_router_logits=True)
        logits = out.logits[:, :-1].flatten(0, 1).float()  # (N, V), N = B*(T-1)
        ce = F.cross_entropy(logits, blocks[:, 1:].flatten())
        aux = router_aux_loss(moe, out.router_logits)
        kl = torch.zeros((), device=ce.device)
        if targets is not None:
            pick = lambda t: t[idx].flatten(0, 1).unsqueeze(0).to(torch_device)  # noqa: E731  (1, N, ...)
            kl = topk_kl_shared(logits, pick(targets.ids), pick(targets.probs), pick(targets.tail),
                                torch.ones(1, logits.shape[0], device=torch_device))
        loss = ce + aux + cfg.kl_weight * kl
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"ce": round(ce.item(), 4), "kl": round(kl.item(), 4), "aux": round(aux.item(), 4)}


def _check(moe, validation: dict, torch_device: torch.device, step: int, stopper: EarlyStopping, curve: list,
           losses: dict) -> bool:
    """Validation perplexity now; True when `patience` checks have passed without a better one."""
    ppl = evaluate(moe, validation, torch_device)["ppl"]
    curve.append({"step": step, **losses, "validation_ppl": ppl})
    return stopper.update(moe, validation_score(ppl), len(curve) - 1)
