"""FedMKT as a one-shot baseline (`fedmkt`): the devices' final-logit knowledge on the public data supervises the
global MoE directly, with no features, no clustering and no per-domain students.

FedMKT (Fan et al., COLING 2025, "FedMKT: Federated Mutual Knowledge Transfer for Large and Small Language
Models"): small client LMs and one large server LM run their models over a shared public set and exchange their
logits there. The server's knowledge fusion picks, per public sample, the client whose logits give the sample's
true tokens the minimum cross-entropy ("MinCE") as its teacher, and the server trains on CE(public tokens) +
KL(selected teacher ‖ server). Where vocabularies differ, tokens are first aligned by minimum edit distance
("MinED"); the server then distils back into the clients (LLM → SLM), round after round.

Here, after the paper pipeline's Phase 0 (recipes/deepfusion.py calls `run` right after the uploads are
received, so a recording of Phase 0 (replay.UploadReplay) feeds fedmkt the very device models that deepfusion
and its ablations distil):

    knowledge  each accepted device's model labels every public proxy block: its top-k ([knowledge] topk) next-
               token probabilities and tail mass, encoded by the device's own code (device.label_proxy, with its
               DP noise and its `attack` if configured) into the KnowledgePacket a FedMKT device would send,
               then parsed and validated back from those bytes. len(packet.to_bytes()) is that device's upload
               in comm_bytes (plus Phase 0's task down), not its model's bytes (summary `comm_note`).
               A device with its own tokenizer (its upload carries it) reads each block as its tokenizer cuts
               the text and answers in the global vocabulary through FedMKT's MinED map, at the positions its
               tokenisation aligns with the global one (device.label_proxy, alignment.py); its packet marks them.
    MinCE      per proxy block, the teacher is the device whose packet gives the block's real next tokens the
               lowest mean cross-entropy over the positions it aligns; a true token outside the top-k gets the
               tail mass spread evenly over the V - k ids outside it (server.truth_log_likelihood, as plain-fkd's
               reliability weights read it). Where the selected teacher does not align a position, its target
               is the true next token, one-hot (plain cross-entropy there).
    the MoE    upcycled from the public dense base, every expert a copy of the base's FFN (upcycling.fuse of K
               copies of the base: the MoE computes the dense base exactly); the router drawn at random
               (upcycling.random_router, seeded): there are no domains to route by, and identical experts need
               the router only to break their symmetry.
    training   every parameter, on the proxy blocks: CE + router load-balancing loss + λ KL(selected teacher ‖
               MoE) over top-k + tail (tuning.tune with train_experts; losses.topk_kl_shared), λ = [tune]
               kl_weight, lr and batch from [tune], for K·[distill] steps + [tune] steps, deepfusion's server
               budget; validation checks every eval_every steps keep the best weights and stop after `patience`
               checks without a better one, as deepfusion's tuning does.

What differs from FedMKT: one shot, not rounds, and only the SLM → LLM direction (the devices do not distil
back); MinED maps only the devices' vocabularies onto the global one (the global model's is fixed); the knowledge is
computed server-side from each device's Phase 0 upload, byte-identical to what the device would send (a FedMKT
device would never upload its model: the model stands in for the device so that Phase 0 is shared and
replayable); the server model is the global MoE, hence the router's load-balancing loss; packets are at
temperature 1, the temperature of the KL term. A resumed run redoes this part (Phase 0 is checkpointed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from deepfusion import upcycling
from deepfusion.config import FederationConfig
from deepfusion.device import Device, align_to_global, label_proxy, poison
from deepfusion.errors import DataError
from deepfusion.evaluation import evaluate, lm_metrics
from deepfusion.federation import FederationData, device_seed
from deepfusion.models import export_model, n_params
from deepfusion.outputs import rewrite_metrics, summary, write_json_atomic
from deepfusion.server import truth_log_likelihood, truth_targets
from deepfusion.tuning import TeacherTargets, tune
from deepfusion.wire import PacketError
from deepfusion.wire.knowledge import KnowledgePacket, aligned_mask, to_targets, validate_packet
from deepfusion.wire.upload import read_tokenizer

log = logging.getLogger("deepfusion")

ROUND = 1  # one shot: every packet belongs to the federation's only round
TEMPERATURE = 1.0  # tune's KL compares the MoE's plain distribution: the teachers' must be at T = 1 too
COMM_NOTE = ("fedmkt: up is each device's KnowledgePacket (top-k + tail on every proxy block), the bytes a FedMKT "
             "device sends; down is Phase 0's task. The server computed the packets from the device models received "
             "in Phase 0 (per_device model_upload: shared with deepfusion so one recording replays for both), "
             "which FedMKT itself would never send; on the flower engine, flower_comm_bytes counts the messages that "
             "carried those models.")


def run(cfg: FederationConfig, out_dir: Path, data: FederationData, uploads: dict, configs: dict, ledger: dict,
        records: list[dict], moe_config, K: int, torch_device: torch.device, shown, start: float,
        phase0_seconds: float) -> dict:
    """FedMKT's server side on the accepted Phase 0 uploads; writes model/ and summary.json like the recipe."""
    from deepfusion.recipes.deepfusion import dense_base, device_reports  # late: the recipe imports this module

    t = time.perf_counter()
    packets, sizes, rejected = device_knowledge(cfg, data, uploads, configs, torch_device, shown)
    if len(packets) < cfg.server.min_devices:
        raise DataError(f"{len(packets)} valid knowledge packets, but server.min_devices = {cfg.server.min_devices}; "
                        "see the rejected uploads above; bring more devices")
    ids = sorted(packets)
    teacher, targets = min_ce_targets([packets[d] for d in ids], data.proxy, len(data.tokenizer))
    chosen = {d: int((teacher == i).sum()) for i, d in enumerate(ids)}
    log.info("[FEDMKT] MinCE teachers of the %d proxy blocks: %s", len(teacher), chosen)
    knowledge_seconds = time.perf_counter() - t

    t = time.perf_counter()
    moe = upcycled_moe(cfg, moe_config, dense_base(cfg, data, moe_config, torch_device)).to(torch_device)
    fused = evaluate(moe, data.test_sets, torch_device)
    budget = replace(cfg.tune, steps=K * cfg.distill.steps + cfg.tune.steps, loss="keep")  # deepfusion's server steps
    shown.stage("FEDMKT", "FedMKT: server step", budget.steps)
    tuned = tune(moe, data.proxy, data.validation, targets, budget, torch.Generator().manual_seed(cfg.seed),
                 torch_device, on_step=lambda step: shown.update(step, line=step % budget.eval_every == 0),
                 train_experts=True)
    records.append({"phase": "FedMKT", "teachers": chosen, "packet_bytes": sizes, "fused_ppl": fused["ppl"],
                    "tuning": tuned})
    rewrite_metrics(out_dir, records)

    metrics = lm_metrics(moe, data.test_sets, data.qa_sets, torch_device)
    export_model(moe, data.tokenizer, out_dir / "model")
    comm = knowledge_comm(ledger, sizes, rejected)
    extra = {"global_params": n_params(moe), "vocab_size": len(data.tokenizer), "domains": K,
             "fedmkt": {"teachers": chosen, "topk": cfg.knowledge.topk, "temperature": TEMPERATURE,
                        "steps_budget": budget.steps},
             "fused_ppl": fused["ppl"], "tuning": {k: v for k, v in tuned.items() if k != "curve"},
             "validation_ppl": evaluate(moe, data.validation, torch_device)["ppl"],
             "phase_seconds": {"phase0": phase0_seconds, "knowledge": round(knowledge_seconds, 2),
                               "server": round(time.perf_counter() - t, 2)},
             "devices": device_reports(cfg, data, uploads, configs, comm, torch_device), "comm_note": COMM_NOTE,
             **{k: metrics[k] for k in metrics if k not in ("ppl", "ppl_by_source")}}
    peaks = {d: u.info.get("peak_mem_bytes", 0) for d, u in uploads.items()}
    result = summary(cfg, metrics, comm, peaks, time.perf_counter() - start, extra)
    result["rounds"] = 1
    write_json_atomic(out_dir / "summary.json", result)
    return result


# ---- the devices' knowledge ---------------------------------------------------------------------------

def device_knowledge(cfg: FederationConfig, data: FederationData, uploads: dict, configs: dict,
                     torch_device: torch.device, shown) -> tuple[dict, dict, dict]:
    """Per accepted device, the packet it would send, as the server receives it. Returns (packets, their sizes
    in bytes, {device: why its packet was rejected})."""
    packets, sizes, rejected = {}, {}, {}
    shown.stage("FEDMKT", "FedMKT: device knowledge", len(uploads))
    for n, d in enumerate(sorted(uploads)):
        blob = knowledge_packet(cfg, data, d, uploads[d], configs[d], torch_device)
        sizes[d] = len(blob)
        try:
            packets[d] = receive_packet(cfg, data, d, blob)
        except PacketError as e:
            rejected[d] = str(e)
            log.warning("[FEDMKT] rejected the knowledge of device %r: %s; the federation goes on without it", d, e)
        shown.update(n + 1)
    return packets, sizes, rejected


def knowledge_packet(cfg: FederationConfig, data: FederationData, device_id: str, upload, config,
                     torch_device: torch.device) -> bytes:
    """What a FedMKT device sends: its model's top-k knowledge on every proxy block, as the packet's bytes.
    The device's own labelling code runs on its uploaded model (no optimiser: it trains no more)."""
    from deepfusion.recipes.deepfusion import upload_model  # late: the recipe imports this module

    dc = next(d for d in cfg.devices if d.id == device_id)
    model = upload_model(upload, config).to(torch_device)
    own = align_to_global(model, data.proxy, data.tokenizer, read_tokenizer(upload.tokenizer)) if upload.tokenizer \
        else None
    device = Device(dc, upload.arch, model, None, torch.empty(0, data.proxy.shape[1], dtype=torch.long), data.proxy,
                    torch.Generator().manual_seed(device_seed(cfg, device_id)), torch_device,
                    tokens_trained=int(upload.info.get("tokens_trained", 0)), own=own)
    packet = label_proxy(device, list(range(len(data.proxy))), cfg.knowledge.topk, TEMPERATURE, ROUND,
                         float(upload.info.get("val_loss", 0.0)))
    if dc.attack:  # an adversarial device poisons its packet, as in the knowledge protocol's run_round
        packet = poison(packet, dc.attack, device.generator)
    return packet.to_bytes()


def receive_packet(cfg: FederationConfig, data: FederationData, device_id: str, blob: bytes) -> KnowledgePacket:
    """The packet as the server reads it: parsed from its bytes and validated like any knowledge upload."""
    packet = KnowledgePacket.from_bytes(blob)
    P, T = data.proxy.shape
    validate_packet(packet, round=ROUND, known_devices={device_id}, n_positions=P * (T - 1),
                    vocab_size=len(data.tokenizer), topk=cfg.knowledge.topk)
    return packet


# ---- MinCE fusion ---------------------------------------------------------------------------------------

def min_ce_targets(packets: list[KnowledgePacket], proxy: torch.Tensor, vocab_size: int
                   ) -> tuple[torch.Tensor, TeacherTargets]:
    """(teacher (P,), the selected teachers' top-k + tail per block): each block's MinCE teacher's knowledge."""
    P, T = proxy.shape
    parts = [to_targets(p) for p in packets]  # (ids (N, k), probs (N, k), tail (N,)), N = P*(T-1)
    ids = torch.stack([i.view(P, T - 1, -1) for i, _, _ in parts])  # (M, P, T-1, k)
    probs = torch.stack([p.view(P, T - 1, -1) for _, p, _ in parts])  # (M, P, T-1, k)
    tail = torch.stack([t.view(P, T - 1) for _, _, t in parts])  # (M, P, T-1)
    if all(p.aligned is None for p in packets):
        teacher = min_ce(ids, probs, tail, proxy, vocab_size)
        return teacher, select(ids, probs, tail, teacher)
    aligned = torch.stack([aligned_mask(p).view(P, T - 1) for p in packets])  # (M, P, T-1)
    teacher = min_ce(ids, probs, tail, proxy, vocab_size, aligned)
    return teacher, truth_where_unaligned(select(ids, probs, tail, teacher), aligned, proxy, vocab_size)


def min_ce(ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor, proxy: torch.Tensor,
           vocab_size: int, aligned: torch.Tensor | None = None) -> torch.Tensor:
    """(P,) FedMKT's MinCE: per proxy block, the device whose distribution gives its true next tokens the lowest
    cross-entropy (a tie: the first device). ids, probs (M, P, T-1, k); tail (M, P, T-1); proxy (P, T);
    aligned (M, P, T-1) bool: each device's cross-entropy over the positions it aligns (a block it aligns
    nowhere: never its teacher, unless no device aligns it)."""
    return truth_log_likelihood(ids, probs, tail, proxy, vocab_size, aligned).argmax(0)  # max log-lik. = min CE


def select(ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor, teacher: torch.Tensor) -> TeacherTargets:
    """Block b's targets are device teacher[b]'s (block_domain holds the teacher: fedmkt has no domains)."""
    blocks = torch.arange(len(teacher))
    return TeacherTargets(ids[teacher, blocks], probs[teacher, blocks], tail[teacher, blocks], teacher)


def truth_where_unaligned(chosen: TeacherTargets, aligned: torch.Tensor, proxy: torch.Tensor,
                          vocab_size: int) -> TeacherTargets:
    """The selected teachers' targets, with the true next token (one-hot) where a teacher does not align."""
    off = ~aligned[chosen.block_domain, torch.arange(len(chosen.block_domain))]  # (P, T-1)
    ids, probs, tail = truth_targets(proxy[:, 1:], chosen.ids.shape[-1], vocab_size)
    row = off[..., None]
    return TeacherTargets(torch.where(row, ids, chosen.ids), torch.where(row, probs, chosen.probs),
                          torch.where(off, tail, chosen.tail), chosen.block_domain)


# ---- the global MoE and the bytes ---------------------------------------------------------------------

def upcycled_moe(cfg: FederationConfig, moe_config, base):
    """The MoE upcycled from the public dense base: every domain's experts a copy of its FFN, a random router."""
    torch.manual_seed(cfg.seed)  # what fuse leaves at init (the zero rule's shared gate/up) trains here: seed it
    moe = upcycling.fuse(moe_config, [base] * upcycling.num_domains(moe_config), cfg.tune.shared)
    upcycling.random_router(moe, torch.Generator().manual_seed(cfg.seed))
    return moe


def knowledge_comm(ledger: dict, sizes: dict[str, int], rejected: dict[str, str]) -> dict:
    """comm_bytes with each device's packet as its upload (its Phase 0 model kept beside it, as model_upload)."""
    per_device = {d: {**v, "up": sizes.get(d, 0), "model_upload": v["up"],
                      **({"rejected": rejected[d]} if d in rejected else {})} for d, v in ledger["per_device"].items()}
    return {"up": sum(v["up"] for v in per_device.values()), "down": sum(v["down"] for v in per_device.values()),
            "embedding_bytes": 0, "per_device": per_device}  # e_n is not part of a FedMKT upload
