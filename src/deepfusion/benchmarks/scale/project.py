"""The scale projection: what each method costs a device and the server, at the paper's model sizes.

    deepfusion bench --profile scale --out benchmarks/scale [--config configs/multiround.toml]

Each shipped model (cards.py) is built on meta and trained one step by memory.step_memory: the device's
training peak. Beside it, bytes on the wire: safetensors size of the weights a method ships, the real
`Instruction` JSON, and a real `KnowledgePacket` of the federation's proxy set (configs/multiround.toml).
From those, per method: bytes per device per round, device memory, the server's traffic for N devices, and
what fits a memory budget; written as scale.json, scale.csv and SCALE.md (report.py).

Read top to bottom:
  1. bytes on the wire
  2. rows per method, N-device totals, the output files
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

from deepfusion.baselines.hosting import hosted_config
from deepfusion.benchmarks.scale import cards
from deepfusion.benchmarks.scale.cards import BUDGETS_GIB, DEVICE_COUNTS, KD_METHODS, WIRE_DTYPES, Card, Census, census
from deepfusion.benchmarks.scale.report import markdown
from deepfusion.config import FederationConfig, default_config_path, load_config
from deepfusion.device import lm_loss
from deepfusion.memory import StepMemory, step_memory
from deepfusion.wire.instruction import Instruction
from deepfusion.wire.knowledge import encode_knowledge


# -----------------------------------------------------------------------------
# 1. Bytes on the wire


_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def safetensors_bytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """len(safetensors.torch.save(tensors)) for tensors of these shapes and one dtype, without their data.

    The format is an 8-byte header length, a JSON header (tensors sorted by name, each with dtype, shape and
    byte offsets, padded with spaces to 8 bytes) and the raw data. Checked byte for byte against the library
    on a real model in tests/benchmarks/test_scale.py.
    """
    header, offset = {}, 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    return 8 + len(text) + (-len(text) % 8) + offset


def instruction_bytes(cfg: FederationConfig) -> int:
    """The server's round message, built as engines/local.py builds it for the first device of cfg."""
    return len(Instruction.for_device(cfg, cfg.devices[0], cfg.rounds, cfg.data.proxy_blocks).to_bytes())


def knowledge_packet(n_positions: int, k: int, vocab_size: int, temperature: float = 1.0, sample: int = 64, seed: int = 0):
    """A real KnowledgePacket of n_positions, encoded by encode_knowledge from random logits of the real vocab.

    A full proxy set's logits (65,024 x 151,936 floats = 40 GB) do not fit, and a packet's size depends on its
    shapes, not its values: we encode `sample` positions and repeat their rows to n_positions.
    """
    logits = torch.randn(sample, vocab_size, generator=torch.Generator().manual_seed(seed))  # (sample, V)
    part = encode_knowledge(logits, k, temperature, device_id="device-00001", round=1, arch="qwen2/base",
                            tokens_trained=61_440, local_loss=2.0)
    rows = np.arange(n_positions) % sample  # (N,) which sampled row each position repeats
    return dataclasses.replace(part, ids=part.ids[rows], probs=part.probs[rows], tail=part.tail[rows])


def packet_bytes(n_positions: int, k: int, vocab_size: int) -> int:
    return len(knowledge_packet(n_positions, k, vocab_size).to_bytes())


# -----------------------------------------------------------------------------
# 2. Rows per method, N-device totals, the output files


@dataclass(frozen=True)
class Measured:
    """One shipped model built on meta and stepped once."""

    card: Card
    cls: str
    vocab_size: int  # the vocabulary it was built with (the federation's, for on-device LLMs)
    card_params: int  # parameters with the card's own vocabulary: what the published total describes
    census: Census
    memory: StepMemory


def measure(card: Card, batch: int, seq_len: int, vocab_size: int | None = None, experts: int | None = None) -> Measured:
    """Build a card on meta (with the federation's vocabulary, if given) and measure one training step of it.
    experts: an MoE built with that many routed experts per layer (a compact MoE, as an expert-subset host's)."""
    raw = cards.read_config(card.name)
    cls, config = cards.transformers_config(raw, vocab_size)
    config = hosted_config(config, experts)
    model = cards.build_on_meta(cls, config)
    own = census(cards.build_on_meta(*cards.transformers_config(raw))).total if vocab_size else census(model).total
    blocks = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")  # (B, T) token ids
    return Measured(card, cls.__name__, config.vocab_size, own, census(model), step_memory(model, blocks, lm_loss))


def _row(global_model: str, method: str, variant: str, params: int, down: dict, up: dict, memory: int, how: str) -> dict:
    row = {"global_model": global_model, "method": method, "variant": variant, "device_params": params,
           "down_bytes": down["fp32"], "up_bytes": up["fp32"], "round_bytes": down["fp32"] + up["fp32"],
           "round_bytes_bf16": down["bf16"] + up["bf16"], "device_memory_bytes": memory}
    for n in DEVICE_COUNTS:  # the server sends every device its down message and receives every up message
        row[f"total_bytes_{n}"] = n * row["round_bytes"]
        row[f"total_bytes_bf16_{n}"] = n * row["round_bytes_bf16"]
    return row | {"how": how}


def method_rows(moe: Measured, devices: list[Measured], down_kd: int, up_kd: int) -> list[dict]:
    """fedavg-moe, expert-subset at a few m, and the knowledge-distillation methods, for one global MoE."""
    c, mem = moe.census, moe.memory
    weights = {w: safetensors_bytes(c.shapes, dt) for w, dt in WIRE_DTYPES.items()}
    rows = [_row(moe.card.title, "fedavg-moe", "full MoE", c.total, weights, weights, mem.total,
                 "safetensors of every parameter down and up; memory: one AdamW step of the MoE on meta")]
    for m in sorted({c.top_k, c.num_experts // 4, c.num_experts // 2}):
        hosted = {w: safetensors_bytes(c.hosted_shapes(m), dt) for w, dt in WIRE_DTYPES.items()}
        params = c.non_expert + m * c.per_expert
        memory = round(params * mem.resident_per_param_bytes) + mem.activations
        rows.append(_row(moe.card.title, "expert-subset", f"m={m} of {c.num_experts}", params, hosted, hosted, memory,
                         "safetensors of the hosted parameters down and up; memory: hosted parameters x the MoE "
                         "step's resident bytes per parameter + the MoE step's activations"))
    kd = {"fp32": down_kd, "bf16": down_kd}, {"fp32": up_kd, "bf16": up_kd}
    for dev in devices:
        for method in KD_METHODS:
            rows.append(_row(moe.card.title, method, dev.card.title, dev.census.total, *kd, dev.memory.total,
                             "Instruction JSON down, KnowledgePacket up; memory: one AdamW step of the on-device "
                             f"LLM on meta, with the federation's vocabulary ({dev.vocab_size})"))
    return rows


def budget_rows(moe: Measured, devices: list[Measured]) -> list[dict]:
    """For each device memory budget: the most experts per layer an expert-subset device can train, and which
    on-device LLMs fit. m below top_k does not fit: a token must reach top_k distinct experts."""
    c, mem = moe.census, moe.memory
    rows = []
    for gib in BUDGETS_GIB:
        spare = gib * 2**30 - mem.activations - c.non_expert * mem.resident_per_param_bytes
        m = min(c.num_experts, max(0, math.floor(spare / (c.per_expert * mem.resident_per_param_bytes))))
        rows.append({"global_model": moe.card.title, "budget_gib": gib, "expert_subset_m": m if m >= c.top_k else 0,
                     "kd_devices_that_fit": [d.card.title for d in devices if d.memory.total <= gib * 2**30]})
    return rows


def model_row(x: Measured) -> dict:
    c = x.census
    row = {"model": x.card.title, "config": f"configs/scale/{x.card.name}.json", "class": x.cls, "vocab_size": x.vocab_size,
           "params": c.total, "card_vocab_params": x.card_params, "published_params": x.card.published_total,
           "card_vs_published_pct": round(100 * (x.card_params / x.card.published_total - 1), 2),
           "routed_expert_params": c.routed_expert, "non_expert_params": c.non_expert, "experts": c.num_experts,
           "top_k": c.top_k, "moe_layers": c.moe_layers, "activated_params": c.activated if c.num_experts else c.total,
           "published_activated": x.card.published_activated, "published_source": x.card.source}
    return row | {f"step_{f.name}_bytes": getattr(x.memory, f.name) for f in dataclasses.fields(StepMemory)}


def project(out_dir: Path, config: Path | None = None, command: str | None = None) -> list[dict]:
    """Build every shipped model on meta, measure, and write out_dir/{scale.json, scale.csv, SCALE.md}."""
    cfg = load_config(config or default_config_path("multiround"))
    batch, seq_len, k = cfg.devices[0].batch_size, cfg.data.seq_len, cfg.knowledge.topk
    positions = cfg.data.proxy_blocks * (seq_len - 1)  # P * (T - 1): every proxy position with a next token
    rows, budgets, models = [], [], []
    for card in cards.GLOBAL_MODELS:
        moe = measure(card, batch, seq_len)
        # devices speak the federation's tokenizer (packets carry token ids), so they take the MoE's vocabulary
        devices = [measure(d, batch, seq_len, moe.vocab_size) for d in cards.DEVICE_MODELS]
        rows += method_rows(moe, devices, instruction_bytes(cfg), packet_bytes(positions, k, moe.vocab_size))
        budgets += budget_rows(moe, devices)
        models += [model_row(moe)] + [model_row(d) for d in devices]
    settings = {"proxy_blocks": cfg.data.proxy_blocks, "seq_len": seq_len, "positions": positions, "topk": k,
                "device_batch": batch, "config": str(config or "configs/multiround.toml"),
                "command": command or f"deepfusion bench --profile scale --out {out_dir}", "machine": machine(),
                "torch": torch.__version__, "transformers": transformers.__version__}
    write_outputs(Path(out_dir), settings, models, rows, budgets)
    return rows


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()}-core CPU, {gpu}"


def write_outputs(out: Path, settings: dict, models: list[dict], rows: list[dict], budgets: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"settings": settings, "models": models, "rows": rows, "expert_subset_budgets": budgets}
    (out / "scale.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    with open(out / "scale.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "SCALE.md").write_text(markdown(settings, models, rows, budgets), encoding="utf-8")
