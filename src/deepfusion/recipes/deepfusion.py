"""DeepFusion as the paper builds it (arXiv 2602.14301v1, §IV): one upload per device, then three server phases.

    Phase 0   devices   train their own LLM until local validation stops improving, upload it once
                        with e_n, a data embedding of tens of bytes (ondevice.py, wire/upload.py)      §IV-A
    Phase I   server    cosine similarity of the e_n (Eq. 6), KMeans into K domains, same-type
                        models averaged into each domain's proxy models (clustering.py)                §IV-B
    Phase II  server    per domain, a copy of the MoE's dense base distils its proxy models on the
                        public data: L = CE + α Σ_j MSE(F_j^T, VAA(F^S)_j) + β KL (crosskd.py, vaa.py) §IV-C
    Phase III server    the K students fused into the MoE's experts (Eqs. 12-13, upcycling.py), the
                        router set from the domains, then tuned with the experts frozen (tuning.py)    §IV-D

The engine only moves bytes: `send(messages)` delivers each device its Task and returns the replies that
arrived (and why the others did not). Every phase boundary, and every distilled domain inside Phase II,
is checkpointed under out/checkpoint/ (PhaseState): a killed run resumed with --resume redoes none of it
and ends with the same weights as an unbroken run (each domain's distillation has its own seed).

The paper's ablations run this same recipe with one part changed (VARIANTS): no VAA (α = 0), logits only
(β KL alone), no clustering (devices dealt to K domains at random), and OFA-KD in VAA's place. The FedMKT
baseline (`fedmkt`, baselines/fedmkt.py) shares Phase 0 and then runs its own server side instead of Phases I-III.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch

from deepfusion import clustering, crosskd, embedding, lora, upcycling
from deepfusion.checkpoints import dense_base_model, device_model
from deepfusion.config import FederationConfig, to_dict
from deepfusion.errors import DataError
from deepfusion.evaluation import evaluate, lm_metrics
from deepfusion.federation import FederationData, public_blocks
from deepfusion.models import export_model, n_params, server_moe_config
from deepfusion.outputs import rewrite_metrics, summary, write_json_atomic
from deepfusion.progress import RunProgress
from deepfusion.tuning import teacher_targets, tune
from deepfusion.wire.upload import Task, UploadError, read_tokenizer, receive_upload

log = logging.getLogger("deepfusion")

BASIS_TEXTS = 128  # public blocks the PCA basis of e_n is fit on: ~15 s of MiniLM on this CPU, ample for 32 axes
Send = Callable[[dict[str, bytes]], tuple[dict[str, bytes], dict[str, str]]]

# method -> the changes it makes to the paper's pipeline (config sections and keys)
VARIANTS: dict[str, dict[str, dict]] = {
    "deepfusion": {},
    "deepfusion-no-vaa": {"distill": {"features": "none"}},  # α = 0: CE + β KL
    "deepfusion-logits-only": {"distill": {"features": "none", "ce": False}},  # β KL alone
    "deepfusion-no-clustering": {"clustering": {"method": "random"}},
    "ofa-kd": {"distill": {"features": "ofa"}},  # OFA-KD's stage branches in VAA's place
}


def variant(cfg: FederationConfig) -> FederationConfig:
    """The config this method actually runs (summary.json records it), validated as a whole."""
    sections = {section: dataclasses.replace(getattr(cfg, section), **changes)
                for section, changes in VARIANTS.get(cfg.method, {}).items()}  # fedmkt: its own server side
    return dataclasses.replace(cfg, **sections)


def run(cfg: FederationConfig, out_dir: Path, data: FederationData, send: Send, torch_device: torch.device,
        resume: bool = False, progress: RunProgress | None = None, engine: str = "local") -> dict:
    start, asked, cfg = time.perf_counter(), cfg, variant(cfg)
    shown = progress or RunProgress(out_dir, live=False)  # a line per device, phase, domain, tuning check
    state = PhaseState(out_dir / "checkpoint", resume, asked, engine)
    moe_config = server_moe_config(cfg.server, len(data.tokenizer))  # [server] pretrained: any MOE_LAYOUTS class
    K = cfg.clustering.domains or upcycling.num_domains(moe_config)

    # ---- Phase 0: one task down, one upload up, per device ------------------------------------------
    if not state.done("phase0"):
        t = time.perf_counter()
        shown.stage("PHASE 0", "Phase 0: device", len(cfg.devices))  # the engine's send counts the devices
        basis = embedding.fit_basis(embedding.load_encoder(), data.tokenizer.batch_decode(data.proxy),
                                    cfg.clustering.embed_dim, max_texts=BASIS_TEXTS, seed=cfg.data.seed)
        tasks = {d.id: Task(d.id, basis.to_bytes()).to_bytes() for d in cfg.devices}
        replies, failed = send(tasks)
        shown.update(len(cfg.devices))
        state.save_phase0(tasks, replies, failed, basis.dim, time.perf_counter() - t)
        state.mark("Phase 0 (every upload received)")
    uploads, configs, ledger = receive(cfg, data, state, torch_device)
    records = [{"phase": "0", "device": d, "arch": u.arch, "curve": u.info.get("curve", [])} for d, u in sorted(uploads.items())]
    if cfg.method == "fedmkt":  # the same Phase 0, then FedMKT's MinCE logit distillation in place of Phases I-III
        from deepfusion.baselines import fedmkt
        return fedmkt.run(cfg, out_dir, data, uploads, configs, ledger, records, moe_config, K, torch_device, shown,
                          start, state.read("phase0")["seconds"])
    if len(uploads) < max(K, cfg.server.min_devices):
        raise DataError(f"{len(uploads)} valid uploads, but {K} domains need at least {K} devices (and "
                        f"server.min_devices = {cfg.server.min_devices}); see the rejected uploads above; lower "
                        "[clustering] domains or bring more devices")

    # ---- Phase I: cluster the devices into K knowledge domains ---------------------------------------
    shown.stage("PHASE I", "Phase I: clustering", 1)
    ids = sorted(uploads)
    E = torch.stack([embedding.decode_embedding(uploads[d].embedding) for d in ids])  # (N, dim)
    labels = clustering.cluster(E, K, cfg.clustering.method, cfg.seed)
    sources = [data.device_source[d] for d in ids]
    phase1 = {"devices": ids, "domain": labels, "sources": sources, "ari": round(clustering.recovery(labels, sources), 4),
              "similarity": [[round(float(x), 3) for x in row] for row in clustering.similarity(E)]}
    records.append({"phase": "I", **phase1})
    rewrite_metrics(out_dir, records)
    log.info("[PHASE I] %d devices into %d domains (adjusted Rand index vs their sources: %.3f): %s", len(ids), K,
             phase1["ari"], {k: [ids[i] for i in range(len(ids)) if labels[i] == k] for k in range(K)})
    shown.update(1)
    teachers = proxy_models(clustering.proxy_groups(labels, [uploads[d].arch for d in ids]), ids, uploads, configs)
    tokens = teacher_tokens(teachers, data, moe_config.get_text_config().vocab_size)  # own tokenizers, aligned once

    # ---- Phase II: per domain, the dense base distils its proxy models --------------------------------
    base = dense_base(cfg, data, moe_config, torch_device)
    students = []
    shown.stage("PHASE II", "Phase II: domain", K, done=sum(state.done(f"student{i}") for i in range(K)))
    for i in range(K):
        if not state.done(f"student{i}"):
            t = time.perf_counter()
            student = base_copy(base)
            torch.manual_seed(cfg.seed * 7919 + i)  # VAA's init: each domain's own seed, so resume is exact
            curve = crosskd.distill_domain(student, [m for _, m, _ in teachers[i]], data.proxy, cfg.distill,
                                           torch.Generator().manual_seed(cfg.seed * 7919 + i), torch_device,
                                           [tokens[n] for n, _, _ in teachers[i]])
            state.save_student(i, student, {"curve": curve, "teachers": [n for n, _, _ in teachers[i]],
                                            "seconds": round(time.perf_counter() - t, 2)})
            state.mark(f"Phase II, domain {i + 1} of {K} distilled")
            log.info("[PHASE II] domain %d/%d distilled from %s", i + 1, K, [n for n, _, _ in teachers[i]])
        students.append(state.student(i))
        records.append({"phase": "II", "domain": i, **state.read(f"student{i}")})
        rewrite_metrics(out_dir, records)
        shown.update(i + 1)

    # ---- Phase III: fuse the students into the MoE's experts, set the router, tune ----------------------
    t = time.perf_counter()
    moe = upcycling.fuse(moe_config, students, cfg.tune.shared).to(torch_device)
    flat = [(i, m.to(torch_device)) for i in range(K) for _, m, _ in teachers[i]]
    targets = teacher_targets(flat, data.proxy, K, cfg.tune.topk, torch_device,
                              tokens=[tokens[n] for i in range(K) for n, _, _ in teachers[i]])
    if cfg.tune.router_init == "domains":
        routing = upcycling.init_router(moe, data.proxy, targets.block_domain)
    else:
        upcycling.random_router(moe, torch.Generator().manual_seed(cfg.seed))
        routing = upcycling.routing_accuracy(moe, data.proxy, targets.block_domain)
    fused = evaluate(moe, data.test_sets, torch_device)
    shown.stage("PHASE III", "Phase III: tuning step", cfg.tune.steps)
    tuned = tune(moe, data.proxy, data.validation, targets, cfg.tune, torch.Generator().manual_seed(cfg.seed),
                 torch_device, on_step=lambda step: shown.update(step, line=step % cfg.tune.eval_every == 0))
    seconds = {"phase0": state.read("phase0")["seconds"],
               "phase2": round(sum(r["seconds"] for r in records if r["phase"] == "II"), 2),
               "phase3": round(time.perf_counter() - t, 2)}
    records.append({"phase": "III", "routing": routing, "fused_ppl": fused["ppl"], "tuning": tuned})
    rewrite_metrics(out_dir, records)

    # ---- evaluate and export ------------------------------------------------------------------------
    metrics = lm_metrics(moe, data.test_sets, data.qa_sets, torch_device)
    export_model(moe, data.tokenizer, out_dir / "model")
    extra = {"global_params": n_params(moe), "vocab_size": len(data.tokenizer), "domains": K,
             "clustering": {k: phase1[k] for k in ("devices", "domain", "sources", "ari")},
             "routing": routing, "fused_ppl": fused["ppl"], "tuning": {k: v for k, v in tuned.items() if k != "curve"},
             "validation_ppl": evaluate(moe, data.validation, torch_device)["ppl"], "phase_seconds": seconds,
             "devices": device_reports(cfg, data, uploads, configs, ledger, torch_device),
             **{k: metrics[k] for k in metrics if k not in ("ppl", "ppl_by_source")}}
    peaks = {d: u.info.get("peak_mem_bytes", 0) for d, u in uploads.items()}
    result = summary(cfg, metrics, ledger, peaks, time.perf_counter() - start, extra)
    result["rounds"] = 1
    write_json_atomic(out_dir / "summary.json", result)
    return result


# ---- receiving the uploads --------------------------------------------------------------------------

def receive(cfg: FederationConfig, data: FederationData, state: PhaseState,
            torch_device: torch.device = torch.device("cpu")) -> tuple[dict, dict, dict]:
    """Check every upload (wire/upload.py); a bad one is left out with one logged reason, the rest go on.
    A LoRA adapter upload comes back merged onto the server's public base (with_base), so every later phase
    sees whole models. Returns (accepted uploads, their architectures, the byte ledger: Σ|m_n| as received
    and e_n's share of it)."""
    phase0 = state.read("phase0")
    uploads, configs, rejected, bases = {}, {}, {}, {}
    for device in phase0["replied"]:
        try:
            uploads[device], configs[device] = receive_upload(
                state.upload_bytes(device), device, devices={d.id for d in cfg.devices},
                vocab_size=len(data.tokenizer), embedding_bytes=phase0["embedding_bytes"])
            if lora.is_adapter(uploads[device].info):
                uploads[device] = with_base(cfg, data, uploads[device], bases, torch_device)
        except UploadError as e:
            uploads.pop(device, None)  # an adapter that failed to merge was parsed already
            configs.pop(device, None)
            rejected[device] = str(e)
            log.warning("[PHASE 0] rejected the upload of device %r: %s; the federation goes on without it", device, e)
    for device, why in phase0["failed"].items():
        log.warning("[PHASE 0] device %r sent nothing (%s); the federation goes on without it", device, why)
    per_device = {d: {"down": phase0["down"][d], "up": phase0["up"].get(d, 0),
                      **({"rejected": rejected[d]} if d in rejected else {}),
                      **({"failed": phase0["failed"][d]} if d in phase0["failed"] else {})} for d in phase0["down"]}
    ledger = {"up": sum(v["up"] for v in per_device.values()), "down": sum(v["down"] for v in per_device.values()),
              "embedding_bytes": phase0["embedding_bytes"] * len(phase0["replied"]), "per_device": per_device}
    return uploads, configs, ledger


def with_base(cfg: FederationConfig, data: FederationData, upload, bases: dict, torch_device: torch.device):
    """An adapter upload merged onto the server's own copy of the device type's public checkpoint (built from
    the public text like the device's, cached; `bases` keeps one per type for this call). UploadError if the
    base is not the one the adapter was trained on, or the adapter does not load onto it."""
    from copy import deepcopy

    dc = next(d for d in cfg.devices if d.id == upload.device_id)
    if (dc.family, dc.size) not in bases:
        bases[dc.family, dc.size] = device_model(dc.family, dc.size, len(data.tokenizer), data.proxy, cfg.pretrain,
                                                 torch_device=torch_device).cpu()
    try:
        return lora.merge_upload(upload, deepcopy(bases[dc.family, dc.size]))
    except ValueError as e:
        raise UploadError(f"LoRA adapter upload: {e}") from None


def proxy_models(groups: dict[int, dict[str, list[int]]], ids: list[str], uploads: dict, configs: dict) -> dict:
    """Fig. 4: per domain, one local-knowledge proxy model per device type, the mean of its devices' weights.
    Returns domain -> [(name, model, its own tokenizer or None)]: a domain with several types distils from each
    of them. Devices of one type share a tokenizer (the type's label includes it: ondevice.device_arch)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for domain, by_type in groups.items():
        out[domain] = []
        for arch, members in sorted(by_type.items()):
            states = [{k: v.float() for k, v in uploads[ids[m]].tensors.items()} for m in members]
            model = AutoModelForCausalLM.from_config(configs[ids[members[0]]])
            model.load_state_dict(clustering.average_state_dicts(states), strict=False)  # tied weights: listed once
            model.tie_weights()
            tok = uploads[ids[members[0]]].tokenizer
            out[domain].append((f"{arch} x{len(members)}", model.eval(), read_tokenizer(tok) if tok else None))
    return out


def teacher_tokens(teachers: dict, data: FederationData, global_size: int) -> dict:
    """name -> crosskd.TeacherTokens for every proxy model with its own tokenizer (None for the rest): the public
    blocks cut by its tokenizer and aligned with the global cut, once, for Phases II and III."""
    return {n: crosskd.TeacherTokens.build(m, tok, data.tokenizer, data.proxy, global_size) if tok is not None
            else None for group in teachers.values() for n, m, tok in group}


# ---- the dense base and its copies -------------------------------------------------------------------

def dense_base(cfg: FederationConfig, data: FederationData, moe_config, torch_device: torch.device):
    """The MoE's dense base: a local directory (server.dense_base), else pretrained on the public text (cached)."""
    return dense_base_model(moe_config, data.proxy, cfg.pretrain, cfg.server.dense_base, torch_device=torch_device,
                            name=f"dense base of {cfg.server.family}/{cfg.server.size}")


def base_copy(base):
    from copy import deepcopy

    return deepcopy(base)


def upload_model(upload, config):
    """A device's LLM rebuilt from its upload (weights in the upload dtype, tied weights listed once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict({k: v.float() for k, v in upload.tensors.items()}, strict=False)
    model.tie_weights()
    return model.eval()


# ---- reports ---------------------------------------------------------------------------------------------

def device_reports(cfg: FederationConfig, data: FederationData, uploads: dict, configs: dict, ledger: dict,
                   torch_device: torch.device) -> dict:
    """Per device: what it uploaded and how its own model does on its own source (the local-only reference)."""
    reports = {}
    for d, upload in sorted(uploads.items()):
        model = upload_model(upload, configs[d])
        source = data.device_source[d]  # its own source's test text: the local-only reference, at 1/S the cost
        # a full device's upload predates the finetune keys (its bytes stay as they were): its defaults here
        full = {"finetune": "full", "lora_rank": 0, "trainable_params": upload.info.get("params"), "upload": "merged"}
        domain, blocks = data.test_sets[source]
        if upload.tokenizer:  # its own tokenizer: the same test text, cut its way (a perplexity per its own token)
            blocks = public_blocks(data.tokenizer, read_tokenizer(upload.tokenizer), blocks)
        reports[d] = {"arch": upload.arch, "upload_bytes": ledger["per_device"][d]["up"], "source": source,
                      "ppl_own_source": evaluate(model.to(torch_device), {source: (domain, blocks)},
                                                 torch_device)["ppl_by_source"][source],
                      **({"tokenizer": "own", "tokenizer_bytes": len(upload.tokenizer)} if upload.tokenizer else {}),
                      **full, **{k: v for k, v in upload.info.items() if k != "curve"}}
    return reports


# ---- phase checkpoints -----------------------------------------------------------------------------------

class PhaseState:
    """out/checkpoint/: what finished phases left, written atomically, read back on --resume.

        progress.json       the config the run was started with, its engine, and what is saved so far (in words)
        phase0.json         bytes down/up per device, who replied, who failed and why
        uploads/<id>.bin    each reply exactly as received (validated again on resume: same verdicts)
        student<i>.json     domain i's distillation record; student<i>.safetensors its weights
        (out/metrics.jsonl is rewritten at every phase boundary: device curves, clusters, domains, tuning)
    """

    def __init__(self, root: Path, resume: bool, cfg: FederationConfig, engine: str = "local"):
        self.root, self.cfg, self.engine = root, cfg, engine
        (root / "uploads").mkdir(parents=True, exist_ok=True)
        if not resume:
            self.mark(None)

    def mark(self, saved: str | None) -> None:
        """progress.json: the run's config and engine (what --resume continues) and, in words, what is saved."""
        self.write("progress", {"config": to_dict(self.cfg), "engine": self.engine, "saved": saved})

    def done(self, name: str) -> bool:
        return (self.root / f"{name}.json").is_file()

    def read(self, name: str, default=None):
        path = self.root / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else default

    def write(self, name: str, obj) -> None:
        write_json_atomic(self.root / f"{name}.json", obj)

    def save_phase0(self, tasks: dict, replies: dict, failed: dict, dim: int, seconds: float) -> None:
        for device, blob in replies.items():
            tmp = self.root / "uploads" / f"{device}.bin.tmp"
            tmp.write_bytes(blob)
            tmp.replace(self.root / "uploads" / f"{device}.bin")
        self.write("phase0", {"down": {d: len(b) for d, b in tasks.items()}, "up": {d: len(b) for d, b in replies.items()},
                              "replied": sorted(replies), "failed": failed, "embedding_bytes": dim + 2,
                              "seconds": round(seconds, 2)})

    def upload_bytes(self, device: str) -> bytes:
        return (self.root / "uploads" / f"{device}.bin").read_bytes()

    def save_student(self, i: int, model, record: dict) -> None:
        tmp = self.root / f"student{i}.safetensors.tmp"
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        tmp.replace(self.root / f"student{i}.safetensors")
        self.write(f"student{i}", record)  # last: the record says the weights are complete

    def student(self, i: int) -> dict[str, torch.Tensor]:
        return safetensors.torch.load_file(self.root / f"student{i}.safetensors")
