"""`deepfusion run | eval | generate | bench`: the command line, and the contract other tools depend on.

Results go to stdout (run and eval print one JSON object), logs to stderr. A user error (config, data, model
paths, disk, a taken run directory) ends in one line on stderr and exit code 2, never a traceback; Ctrl-C
ends in one line saying what was saved and how to continue, exit code 130. A run writes into its run
directory under `rundir.claim`'s rules (rundir.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from pathlib import Path

from deepfusion.benchmarks import MICRO, PROFILES
from deepfusion.config import KNOWLEDGE_METHODS, METHODS, ONESHOT_METHODS, load_config
from deepfusion.errors import ConfigError, DataError, RunDirError, RunInterrupted
from deepfusion.logs import setup_logging
from deepfusion.rundir import claim, resume_command, user_message

ENGINES = ("local", "flower")
DESCRIPTION = """DeepFusion: train a global Mixture-of-Experts from heterogeneous on-device language models
by federated knowledge distillation, then evaluate the exported model or generate text with it."""
EPILOG = """examples:
  deepfusion run --config configs/smoke-multiround.toml --out runs/smoke   a tiny federation, seconds on a CPU
  deepfusion run --resume runs/smoke --rounds 4                            continue it, two rounds more
  deepfusion eval --model runs/smoke/model                                 per-domain perplexity, as JSON
  deepfusion generate --model runs/smoke/model --prompt "The heart"

Results go to stdout, logs to stderr. `deepfusion COMMAND --help` describes each command."""
log = logging.getLogger("deepfusion")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = _parser().parse_args(argv)
    args.command_line = shlex.join(["deepfusion", *argv])  # what a run directory's lock says holds it
    setup_logging(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except RunInterrupted as e:
        print(f"deepfusion: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # eval, generate, bench: nothing of theirs needs saving
        print("deepfusion: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, DataError, RunDirError, OSError) as e:  # user errors: one line, no traceback
        print(f"deepfusion: {user_message(e)}", file=sys.stderr)
        return 2


# ---- run ----------------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        return _resume(args)
    cfg = load_config(args.config, args.set, method=args.method, rounds=args.rounds, seed=args.seed)
    engine = args.engine or "local"
    run = _runner(engine)
    if args.replay and (engine != "local" or cfg.method not in (*KNOWLEDGE_METHODS, *ONESHOT_METHODS)):
        raise ConfigError(f"--replay records and replays the devices' uploads: it needs --engine local and one of "
                          f"{', '.join((*ONESHOT_METHODS, *KNOWLEDGE_METHODS))} (got --engine {engine}, "
                          f"method {cfg.method!r})")
    extra = {"replay": Path(args.replay)} if args.replay else {}
    extra["tensorboard"] = Path(args.tensorboard) if args.tensorboard else None
    resume_with = _resume_with(args, Path(args.out))
    with claim(args.out, overwrite=args.overwrite, command=args.command_line, resume_with=resume_with) as run_dir:
        result = run(cfg, run_dir.path, data_dir=args.data_dir, progress=not args.no_progress, **extra)
    _print_brief(result)
    return 0


def _runner(engine: str):
    if engine == "local":
        from deepfusion.engines.local import run
    else:  # Flower's Simulation Runtime on this machine; across machines: `flwr run` (README)
        from deepfusion.engines.flower.simulation import run
    return run


def _resume(args: argparse.Namespace) -> int:
    """Continue DIR's run after its last completed round, with the config and engine it was started with."""
    from deepfusion.config import from_dict

    out = Path(args.resume)
    ignored = [flag for flag, given in (("--config", args.config), ("--method", args.method), ("--seed", args.seed),
                                        ("--set", args.set),
                                        ("--replay", args.replay), ("--overwrite", args.overwrite or None))
               if given is not None]
    if ignored:
        raise ConfigError(f"--resume {out} continues that run with the config it was started with (its checkpoint's); "
                          f"{' and '.join(ignored)} would be ignored: drop {'them' if len(ignored) > 1 else 'it'}, "
                          "or start a new run with --out")
    if (out / "checkpoint" / "progress.json").is_file():  # the paper's one-shot pipeline: phases, not rounds
        return _resume_phases(args, out)
    state = _readable_checkpoint(out / "checkpoint" / "state.pt")
    cfg, done = from_dict(state["config"]), len(state["metrics"])
    if args.rounds is not None and args.rounds < done:
        raise ConfigError(f"--rounds {args.rounds}: {out} has completed {done} rounds already; a resumed run can only "
                          f"run longer: give --rounds > {done}, or leave it out to finish the {cfg.rounds} planned")
    finished = (out / "summary.json").is_file()
    if finished and (args.rounds or 0) <= done:
        raise ConfigError(f"--resume {out}: that run has finished ({done} rounds, summary.json); nothing to continue; "
                          f"to train it longer give --rounds > {done}")
    if args.rounds:  # the one setting a resume may change: run longer than first planned
        cfg.rounds = args.rounds
    return _continue(args, out, cfg, state.get("engine", "local"))


def _resume_phases(args: argparse.Namespace, out: Path) -> int:
    """Continue a one-shot run after its last saved phase (or distilled domain), with its own config."""
    from deepfusion.config import from_dict

    if args.rounds is not None:
        raise ConfigError(f"--rounds {args.rounds}: {out} is a one-shot run (method deepfusion and its ablations "
                          "have one upload and no rounds); drop --rounds")
    if (out / "summary.json").is_file():
        raise ConfigError(f"--resume {out}: that run has finished (summary.json); nothing to continue")
    try:
        progress = json.loads((out / "checkpoint" / "progress.json").read_text())
        cfg = from_dict(progress["config"])
    except (ValueError, KeyError) as e:
        raise DataError(f"{out / 'checkpoint' / 'progress.json'}: unreadable ({type(e).__name__}); it was damaged "
                        "or not written by `deepfusion run`; start afresh with --out DIR") from None
    return _continue(args, out, cfg, progress.get("engine", "local"))


def _continue(args: argparse.Namespace, out: Path, cfg, engine: str) -> int:
    """Resume the run in `out` with its config, on the engine it ran on (--engine may only agree)."""
    if args.engine and args.engine != engine:
        raise ConfigError(f"--resume {out}: that run ran on the {engine} engine and continues there (its devices' "
                          f"states are that engine's); drop --engine {args.engine}")
    with claim(out, resume=True, command=args.command_line, resume_with=_resume_with(args, out)) as run_dir:
        result = _runner(engine)(cfg, run_dir.path, data_dir=args.data_dir, progress=not args.no_progress,
                                 resume=True, tensorboard=Path(args.tensorboard) if args.tensorboard else None)
    _print_brief(result)
    return 0


def _resume_with(args: argparse.Namespace, out: Path) -> str:
    """The exact command that continues this run (the config is in its checkpoint; the data dir is not)."""
    return resume_command(out) + (f" --data-dir {shlex.quote(args.data_dir)}" if args.data_dir else "")


def _readable_checkpoint(path: Path) -> dict:
    """The checkpoint, or one clear line. It is written atomically, so a damaged one was damaged afterwards."""
    from deepfusion.outputs import load_checkpoint

    try:
        state = load_checkpoint(path)
        state["config"], state["metrics"]
    except FileNotFoundError:
        raise
    except Exception as e:  # torch.load of damaged or foreign bytes raises many types
        raise DataError(f"{path}: unreadable checkpoint ({type(e).__name__}); it was damaged or not written by "
                        "`deepfusion run`; start afresh with --out DIR") from None
    return state


def _print_brief(result: dict) -> None:
    brief = {k: result[k] for k in ("method", "global_family", "rounds", "ppl", "wall_seconds")}
    brief["comm_bytes"] = {k: result["comm_bytes"][k] for k in ("up", "down")}
    print(json.dumps(brief))


# ---- eval, generate, bench ---------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from deepfusion.federation import prepare_data
    from deepfusion.models import resolve_device
    from deepfusion.server import evaluate

    device = resolve_device(args.device)
    model = _load_exported(Path(args.model), device)  # first: a wrong --model should be named as such
    cfg, source = _eval_config(args.config, Path(args.model))
    cfg.data.tokenizer = args.model  # evaluate with the model's own tokenizer
    data = prepare_data(cfg, args.data_dir)
    log.info("eval: config from %s; data from %s (held-out text of %s)", source, data.data_dir,
             ", ".join(data.test_sets))
    with torch.no_grad():
        print(json.dumps(evaluate(model, data.test_sets, device)))
    return 0


def _eval_config(config: str | None, model_dir: Path):
    """--config, else the config of the run the model came from (RUN/summary.json, else RUN/checkpoint),
    else the default config with a warning: its sources may not be the ones the model was trained on."""
    from deepfusion.config import default_config_path, from_dict

    if config:
        return load_config(config), config
    run = model_dir.resolve().parent
    summary, ckpt = run / "summary.json", run / "checkpoint" / "state.pt"
    if summary.is_file():
        try:
            return from_dict(json.loads(summary.read_text())["config"]), str(summary)
        except (ValueError, KeyError, TypeError):
            log.warning("eval: %s holds no readable config; trying %s", summary, ckpt)
    if ckpt.is_file():
        return from_dict(_readable_checkpoint(ckpt)["config"]), str(ckpt)
    log.warning("eval: no --config, and no run next to %s (%s or %s): using the default config, whose sources "
                "may not be the ones this model was trained on; pass --config", model_dir, summary.name,
                "checkpoint/state.pt")
    return load_config(None), str(default_config_path("default"))


def _load_exported(path: Path, device):
    """An exported model, or one line: missing (load_model says so) or damaged (a truncated model.safetensors)."""
    from deepfusion.models import load_model

    try:
        return load_model(path, device)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors, json and transformers raise many types for damaged files
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DataError(f"--model {path}: cannot load the exported model ({why}); a file in it is truncated or "
                        "damaged; export it again (rerun, or --resume the run) or copy it anew") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from deepfusion import benchmarks
    from deepfusion.benchmarks import recheck

    recheck.check_arguments(args)
    if args.recheck:  # re-run a published table; exit 1 when a figure moved
        result = recheck.recheck(Path(args.recheck), args.recheck_out and Path(args.recheck_out),
                                 args.tolerance or 0.0, args.only, args.seeds, args.threads, args.command_line)
        print(recheck.markdown(result))
        return 1 if result["differ"] else 0
    benchmarks.check_arguments(args.micro, args.profile, args.out, args.seeds, args.seed)
    config = Path(args.config) if args.config else None
    if args.micro:
        for row in benchmarks.run_micro(args.micro, Path(args.out or "runs/bench"), config, args.seed):
            print(json.dumps(row))
        return 0
    print(benchmarks.run_profile(args.profile or "quick", Path(args.out), config, args.seeds))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from deepfusion.data import load_tokenizer
    from deepfusion.models import resolve_device

    if not args.prompt:
        raise ConfigError('--prompt is empty: give the text to continue, e.g. --prompt "The heart"')
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1 (the number of tokens to generate)")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise ConfigError(f"--temperature {args.temperature}: must be >= 0 (0: greedy decoding; 0.7-1.0: sampling)")
    device = resolve_device(args.device)
    model = _load_exported(Path(args.model), device)
    tokenizer = load_tokenizer(Path(args.model))
    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    sample = args.temperature > 0
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=sample,
                         temperature=args.temperature if sample else None, top_k=50 if sample else None,
                         pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from deepfusion.checkpoints import federation_checkpoints
    from deepfusion.federation import prepare_data
    from deepfusion.models import resolve_device

    cfg = load_config(args.config)
    data = prepare_data(cfg, args.data_dir, private=False)  # public text only: no device's private blocks
    built = federation_checkpoints(cfg, data, Path(args.cache) if args.cache else None, resolve_device(cfg.device))
    print(json.dumps(built))
    return 0


# ---- parser and logging -------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepfusion", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"deepfusion {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a federation and export the global MoE",
                         description="Run a federation (or continue one) and export its global MoE. Writes "
                                     "DIR/summary.json, metrics.jsonl, model/ and checkpoint/; prints a JSON "
                                     "summary on stdout.")
    where = run.add_argument_group("where (one of these is required)").add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR", help="a new run directory: summary.json, metrics.jsonl, model/, "
                       "checkpoint/ (refused if it holds a run: see --resume, --overwrite)")
    where.add_argument("--resume", metavar="DIR", help="continue the run in DIR after its last completed round, "
                       "with the config it was started with")
    run.add_argument("--overwrite", action="store_true", help="replace the run already in --out DIR (removes only "
                     "what a run writes there)")
    run.add_argument("--config", help="federation TOML (default: the shipped default config)")
    run.add_argument("--method", choices=METHODS, help="override the config's method")
    run.add_argument("--engine", choices=ENGINES,
                     help="local: in-process (default); flower: Flower's Simulation Runtime, one SuperNode per device "
                          "(with --resume: the run's own engine)")
    run.add_argument("--rounds", type=int, help="override the number of rounds (with --resume: run to this many)")
    run.add_argument("--seed", type=int, help="override the training seed")
    run.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                     help="override one config key, e.g. --set tune.loss=ce --set distill.alpha=0.5 (repeatable)")
    run.add_argument("--data-dir", help="data directory (else $DEEPFUSION_DATA, ../shared/data, user cache)")
    run.add_argument("--replay", metavar="DIR", help="record the devices' uploads in DIR, or replay them if this "
                     "device side is recorded there (compare server-side methods on identical knowledge)")
    run.add_argument("--no-progress", action="store_true", help="no live progress bars: one plain line per round or "
                     "phase instead (as when stderr is not a terminal)")
    run.add_argument("--tensorboard", metavar="DIR", help="also log the run's curves (perplexity per round, or each "
                     "phase's curves) as TensorBoard events in DIR: tensorboard --logdir DIR")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="per-domain perplexity of an exported model, as JSON",
                        description="Per-domain perplexity of an exported model on its run's held-out text, as "
                                    "JSON on stdout; which config and data it used goes to stderr.")
    ev.add_argument("--model", required=True, help="an exported model directory (DIR/model)")
    ev.add_argument("--config", help="federation TOML naming the sources and splits (default: the config of the "
                    "run the model came from, DIR/summary.json or DIR/checkpoint)")
    ev.add_argument("--data-dir")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="continue a prompt with an exported model")
    gen.add_argument("--model", required=True, help="an exported model directory (DIR/model)")
    gen.add_argument("--prompt", required=True, help="the text to continue (not empty)")
    gen.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate, >= 1 (default 48)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding, else > 0 (default 0.8)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="every method side by side, the scale projection, or a micro-benchmark",
                           description="A profile runs methods side by side and writes results.json, RESULTS.md "
                                       "(SCALE.md for scale) and plots into --out DIR; a micro-benchmark prints one "
                                       "JSON row per line; --recheck DIR re-runs a published table and reports every figure that moved. "
                                       "`python -m deepfusion.benchmarks` takes the same arguments.")
    bench.add_argument("micro", nargs="?", choices=MICRO, metavar="MICRO",
                       help=f"a micro-benchmark instead of a profile: {', '.join(MICRO)}")
    bench.add_argument("--profile", choices=PROFILES, help="quick (default): both families, every multi-round method "
                       "and baseline, one seed; full: 3 seeds, tuned λ, ablations; scale: the paper's MoEs on the meta "
                       "device; pipeline: the paper pipeline beside its ablations and the multi-round protocol on the "
                       "default federation; paper: the paper's evaluation (its baselines, N = 16-128, 2 cases, 3 seeds, "
                       "Tables I-II, Figs. 7-9, its claims); paper-quick: one seed, N = 16 and 32, the main rows")
    bench.add_argument("--out", help="output directory, required for a profile (runs already there are reused); "
                       "poison and dp: where their runs go (default runs/bench)")
    bench.add_argument("--config", help="federation TOML (defaults: quick/full configs/bench-quick.toml, scale "
                       "configs/multiround.toml, pipeline configs/default.toml, poison configs/reliability.toml, "
                       "dp configs/smoke-multiround.toml)")
    bench.add_argument("--seeds", type=int, nargs="+", help="a profile: override its seeds; --recheck: recheck only these seeds")
    bench.add_argument("--seed", type=int, help="dp: override the config's training seed")
    again = bench.add_argument_group("recheck (re-run a published table and report every figure that moved)")
    again.add_argument("--recheck", metavar="DIR", help="a profile's output directory: re-run each DIR/runs/**/"
                       "summary.json from its own config, compare its figures with the published ones, write "
                       "DIR/recheck.json and DIR/RECHECK.md; exit 1 if any run differs")
    again.add_argument("--recheck-out", metavar="OUT", help="where the reruns go (default DIR/recheck; a rerun "
                       "already there at the same commit and threads is reused)")
    again.add_argument("--tolerance", type=float, help="relative change a figure may show (default 0: equal to "
                       "its published 4 significant digits)")
    again.add_argument("--only", action="append", metavar="ROW", help="recheck only runs whose path under DIR/runs "
                       "contains ROW (repeatable); --seeds restricts the seeds")
    again.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) for the reruns: recheck "
                       "under the published thread count (each row says when it differs)")
    bench.set_defaults(func=cmd_bench)

    pre = sub.add_parser("pretrain", help="build (or reuse) the public checkpoints a config needs, as JSON",
                         description="Pretrain every device type's public checkpoint and the MoE's dense base on the "
                                     "public proxy text ([pretrain] settings), cached by content hash; prints "
                                     "{type: {path, params, seconds, final_loss, cached, ...}} on stdout.")
    pre.add_argument("--config", help="federation TOML (default: the shipped default config)")
    pre.add_argument("--data-dir", help="data directory (else $DEEPFUSION_DATA, ../shared/data, user cache)")
    pre.add_argument("--cache", metavar="DIR", help="checkpoint cache (default: $XDG_CACHE_HOME/deepfusion/checkpoints)")
    pre.set_defaults(func=cmd_pretrain)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepfusion")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
