"""Federated MoE baselines: devices host the global MoE, or part of it, and the server averages weights.

fedavg-moe     every device hosts the whole global MoE (FedAvg, McMahan et al. 2017): all weights down,
               local training, all weights up; the server averages them weighted by tokens trained.
expert-subset  a device hosts every parameter that is not a routed expert (embeddings, attention, norms,
               routers, shared experts, dense layers, LM head) plus, in each MoE layer, the m routed experts
               its router sends its data to most, m the largest number whose training step fits the device's
               memory. It trains that smaller MoE, the real transformers class with num_experts = m and the
               router cut to those rows; the server averages each expert over the devices that hosted it
               and every other parameter over all devices.
fedjets        FedJETS (Dun et al. 2023, arXiv 2306.08586), as expert-subset with two changes: m is FedJETS'
               fixed number of selected experts (server.fedjets_experts, 0: the router's top-k), not a memory
               fit, so the device needs that compact MoE's measured training peak, recorded next to its own
               budget (it may exceed it: FedJETS' device memory, the paper's Fig. 7); and the experts are
               chosen by the gate on the client's data from round 1 on: before its first round the server
               sends the device a usage probe (the round's compact MoE with settings["probe"]), the device
               routes its private blocks through it without training and sends back only its router usage.
               The common expert, trained by every client, is the MoE's shared expert (Qwen-MoE shared_expert,
               DeepSeek shared_experts): not a routed expert, so every host holds it, as in expert-subset.
               What differs from FedJETS' paper: no separate gating network pretrained on anchor clients (the
               global MoE's own router is the gate, trained with the model); one fine-tuning stage, no
               pre-training stage; the gate's choice is per client per round (usage counted over its data),
               not per sample, and the server sends the selected experts as one compact MoE.

Token budget: a round trains the global model on server.steps x server.batch_size private blocks in all,
split evenly over the round's devices: the blocks one distillation round's server step sees. (FedAvg
averages the devices' parallel steps, so per token it progresses less than one server step; server.host_steps
gives every host more steps, and the global model more tokens, to show that this is not all that holds it back.)

A round, as a recipe (fedjets first runs the same exchange as a usage probe, probe_first):
    sent = offer(model, host_info, round)         server: the hosted weights (+ full routers) as a packet
    up   = host_round(host, sent.to_bytes())      device: rebuild, train, count router usage, weights back
    receive(...) and average(model, uploads)      server: validate against what was sent, then FedAvg
"""

from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from deepfusion.config import DeviceConfig, ServerConfig
from deepfusion.device import lm_loss
from deepfusion.errors import config_fail
from deepfusion.memory import train_peak_bytes
from deepfusion.models import autocast, build_device_model, routed_experts, set_routed_experts
from deepfusion.wire import PacketError
from deepfusion.wire.weights import WeightsPacket, validate_upload

log = logging.getLogger("deepfusion.hosting")

# Parameters indexed by routed expert on dim 0: the fused expert weights, the router's rows and DeepSeek-V3's
# per-expert score correction bias.
_ROUTED = re.compile(r"model\.layers\.(\d+)\.mlp\.(?:experts\.(?:gate_up_proj|down_proj)|gate\.weight"
                     r"|gate\.e_score_correction_bias)$")
_PROBE = "probe.router."  # full router rows sent to a subset host so it can count usage over all experts
_USAGE = "usage."  # a subset host's router counts per layer, (E,), uploaded with its weights
SUBSET_METHODS = ("expert-subset", "fedjets")  # a host holds some routed experts per layer, chosen by usage


def routed_layer(name: str) -> int | None:
    """The layer of a parameter indexed by routed expert, else None (shared by every host)."""
    m = _ROUTED.fullmatch(name)
    return int(m[1]) if m else None


def moe_layers(model: PreTrainedModel) -> list[int]:
    return sorted({layer for name, _ in model.named_parameters() if (layer := routed_layer(name)) is not None})


# ---- the device side ----------------------------------------------------------------------------

@dataclass
class Host:
    """A device that hosts (part of) the global MoE: its data and what it measured about itself."""

    cfg: DeviceConfig
    private: torch.Tensor  # (N, T) private blocks, never leave the device
    generator: torch.Generator
    torch_device: torch.device
    global_config: PretrainedConfig  # the MoE's architecture, from the server once at setup
    experts: int | None  # routed experts per layer it holds; None: the whole model (fedavg-moe)
    budget_bytes: int = 0  # memory it may use (expert-subset, fedjets)
    peak_mem_bytes: int = 0  # measured training peak of what it hosts
    tokens_trained: int = 0


def hosted_config(global_config: PretrainedConfig, experts: int | None) -> PretrainedConfig:
    """The global architecture with `experts` routed experts per layer (the real class, smaller)."""
    config = copy.deepcopy(global_config)
    if experts is not None:
        set_routed_experts(config, experts)
    return config


def moe_loss(model: PreTrainedModel, blocks: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy plus the router's load-balancing loss: the server's own objective."""
    from deepfusion.server import router_aux_loss

    out = model(input_ids=blocks, output_router_logits=True)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), blocks[:, 1:].flatten())
    return ce + router_aux_loss(model, out.router_logits)


def memory_budget(cfg: DeviceConfig, vocab_size: int, seq_len: int, torch_device: torch.device) -> int:
    """The device's memory: memory_mb when configured, else the training peak of its own on-device LLM
    (the hardware it was configured for), so each method asks the same device for no more than it has."""
    if cfg.memory_mb:
        return cfg.memory_mb * 2**20
    size = cfg.size if cfg.size != "auto" else "small"
    model = build_device_model(cfg.family, size, vocab_size).to(torch_device)
    return train_peak_bytes(model, torch.randint(vocab_size, (cfg.batch_size, seq_len), device=torch_device), lm_loss)


def hosted_peak(global_config: PretrainedConfig, m: int, batch: torch.Tensor) -> int:
    """The measured training peak of the MoE with m routed experts per layer, on `batch`."""
    torch.manual_seed(0)
    return train_peak_bytes(AutoModelForCausalLM.from_config(hosted_config(global_config, m)).to(batch.device),
                            batch, moe_loss)


def fit_experts(global_config: PretrainedConfig, budget: int, batch: torch.Tensor) -> tuple[int, int]:
    """(m, peak): the most routed experts per layer whose training step fits `budget` (binary search: the
    peak grows with m). Never fewer than the router's top-k, or routing breaks; the peak says if it fits."""
    def peak(m: int) -> int:
        return hosted_peak(global_config, m, batch)

    lo, hi = global_config.num_experts_per_tok, routed_experts(global_config)
    peaks = {lo: peak(lo)}
    if peaks[lo] > budget:
        return lo, peaks[lo]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        peaks[mid] = peak(mid)
        lo, hi = (mid, hi) if peaks[mid] <= budget else (lo, mid - 1)
    return lo, peaks[lo]


def fit_host(host: Host, vocab_size: int, batch: torch.Tensor) -> None:
    """expert-subset, once per host (either engine): its memory budget and the most routed experts per layer
    whose training step on `batch` fits it, measured."""
    host.budget_bytes = memory_budget(host.cfg, vocab_size, batch.shape[1], host.torch_device)
    host.experts, host.peak_mem_bytes = fit_experts(host.global_config, host.budget_bytes, batch)


def fedjets_experts(global_config: PretrainedConfig, wanted: int) -> int:
    """FedJETS' m: `wanted` (server.fedjets_experts) routed experts per layer, 0 the router's top-k; the
    router needs at least top-k of them and the MoE has no more than its own."""
    top_k, total = global_config.num_experts_per_tok, routed_experts(global_config)
    m = wanted or top_k
    if not top_k <= m <= total:
        config_fail("server", "fedjets_experts", wanted, f"this MoE routes to {top_k} of {total} experts: "
                    f"allowed 0 (= {top_k}) or {top_k}..{total}")
    return m


def fix_host(host: Host, server: ServerConfig, vocab_size: int, batch: torch.Tensor) -> None:
    """fedjets, once per host (either engine): m fixed by the server, and the training peak that m needs,
    measured; its own budget is only recorded (FedJETS does not fit the model to the device)."""
    host.budget_bytes = memory_budget(host.cfg, vocab_size, batch.shape[1], host.torch_device)
    host.experts = fedjets_experts(host.global_config, server.fedjets_experts)
    host.peak_mem_bytes = hosted_peak(host.global_config, host.experts, batch)


def measure_host(host: Host, method: str, server: ServerConfig, vocab_size: int, batch: torch.Tensor) -> None:
    """What a subset host holds and what that costs it: expert-subset fits m to its memory, fedjets fixes m."""
    if method == "fedjets":
        fix_host(host, server, vocab_size, batch)
    else:
        fit_host(host, vocab_size, batch)


def host_round(host: Host, down: bytes) -> bytes:
    """One device round: rebuild the hosted MoE from the server's weights, train it, send it back. A usage
    probe (fedjets, settings["probe"]) only routes the round's blocks through it and sends back the usage;
    its `tokens` are the tokens routed, none trained."""
    sent = WeightsPacket.from_bytes(down)
    probes = {int(k[len(_PROBE):]): v for k, v in sent.tensors.items() if k.startswith(_PROBE)}
    experts = len(next(iter(sent.hosted.values()))) if sent.hosted else None
    model = AutoModelForCausalLM.from_config(hosted_config(host.global_config, experts))
    model.load_state_dict({k: v for k, v in sent.tensors.items() if not k.startswith(_PROBE)})
    model.to(host.torch_device).train()
    usage = {layer: torch.zeros(len(router)) for layer, router in probes.items()}
    hooks = [model.model.layers[layer].mlp.gate.register_forward_hook(_count_usage(router, usage[layer]))
             for layer, router in probes.items()]
    if sent.settings.get("probe"):  # the weights go back unchanged: only the usage is news
        tokens, tensors = _route(host, model, sent.settings), {}
    else:
        tokens, tensors = _train(host, model, sent.settings), model.state_dict()
        host.tokens_trained += tokens
    for hook in hooks:
        hook.remove()
    tensors = {**tensors, **{f"{_USAGE}{layer}": counts for layer, counts in usage.items()}}
    return WeightsPacket(sent.device_id, sent.round, tensors, tokens, sent.hosted).to_bytes()


def _blocks(host: Host, settings: dict):
    """The round's private batches, drawn by the host's own generator: (steps) x (batch_size, T)."""
    for _ in range(int(settings["steps"])):
        idx = torch.randint(len(host.private), (int(settings["batch_size"]),), generator=host.generator)
        yield host.private[idx].to(host.torch_device)


def _train(host: Host, model: PreTrainedModel, settings: dict) -> int:
    """The round's local training (CE + router loss, AdamW); returns the tokens trained."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01)
    tokens = 0
    for blocks in _blocks(host, settings):
        with autocast(host.torch_device):
            loss = moe_loss(model, blocks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += blocks.numel()
    return tokens


@torch.no_grad()
def _route(host: Host, model: PreTrainedModel, settings: dict) -> int:
    """A usage probe: the round's blocks through the model, no training (the router hooks count); tokens routed."""
    tokens = 0
    for blocks in _blocks(host, settings):
        with autocast(host.torch_device):
            model(input_ids=blocks)
        tokens += blocks.numel()
    return tokens


def _count_usage(router: torch.Tensor, counts: torch.Tensor):
    """A router hook: which of *all* experts (router (E, d)) each token would pick, hosted or not."""
    def hook(module, inputs, output):
        with torch.no_grad():
            hidden = inputs[0].reshape(-1, router.shape[1]).float()  # (N, d)
            picks = (hidden @ router.to(hidden.device).T).topk(module.top_k, dim=-1).indices  # (N, k)
            counts.add_(torch.bincount(picks.flatten().cpu(), minlength=len(counts)).float())

    return hook


# ---- the server side ----------------------------------------------------------------------------

@dataclass
class HostInfo:
    """What the server knows of a host: how many experts it holds and its last router usage."""

    experts: int | None  # None: the whole model
    usage: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (E,) counts from its last upload
    offset: int = 0  # where its first round's experts start, so first rounds spread over all experts


def choose_experts(info: HostInfo, layers: list[int], num_experts: int) -> dict[int, list[int]] | None:
    """Per MoE layer, the experts this host holds: those its router used most last round; in its first
    round (no usage yet) a contiguous run starting at its offset, so the devices cover every expert."""
    if info.experts is None:
        return None
    m = info.experts
    if not info.usage:
        return {layer: sorted((info.offset * m + j) % num_experts for j in range(m)) for layer in layers}
    return {layer: sorted(info.usage[layer].topk(m).indices.tolist()) for layer in layers}


def offer(model: PreTrainedModel, device_id: str, info: HostInfo, round: int, settings: dict) -> WeightsPacket:
    """The round's down message: the hosted slice of the global weights, plus full routers to count usage."""
    layers = moe_layers(model)
    hosted = choose_experts(info, layers, routed_experts(model.config))
    tensors = {}
    for name, t in model.state_dict().items():
        layer = routed_layer(name)
        if hosted is not None and layer is not None:
            if name.endswith("gate.weight"):
                tensors[f"{_PROBE}{layer}"] = t
            t = t[hosted[layer]]
        tensors[name] = t
    return WeightsPacket(device_id, round, tensors, 0, hosted, settings)


def expected_upload(sent: WeightsPacket) -> dict[str, torch.Size]:
    """The tensors a correct answer to `sent` carries: the hosted weights (unless it is a usage probe), and
    usage counts if probed."""
    shapes = {}
    for name, t in sent.tensors.items():
        if name.startswith(_PROBE):
            shapes[f"{_USAGE}{name[len(_PROBE):]}"] = torch.Size([t.shape[0]])
        elif not sent.settings.get("probe"):
            shapes[name] = t.shape
    return shapes


def probe_first(method: str, model: PreTrainedModel, infos: dict[str, HostInfo], r: int, settings: dict,
                exchange: Callable[[dict[str, WeightsPacket]], dict[str, bytes]]) -> list[str]:
    """fedjets: the gate on each client's data before its first round. Every host without router usage yet
    gets this round's offer as a usage probe (`exchange`: the engine's, down and up as bytes, counted); its
    answer, checked as any upload, becomes the usage that picks its experts. Returns the devices probed; one
    whose probe failed gets a first round's spread experts (usage from its first upload on)."""
    probes = {d: offer(model, d, info, r, {**settings, "probe": 1}) for d, info in infos.items()
              if method == "fedjets" and info.experts is not None and not info.usage}
    if probes:
        note_usage(infos, receive(exchange(probes), probes, r)[0])
    return list(probes)


def receive(payloads: dict[str, bytes], sent: dict[str, WeightsPacket],
            round: int) -> tuple[dict[str, WeightsPacket], dict[str, str]]:
    """Parse and validate every upload against what was sent; returns (accepted, {device: reason})."""
    accepted, rejected = {}, {}
    for device_id, payload in payloads.items():
        try:
            packet = WeightsPacket.from_bytes(payload)
            validate_upload(packet, sent[device_id], expected_upload(sent[device_id]))
        except PacketError as e:
            rejected[device_id] = str(e)
            log.warning("[ROUND %d] rejected weights of device %r: %s; the round goes on without it", round, device_id, e)
            continue
        accepted[device_id] = packet
    return accepted, rejected


@torch.no_grad()
def average(model: PreTrainedModel, uploads: dict[str, WeightsPacket]) -> None:
    """FedAvg, weighted by tokens trained: each routed expert over the hosts that held it, the rest over all.
    An expert nobody held this round keeps its weights."""
    state = model.state_dict()
    total = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in state.items()}
    weight = {name: torch.zeros(t.shape[0] if routed_layer(name) is not None else 1) for name, t in state.items()}
    for packet in uploads.values():
        w = float(packet.tokens)
        for name, t in packet.tensors.items():
            if name.startswith(_USAGE):
                continue
            layer = routed_layer(name)
            rows = torch.tensor(packet.hosted[layer]) if packet.hosted is not None and layer is not None else slice(None)
            total[name][rows] += w * t
            weight[name][rows] += w
    for name, t in state.items():
        w = weight[name].view(-1, *([1] * (t.dim() - 1)))  # (E, 1, ..) routed, (1, ..) shared
        t.copy_(torch.where(w > 0, total[name] / w.clamp_min(1e-12), t.float()).to(t.dtype))


def note_usage(infos: dict[str, HostInfo], uploads: dict[str, WeightsPacket]) -> None:
    """Remember each subset host's router usage: next round it gets the experts its data wants."""
    for device_id, packet in uploads.items():
        counts = {int(k[len(_USAGE):]): v for k, v in packet.tensors.items() if k.startswith(_USAGE)}
        if counts:
            infos[device_id].usage = counts


def hosted_share(model: PreTrainedModel, info: HostInfo) -> float:
    """The share of the global model's parameters a host holds (1.0 for fedavg-moe)."""
    if info.experts is None:
        return 1.0
    total = hosted = 0
    for name, p in model.named_parameters():
        total += p.numel()
        hosted += p.numel() * info.experts // p.shape[0] if routed_layer(name) is not None else p.numel()
    return hosted / total


def steps_per_host(cfg: ServerConfig, hosts: int) -> int:
    """Local steps of each host this round: server.host_steps if set, else the round's server.steps split
    evenly over its hosts (at least one each), so the global model trains on the matched token budget."""
    return cfg.host_steps or max(1, math.ceil(cfg.steps / max(hosts, 1)))


def round_settings(cfg: ServerConfig, hosts: int) -> dict:
    """Each host's local training this round: the server's step budget split over every configured host."""
    return {"steps": steps_per_host(cfg, hosts), "batch_size": cfg.batch_size, "lr": cfg.lr}


def conclude(model: PreTrainedModel, infos: dict[str, HostInfo], uploads: dict[str, WeightsPacket],
             rejected: dict[str, str], sent: dict[str, WeightsPacket], r: int, min_devices: int,
             fedavg: Callable[[PreTrainedModel, dict[str, WeightsPacket]], bool] | None = None) -> dict:
    """The server's side of a hosting round once every upload is checked, on either engine: FedAvg (`fedavg`,
    False if it refused; else `average`), then each host's router usage noted. Below min_devices valid uploads
    the round is skipped and the model untouched."""
    result = {"accepted": sorted(uploads), "rejected": rejected,
              "hosted": {d: sent[d].hosted for d in uploads if sent[d].hosted is not None}}
    if len(uploads) < min_devices:
        log.warning("[ROUND %d] expected at least %d valid uploads (server.min_devices), got %d: averaging skipped "
                    "this round", r, min_devices, len(uploads))
        return {**result, "skipped": True}
    if (fedavg or average)(model, uploads) is False:  # Flower's FedAvg may refuse the replies
        return {**result, "skipped": True}
    note_usage(infos, uploads)
    return result
