"""The multi-round server: receive knowledge packets, distil them into the global MoE, evaluate.

One server round is a plain recipe:
    packets  = receive(payloads)                 validate every upload, reject bad ones with a reason
    targets  = stack_targets(packets)            (K, B, T-1, k) top-k knowledge per device
    weights  = reliability_weights(targets)      (K, B) how much each device is trusted on each block
    distill(server, targets, weights, steps)     L = CE + λ T² KD + router aux
The distillation term depends on the method:
    multiround-views  per device, (1 - mix) KL(p_k || final head) + mix KL(p_k || view_k(H)) (logit_views.py)
    device-kd         per device, KL(p_k || final head)
    plain-fkd         KL(weighted average of the p_k || final head)
    proxy-only        none (the floor: the proxy set's cross-entropy alone)

A device with its own tokenizer answers only at the positions its tokenisation aligns with the global one
(the packet's `aligned` mask, alignment.py); at the others it carries no knowledge: its reliability is its mean
over the positions it aligns, a position's teacher is the mixture of the devices that align it, and a position
no device aligns takes the true next token as its target (plain cross-entropy there). Without masks every
step below is exactly what it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

from deepfusion.config import SERVER_METHODS, KnowledgeConfig, ServerConfig
from deepfusion.losses import topk_kl, topk_kl_shared
from deepfusion.models import autocast, build_global_moe, routed_experts
from deepfusion.evaluation import evaluate  # noqa: F401  (moved; engines and the CLI import it from here)
from deepfusion.logit_views import LogitViews, stage_layers, stage_logits
from deepfusion.wire import PacketError
from deepfusion.wire.knowledge import KnowledgePacket, aligned_mask, id_dtype, to_targets, validate_packet

log = logging.getLogger("deepfusion.server")

MAX_PACKET_BYTES = 256 << 20  # a packet larger than this is rejected before parsing, whatever the round expects
HEADER_ROOM = 64 << 10  # safetensors header + metadata of a valid packet: a few hundred bytes, with ample room


@dataclass
class Server:
    cfg: ServerConfig
    knowledge: KnowledgeConfig  # what devices send: the upload cap, the padding of stacked targets, T of the KD term
    method: str
    model: PreTrainedModel
    views: LogitViews | None  # multiround-views only
    layers: list[int]  # MoE depths the views attend over
    optimizer: torch.optim.Optimizer
    proxy: torch.Tensor  # (P, T) public proxy blocks (centralized: everyone's private blocks pooled with them)
    device_ids: list[str]  # view k belongs to device_ids[k]
    generator: torch.Generator
    torch_device: torch.device
    step: int = 0
    vocabs: dict[str, str | None] = field(default_factory=dict)  # device -> the vocabulary its packets speak


@dataclass
class Targets:
    """The round's knowledge, stacked over the K devices that delivered a valid packet."""

    views: torch.Tensor  # (K,) view index of each device
    ids: torch.Tensor  # (K, P, T-1, k) long
    probs: torch.Tensor  # (K, P, T-1, k) float
    tail: torch.Tensor  # (K, P, T-1) float
    aligned: torch.Tensor | None = None  # (K, P, T-1) bool: where each device carries knowledge; None: everywhere
    final: Targets | None = None  # multiround-views with views_final = "average": the final head's single teacher


def build_server(cfg: ServerConfig, method: str, vocab_size: int, proxy: torch.Tensor, device_ids: list[str],
                 seed: int, torch_device: torch.device, knowledge: KnowledgeConfig | None = None) -> Server:
    torch.manual_seed(seed)
    model = build_global_moe(cfg.family, cfg.size, vocab_size, cfg.pretrained).to(torch_device)
    layers = stage_layers(model.config.num_hidden_layers, cfg.views_stages)
    views = None
    if method == "multiround-views":
        views = LogitViews(model.config.hidden_size, len(device_ids), len(layers), cfg.views_heads,
                           cfg.views_dim).to(torch_device)
    groups = [{"params": list(model.parameters())}]
    if views:  # a view is a few numbers that must find its device's calibration within a few hundred steps
        groups.append({"params": list(views.parameters()), "lr": cfg.lr * cfg.views_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    return Server(cfg, knowledge or KnowledgeConfig(), method, model, views, layers, optimizer, proxy, device_ids,
                  generator, torch_device)


# ---- receiving ----------------------------------------------------------------------------------

def receive(server: Server, payloads: dict[str, bytes], round: int) -> tuple[dict[str, KnowledgePacket], dict[str, str]]:
    """Parse and validate every upload; returns (accepted packets, {device: rejection reason})."""
    accepted, rejected = {}, {}
    n_positions = server.proxy.shape[0] * (server.proxy.shape[1] - 1)
    vocab_size = server.model.config.vocab_size
    cap = min(MAX_PACKET_BYTES, packet_byte_cap(n_positions, server.knowledge.topk, vocab_size))
    for device_id, payload in payloads.items():
        try:
            packet = KnowledgePacket.from_bytes(payload, max_bytes=cap)
            if packet.device_id != device_id:
                raise PacketError(f"packet claims device {packet.device_id!r} but came from {device_id!r}")
            validate_packet(packet, round=round, known_devices=set(server.device_ids), n_positions=n_positions,
                            vocab_size=server.model.config.vocab_size, topk=server.knowledge.topk)
            check_vocabulary(server, packet)
        except PacketError as e:
            rejected[device_id] = str(e)
            log.warning("[ROUND %d] rejected upload of device %r: %s; the round goes on without it", round, device_id, e)
            continue
        accepted[device_id] = packet
        server.vocabs.setdefault(device_id, packet.vocab)
    return accepted, rejected


def check_vocabulary(server: Server, packet: KnowledgePacket) -> None:
    """A device's knowledge is projected from one vocabulary for the whole run: the one its first accepted
    packet named (none: the federation's). Another one means another tokenizer, whose positions and ids the
    server's earlier rounds did not align."""
    if packet.device_id not in server.vocabs or server.vocabs[packet.device_id] == packet.vocab:
        return
    before, now = server.vocabs[packet.device_id], packet.vocab
    raise PacketError(f"packet from device {packet.device_id!r} for round {packet.round}: vocab {now!r}, but its "
                      f"earlier packets spoke {before!r} (None: the federation's tokenizer); a device keeps its "
                      "tokenizer for the whole run")


def packet_byte_cap(n_positions: int, topk: int, vocab_size: int) -> int:
    """The most bytes a valid upload can take: per position k ids, k fp16 probs, an fp16 tail and a uint8
    alignment flag, plus the header. Anything bigger is rejected unread, so a device cannot make the server
    parse or hold more than a round needs."""
    return n_positions * (topk * (id_dtype(vocab_size).itemsize + 2) + 2 + 1) + HEADER_ROOM


def stack_targets(server: Server, packets: dict[str, KnowledgePacket]) -> Targets:
    P, T = server.proxy.shape
    k = server.knowledge.topk
    ids, probs, tails, views, masks = [], [], [], [], []
    for device_id, packet in packets.items():
        i, p, t = to_targets(packet)
        masks.append(aligned_mask(packet).view(P, T - 1))
        if i.shape[1] < k:  # a device may send fewer than k ids: pad with zero-probability entries
            pad = k - i.shape[1]
            i, p = F.pad(i, (0, pad)), F.pad(p, (0, pad))
        ids.append(i.view(P, T - 1, k))  # (P, T-1, k)
        probs.append(p.view(P, T - 1, k))
        tails.append(t.view(P, T - 1))
        views.append(server.device_ids.index(device_id))
    aligned = torch.stack(masks) if any(p.aligned is not None for p in packets.values()) else None
    return Targets(torch.tensor(views), torch.stack(ids), torch.stack(probs), torch.stack(tails), aligned)


def reliability_weights(server: Server, targets: Targets, enabled: bool = True) -> torch.Tensor:
    """(K, P) per-block device weights summing to 1 over devices.

    A device is trusted on a proxy block as much as its predictions explain the block's real next tokens
    (the proxy text is public): softmax over devices of the mean log-probability each assigns to the
    truth. Finance blocks lean on finance devices, and a device uploading garbage earns ~0 weight.
    Disabled: uniform.
    """
    K, P = targets.ids.shape[:2]
    if not enabled:
        return torch.full((K, P), 1.0 / K)
    score = truth_log_likelihood(targets.ids, targets.probs, targets.tail, server.proxy, server.model.config.vocab_size,
                                 targets.aligned)
    weights = score.softmax(dim=0)
    if targets.aligned is None:
        return weights
    return weights.nan_to_num(1.0 / K)  # a block no device aligns (every score -inf): its positions take the truth


def truth_log_likelihood(ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor, proxy: torch.Tensor,
                         vocab_size: int, aligned: torch.Tensor | None = None) -> torch.Tensor:
    """(K, P): each device's mean log-probability of each proxy block's real next tokens, read from its top-k +
    tail (minus a block's cross-entropy). ids, probs (K, P, T-1, k); tail (K, P, T-1); proxy (P, T).
    aligned (K, P, T-1) bool: the mean is over the positions a device aligns, -inf on a block it aligns none of."""
    truth = proxy[:, 1:].unsqueeze(0).unsqueeze(-1)  # (1, P, T-1, 1)
    hit = ids == truth  # (K, P, T-1, k)
    p_truth = (probs * hit).sum(-1)  # (K, P, T-1)
    # a miss: the tail mass spread evenly over the ids outside the top-k
    vocab_rest = vocab_size - ids.shape[-1]
    p_truth = torch.where(hit.any(-1), p_truth, tail / max(vocab_rest, 1))
    log_p = p_truth.clamp_min(1e-12).log()  # (K, P, T-1)
    if aligned is None:
        return log_p.mean(-1)  # (K, P)
    n = aligned.sum(-1)  # (K, P)
    mean = (log_p * aligned).sum(-1) / n.clamp_min(1)
    return mean.masked_fill(n == 0, -torch.inf)


def truth_targets(truth: torch.Tensor, k: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The true next tokens (...,) as one-hot top-k targets: (ids (..., k), probs (..., k), tail (...,)). The
    truth first with probability 1, then k-1 other distinct ids with 0: their KL is the cross-entropy."""
    ids = (truth.unsqueeze(-1) + torch.arange(k, device=truth.device)) % vocab_size
    probs = torch.zeros(*truth.shape, k, device=truth.device)
    probs[..., 0] = 1.0
    return ids, probs, torch.zeros(truth.shape, device=truth.device)


def aggregate(targets: Targets, weights: torch.Tensor, vocab_size: int, topk: int, chunk: int = 4096,
              proxy: torch.Tensor | None = None) -> Targets:
    """plain-fkd's single teacher: the weighted average of the devices' distributions, re-sparsified to top-k.

    Each device's tail mass is spread evenly over its non-top-k ids (the maximum-entropy reading of
    "the rest"), the K dense rows are averaged, and the average is cut back to top-k + tail. With alignment
    masks (targets.aligned; then proxy (P, T) is needed) a position averages the devices that align it, and one
    that none aligns gets its true next token, one-hot.
    """
    K, P, T1, _ = targets.ids.shape
    ids, probs = targets.ids.flatten(1, 2), targets.probs.flatten(1, 2)  # (K, N, k)
    tail = targets.tail.flatten(1, 2)  # (K, N)
    w = weights.unsqueeze(-1).expand(K, P, T1).flatten(1, 2)  # (K, N)
    if targets.aligned is not None:
        w = mixture_weights(w, targets.aligned.flatten(1, 2))
        truth = proxy[:, 1:].flatten()  # (N,)
    out_ids, out_probs, out_tail = [], [], []
    for s in range(0, ids.shape[1], chunk):
        sl = slice(s, s + chunk)
        fill = tail[:, sl] / (vocab_size - ids.shape[-1])  # (K, n)
        dense = fill.unsqueeze(-1).expand(-1, -1, vocab_size).clone()  # (K, n, V)
        dense.scatter_(-1, ids[:, sl], probs[:, sl])
        avg = (w[:, sl].unsqueeze(-1) * dense).sum(0)  # (n, V)
        if targets.aligned is not None:
            orphan = w[:, sl].sum(0) == 0  # (n,) no device aligns it
            avg[orphan] = F.one_hot(truth[sl][orphan], vocab_size).to(avg.dtype)
        top_p, top_i = avg.topk(topk, dim=-1)  # (n, k)
        out_ids.append(top_i)
        out_probs.append(top_p)
        out_tail.append((1.0 - top_p.sum(-1)).clamp_min(0.0))
    shape = (1, P, T1)
    return Targets(torch.tensor([0]), torch.cat(out_ids).view(*shape, topk), torch.cat(out_probs).view(*shape, topk),
                   torch.cat(out_tail).view(*shape))


def mixture_weights(w: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """(K, ...) device weights renormalised per position over the devices that align it (0 where none does)."""
    w = w * aligned
    total = w.sum(0, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(w))


# ---- distilling ---------------------------------------------------------------------------------

def router_aux_loss(model: PreTrainedModel, router_logits) -> torch.Tensor:
    cfg = model.config
    num_experts = routed_experts(cfg)
    coef = getattr(cfg, "router_aux_loss_coef", 0.01)
    return coef * load_balancing_loss_func(router_logits, num_experts, cfg.num_experts_per_tok)


def _batch(targets: Targets, weights: torch.Tensor, blocks_idx: torch.Tensor, device: torch.device):
    """The batch's rows of the round's targets: ids, probs (K, N, k), tail, weights (K, N), N = B*(T-1)."""
    T1 = targets.ids.shape[2]
    pick = lambda t: t[:, blocks_idx].flatten(1, 2).to(device)  # noqa: E731
    w = weights[:, blocks_idx].unsqueeze(-1).expand(-1, -1, T1)
    if targets.aligned is not None:  # a device teaches nothing where it does not align
        w = mixture_weights(w, targets.aligned[:, blocks_idx])
    return pick(targets.ids), pick(targets.probs), pick(targets.tail), w.flatten(1, 2).to(device)


def kd_loss(server: Server, out, blocks_idx: torch.Tensor, targets: Targets, weights: torch.Tensor) -> torch.Tensor:
    """λ-free distillation term for one batch; T² keeps gradients comparable across temperatures."""
    T = server.knowledge.temperature
    final = out.logits[:, :-1].flatten(0, 1)  # (N, V), N = B*(T-1)
    ids, probs, tail, w = _batch(targets, weights, blocks_idx, final.device)  # (K, N, k) x2, (K, N) x2
    if targets.final is None:
        loss = topk_kl_shared(final.float() / T, ids, probs, tail, w)  # every device vs the final head
    else:  # the devices' weighted average vs the final head; each device still has its view below
        one = torch.ones(1, weights.shape[1])
        loss = topk_kl_shared(final.float() / T, *_batch(targets.final, one, blocks_idx, final.device))
    if server.views is not None:
        # A view is a few numbers: a sample of positions trains it, at a fraction of K vocab-wide KLs.
        n = max(1, int(server.cfg.views_positions * final.shape[0]))
        pos = torch.randperm(final.shape[0], generator=server.generator)[:n].to(final.device)  # (n,)
        hidden = tuple(h[:, :-1].flatten(0, 1)[pos] for h in out.hidden_states)  # (n, d) each
        feats, logits = stage_logits(hidden, final[pos], server.layers, server.model.model.norm,
                                     server.model.lm_head)  # (S, n, d), (S, n, V)
        views = server.views(feats.float(), logits.float(), targets.views.to(final.device))  # (K, n, V)
        view_kl = topk_kl(views.flatten(0, 1) / T, ids[:, pos].flatten(0, 1), probs[:, pos].flatten(0, 1),
                          tail[:, pos].flatten(0, 1), weight=w[:, pos].flatten())  # over (K*n) rows
        loss = (1 - server.cfg.views_mix) * loss + server.cfg.views_mix * view_kl
    return loss * T * T


def distill(server: Server, targets: Targets | None, weights: torch.Tensor | None, steps: int) -> dict[str, float]:
    """`steps` optimiser steps over random proxy batches; targets None means proxy cross-entropy only."""
    model = server.model
    model.train()
    sums = {"ce": 0.0, "kd": 0.0, "aux": 0.0}
    for _ in range(steps):
        idx = torch.randint(len(server.proxy), (server.cfg.batch_size,), generator=server.generator)
        blocks = server.proxy[idx].to(server.torch_device)  # (B, T)
        with autocast(server.torch_device):
            out = model(input_ids=blocks, output_hidden_states=server.views is not None, output_router_logits=True)
            ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), blocks[:, 1:].flatten())
            aux = router_aux_loss(model, out.router_logits)
            kd = kd_loss(server, out, idx, targets, weights) if targets is not None else torch.zeros((), device=ce.device)
            loss = ce + server.cfg.lam * kd + aux
        loss.backward()
        params = [p for group in server.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        server.optimizer.step()
        server.optimizer.zero_grad(set_to_none=True)
        server.step += 1
        for key, value in (("ce", ce), ("kd", kd), ("aux", aux)):
            sums[key] += value.item()
    return {key: value / max(steps, 1) for key, value in sums.items()}


def server_round(server: Server, payloads: dict[str, bytes], round: int) -> dict:
    """Receive, weight and distil one round's uploads. Returns the round's server-side log."""
    if server.method in SERVER_METHODS:  # no devices: cross-entropy on the server's own blocks
        return {"accepted": [], "rejected": {}, "losses": distill(server, None, None, server.cfg.steps)}
    packets, rejected = receive(server, payloads, round)
    if len(packets) < server.cfg.min_devices:
        log.warning("[ROUND %d] expected at least %d valid packets, got %d: distillation skipped this round",
                    round, server.cfg.min_devices, len(packets))
        return {"accepted": sorted(packets), "rejected": rejected, "skipped": True, "losses": {}}
    targets = stack_targets(server, packets)
    weights = reliability_weights(server, targets, server.cfg.reliability)
    if server.method == "plain-fkd":
        targets = aggregate(targets, weights, server.model.config.vocab_size, server.knowledge.topk,
                            proxy=server.proxy)
        weights = torch.ones(1, weights.shape[1])
    elif server.views is not None and server.cfg.views_final == "average":
        targets.final = aggregate(targets, weights, server.model.config.vocab_size, server.knowledge.topk,
                                  proxy=server.proxy)
    losses = distill(server, targets, weights, server.cfg.steps)
    result = {"accepted": sorted(packets), "rejected": rejected, "losses": losses,
              "device_weight": {server.device_ids[v]: round_(float(weights[i].mean()))
                                for i, v in enumerate(targets.views.tolist())} if server.method != "plain-fkd" else {}}
    if server.views is not None:
        result["views"] = {server.device_ids[v]: server.views.describe()[v] for v in targets.views.tolist()}
    return result


def round_(x: float) -> float:
    return float(f"{x:.4g}")


# ---- checkpointing ------------------------------------------------------------------------------

def server_state(server: Server) -> dict:
    """Everything a killed server needs to continue exactly: weights, logit views, optimiser, step, RNGs."""
    return {"step": server.step, "model": server.model.state_dict(),
            "views": server.views.state_dict() if server.views is not None else None,
            "optimizer": server.optimizer.state_dict(), "generator": server.generator.get_state(),
            "torch_rng": torch.get_rng_state(), "vocabs": dict(server.vocabs)}


def load_server_state(server: Server, state: dict) -> None:
    server.step = state["step"]
    server.model.load_state_dict(state["model"])
    if server.views is not None:
        server.views.load_state_dict(state["views"])
    server.optimizer.load_state_dict(state["optimizer"])
    server.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    server.vocabs = dict(state.get("vocabs", {}))  # a checkpoint from before devices had their own tokenizers
