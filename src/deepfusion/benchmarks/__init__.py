"""Benchmarks: the methods compared, the micro-benchmarks behind the defaults, the projection to the paper's
model sizes, and their reports. The federation itself lives one level up; no run imports anything here.

    deepfusion bench --profile quick|full --out DIR     compare.py: every method side by side (report.py: tables, plots)
    deepfusion bench --profile scale --out DIR          scale/: the paper's MoEs built and stepped on the meta device
    deepfusion bench --profile pipeline --out DIR       pipeline.py: the paper pipeline beside its ablations
    deepfusion bench --profile paper|paper-quick --out DIR   paper.py: the paper's evaluation (§V), its baselines,
                                                        N = 16-128, Tables I-II, Figs. 7-9, the claims (paper_report.py)
    deepfusion bench experts|distill|poison|dp|vaa|align micro.py: one micro-benchmark, one JSON row per line
    deepfusion bench --recheck DIR [--threads N]        recheck.py: re-run a published table, report what moved

`python -m deepfusion.benchmarks ARGS` is `deepfusion bench ARGS`: the same arguments, the same code.
"""

from __future__ import annotations

from pathlib import Path

from deepfusion.errors import ConfigError

PROFILES = ("quick", "full", "scale", "pipeline", "paper", "paper-quick", "byo")
MICRO = ("experts", "distill", "poison", "dp", "vaa", "align")


def run_profile(profile: str, out: Path, config: Path | None = None, seeds: list[int] | None = None) -> str:
    """Run a profile, write its results into `out`; returns one line saying what was written where."""
    if profile in ("paper", "paper-quick"):
        from deepfusion.benchmarks import paper

        if config:
            raise ConfigError(f"bench --profile {profile}: --config does not apply; its federations are written from "
                              "configs/paper-medical.toml and configs/paper-finance.toml for every N and seed")
        return f"{len(paper.run_bench(out, profile, seeds)['runs'])} runs -> {out / 'RESULTS.md'}"
    if profile == "byo":
        from deepfusion.benchmarks import byo

        if config:
            raise ConfigError("bench --profile byo: --config does not apply; it runs configs/default.toml three ways")
        return f"{len(byo.run_bench(out, seeds)['runs'])} runs -> {out / 'RESULTS.md'}"
    if profile == "pipeline":
        from deepfusion.benchmarks.pipeline import run_bench

        return f"{len(run_bench(out, config, seeds)['runs'])} runs -> {out / 'RESULTS.md'}"
    if profile == "scale":
        from deepfusion.benchmarks.scale.project import project

        command = f"deepfusion bench --profile scale --out {out}" + (f" --config {config}" if config else "")
        return f"{len(project(out, config, command))} rows -> {out / 'SCALE.md'}"
    from deepfusion.benchmarks.compare import run_bench

    return f"{len(run_bench(profile, out, config, seeds)['rows'])} rows -> {out / 'RESULTS.md'}"


def run_micro(what: str, out: Path, config: Path | None = None, seed: int | None = None) -> list[dict]:
    """One micro-benchmark's rows (micro.py)."""
    from deepfusion.benchmarks.micro import run

    return run(what, out, config, seed)


def check_arguments(micro: str | None, profile: str | None, out: str | None, seeds, seed) -> None:
    """A micro-benchmark and a profile take different arguments: say which one a mix belongs to."""
    if micro and profile:
        raise ConfigError(f"bench: got the micro-benchmark {micro!r} and --profile {profile}; give one of them "
                          f"(`deepfusion bench {micro}` or `deepfusion bench --profile {profile} --out DIR`)")
    if micro and seeds:
        raise ConfigError(f"bench {micro}: --seeds is a profile's; a micro-benchmark runs once (dp takes --seed N)")
    if not micro and seed is not None:
        raise ConfigError("bench: --seed is the dp micro-benchmark's; a profile takes --seeds N [N ...]")
    if not micro and not out:
        raise ConfigError(f"bench --profile {profile or 'quick'}: --out DIR is required: the profile writes its runs "
                          "and results there (runs already in DIR are reused)")
