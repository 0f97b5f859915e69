"""The ``bitune`` command: each subcommand parses its arguments and makes one call into the library.

bitune train CONFIG.yaml [key=value ...] [--resume [--allow-change training.max_steps]]
bitune compare CONFIG.yaml [key=value ...] [--report-only]
bitune eval TARGET [--tasks ...] [--limit N] [--choices listed|cloze] [--metric acc|acc_norm] [--prompt-repeat N]
bitune generate TARGET "prompt" | --messages FILE  [--max-new-tokens N --temperature T --top-p P --seed S]
bitune chat TARGET [--system TEXT]
bitune serve TARGET [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch-size N] [--max-wait-ms T] [--prefix-cache-tokens N] [--drain-timeout S]
                    [--engine builtin|vllm] [--dtype float32] [-- VLLM_OPTIONS...]
bitune push RUN_DIR REPO_ID [--private]

Errors are one line on stderr; exit status 2 for bad input (config, data, arguments, a run directory
in use), 1 for a failure during work, 130 after Ctrl-C (with how to continue). ``--debug`` (or
``BITUNE_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .errors import INPUT_ERRORS


def _train(args: argparse.Namespace) -> None:
    from .training.run_config import load_run_config
    from .training.sharding import leave_process_group
    from .training.trainer import train

    config = load_run_config(args.config, args.overrides)
    print(f"trained model in {train(config, resume=args.resume, allow_changes=args.allow_change)}")
    leave_process_group()  # launched: every process done, then the group ends before the interpreter does


def _compare(args: argparse.Namespace) -> None:
    from .experiments import load_compare_config, run_grid

    summary = run_grid(load_compare_config(args.config, args.overrides), report_only=args.report_only)
    if summary["failures"]:
        raise RuntimeError(f"{len(summary['failures'])} run(s) failed; see the messages above")


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
        choices=args.choices,
        metric=args.metric,
        prompt_repeat=args.prompt_repeat,
    )
    print(write_report(summary, args.target, output))
    print(f"written to {output}/results.json and results.md")


def _generation_settings(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )


def _generate(args: argparse.Namespace) -> None:
    from transformers import TextStreamer

    from .inference import generate_text, load_for_inference, request_messages

    messages = request_messages(args.prompt, args.messages)
    loaded = load_for_inference(args.target)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate_text(loaded, messages, streamer=streamer, **_generation_settings(args))


def _chat(args: argparse.Namespace) -> None:
    from transformers import TextStreamer

    from .inference import ChatSession, load_for_inference

    loaded = load_for_inference(args.target)
    session = ChatSession(loaded, system=args.system, **_generation_settings(args))
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(f"chatting with {args.target} ({loaded.prompt_format.template} prompts); /reset clears, /exit ends")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if not line.strip():
            continue
        print("bot> ", end="", flush=True)
        session.send(line, streamer=streamer)


def _serve(args: argparse.Namespace) -> None:
    from .serving import serve

    serve(
        args.target,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        model_name=args.model_name,
        drain_timeout=args.drain_timeout,
        engine=args.engine,
        dtype=args.dtype,
        vllm_args=args.vllm_args,
        prefix_cache_tokens=args.prefix_cache_tokens,
    )


def _push(args: argparse.Namespace) -> None:
    from .card import push, push_files

    print("uploading:", ", ".join(push_files(args.run_dir)))
    print(f"pushed to {push(args.run_dir, args.repo_id, private=args.private)}")


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be in [0, 100], got {value}")
    return value


def _positive(text: str, least: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def _non_negative(text: str) -> int:
    return _positive(text, least=0)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks (or BITUNE_DEBUG=1)"
    )
    parser = argparse.ArgumentParser(
        prog="bitune", description="Bitune: bidirectional instruction-tuning.", parents=[common]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one run from a YAML config", parents=[common])
    train.add_argument("config", help="run config YAML (see configs/)")
    train.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. training.learning_rate=3e-4"
    )
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    train.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="FIELD",
        help="with --resume: let FIELD differ from the saved run (training.max_steps or training.num_epochs)",
    )
    train.set_defaults(func=_train)

    compare = commands.add_parser(
        "compare", help="train and evaluate a grid of methods x seeds", parents=[common]
    )
    compare.add_argument("config", help="compare config YAML (e.g. configs/quickstart.yaml)")
    compare.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. evaluation.limit=50")
    compare.add_argument(
        "--report-only",
        action="store_true",
        help="train and score nothing: rewrite the report, tables and plots from what is recorded",
    )
    compare.set_defaults(func=_compare)

    from .data import CHOICE_FORMATS, SOURCES
    from .evaluation.tasks import DEFAULT_BATCH_SIZE, METRICS, PAPER_TASKS

    evaluate = commands.add_parser(
        "eval", help="score a run or a base model on the paper's tasks (lm-eval)", parents=[common]
    )
    evaluate.add_argument("target", help="a bitune run directory, or a base model (alias, directory, hub id)")
    evaluate.add_argument(
        "--tasks", nargs="+", default=list(PAPER_TASKS), help="bitune tasks (default: Table 1's)"
    )
    evaluate.add_argument("--source", default=SOURCES[0], choices=list(SOURCES), help="task data source")
    evaluate.add_argument("--limit", type=_positive, default=None, help="questions per task")
    evaluate.add_argument(
        "--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help="prompts per forward"
    )
    evaluate.add_argument(
        "--max-gen-toks", type=_positive, default=None, help="cap on generated tokens (GSM8K)"
    )
    evaluate.add_argument(
        "--choices",
        default=CHOICE_FORMATS[0],
        choices=list(CHOICE_FORMATS),
        help="multiple-choice questions with their choices listed (the paper) or as a cloze",
    )
    evaluate.add_argument(
        "--metric",
        default=METRICS[0],
        choices=list(METRICS),
        help="the headline score of a multiple-choice task",
    )
    evaluate.add_argument(
        "--prompt-repeat",
        type=_positive,
        default=None,
        help="send each question N times (default: as the run was trained; 1 for a base model)",
    )
    evaluate.add_argument(
        "--output", default=None, help="report folder (default: RUN_DIR/eval, or runs/eval/<name>-<hash>)"
    )
    evaluate.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the base model's own code to run (off by default)",
    )
    evaluate.set_defaults(func=_eval)

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument(
        "target", help="a run directory (or checkpoint, snapshot) or a base model (untrained)"
    )
    sampling.add_argument("--max-new-tokens", type=_positive, default=256, help="answer length cap")
    sampling.add_argument("--temperature", type=_temperature, default=0.0, help="0: greedy (default)")
    sampling.add_argument(
        "--top-p", type=_probability, default=1.0, help="nucleus sampling (with temperature)"
    )
    sampling.add_argument("--seed", type=int, default=None, help="seed for sampling")
    generate = commands.add_parser(
        "generate",
        help="answer one prompt, streamed, with the run's prompt format",
        parents=[common, sampling],
    )
    generate.add_argument("prompt", nargs="?", default=None, help="the user's message")
    generate.add_argument("--messages", default=None, help="a JSON file: a list of {role, content} messages")
    generate.set_defaults(func=_generate)
    chat = commands.add_parser(
        "chat", help="an interactive multi-turn chat in the terminal", parents=[common, sampling]
    )
    chat.add_argument("--system", default=None, help="a system message opening the conversation")
    chat.set_defaults(func=_chat)

    server = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (batching, streaming)", parents=[common]
    )
    server.add_argument("target", help="a run directory (or checkpoint, snapshot, hub id) or a base model")
    server.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", default=None, help="bearer token clients must send (or BITUNE_API_KEY)")
    server.add_argument("--max-batch-size", type=_positive, default=8, help="requests decoded together")
    server.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="how long an idle engine waits for more requests to prefill with the first "
        "(default 0: later ones join the running batch)",
    )
    server.add_argument(
        "--prefix-cache-tokens",
        type=_non_negative,
        default=None,
        help="prompt tokens whose causal-pass keys and values the built-in engine keeps for the shared "
        "prefixes (a system prompt) of later prompts; never the bidirectional pass (default 2048; 0: off)",
    )
    server.add_argument("--model-name", default=None, help="the model id clients use (default: TARGET)")
    server.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds requests in flight may take to finish before they are cancelled",
    )
    server.add_argument(
        "--engine",
        choices=("builtin", "vllm"),
        default="builtin",
        help="who decodes: bitune's own batching engine, or vLLM (`make setup-vllm`; README 'Serving on vLLM')",
    )
    server.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights and cache dtype",
    )
    server.epilog = "After `--`: vLLM's own engine options for --engine vllm (e.g. -- --max-model-len 4096)."
    server.set_defaults(func=_serve, vllm_args=[])

    publish = commands.add_parser(
        "push", help="upload a run's trained files to the Hugging Face hub", parents=[common]
    )
    publish.add_argument("run_dir", help="a run directory")
    publish.add_argument("repo_id", help="the hub repository, e.g. user/my-bitune-run")
    publish.add_argument("--private", action="store_true", help="create the repository as private")
    publish.set_defaults(func=_push)
    return parser


def _how_to_continue(args: argparse.Namespace) -> str:
    if args.command == "train":
        command = ["bitune", "train", args.config, *args.overrides, "--resume"]
        return f"; resume with: {shlex.join(command)}"
    if args.command == "compare":
        return "; run the same command again to continue (finished runs are reused)"
    return ""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on = []  # after `--`: another program's options (vLLM's, for `bitune serve --engine vllm`)
    if "--" in argv:
        at = argv.index("--")
        argv, passed_on = argv[:at], argv[at + 1 :]
    args = build_parser().parse_args(argv)
    if passed_on:
        if args.command != "serve":
            build_parser().error(f"options after `--` are for `bitune serve --engine vllm`: {passed_on}")
        args.vllm_args = passed_on
    debug = getattr(args, "debug", False) or os.environ.get("BITUNE_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"bitune {args.command}: interrupted{_how_to_continue(args)}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:
        if debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, INPUT_ERRORS):
            print(f"bitune {args.command}: error: {message}", file=sys.stderr)
            raise SystemExit(2) from None
        print(
            f"bitune {args.command}: failed: {type(exc).__name__}: {message} (--debug shows the traceback)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
