"""`deepfusion bench --profile byo`: bring your own tokenizer, or your own memory budget (issue 11's benchmark).

The default federation (configs/default.toml: 16 devices of 5 types, the paper pipeline) three ways, per seed:

    global tokenizer   as it is: every device reads the federation's 8,192-id byte-level BPE
    own tokenizers     each device type with a tokenizer of its own, as GPT-2, TinyLlama and BERT-family models
                       come: gpt2 types a byte-level BPE of 6,000 ids, llama types a Unigram of 4,000, the other
                       types a WordPiece of 3,000 (data.tokenizer.train_kind, on the public documents: a
                       tokenizer is a public artefact). Their public checkpoints are pretrained on the same
                       public text cut by their tokenizer; the server aligns each over character spans.
    LoRA devices       the global tokenizer, every device fine-tuning rank-8 LoRA adapters and uploading only
                       the adapter (the server merges it onto its own copy of the public checkpoint)

Reported: the MoE's figures per domain (the test text and QA answers are cut by the global tokenizer in every
row, so the rows compare), Phase II / III server seconds (what aligning costs), Phase 0 device peak memory per
type, upload bytes (with the tokenizers' share), and the share of public positions each tokenizer aligns.

    deepfusion bench --profile byo --out benchmarks/byo [--seeds 0 1 2]

Runs already in OUT are reused: a finished run (OUT/runs/<row>/s<seed>/summary.json), or a row already measured in
OUT/results.json (runs/ is local, results.json is committed: a fresh clone adds rows without redoing two hours of
earlier ones; each row keeps the commit it ran at). No replay: each row's devices differ.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

from deepfusion.benchmarks.pipeline import _slug, figures, metric_cells, publish
from deepfusion.config import default_config_path, load_config

log = logging.getLogger("deepfusion.bench")

OWN = {"gpt2": ("bpe", 6000), "llama": ("unigram", 4000)}  # every other family: OTHER
OTHER = ("wordpiece", 3000)
ROWS = ("global tokenizer", "own tokenizers", "LoRA devices")


def tokenizers(out: Path, cfg) -> dict[str, Path]:
    """family -> its own tokenizer's directory, trained once on the federation's public documents."""
    from deepfusion.data import load_source, split_documents
    from deepfusion.data.tokenizer import train_kind

    d, texts = cfg.data, []
    for source in sorted({dev.source for dev in cfg.devices}):
        split = split_documents(load_source(source, Path(d.dir) if d.dir else _data_dir()), d.seed, d.proxy_frac,
                                d.test_frac)
        texts += [doc.text for doc in split.proxy]
    dirs = {}
    for family in sorted({dev.family for dev in cfg.devices}):
        kind, size = OWN.get(family, OTHER)
        target = out / "tokenizers" / f"{kind}-{size}"
        if not (target / "tokenizer.json").is_file():
            train_kind(texts, kind, size).save_pretrained(str(target))
        dirs[family] = target
    return dirs


def _data_dir() -> Path:
    from deepfusion.data import resolve_data_dir

    return resolve_data_dir(None)


def config_of(row: str, seed: int, out: Path):
    cfg = load_config(default_config_path("default"), [f"seed={seed}"])
    if row == "own tokenizers":
        dirs = tokenizers(out, cfg)
        for dev in cfg.devices:
            dev.tokenizer = str(dirs[dev.family])
    elif row == "LoRA devices":
        for dev in cfg.devices:
            dev.finetune, dev.lora_rank, dev.upload = "lora", 8, "adapter"
    return cfg.validate()


def run_one(out: Path, row: str, seed: int) -> dict:
    from deepfusion.engines.local import run

    where = out / "runs" / _slug(row) / f"s{seed}"
    if not (where / "summary.json").is_file():
        log.info("bench byo: %s seed %d", row, seed)
        run(config_of(row, seed, out), where, progress=False)
    return json.loads((where / "summary.json").read_text())


def measures(summary: dict) -> dict:
    """figures() and what this bench adds: server seconds, device memory per type, upload bytes."""
    devices = summary["devices"].values()
    by_type: dict[str, list[int]] = {}
    for r in devices:
        by_type.setdefault(r["arch"].split("+tok:")[0], []).append(r.get("peak_mem_bytes", 0))
    return {**figures(summary), "phase_seconds": summary["phase_seconds"],
            "peak_mem_mb": {t: round(statistics.mean(v) / 2**20, 1) for t, v in sorted(by_type.items())},
            "upload_mb_per_device": round(statistics.mean(r["upload_bytes"] for r in devices) / 2**20, 3),
            "tokenizer_kb_per_device": round(statistics.mean(r.get("tokenizer_bytes", 0) for r in devices) / 1024, 1),
            "commit": summary.get("provenance", {}).get("commit")}


def measured(out: Path) -> dict[tuple[str, int], dict]:
    """(row, seed) -> its measures, from an earlier results.json in OUT (empty when there is none)."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    return {(r["row"], r["seed"]): {k: v for k, v in r.items() if k not in ("row", "seed")}
            for r in json.loads(path.read_text())["runs"]}


def aligned_share(out: Path, seed: int) -> dict[str, float]:
    """Per own tokenizer: the share of public next-token positions that end an aligned span (where its device's
    KL speaks), on the federation's public blocks."""
    from deepfusion.alignment import block_views
    from deepfusion.data.tokenizer import load_tokenizer
    from deepfusion.federation import prepare_data

    cfg = config_of("own tokenizers", seed, out)
    data = prepare_data(cfg, private=False)
    share = {}
    for family, path in tokenizers(out, cfg).items():
        views = block_views(data.tokenizer, load_tokenizer(path), data.proxy[:64])
        share[f"{family}: {path.name}"] = round(sum(len(v.alignment) for v in views) / data.proxy[:64].numel(), 3)
    return share


def run_bench(out: Path, seeds: list[int] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    seeds, start, runs, earlier, share = seeds or [0], time.perf_counter(), {}, measured(out), {}
    for s in seeds:
        for row in ROWS:
            summary = out / "runs" / _slug(row) / f"s{s}" / "summary.json"
            reuse = (row, s) in earlier and not summary.is_file()
            runs[row, s] = earlier[row, s] if reuse else measures(run_one(out, row, s))
            if not share and ("own tokenizers", seeds[0]) in runs:
                share = aligned_share(out, seeds[0])
            results = publish(out, {"seeds": seeds, "aligned_share": share}, runs, start, report)
    return results


def report(results: dict, runs: dict) -> str:
    from deepfusion.benchmarks.report import thread_setting
    from deepfusion.outputs import provenance

    seeds, p = results["seeds"], provenance()
    commits = sorted({m.get("commit") or "?" for m in runs.values()})
    lines = [f"# Bring your own tokenizer or memory budget: the default federation three ways (seeds {seeds})", "",
             f"Command: `deepfusion bench --profile byo --out OUT`; rows run at commit {', '.join(commits)} "
             f"(column `commit`), report written at {p['commit'][:7]}, torch {p['torch']}, "
             f"{thread_setting({f'{r} s{s}': m['threads'] for (r, s), m in runs.items()})}; bench wall time "
             f"{results['bench_seconds']:.0f} s (reused runs count 0); the runs' own wall time "
             f"{sum(m['wall_seconds'] for m in runs.values()) / 3600:.1f} h.", "",
             "Own tokenizers: " + ", ".join(f"{f} types {k} {n}" for f, (k, n) in OWN.items())
             + f", every other type {OTHER[0]} {OTHER[1]} (trained on the public documents). log-ppl = mean NLL "
             "per global token of the test text (lower is better), accuracy in %, mean ± std over the row's seeds; QA: "
             "answer tokens only. Paired: the row minus the global-tokenizer row on the same seeds (mean ± std). "
             "Phase II / III s are wall seconds under whatever else ran (compare with `deepfusion bench align`, "
             "not across rows). Peak: each type's Phase 0 training peak, measured on the device.", "",
             "| row | n | log-ppl medical | log-ppl finance | QA log-ppl medical | QA log-ppl finance | accuracy "
             "medical | accuracy finance | paired log-ppl medical / finance | Phase II s | Phase III s | upload MB / device | "
             "of which tokenizer kB | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        done = [s for s in seeds if (row, s) in runs]
        if not done:
            continue
        m = [runs[row, s] for s in done]
        lines.append(f"| {row} | {len(done)} | " + " | ".join(metric_cells(runs, row, done, ROWS[0]))
                     + f" | {statistics.mean(x['phase_seconds']['phase2'] for x in m):.0f}"
                     f" | {statistics.mean(x['phase_seconds']['phase3'] for x in m):.0f}"
                     f" | {statistics.mean(x['upload_mb_per_device'] for x in m):.2f}"
                     f" | {statistics.mean(x['tokenizer_kb_per_device'] for x in m):.0f}"
                     f" | {', '.join(sorted({(x.get('commit') or '?')[:7] for x in m}))} |")
    types = sorted({t for m in runs.values() for t in m["peak_mem_mb"]})
    lines += ["", "Phase 0 peak training memory per device type, MB (first seed):", "",
              "| row | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for row in ROWS:
        if (row, seeds[0]) in runs:
            peaks = runs[row, seeds[0]]["peak_mem_mb"]
            lines.append(f"| {row} | " + " | ".join(str(peaks.get(t, "–")) for t in types) + " |")
    if results["aligned_share"]:
        lines += ["", "Share of the public next-token positions each own tokenizer aligns (where its KL speaks; "
                  "first 64 public blocks): " + ", ".join(f"{k} {v:.1%}" for k, v in results["aligned_share"].items())]
    return "\n".join(lines) + "\n"
