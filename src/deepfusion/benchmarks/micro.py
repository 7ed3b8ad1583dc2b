"""Micro-benchmarks that back the defaults (speed is measured here, never asserted in timed tests).

    python -m deepfusion.benchmarks experts     # MoE experts kernels: one training step per implementation
    python -m deepfusion.benchmarks distill     # one distillation step per method, 6 devices
    python -m deepfusion.benchmarks poison      # one adversarial device of six: damage with / without reliability
    python -m deepfusion.benchmarks dp          # differential privacy on uploads: perplexity and (ε, δ) per noise level
    python -m deepfusion.benchmarks vaa         # one Phase II step: VAA vs no feature term vs OFA-KD (crosskd.time_steps)
    python -m deepfusion.benchmarks align       # one Phase II step: a teacher with the global vs its own tokenizer

(`deepfusion bench experts` and so on is the same command.) Each prints one JSON object per row.
Timings are ratios within one run on one machine: compare rows, not machines.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from deepfusion.config import ServerConfig
from deepfusion.models import MOE_PRESETS, build_global_moe


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, AdamW state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_experts(size: str = "small", vocab: int = 8192, batch: int = 8, seq: int = 128, repeats: int = 3) -> list[dict]:
    """Seconds per training step (forward with hidden states + backward + AdamW) per experts kernel."""
    x = torch.randint(vocab, (batch, seq))
    rows = []
    for family in MOE_PRESETS:
        for impl in ("eager", "grouped_mm", "batched_mm"):
            torch.manual_seed(0)
            model = build_global_moe(family, size, vocab, experts_impl=impl)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

            def step():
                out = model(input_ids=x, labels=x, output_hidden_states=True)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            rows.append({"family": family, "experts_impl": impl, "seconds_per_step": round(_time(step, repeats), 3)})
    return rows


def bench_distill(devices: int = 6, vocab: int = 8192, blocks: int = 64, seq: int = 128, repeats: int = 3,
                  size: str = "small") -> list[dict]:
    """Seconds per server distillation step per method, on random knowledge from `devices` devices."""
    from deepfusion.server import Targets, build_server, distill

    k = 8
    proxy = torch.randint(vocab, (blocks, seq))
    raw = torch.rand(devices, blocks, seq - 1, k + 1)
    raw /= raw.sum(-1, keepdim=True)
    targets = Targets(torch.arange(devices), torch.randint(vocab, (devices, blocks, seq - 1, k)), raw[..., :k], raw[..., k])
    weights = torch.full((devices, blocks), 1.0 / devices)
    rows = []
    for method in ("proxy-only", "device-kd", "multiround-views"):
        server = build_server(ServerConfig(size=size, batch_size=min(8, blocks)), method, vocab, proxy, [f"d{i}" for i in range(devices)], 0,
                              torch.device("cpu"))
        tg = None if method == "proxy-only" else targets
        rows.append({"method": method, "seconds_per_step": round(_time(lambda: distill(server, tg, weights, 1), repeats), 3)})
    base = rows[0]["seconds_per_step"]
    for row in rows:
        row["ratio_to_proxy_only"] = round(row["seconds_per_step"] / base, 2)
    return rows


def bench_poison(out: Path, attacks: tuple[str, ...] = ("inverted", "shifted", "uniform"), victim: str = "nhlbi",
                 config: Path | None = None) -> list[dict]:
    """Perplexity damage from one adversarial device of six, with and without reliability weighting."""
    from deepfusion.config import default_config_path, load_config
    from deepfusion.engines.local import run

    rows = []
    for attack in (None, *attacks):
        for reliability in (True, False):
            cfg = load_config(config or default_config_path("reliability"))
            cfg.server.reliability = reliability
            for d in cfg.devices:
                d.attack = attack if d.id == victim else None
            result = run(cfg, out / f"{attack or 'clean'}-{'rw' if reliability else 'uniform'}", progress=False)
            rows.append({"attack": attack or "none", "reliability": reliability, "ppl": result["ppl"]})
    clean = {r["reliability"]: r["ppl"] for r in rows if r["attack"] == "none"}
    for row in rows:
        row["damage_pct"] = {d: round(100 * (row["ppl"][d] / clean[row["reliability"]][d] - 1), 1) for d in row["ppl"]}
    return rows


def bench_dp(out: Path, noise: tuple[float, ...] = (0.01, 0.05, 0.2, 100.0), config: Path | None = None,
             seed: int | None = None) -> list[dict]:
    """Utility cost of differential privacy: every device noises its uploads at dp_noise = σ (privacy.py);
    perplexity and the (ε, δ) spent per σ, beside the same federation without DP and the proxy-only floor."""
    from deepfusion.config import default_config_path, load_config
    from deepfusion.engines.local import run

    rows = []
    for sigma in (None, 0.0, *noise):  # None: proxy-only, what the server learns with no device at all
        cfg = load_config(config or default_config_path("smoke-multiround"), seed=seed)
        if sigma is None:
            cfg.method = "proxy-only"
        for d in cfg.devices:
            d.dp_noise = sigma or 0.0
        result = run(cfg, out / ("proxy-only" if sigma is None else f"dp-{sigma:g}"), progress=False)
        spent = result.get("privacy") or {}
        rows.append({"method": cfg.method, "dp_noise": sigma, "ppl": result["ppl"], "epsilon": spent.get("epsilon"),
                     "delta": spent.get("delta") if sigma else None, "rounds": cfg.rounds})
    no_dp = rows[1]["ppl"]
    for row in rows:
        row["cost_pct"] = {d: round(100 * (row["ppl"][d] / no_dp[d] - 1), 1) for d in row["ppl"]}
    return rows

def bench_align(out: Path, repeats: int = 7, blocks: int = 64, teacher: tuple[str, str] = ("gpt2", "small"),
                config: Path | None = None) -> list[dict]:
    """What a device with its own tokenizer costs (issue 11), on the default federation's public blocks. Paper pipeline:
    the one-off alignment of the blocks (crosskd.TeacherTokens.build: decode, re-cut, align, vocabulary map), and
    one Phase II step (VAA + KL, [distill] as configured) with the teacher reading the global tokenizer vs the same
    teacher type with each tokenizer of the byo bench (benchmarks/byo.py), steps interleaved (crosskd.interleaved).
    Multi-round protocol: label_rows. Read cpu_ratio on a loaded machine. `out` keeps the trained tokenizers."""
    import dataclasses

    from deepfusion.benchmarks.byo import tokenizers
    from deepfusion.config import default_config_path, load_config
    from deepfusion.crosskd import TeacherTokens, interleaved, make_aligners, train_step
    from deepfusion.data import load_tokenizer
    from deepfusion.federation import prepare_data
    from deepfusion.models import build_dense_base, build_device_model, global_moe_config

    cfg = load_config(config or default_config_path("default"))
    data = prepare_data(cfg, private=False)
    public, device = data.proxy[:blocks], torch.device("cpu")
    torch.manual_seed(0)
    moe = global_moe_config(cfg.server.family, cfg.server.size, len(data.tokenizer))
    student = build_dense_base(moe).train()
    dcfg = dataclasses.replace(cfg.distill, batch_size=min(cfg.distill.batch_size, blocks))
    gen = torch.Generator().manual_seed(0)
    x_idx = torch.randint(blocks, (dcfg.batch_size,), generator=gen)
    variants, rows = {"global tokenizer": None}, []
    for path in sorted(set(tokenizers(out, cfg).values())):  # the byo bench's, trained on the public documents
        variants[path.name] = load_tokenizer(path)
    steps = {}
    for name, tok in variants.items():
        model = build_device_model(*teacher, len(tok) if tok is not None else len(data.tokenizer)).eval()
        start = time.perf_counter()
        tokens = None if tok is None else TeacherTokens.build(model, tok, data.tokenizer, public,
                                                              moe.get_text_config().vocab_size)
        build_s = time.perf_counter() - start
        s = build_dense_base(moe).train()
        s.load_state_dict(student.state_dict())
        aligners = make_aligners(s, [model], public.shape[1], dcfg, gen)
        opt = torch.optim.AdamW([*s.parameters(), *aligners.parameters()], lr=dcfg.lr)
        steps[name] = (lambda s=s, m=model, a=aligners, o=opt, t=tokens:
                       train_step(s, [m], a, public[x_idx], dcfg, o, device, [t], x_idx))
        aligned = 1.0 if tokens is None else sum(len(v.alignment) for v in tokens.views) / public.numel()
        rows.append({"teacher": f"{'/'.join(teacher)} {name}", "align_seconds_per_64_blocks":
                     round(build_s * 64 / blocks, 3), "aligned_share": round(aligned, 3)})
    med = interleaved(steps, repeats, device)
    ref = med["global tokenizer"]
    for row, name in zip(rows, variants):
        row.update(seconds_per_step=round(med[name][0], 4), ratio=round(med[name][0] / ref[0], 3),
                   cpu_seconds_per_step=round(med[name][1], 4), cpu_ratio=round(med[name][1] / ref[1], 3))
    return rows + label_rows(cfg, data.tokenizer, public, variants, teacher, repeats)


def label_rows(cfg, global_tokenizer, public: torch.Tensor, variants: dict, teacher: tuple[str, str],
               repeats: int) -> list[dict]:
    """The multi-round protocol's side: a device of the teacher's type labelling the public blocks (device.label_proxy,
    the [knowledge] top-k) with each tokenizer, interleaved; its packet's bytes (an own tokenizer adds the aligned
    mask and vocabulary digest) and the share of positions it speaks at."""
    from deepfusion.config import DeviceConfig
    from deepfusion.crosskd import interleaved
    from deepfusion.device import build_device, label_proxy

    k, devices = cfg.knowledge, {}
    for name, tok in variants.items():
        dc = DeviceConfig(id="d0", source=cfg.devices[0].source, family=teacher[0], size=teacher[1])
        devices[name] = build_device(dc, teacher[1], len(tok if tok is not None else global_tokenizer), public[:2],
                                     public, 0, torch.device("cpu"), global_tokenizer=global_tokenizer, tokenizer=tok)
    every = list(range(len(public)))
    packets = {n: label_proxy(d, every, k.topk, k.temperature, 1, 0.0) for n, d in devices.items()}
    med = interleaved({n: (lambda d=d: label_proxy(d, every, k.topk, k.temperature, 1, 0.0))
                       for n, d in devices.items()}, repeats, torch.device("cpu"))
    ref_s, ref_b = med["global tokenizer"][1], len(packets["global tokenizer"].to_bytes())
    rows = []
    for n, packet in packets.items():
        size = len(packet.to_bytes())
        spoken = 1.0 if packet.aligned is None else float(packet.aligned.mean())
        rows.append({"device": f"{'/'.join(teacher)} {n}", "label_cpu_seconds_per_64_blocks":
                     round(med[n][1] * 64 / len(public), 3), "label_cpu_ratio": round(med[n][1] / ref_s, 3),
                     "packet_bytes": size, "packet_ratio": round(size / ref_b, 3), "positions_spoken": round(spoken, 3)})
    return rows


def run(what: str, out: Path, config: Path | None = None, seed: int | None = None) -> list[dict]:
    """One micro-benchmark's rows. `out` holds the federation runs of poison and dp; `config` and `seed` are theirs."""
    if what == "poison":
        return bench_poison(out, config=config)
    if what == "dp":
        return bench_dp(out, config=config, seed=seed)
    if what == "align":
        return bench_align(out, config=config)
    if what == "vaa":
        from deepfusion.crosskd import time_steps

        return time_steps()
    return bench_experts() if what == "experts" else bench_distill()
