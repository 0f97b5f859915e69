"""Serving benchmark: `bitune serve` under load from the official `openai` client, on loopback, against
plain servers of the same base model at the same concurrency.

    python benchmarks/serve.py                                  # the built-in engine vs transformers serve
    python benchmarks/serve.py --target runs/chat               # or a trained run
    .venv-vllm/bin/python benchmarks/serve.py --engine vllm     # --engine vllm vs the built-in engine and vLLM

With ``--engine builtin`` (the default) the built-in engine is measured against `transformers serve
--continuous-batching` (plain causal, no Bitune, paged attention); ``--plain-bitune`` adds the built-in
engine serving the base model alone (the engine's cost without the second prompt pass), and
``--without-prefix-cache`` the run served with the engine's causal prefix cache off (the questions share
their chat template's system turn, about 24 of their ~38 tokens; transformers serve shares prefixes in whole
256-token pages, so none of these). With ``--engine
vllm`` (in the environment of ``make setup-vllm``) `bitune serve --engine vllm` is measured against the
built-in engine on the same run, against vLLM's own OpenAI server on the base model (no Bitune, no LoRA,
prefix caching off as in bitune's), and against that server decoding with the run's causal adapter as a
vLLM LoRA (no connector: what the LoRA costs in vLLM by itself); ``--vllm-options`` go to every vLLM server.

1. Correctness of the engine under test: 64 chat requests (greedy, the questions of
   examples/chat_conversations.jsonl and variations) from 16 concurrent clients; every response must arrive,
   be well formed, and equal the same request served alone afterwards.
2. Throughput and latency at 1, 4 and 16 concurrent clients (``--requests-per-client`` requests each, at
   least 16 per level; streamed, greedy, ``--max-tokens`` each; after two warm-up requests): generated tokens
   per second over the whole level, time to first token and request latency (p50, p95), for every server, and
   the tested engine's ratios to each of the others.

Without ``--target`` the served run is an untrained Bitune model of the packaged SmolLM2-135M-Instruct (zero
adapters, mixing at its initial 50 %) saved to a temporary folder: it runs exactly the computation of a
trained run (two prompt passes, mixing, causal decoding). Its answers differ from the base model's, and so
do their lengths, which moves tokens/s; ``--same-answers`` zeroes its thetas, so that it answers as the base
model does (the same tokens from every server) while still computing both prompt passes and the mix. The
servers are started and stopped one after another by this script, or with ``--together`` all started at
once and loaded level by level in turns (``--rounds``, the best round of each kept; transformers serve then
gets 10 % of the memory for its paged cache instead of 90 %), which spreads the machine's drift over every
server alike; request counts are bounded. Do not run it while other jobs use the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(count: int) -> list[str]:
    rows = [
        json.loads(line) for line in (REPO / "examples" / "chat_conversations.jsonl").read_text().splitlines()
    ]
    firsts = [row["messages"][0 if row["messages"][0]["role"] == "user" else 1]["content"] for row in rows]
    variations = [f"{q} Please answer briefly." for q in firsts]
    return (firsts + variations)[:count]


def untrained_run(folder: Path, same_answers: bool) -> Path:
    import torch

    from bitune import BituneConfig, get_bitune_model
    from bitune.data import PromptFormat
    from bitune.references import load_model

    base, tokenizer = load_model("smollm2-135m-instruct")
    model = get_bitune_model(base, BituneConfig())
    if (
        same_answers
    ):  # thetas 0: the mixed cache is the causal one, so the answers (and their lengths) are the
        with torch.no_grad():  # base model's, while the computation is all of Bitune's
            model.mixing.theta_k.zero_()
            model.mixing.theta_v.zero_()
    model.save_pretrained(folder)
    PromptFormat.for_tokenizer("chat", tokenizer).save(folder)
    return folder


class Server:
    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(command, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: see {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server did not start: see {log}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)
        self.log.close()


def ask(client: OpenAI, model: str, question: str, max_tokens: int) -> dict:
    """One streamed greedy chat request: text, token count, time to first token, latency."""
    start = time.perf_counter()
    first, pieces, reason = None, [], None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    tokens = None
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                pieces.append(choice.delta.content)
            reason = choice.finish_reason or reason
    end = time.perf_counter()
    return {
        "text": "".join(pieces),
        "tokens": tokens,
        "ttft": (first or end) - start,
        "latency": end - start,
        "finish": reason,
    }


def level_prompts(prompts: list[str], clients: int, per_client: int) -> list[str]:
    count = max(16, clients * per_client)
    return (prompts * (count // len(prompts) + 1))[:count]


def load(client: OpenAI, model: str, prompts: list[str], clients: int, max_tokens: int, count=None) -> dict:
    """``prompts`` from ``clients`` concurrent clients. Tokens are the servers' ``usage`` counts; a server that
    does not report usage in streams has its texts counted with ``count`` (re-tokenized, marked in the row)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda q: ask(client, model, q, max_tokens), prompts))
    wall = time.perf_counter() - start
    recounted = count is not None and any(r["tokens"] is None for r in results)
    tokens = sum(count(r["text"]) if recounted else r["tokens"] or 0 for r in results)
    latencies = sorted(r["latency"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50": statistics.median(r["ttft"] for r in results),
        "latency_p50": statistics.median(latencies),
        "latency_p95": latencies[max(0, round(0.95 * len(latencies)) - 1)],
        "wall": wall,
        "tokens_counted_by": "re-tokenizing the text" if recounted else "server usage",
        "results": results,
    }


def level_rows(client: OpenAI, model: str, prompts: list[str], args, count=None) -> list[dict]:
    """`load` at each of ``args.clients`` concurrency levels, without the per-request results."""
    rows = []
    for clients in args.clients:
        row = load(client, model, level_prompts(prompts, clients, args.requests_per_client), clients,
                   args.max_tokens, count)  # fmt: skip
        rows.append({k: v for k, v in row.items() if k != "results"})
    return rows


def correctness(client: OpenAI, model: str, prompts: list[str], max_tokens: int) -> dict:
    """``prompts`` from 16 concurrent clients, then each alone: failures and answers that differ."""
    together = load(client, model, prompts, 16, max_tokens)
    alone = [ask(client, model, q, max_tokens) for q in prompts]
    failures = sum(
        1 for r in together["results"] if r["finish"] not in ("stop", "length") or r["tokens"] is None
    )
    mismatches = sum(1 for a, b in zip(together["results"], alone, strict=True) if a["text"] != b["text"])
    print(f"correctness: {len(prompts)} requests from 16 clients: {failures} failed/malformed, "
          f"{mismatches} differ from alone")  # fmt: skip
    return {
        "requests": len(prompts),
        "clients": 16,
        "failed_or_malformed": failures,
        "differ_from_alone": mismatches,
    }


def start(name: str, command: list[str], work: Path) -> Server:
    """``command`` (without its port) started on a free port, logging to ``work/name.log``."""
    port = free_port()
    split = command.index("--") if "--" in command else len(command)  # the port before pass-through options
    return Server([*command[:split], "--port", str(port), *command[split:]], port, work / f"{name}.log")


def client_of(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=600)


def engine_counters(server: Server) -> dict | None:
    """bitune's engine counters from /health (the prefix cache's use), None for other servers."""
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    return health.get("engine") if isinstance(health, dict) else None


def measure(name: str, command: list[str], model: str, work: Path, prompts: list[str], args, *,
            check: bool = False, count=None) -> dict:  # fmt: skip
    """Start one server, optionally check it (`correctness`), warm it up, load it at every level, stop it."""
    server = start(name, command, work)
    try:
        client = client_of(server)
        report = {"correctness": correctness(client, model, prompts, args.max_tokens)} if check else {}
        load(client, model, prompts[:2], 1, 4)  # warm-up
        report["levels"] = level_rows(client, model, prompts, args, count)
        if (counters := engine_counters(server)) is not None:
            report["engine"] = counters
        return report
    finally:
        server.close()


def measure_together(servers: list[tuple[str, list[str], str, dict]], work: Path, prompts: list[str], args):
    """Every server started at once (each idle while another is loaded), checked and warmed up, then loaded
    level by level, taking turns ``args.rounds`` times (each round in another order); each level keeps each
    server's round with the most tokens/s. The machine's drift over the run reaches every server alike."""
    running: dict[str, Server] = {}
    try:
        for name, command, _, _ in servers:
            running[name] = start(name, command, work)
        reports = {}
        for name, _, model, options in servers:
            client = client_of(running[name])
            check = options.get("check", False)
            reports[name] = (
                {"correctness": correctness(client, model, prompts, args.max_tokens)} if check else {}
            )
            load(client, model, prompts[:2], 1, 4)  # warm-up
            reports[name]["levels"] = []
        names = [name for name, *_ in servers]
        for clients in args.clients:
            best: dict[str, dict] = {}
            for turn in range(args.rounds):
                for name, _, model, options in (
                    servers[turn % len(servers) :] + servers[: turn % len(servers)]
                ):
                    row = load(client_of(running[name]), model, level_prompts(prompts, clients, args.requests_per_client),
                               clients, args.max_tokens, options.get("count"))  # fmt: skip
                    row = {k: v for k, v in row.items() if k != "results"}
                    if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                        best[name] = {**row, "rounds": args.rounds}
            for name in names:
                reports[name]["levels"].append(best[name])
        for name in names:
            if (counters := engine_counters(running[name])) is not None:
                reports[name]["engine"] = counters
        return reports
    finally:
        for server in running.values():
            server.close()


def bitune_serve(target: str, name: str, args, *extra: str) -> list[str]:
    return [str(BIN / "bitune"), "serve", target, "--model-name", name, "--max-batch-size",
            str(args.max_batch_size), *extra]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="a run directory (default: an untrained Bitune run)")
    parser.add_argument(
        "--engine",
        choices=("builtin", "vllm"),
        default="builtin",
        help="the engine under test: builtin (against transformers serve) or vllm (bitune serve --engine "
        "vllm against the built-in engine and plain vLLM; run it with .venv-vllm/bin/python)",
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--requests-per-client",
        type=int,
        default=4,
        help="requests per client at each level (at least 16 in all)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers serve / plain vLLM")
    parser.add_argument("--plain-bitune", action="store_true", help="also serve the base model with bitune")
    parser.add_argument(
        "--without-prefix-cache",
        action="store_true",
        help="also serve the run with the built-in engine's causal prefix cache off (--prefix-cache-tokens 0)",
    )
    parser.add_argument(
        "--same-answers",
        action="store_true",
        help="the untrained run with thetas 0: the base model's answers (equal work for every server), "
        "computed with both prompt passes and the mix",
    )
    parser.add_argument(
        "--vllm-options",
        default="",
        help="vLLM engine options for both vLLM servers, as on vLLM's command line (e.g. '--enforce-eager')",
    )
    parser.add_argument(
        "--transformers-page-size",
        type=int,
        default=None,
        help="also serve transformers serve with pages of this many tokens (--cb-block-size; its default 256 "
        "shares no prefix of prompts this short), so that it shares prefixes too",
    )
    parser.add_argument(
        "--together",
        action="store_true",
        help="start every server at once and load them level by level in turns (--rounds times, the best "
        "round kept), so that the machine's drift reaches all alike (the built-in engine only)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="turns per level with --together")
    parser.add_argument("--output", default=None, help="write the measurements as JSON here")
    args = parser.parse_args()
    if args.together and args.engine == "vllm":
        parser.error("--together runs the built-in engine's comparison only (vLLM servers are large)")

    from bitune.references import packaged_model_path

    work = Path(tempfile.mkdtemp(prefix="bitune-serve-bench-"))
    target = args.target or str(untrained_run(work / "run", args.same_answers))
    base = str(packaged_model_path("smollm2-135m-instruct"))
    report = {
        "target": args.target or "untrained Bitune run of smollm2-135m-instruct",
        "note": f"threads: torch default, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "engine": args.engine,
        "layout": f"every server at once, in turns, best of {args.rounds} rounds per level"
        if args.together
        else "one server after another",
    }
    prompts = questions(64)
    builtin = bitune_serve(target, "bitune", args, "--max-wait-ms", str(args.max_wait_ms))
    vllm_options = args.vllm_options.split()
    servers: list[tuple[str, list[str], str, dict]] = []  # name, command, model name, measure's options
    if args.engine == "vllm":
        os.environ.setdefault(
            "VLLM_CPU_KVCACHE_SPACE", "2"
        )  # GiB; vLLM's CPU default takes a share of all memory
        vllm = bitune_serve(target, "bitune", args, "--engine", "vllm", "--", *vllm_options)
        servers += [("bitune_vllm", vllm, "bitune", {"check": True}), ("bitune", builtin, "bitune", {})]
        if not args.no_baseline:  # vLLM's own OpenAI server on the base model: no Bitune, no LoRA
            plain = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base,
                     "--served-model-name", "plain", "--dtype", "float32", "--max-num-seqs",
                     str(args.max_batch_size), "--no-enable-prefix-caching", *vllm_options]  # fmt: skip
            servers.append(("plain_vllm", plain, "plain", {}))
            adapter = Path(target) / "causal" / "adapter_config.json"
            if adapter.is_file():  # the same with the run's LoRA, set up as bitune's engine sets it up
                rank = max(8, json.loads(adapter.read_text())["r"])
                lora = ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "1",
                        "--lora-modules", f"causal={adapter.parent}"]  # fmt: skip
                servers.append(("plain_vllm_lora", [*plain, *lora], "causal", {}))
    else:
        servers.append(("bitune", builtin, "bitune", {"check": True}))
        if args.without_prefix_cache:
            servers.append(("bitune_no_prefix_cache", [*builtin, "--prefix-cache-tokens", "0"], "bitune", {}))
        if args.plain_bitune:
            plain = bitune_serve(
                "smollm2-135m-instruct", "plain", args, "--max-wait-ms", str(args.max_wait_ms)
            )
            servers.append(("bitune_plain_base", plain, "plain", {}))
        if not args.no_baseline:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base)

            def count(text: str) -> int:
                return len(tokenizer(text, add_special_tokens=False)["input_ids"])

            hf = [str(BIN / "transformers"), "serve", base, "--continuous-batching"]
            if args.together:  # on CPU its paged cache takes 90 % of the machine's memory: 10 % for each
                hf += ["--cb-max-memory-percent", "0.1"]
            servers.append(("transformers_serve", hf, base, {"count": count}))
            if args.transformers_page_size:
                paged = [*hf, "--cb-block-size", str(args.transformers_page_size)]
                servers.append(("transformers_serve_paged", paged, base, {"count": count}))
    if args.together:
        results = measure_together(servers, work, prompts, args)
    else:
        results = {}
        for name, command, model, options in servers:
            results[name] = measure(name, command, model, work, prompts, args, **options)
            write(report, results, args.output)  # after every server: a later failure keeps what was measured
    write(report, results, args.output)
    print_table(report)


def write(report: dict, results: dict, output: str | None) -> None:
    """Each server's results into ``report`` (and to ``output`` as JSON)."""
    for name, result in results.items():
        report[name] = result["levels"]
        for key in ("correctness", "engine"):
            if key in result:
                report[f"{name}_{key}"] = result[key]
    if output:
        Path(output).write_text(json.dumps(report, indent=2) + "\n")


SERVERS = {
    "bitune_vllm": "bitune --engine vllm",
    "bitune": "bitune (built-in engine)",
    "bitune_no_prefix_cache": "bitune, no prefix cache",
    "bitune_plain_base": "bitune, base model",
    "transformers_serve": "transformers serve (continuous batching)",
    "transformers_serve_paged": "transformers serve, small pages",
    "plain_vllm": "plain vLLM (base model)",
    "plain_vllm_lora": "plain vLLM + the run's causal LoRA",
}


def print_table(report: dict) -> None:
    print(f"\n{report['target']}; {report['note']}; {report.get('layout', '')}")
    for name in SERVERS:
        if f"{name}_correctness" in report:
            c = report[f"{name}_correctness"]
            print(f"{SERVERS[name]}: {c['requests']} requests from {c['clients']} clients, "
                  f"{c['failed_or_malformed']} failed or malformed, {c['differ_from_alone']} differ from alone")  # fmt: skip
        if f"{name}_engine" in report and "prefix_cache" in report[f"{name}_engine"]:
            print(f"{SERVERS[name]}: causal prefix cache {report[f'{name}_engine']['prefix_cache']}")
    print("| clients | server | tokens/s | TTFT p50 [s] | latency p50 [s] | p95 [s] | tokens | requests |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label in SERVERS.items():
        for row in report.get(name, []):
            print(
                f"| {row['clients']} | {label} | {row['tokens_per_s']:.1f} | {row['ttft_p50']:.2f} | "
                f"{row['latency_p50']:.2f} | {row['latency_p95']:.2f} | {row['tokens']} | {row['requests']} |"
            )
    tested = "bitune_vllm" if report["engine"] == "vllm" else "bitune"
    levels = {r["clients"]: r for r in report.get(tested, [])}
    if levels:
        low, high = min(levels), max(levels)
        ratio = levels[high]["tokens_per_s"] / levels[low]["tokens_per_s"]
        print(f"\n{SERVERS[tested]} throughput {high} clients / {low} client: {ratio:.2f}x")
    pairs = [(tested, name) for name in SERVERS if name != tested]
    if report["engine"] == "vllm":
        pairs.append(("bitune", "plain_vllm"))  # the built-in engine against plain vLLM too
        pairs.append(("plain_vllm_lora", "plain_vllm"))  # what vLLM's LoRA costs by itself
    print("| clients | ratio | tokens/s | TTFT p50 | latency p50 | latency p95 |")
    print("|---|---|---|---|---|---|")
    for a_name, b_name in pairs:
        a_rows = {r["clients"]: r for r in report.get(a_name, [])}
        b_rows = {r["clients"]: r for r in report.get(b_name, [])}
        for clients in sorted(set(a_rows) & set(b_rows)):
            a, b = a_rows[clients], b_rows[clients]
            cells = " | ".join(
                f"{a[k] / b[k]:.2f}" for k in ("tokens_per_s", "ttft_p50", "latency_p50", "latency_p95")
            )
            print(f"| {clients} | {SERVERS[a_name]} / {SERVERS[b_name]} | {cells} |")


if __name__ == "__main__":
    main()
