"""The paper's Figs. 7-8 at its own model sizes: device peak memory against FedJETS, and total communication.

    result = project(out)          # writes out/paper_scale.json
    text = markdown(result)        # the two tables and one line per assumption

Each model is a config.json in configs/scale (sources in its README), built on PyTorch's meta device with its
real transformers class and stepped once by memory.step_memory (benchmarks/scale/project.measure), as the scale
projection does. The two cases (paper §V-A):
  medical  Qwen1.5-MoE-A2.7B  <- GPT-2, GPT-2 Medium, TinyLlama-1.1B   (dense base: Qwen1.5-1.8B)
  finance  DeepSeek-MoE-16B   <- TinyLlama-1.1B, OLMo-1B, BLOOM-1b1     (no dense parent: see DENSE_BASES)

Fig. 7: a device's training peak against a FedJETS device's, which trains a compact MoE pruned from the global
one: every non-expert parameter (embeddings, attention, norms, router, shared experts, dense layers, lm_head)
plus m = top-k routed experts per layer, built as the real class with that many experts.
Fig. 8: total bytes for N devices: DeepFusion's one upload per device (+ its task), FedJETS' R rounds of the
compact MoE down and up, FedMKT's R rounds of top-k knowledge up and down on the public set.

Read top to bottom: 1. the models and cases, 2. bytes per device, 3. the two figures, 4. markdown.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from deepfusion.benchmarks.scale import cards
from deepfusion.benchmarks.scale.cards import Card
from deepfusion.benchmarks.scale.project import Measured, measure, packet_bytes, safetensors_bytes
from deepfusion.benchmarks.scale.report import human_bytes, human_gib, human_params
from deepfusion.config import FederationConfig, load_config
from deepfusion.embedding import Basis
from deepfusion.wire import safetensors as st
from deepfusion.wire.upload import EMBEDDING, VERSION, Task

DEVICE_COUNTS = (16, 32, 64, 128)  # the paper's N
FEDJETS_ROUNDS = 10  # not stated in the paper for FedJETS; the tables also give bytes per round to rescale
FEDMKT_ROUNDS = 10  # likewise
PAPER_REDUCTION_PCT = {"medical": 71.0, "finance": 46.0}  # DeepFusion vs FedJETS, read off the paper's Fig. 8
PAPER_MEMORY_RATIO = (3.3, 9.3)  # FedJETS / device, the paper's Fig. 7 range

# -----------------------------------------------------------------------------
# 1. The models and cases

GPT2 = Card("gpt2", "GPT-2", 124e6, None, "model card openai-community/gpt2: 124M parameters")
GPT2_MEDIUM = Card("gpt2-medium", "GPT-2 Medium", 355e6, None, "model card openai-community/gpt2-medium: 355M parameters")
TINYLLAMA = Card("tinyllama-1.1b", "TinyLlama-1.1B", 1.1e9, None,
                 "model card TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T and arXiv 2401.02385: 1.1B")
OLMO = Card("olmo-1b", "OLMo-1B", 1.18e9, None,
            "Hub page allenai/OLMo-1B-hf: 1.18B params (the paper's 'OLMo-1.2B'; OLMo paper arXiv 2402.00838: 1B)")
BLOOM = Card("bloom-1b1", "BLOOM-1b1", 1_065_314_304, None, "model card bigscience/bloom-1b1: 1,065,314,304 parameters")
PAPER_DEVICE_MODELS = (GPT2, GPT2_MEDIUM, TINYLLAMA, OLMO, BLOOM)

# The dense model each MoE's experts would be upcycled from (DESIGN §2, Phase II's student).
QWEN_DENSE = Card("qwen1.5-1.8b", "Qwen1.5-1.8B", 1.84e9, None,
                  "Hub page Qwen/Qwen1.5-1.8B: 1.84B params (named 1.8B); Qwen1.5-MoE blog: upcycled from Qwen-1.8B")
# DeepSeek-MoE-16B was trained from scratch: no dense parent exists. Its stand-in keeps the MoE's embeddings
# and attention (so a student's trunk averages into the MoE) with one dense FFN of the MoE's activated width,
# (2 shared + 6 routed) x 1408 = 11264. Not DeepSeek-LLM-7B: its 4096-wide trunk cannot merge into the MoE's 2048.
DEEPSEEK_DENSE = Card("deepseek-moe-16b-dense-activated", "DeepSeek-MoE-16B dense (activated width)", 2.8e9, None,
                      "derived, no model card: compared with DeepSeek-MoE-16B's 2.8B activated (arXiv 2401.06066)")
DENSE_BASES = (QWEN_DENSE, DEEPSEEK_DENSE)


@dataclass(frozen=True)
class Case:
    name: str
    moe: Card
    devices: tuple[Card, ...]  # the three device types, drawn at random: N/3 of each in expectation
    dense_base: Card


CASES = (
    Case("medical", cards.GLOBAL_MODELS[0], (GPT2, GPT2_MEDIUM, TINYLLAMA), QWEN_DENSE),
    Case("finance", cards.GLOBAL_MODELS[1], (TINYLLAMA, OLMO, BLOOM), DEEPSEEK_DENSE),
)


def built_params(card: Card) -> int:
    """Parameters of a card built on meta with its own vocabulary (what its published figure counts)."""
    return cards.census(cards.build_on_meta(*cards.transformers_config(cards.read_config(card.name)))).total


# -----------------------------------------------------------------------------
# 2. Bytes per device


def upload_bytes(shapes: dict[str, tuple[int, ...]], config: dict, embedding_bytes: int,
                 dtype: torch.dtype = torch.float16, arch: str = "device/type", device_id: str = "device-00001") -> int:
    """len(Upload(...).to_bytes()) for weights of these shapes, computed without their data.

    The blob is wire/safetensors.write's: an 8-byte length, the header JSON with sorted keys (the tensors'
    dtype, shape and offsets, and the metadata Upload.to_bytes writes, its `info` left empty), padded with
    spaces to 8 bytes, then the data: the weights (sorted by name) before e_n's uint8 bytes, as safetensors
    orders by dtype, then name. Checked byte for byte against a real Upload in tests/benchmarks/test_paper_scale.py.
    """
    tensors = [(n, shapes[n], dtype) for n in sorted(shapes)] + [(EMBEDDING, (embedding_bytes,), torch.uint8)]
    header, offset = {}, 0
    for name, shape, dt in tensors:
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"data_offsets": [offset, offset + nbytes], "dtype": _DTYPE_NAMES[dt], "shape": list(shape)}
        offset += nbytes
    header["__metadata__"] = {"version": str(VERSION), "device_id": device_id, "arch": arch,
                              "config": st.to_str(config, "json"), "info": st.to_str({}, "json")}
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return 8 + len(text) + (-len(text) % 8) + offset


_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}


def task_bytes(cfg: FederationConfig) -> int:
    """The real Task a device receives: the public basis of embed_dim axes over MiniLM's 384-wide vectors."""
    basis = Basis(mean=torch.zeros(384), axes=torch.zeros(cfg.clustering.embed_dim, 384))
    return len(Task("device-00001", basis.to_bytes()).to_bytes())


def device_upload(card: Card, cfg: FederationConfig, vocab_size: int | None = None) -> int:
    """One device's upload of its trained LLM (own vocabulary, or the federation's) in fp16 with its e_n."""
    cls, config = cards.transformers_config(cards.read_config(card.name), vocab_size)
    shapes = cards.census(cards.build_on_meta(cls, config)).shapes
    return upload_bytes(shapes, config.to_dict(), cfg.clustering.embed_dim + 2, arch=card.name)


# -----------------------------------------------------------------------------
# 3. The two figures


def settings(cfg: FederationConfig, device_counts) -> dict:
    positions = cfg.data.proxy_blocks * (cfg.data.seq_len - 1)  # every public position with a next token
    return {"config": "configs/default.toml", "batch": cfg.devices[0].batch_size, "seq_len": cfg.data.seq_len,
            "embed_dim": cfg.clustering.embed_dim, "public_positions": positions, "topk": cfg.knowledge.topk,
            "fedjets_rounds": FEDJETS_ROUNDS, "fedmkt_rounds": FEDMKT_ROUNDS, "device_counts": list(device_counts)}


def memory_rows(case: Case, compact: Measured, moe_vocab: int, s: dict) -> list[dict]:
    """Fig. 7: each device type's training peak (own vocab, and the MoE's) against a FedJETS device's."""
    rows = []
    for card in case.devices:
        own, fed = (measure(card, s["batch"], s["seq_len"], v) for v in (None, moe_vocab))
        rows.append({"case": case.name, "device": card.title, "params": own.census.total,
                     "peak_bytes": own.memory.total, "peak_bytes_moe_vocab": fed.memory.total,
                     "fedjets_peak_bytes": compact.memory.total,
                     "ratio": compact.memory.total / own.memory.total,
                     "ratio_moe_vocab": compact.memory.total / fed.memory.total})
    return rows


def traffic_rows(case: Case, compact: Measured, moe_vocab: int, cfg: FederationConfig, s: dict) -> list[dict]:
    """Fig. 8: total bytes for each N, per method, with N/3 devices of each type (the expected mix)."""
    task = task_bytes(cfg)
    df = sum(device_upload(c, cfg) for c in case.devices) / 3 + task  # bytes per device, once
    df_fed = sum(device_upload(c, cfg, moe_vocab) for c in case.devices) / 3 + task
    fj_round = 2 * safetensors_bytes(compact.census.shapes, torch.float16)  # compact MoE down + up, fp16
    fj_round_fp32 = 2 * safetensors_bytes(compact.census.shapes, torch.float32)  # as WeightsPacket ships it
    # FedMKT: both directions over the device's own vocabulary (the server aligns the MoE's tokens to it)
    mkt_round = sum(2 * packet_bytes(s["public_positions"], s["topk"], _vocab(c)) for c in case.devices) / 3
    rows = []
    for n in s["device_counts"]:
        row = {"case": case.name, "N": n, "deepfusion": round(n * df), "deepfusion_moe_vocab": round(n * df_fed),
               "fedjets": FEDJETS_ROUNDS * n * fj_round, "fedjets_per_round": n * fj_round,
               "fedjets_fp32": FEDJETS_ROUNDS * n * fj_round_fp32,
               "fedmkt": round(FEDMKT_ROUNDS * n * mkt_round), "fedmkt_per_round": round(n * mkt_round)}
        row["reduction_vs_fedjets_pct"] = reduction_pct(row["deepfusion"], row["fedjets"])
        row["reduction_vs_fedjets_fp32_pct"] = reduction_pct(row["deepfusion"], row["fedjets_fp32"])
        # rounds of our compact MoE at which the paper's reduction would hold: R* = DF / ((1 - r) x per round)
        row["rounds_for_paper_reduction"] = row["deepfusion"] / ((1 - PAPER_REDUCTION_PCT[case.name] / 100) * n * fj_round)
        rows.append(row)
    return rows


def reduction_pct(deepfusion: float, other: float) -> float:
    """DeepFusion's saving against another method's total, in % (positive: DeepFusion moves less)."""
    return 100 * (1 - deepfusion / other)


def _vocab(card: Card) -> int:
    return cards.read_config(card.name)["vocab_size"]


def model_rows(case: Case, compact: Measured) -> list[dict]:
    """Built against published parameter counts, for every model a case uses."""
    rows = []
    for card in (case.moe, *case.devices, case.dense_base):
        built = built_params(card)
        rows.append({"case": case.name, "model": card.title, "config": f"configs/scale/{card.name}.json",
                     "params": built, "published": card.published_total, "source": card.source,
                     "diff_pct": round(100 * (built / card.published_total - 1), 2)})
    full = cards.census(cards.build_on_meta(*cards.transformers_config(cards.read_config(case.moe.name))))
    rows.append({"case": case.name, "model": f"FedJETS compact {case.moe.title} (m={full.top_k} of {full.num_experts})",
                 "config": f"configs/scale/{case.moe.name}.json with {full.top_k} routed experts per layer",
                 "params": compact.census.total, "published": None, "source": "built", "diff_pct": None,
                 "full_moe_params": full.total, "non_expert_params": full.non_expert})
    return rows


def project(out: Path, device_counts=DEVICE_COUNTS) -> dict:
    """Both cases: Fig. 7 memory rows, Fig. 8 traffic rows, the models; written to out/paper_scale.json."""
    cfg = load_config()  # the paper's recipe (configs/default.toml): batch, seq_len, e_n, public set
    s = settings(cfg, device_counts)
    result = {"settings": s, "models": [], "memory": [], "traffic": []}
    for case in CASES:
        top_k = cards.read_config(case.moe.name)["num_experts_per_tok"]
        compact = measure(case.moe, s["batch"], s["seq_len"], experts=top_k)  # the FedJETS device's MoE
        result["models"] += model_rows(case, compact)
        result["memory"] += memory_rows(case, compact, compact.vocab_size, s)
        result["traffic"] += traffic_rows(case, compact, compact.vocab_size, cfg, s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_scale.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


# -----------------------------------------------------------------------------
# 4. Markdown


def _table(header: list[str], lines: list[list[str]]) -> str:
    rule = "|" + "|".join("---" for _ in header) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(line) + " |" for line in lines])


def memory_table(result: dict) -> str:
    lines = [[r["case"], r["device"], human_params(r["params"]), human_gib(r["peak_bytes"]),
              human_gib(r["peak_bytes_moe_vocab"]), human_gib(r["fedjets_peak_bytes"]), f"{r['ratio']:.1f}x",
              f"{r['ratio_moe_vocab']:.1f}x"] for r in result["memory"]]
    return _table(["case", "device type", "params", "device peak", "device peak (MoE vocab)", "FedJETS device peak",
                   "FedJETS / device", "FedJETS / device (MoE vocab)"], lines)


def traffic_table(result: dict) -> str:
    s = result["settings"]
    lines = [[r["case"], str(r["N"]), human_bytes(r["deepfusion"]), human_bytes(r["deepfusion_moe_vocab"]),
              human_bytes(r["fedjets"]), human_bytes(r["fedjets_per_round"]), human_bytes(r["fedmkt"]),
              human_bytes(r["fedmkt_per_round"]), f"{-r['reduction_vs_fedjets_pct']:+.1f}%"]
             for r in result["traffic"]]
    return _table(["case", "N", "DeepFusion", "DeepFusion (MoE vocab)", f"FedJETS (R={s['fedjets_rounds']})",
                   "FedJETS per round", f"FedMKT (R={s['fedmkt_rounds']})", "FedMKT per round",
                   "DeepFusion vs FedJETS"], lines)


def assumptions(result: dict) -> list[str]:
    s = result["settings"]
    compact = [m for m in result["models"] if m["published"] is None]
    built = [m for m in result["models"] if m["published"] is not None]
    implied = {r["case"]: r["rounds_for_paper_reduction"] for r in result["traffic"]}
    fp32 = ", ".join(f"{c} {-_first(result, c)['reduction_vs_fedjets_fp32_pct']:+.1f}%" for c in implied)
    lines = [
        "Models: config.json files in configs/scale (sources in its README), built on PyTorch's meta device with "
        "their transformers class; built vs published: " + "; ".join(
            f"{m['model']} {human_params(m['params'])} ({m['diff_pct']:+.2f}%)" for m in _unique(built)) + ".",
        "FedJETS device: the global MoE as its real class with m = top-k routed experts per layer (all non-expert "
        "parameters, shared experts and routers kept): " + "; ".join(
            f"{m['model']} {human_params(m['params'])}, between the non-expert trunk {human_params(m['non_expert_params'])} "
            f"and the full MoE {human_params(m['full_moe_params'])}" for m in compact) + ".",
        f"Peak memory: one AdamW step (fp32 weights, gradients and both moments; activations saved for backward, "
        f"fused attention) at batch {s['batch']} x {s['seq_len']} tokens ({s['config']}), measured by "
        "memory.step_memory on meta; next-token cross-entropy only (FedJETS' router loss adds (tokens x m) tensors).",
        "Vocabulary: 'device peak' and 'DeepFusion' use each device LLM's own vocabulary (the paper's public "
        "checkpoints); '(MoE vocab)' rebuilds it with the global MoE's, as this project's federations do "
        "(uploads must match the federation's tokenizer).",
        f"DeepFusion: each device uploads once its weights in fp16 (the real Upload's safetensors length, info left "
        f"empty) and its {s['embed_dim'] + 2}-byte e_n, and receives one Task (the public basis, "
        f"{s['embed_dim']} x 384 fp16); device types drawn at random, so N/3 of each (expected bytes). Public "
        "checkpoints and the public set come from their public hosts and are not counted for any method.",
        f"FedJETS: R = {s['fedjets_rounds']} rounds (the paper does not state it) x N devices x (compact MoE down + "
        "up), fp16 safetensors; the project's WeightsPacket ships fp32, twice as many bytes "
        f"(DeepFusion vs FedJETS in fp32, N = {s['device_counts'][0]}: {fp32}). "
        "'per round' columns rescale to any R.",
        f"FedMKT: R = {s['fedmkt_rounds']} rounds x N x (a device's top-{s['topk']} knowledge up + the server's down), "
        f"each a real KnowledgePacket over {s['public_positions']:,} public positions ({s['config']}'s public set) in "
        "the device's own vocabulary (the server aligns the MoE's tokens to it).",
        "The paper's Fig. 8 reductions (" + ", ".join(f"{c} -{p:.0f}%" for c, p in PAPER_REDUCTION_PCT.items()) +
        ") would need FedJETS to run only " + ", ".join(f"{c} {r:.2f}" for c, r in implied.items()) +
        " rounds of this compact MoE: its FedJETS must ship far less per round than every non-expert parameter "
        "plus top-k experts.",
        f"The paper's Fig. 7 range is {PAPER_MEMORY_RATIO[0]}-{PAPER_MEMORY_RATIO[1]}x FedJETS / device.",
    ]
    return lines


def _unique(models: list[dict]) -> list[dict]:
    seen, out = set(), []
    for m in models:  # TinyLlama appears in both cases
        if m["model"] not in seen:
            seen.add(m["model"])
            out.append(m)
    return out


def _first(result: dict, case: str) -> dict:
    return next(r for r in result["traffic"] if r["case"] == case)


def markdown(result: dict) -> str:
    """The section: Fig. 7 and Fig. 8 tables, then one line per assumption."""
    return "\n".join([
        "### Fig. 7 at the paper's sizes: device training peak vs FedJETS", "", memory_table(result), "",
        "### Fig. 8 at the paper's sizes: total communication for N devices", "", traffic_table(result), "",
        "Assumptions:", "", *[f"- {line}" for line in assumptions(result)], "",
    ])
