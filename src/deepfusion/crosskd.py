"""Phase II: distil one knowledge domain's teachers into a copy of the MoE's dense base (paper §IV-C, Eq. 11).

    L_KD = [L_CE] + alpha * (1/|teachers|) sum_t L_feat(t) + beta * (1/|teachers|) sum_t T^2 KL(P^T_t || P^S)

L_CE is the student's next-token cross-entropy on the public blocks; the KL is over the full vocabulary at
temperature T on the student's own final logits; L_feat is, by
[distill] features:
    vaa   sum_j MSE(F_j^T, F_j^S') through View-Aligned Attention (vaa.py), the paper's method
    ofa   sum_j L_OFA of stage branches against the teacher's logits (ofa.py), the OFA-KD baseline
    none  nothing (the "no VAA" ablation; with ce = false it is the "logits only" ablation)
A domain with several device types has several teachers: one VAA (or OFA branch set) per teacher, each
term averaged over teachers so alpha and beta mean the same whatever the count.

A teacher with its own tokenizer (bring your own models: alignment.py) reads each public block's text as its
tokenizer cuts it (TeacherTokens). Its KL is taken once per aligned character span, the teacher's distribution
at its last token of the span projected onto the global vocabulary (MinED map) against the student's at its
last token, averaged over spans; its VAA target for a patch is its features pooled over the characters of the
spans that end in that patch (each character weighs the same, however finely either side cut it), and patches
no span ends in are left out of the MSE. OFA-KD's branches compare per-token logits and stay shared-tokenizer.

Resumable at domain granularity: everything random (batches, VAA/OFA initialisation) is drawn from the
caller's generator, so a domain redone from the same generator state gives the same student.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from deepfusion.alignment import BlockView, block_views, project_probs, vocab_map
from deepfusion.pipeline_config import DistillConfig
from deepfusion.errors import ConfigError
from deepfusion.models import autocast
from deepfusion.ofa import OFABranches
from deepfusion.vaa import ViewAlignedAttention, stage_ends, stage_features

LOG_EVERY = 10  # steps between loss-curve entries (the first and last step are always logged)
CLIP = 1.0  # gradient-norm clip, as the devices' training (baselines/hosting.py)


# ---- teachers with their own tokenizer ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TeacherTokens:
    """A teacher that reads the public blocks through its own tokenizer: each block as it cuts it (aligned
    with the block's global ids) and where each of its token ids lands in the global vocabulary."""

    views: list[BlockView]  # one per public block, in the blocks' order
    vocab_map: torch.Tensor  # (V_teacher,) long: global id of each teacher id (alignment.vocab_map)
    pad_id: int
    global_size: int  # the student's output width (the global vocabulary, padded as the model pads it)

    @classmethod
    def build(cls, teacher: PreTrainedModel, tokenizer, global_tokenizer, public: torch.Tensor,
              global_size: int) -> TeacherTokens:
        width = teacher.get_output_embeddings().weight.shape[0]
        text = teacher.config.get_text_config()
        limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        return cls(block_views(global_tokenizer, tokenizer, public, limit),
                   vocab_map(tokenizer, global_tokenizer, device_size=width),
                   tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                   global_size)

    def batch(self, idx: torch.Tensor) -> tuple[list[BlockView], torch.Tensor, torch.Tensor]:
        """The views of blocks idx and their ids right-padded to one length, with the attention mask."""
        views = [self.views[int(i)] for i in idx]
        L = max(len(v.ids) for v in views)
        ids = torch.full((len(views), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(views), L, dtype=torch.long)
        for b, v in enumerate(views):
            ids[b, :len(v.ids)], mask[b, :len(v.ids)] = v.ids, 1
        return views, ids, mask


def span_kl(log_p_student: torch.Tensor, t_logits: torch.Tensor, views: list[BlockView], tokens: TeacherTokens,
            temperature: float) -> torch.Tensor:
    """KL(P^T || P^S) once per aligned span, the teacher projected onto the global vocabulary; mean over spans.
    log_p_student (B, T, V) at temperature, t_logits (B, L, V_teacher) raw. All the batch's spans at once."""
    rows = [torch.full((len(v.alignment),), b, dtype=torch.long) for b, v in enumerate(views)]
    if not sum(len(r) for r in rows):
        return log_p_student.new_zeros(())
    b = torch.cat(rows).to(t_logits.device)
    t_last = torch.cat([v.alignment.a.last for v in views]).to(t_logits.device)
    s_last = torch.cat([v.alignment.b.last for v in views]).to(t_logits.device)
    p_t = F.softmax(t_logits[b, t_last] / temperature, dim=-1)  # (S, V_teacher)
    p_t = project_probs(p_t, tokens.vocab_map, log_p_student.shape[-1])  # (S, V)
    kl = F.kl_div(log_p_student[b, s_last], p_t, reduction="sum")  # 0 log 0 = 0 for unmapped ids
    return kl / len(b) * temperature ** 2


def patch_pool(views: list[BlockView], patches: int, seq_len: int, teacher_len: int) -> torch.Tensor:
    """(B, patches, L): how much of each teacher token goes into each student patch's VAA target. A span goes
    to the patch its last global token is in; a token's weight is the characters of its span it holds."""
    p = seq_len // patches
    pool = torch.zeros(len(views), patches, teacher_len)
    for b, v in enumerate(views):
        a, g = v.alignment.a, v.alignment.b
        on = (a.group >= 0).nonzero().flatten()
        pool[b].index_put_((g.last[a.group[on]] // p, on), a.weight[on].float(), accumulate=True)
    return pool


# ---- setup --------------------------------------------------------------------------------------

def _check(student: PreTrainedModel, teachers: list[PreTrainedModel], public: torch.Tensor, cfg: DistillConfig,
           tokens: list[TeacherTokens | None]) -> None:
    if not teachers:
        raise ValueError("distill_domain got no teachers; a knowledge domain needs at least one proxy model")
    if public.dim() != 2 or len(public) == 0:
        raise ValueError(f"distill_domain got public blocks of shape {tuple(public.shape)}; expected (N, T) token "
                         "ids with N >= 1 (data.pack_blocks makes them)")
    vocab = student.config.vocab_size
    for i, (t, own) in enumerate(zip(teachers, tokens)):
        if own is None and t.config.vocab_size != vocab:
            raise ConfigError(f"config error: teacher {i} ({t.config.model_type}) has vocab {t.config.vocab_size}, "
                              f"the student {vocab}, and no tokenizer of its own to align them by; Phase II's KL "
                              "compares the same tokens")
        if own is not None and cfg.features == "ofa":
            raise ConfigError(f"config error: [distill] features = 'ofa': teacher {i} ({t.config.model_type}) has its "
                              "own tokenizer, and OFA-KD's branches compare logits token by token; use features = "
                              "'vaa' (aligned over character spans) or 'none'")
    if not cfg.ce and cfg.beta == 0 and (cfg.features == "none" or cfg.alpha == 0):
        raise ConfigError("config error: [distill] ce = false, beta = 0 and no feature term: nothing to train on; "
                          "turn one of them on")


def make_aligners(student: PreTrainedModel, teachers: list[PreTrainedModel], seq_len: int, cfg: DistillConfig,
                  generator: torch.Generator) -> nn.ModuleList:
    """One VAA (or OFA branch set) per teacher, initialised from the generator, not the global RNG."""
    d_s, layers = student.config.hidden_size, student.config.num_hidden_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        if cfg.features == "vaa":
            return nn.ModuleList(ViewAlignedAttention(d_s, t.config.hidden_size, seq_len, cfg.stages, cfg.patches,
                                                      cfg.dim, cfg.heads, cfg.causal) for t in teachers)
        if cfg.features == "ofa":
            return nn.ModuleList(OFABranches(d_s, stage_ends(layers, cfg.stages), layers) for _ in teachers)
        return nn.ModuleList()


def final_norm(model: PreTrainedModel) -> nn.Module:
    """The norm the backbone applies before the LM head (Llama's norm, GPT-2's ln_f, Phi's final_layernorm):
    transformers has no accessor for it, so take the backbone's last direct child that is a norm layer, by
    class name (LayerNorm, RMSNorm, ...; BLOOM's embedding LayerNorm comes first, so it is never chosen)."""
    norms = [m for m in model.base_model.children() if "norm" in type(m).__name__.lower()]
    if not norms:
        raise ConfigError(f"config error: {type(model).__name__} has no final norm layer among its backbone's "
                          "modules; OFA-KD's branches read stages out through it, so use [distill] features = vaa")
    return norms[-1]


# ---- one step -----------------------------------------------------------------------------------

def kd_losses(student: PreTrainedModel, teachers: list[PreTrainedModel], aligners: nn.ModuleList, x: torch.Tensor,
              cfg: DistillConfig, device: torch.device, tokens: list[TeacherTokens | None] | None = None,
              idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eq. 11's terms on one batch x (B, T) = public[idx]: ce, fm (feature term, averaged over teachers), kl,
    total. tokens[i]: teacher i's own tokenizer's view of the public blocks (None: it reads x as it is)."""
    feats = cfg.features != "none"
    with autocast(device):
        out = student(input_ids=x, output_hidden_states=feats)
    logits = out.logits.float()  # (B, T, V)
    log_p = F.log_softmax(logits, dim=-1)  # (B, T, V)
    ce = F.nll_loss(log_p[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    log_p_t = log_p if cfg.temperature == 1 else F.log_softmax(logits / cfg.temperature, dim=-1)  # (B, T, V)
    s_feats = stage_features(out.hidden_states, stage_ends(len(out.hidden_states) - 1, cfg.stages)) if feats else None
    fm = kl = torch.zeros((), device=device)
    tokens = tokens or [None] * len(teachers)
    for teacher, aligner, own in zip(teachers, aligners if feats else [None] * len(teachers), tokens):
        views, t_ids, t_mask = own.batch(idx) if own is not None else (None, x, None)
        with torch.no_grad(), autocast(device):
            t_out = teacher(input_ids=t_ids.to(device), attention_mask=None if t_mask is None else t_mask.to(device),
                            output_hidden_states=cfg.features == "vaa")
        t_logits = t_out.logits.float()  # (B, T or L, V_teacher)
        if own is None:
            t_log_p = F.log_softmax(t_logits / cfg.temperature, dim=-1)  # (B, T, V)
            kl = kl + F.kl_div(log_p_t, t_log_p, log_target=True, reduction="none").sum(-1).mean() * cfg.temperature ** 2
        else:
            kl = kl + span_kl(log_p_t, t_logits, views, own, cfg.temperature)
        if cfg.features == "vaa":
            t_feats = stage_features(t_out.hidden_states, stage_ends(len(t_out.hidden_states) - 1, cfg.stages))
            pool = None if own is None else patch_pool(views, aligner.per_stage, x.shape[1], t_ids.shape[1]).to(device)
            with autocast(device):
                fm = fm + aligner.loss(s_feats, t_feats, pool)
        elif cfg.features == "ofa":
            fm = fm + aligner.loss(out.hidden_states, logits, final_norm(student), student.get_output_embeddings(),
                                   t_logits, x, cfg.ofa_gamma)
    n = len(teachers)
    fm, kl = fm / n, kl / n
    total = (ce if cfg.ce else 0) + (cfg.alpha * fm if feats else 0) + cfg.beta * kl
    return {"ce": ce, "fm": fm, "kl": kl, "total": total}


def train_step(student, teachers, aligners, x, cfg, opt, device, tokens=None, idx=None) -> dict[str, torch.Tensor]:
    losses = kd_losses(student, teachers, aligners, x, cfg, device, tokens, idx)
    losses["total"].backward()
    params = [p for group in opt.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return losses


def _detached(losses: dict) -> dict:
    return {k: v.detach() if torch.is_tensor(v) else v for k, v in losses.items()}


# ---- a domain -----------------------------------------------------------------------------------

def distill_domain(student: PreTrainedModel, teachers: list[PreTrainedModel], public: torch.Tensor,
                   cfg: DistillConfig, generator: torch.Generator, torch_device: torch.device,
                   tokens: list[TeacherTokens | None] | None = None) -> list[dict]:
    """Train `student` in place (moved to torch_device) for cfg.steps AdamW steps on random public blocks.

    Teachers are frozen (eval, no grad) and moved to torch_device. VAA/OFA modules live only inside this call.
    tokens[i] (TeacherTokens.build): teacher i reads the blocks through its own tokenizer; None: the global one.
    Returns the loss curve: every LOG_EVERY steps {"step", "ce", "fm", "kl", "total"} (training batch values).
    """
    cfg.validate()
    tokens = tokens or [None] * len(teachers)
    _check(student, teachers, public, cfg, tokens)
    device = torch.device(torch_device)
    was_training = student.training
    student.to(device).train()
    for t in teachers:
        t.to(device).eval()
    aligners = make_aligners(student, teachers, public.shape[1], cfg, generator).to(device)
    opt = torch.optim.AdamW([*student.parameters(), *aligners.parameters()], lr=cfg.lr, weight_decay=0.01)
    curve = []
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(public), (cfg.batch_size,), generator=generator)
        losses = train_step(student, teachers, aligners, public[idx].to(device), cfg, opt, device, tokens, idx)
        if step % LOG_EVERY == 0 or step in (1, cfg.steps):
            curve.append({"step": step, **{k: round(float(v), 5) for k, v in _detached(losses).items()}})
    student.train(was_training)
    return curve


@torch.no_grad()
def teacher_kl(student: PreTrainedModel, teachers: list[PreTrainedModel], blocks: torch.Tensor,
               temperature: float = 1.0, batch_size: int = 8) -> float:
    """Mean over teachers and tokens of KL(P^T || P^S) on held-out blocks (N, T): what Phase II lowers.

    Every model is evaluated in eval mode (no dropout) and given back in the mode it came in.
    """
    device = next(student.parameters()).device
    modes = [(m, m.training) for m in (student, *teachers)]
    for m, _ in modes:
        m.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size].to(device)
        with autocast(device):
            log_p = F.log_softmax(student(input_ids=x).logits.float() / temperature, dim=-1)  # (B, T, V)
            for t in teachers:
                t_log_p = F.log_softmax(t(input_ids=x).logits.float() / temperature, dim=-1)  # (B, T, V)
                total += float(F.kl_div(log_p, t_log_p, log_target=True, reduction="sum")) / len(teachers)
        count += x.numel()
    for m, training in modes:
        m.train(training)
    return total / count


# ---- cost ---------------------------------------------------------------------------------------

def interleaved(steps: dict, repeats: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """name -> (median wall seconds, median process CPU seconds) of steps[name](), the names taken in turn each
    repeat so that a noisy shared machine slows all of them alike; one round first to warm up allocator,
    kernels and optimiser state."""
    wall, cpu = {k: [] for k in steps}, {k: [] for k in steps}
    for r in range(repeats + 1):
        for k, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:
                wall[k].append(time.perf_counter() - start)
                cpu[k].append(time.process_time() - start_cpu)  # this process's CPU seconds: steadier on a shared box
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in steps}


def time_steps(features: tuple[str, ...] = ("none", "vaa", "ofa"), repeats: int = 7, vocab: int = 8192,
               batch: int = 8, seq: int = 128, teacher: tuple[str, str] = ("gpt2", "small"),
               torch_device: str = "cpu", cfg: DistillConfig | None = None) -> list[dict]:
    """Median seconds of one Phase II step per feature term, and the ratio to features = "none".

    Student: qwen_moe small's dense base; one teacher. Repeats are interleaved across the variants so that
    a noisy shared machine slows all of them alike; on a loaded CPU run it with OMP_NUM_THREADS=1 (two
    threads on two busy cores spin against each other and the wall times become noise) and read cpu_ratio.
    """
    from deepfusion.models import build_device_model, build_dense_base, global_moe_config

    device = torch.device(torch_device)
    torch.manual_seed(0)
    base = build_dense_base(global_moe_config("qwen_moe", "small", vocab)).to(device).train()
    teachers = [build_device_model(*teacher, vocab).to(device).eval()]
    gen = torch.Generator().manual_seed(0)
    public = torch.randint(vocab, (64, seq), generator=gen)
    runs = {}
    for f in features:
        c = dataclasses.replace(cfg or DistillConfig(batch_size=batch), features=f)
        student = copy.deepcopy(base)
        aligners = make_aligners(student, teachers, seq, c, gen).to(device)
        opt = torch.optim.AdamW([*student.parameters(), *aligners.parameters()], lr=c.lr)
        runs[f] = (student, aligners, c, opt)

    def step(f):
        student, aligners, c, opt = runs[f]
        x = public[torch.randint(len(public), (batch,), generator=gen)].to(device)
        return lambda: train_step(student, teachers, aligners, x, c, opt, device)

    med = interleaved({f: step(f) for f in features}, repeats, device)
    ref = med[features[0]]
    return [{"features": f, "seconds_per_step": round(med[f][0], 4),
             "ratio_to_" + features[0]: round(med[f][0] / ref[0], 3),
             "cpu_seconds_per_step": round(med[f][1], 4), "cpu_ratio": round(med[f][1] / ref[1], 3),
             "aligner_params": sum(p.numel() for p in runs[f][1].parameters())} for f in features]
