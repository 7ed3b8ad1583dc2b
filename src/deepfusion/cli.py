"""`deepfusion run | eval | generate`: the command-line contract other tools depend on.

User errors (config, data, model paths) end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from deepfusion.config import KNOWLEDGE_METHODS, METHODS, ConfigError, load_config

ENGINES = ("local", "flower")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose if hasattr(args, "verbose") else False)
    from deepfusion.data import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError, OSError) as e:  # user errors (config, data, paths, disk): one line, no traceback
        print(f"deepfusion: {e}", file=sys.stderr)
        return 2


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume and args.engine != "local":  # a Flower run's device states live on its SuperNodes
        raise ConfigError("deepfusion run --resume continues local-engine runs only; rerun a flower run from "
                          "the start (its devices keep their state on their nodes)")
    if args.resume:
        return _resume(args)
    if not args.out:
        raise ConfigError("deepfusion run needs --out DIR (or --resume DIR to continue a killed run)")
    cfg = load_config(args.config, method=args.method, rounds=args.rounds, seed=args.seed)
    if args.engine == "local":
        from deepfusion.engines.local import run
    else:  # Flower's Simulation Runtime on this machine; across machines: `flwr run` (README)
        from deepfusion.engines.flower.simulation import run
    if args.replay and (args.engine != "local" or cfg.method not in KNOWLEDGE_METHODS):
        raise ConfigError(f"--replay records and replays knowledge uploads: it needs --engine local and one of "
                          f"{', '.join(KNOWLEDGE_METHODS)} (got --engine {args.engine}, method {cfg.method!r})")
    extra = {"replay": Path(args.replay)} if args.replay else {}
    result = run(cfg, Path(args.out), data_dir=args.data_dir, progress=not args.no_progress, **extra)
    _print_brief(result)
    return 0


def _resume(args: argparse.Namespace) -> int:
    """Continue DIR's run after its last completed round, with the config it was started with."""
    from deepfusion.config import from_dict
    from deepfusion.engines.local import run

    out = Path(args.resume)
    cfg = from_dict(_readable_checkpoint(out / "checkpoint" / "state.pt")["config"])
    if args.rounds:  # the one setting a resume may change: run longer than first planned
        cfg.rounds = args.rounds
    result = run(cfg, out, data_dir=args.data_dir, progress=not args.no_progress, resume=True)
    _print_brief(result)
    return 0


def _readable_checkpoint(path: Path) -> dict:
    """The checkpoint, or one clear line. It is written atomically, so a damaged one was damaged afterwards."""
    from deepfusion.data import DataError
    from deepfusion.federation import load_checkpoint

    try:
        state = load_checkpoint(path)
        state["config"]
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


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from deepfusion.federation import prepare_data
    from deepfusion.models import load_model, resolve_device
    from deepfusion.server import evaluate

    device = resolve_device(args.device)
    cfg = load_config(args.config)
    model = load_model(args.model, device)  # first: a wrong --model should be named as such
    cfg.data.tokenizer = args.model  # evaluate with the model's own tokenizer
    data = prepare_data(cfg, args.data_dir)
    with torch.no_grad():
        print(json.dumps(evaluate(model, data.test_sets, device)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from deepfusion.experiments import run_bench

    results = run_bench(args.profile, Path(args.out), Path(args.config) if args.config else None, args.seeds)
    print(f"{len(results['rows'])} rows -> {Path(args.out) / ('SCALE.md' if args.profile == 'scale' else 'RESULTS.md')}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from deepfusion.data import load_tokenizer
    from deepfusion.models import load_model, resolve_device

    device = resolve_device(args.device)
    model = load_model(args.model, device)
    tokenizer = load_tokenizer(Path(args.model))
    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature if args.temperature > 0 else None, top_k=50 if args.temperature > 0 else None,
                         pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepfusion", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federation and export the global MoE")
    run.add_argument("--config", help="federation TOML (default: configs/default.toml)")
    run.add_argument("--method", choices=METHODS, help="override the config's method")
    run.add_argument("--engine", choices=ENGINES, default="local",
                     help="local: in-process (default); flower: Flower's Simulation Runtime, one SuperNode per device")
    run.add_argument("--rounds", type=int, help="override the number of rounds")
    run.add_argument("--seed", type=int, help="override the training seed")
    run.add_argument("--data-dir", help="data directory (else $DEEPFUSION_DATA, ../shared/data, user cache)")
    run.add_argument("--out", help="output directory: summary.json, metrics.jsonl, model/, checkpoint/")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR after its last completed round")
    run.add_argument("--replay", metavar="DIR", help="record the devices' uploads in DIR, or replay them if this "
                     "device side is recorded there (compare server-side methods on identical knowledge)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="per-domain perplexity of an exported model, as JSON")
    ev.add_argument("--model", required=True, help="an exported model directory (DIR/model)")
    ev.add_argument("--config", help="federation TOML naming the sources and splits (default: configs/default.toml)")
    ev.add_argument("--data-dir")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="continue a prompt with an exported model")
    gen.add_argument("--model", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="every method side by side: results.json/.csv, RESULTS.md, plots")
    bench.add_argument("--profile", choices=("quick", "full", "scale"), default="quick",
                       help="quick: both families, every method, one seed; full: 3 seeds, tuned λ, ablations; "
                            "scale: the paper's MoEs on the meta device")
    bench.add_argument("--out", required=True, help="output directory (runs already there are reused)")
    bench.add_argument("--config", help="federation TOML (default: configs/bench-quick.toml)")
    bench.add_argument("--seeds", type=int, nargs="+", help="override the profile's seeds")
    bench.set_defaults(func=cmd_bench)
    return p


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=False)], force=True)
    for noisy in ("transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
