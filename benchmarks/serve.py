"""Serving benchmark: `bitune serve` under load from the official `openai` client, on loopback, and the same
base model under `transformers serve --continuous-batching` (plain causal, no Bitune, paged attention) at the
same concurrency; with ``--plain-bitune`` also bitune's own engine serving the base model alone (the engine's
cost without the second prompt pass).

    python benchmarks/serve.py                       # a Bitune run of the packaged smollm2-135m-instruct
    python benchmarks/serve.py --target runs/chat    # or a trained run

1. Correctness: 64 chat requests (greedy, the questions of examples/chat_conversations.jsonl and variations)
   from 16 concurrent clients; every response must arrive, be well formed, and equal the same request
   served alone afterwards.
2. Throughput and latency at 1, 4 and 16 concurrent clients (``--requests-per-client`` requests each, at
   least 16 per level; streamed, greedy, ``--max-tokens`` each): generated tokens per second over the whole
   run, time to first token and request latency (p50, p95), for bitune and for transformers serve, and
   their ratio.

Without ``--target`` the served run is an untrained Bitune model of the packaged SmolLM2-135M-Instruct (zero
adapters, mixing at its initial 50 %) saved to a temporary folder: it runs exactly the computation of a
trained run (two prompt passes, mixing, causal decoding). Its answers differ from the base model's, and so
do their lengths, which moves tokens/s; ``--same-answers`` zeroes its thetas, so that it answers as the base
model does (the same tokens from every server) while still computing both prompt passes and the mix. Both servers are started and stopped by this
script; request counts are bounded. Do not run it while other jobs use the CPU.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="a run directory (default: an untrained Bitune run)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--requests-per-client",
        type=int,
        default=4,
        help="requests per client at each level (at least 16 in all)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers serve")
    parser.add_argument("--plain-bitune", action="store_true", help="also serve the base model with bitune")
    parser.add_argument(
        "--same-answers",
        action="store_true",
        help="the untrained run with thetas 0: the base model's answers (equal work for every server), "
        "computed with both prompt passes and the mix",
    )
    parser.add_argument("--output", default=None, help="write the measurements as JSON here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bitune-serve-bench-"))
    target = args.target or str(untrained_run(work / "run", args.same_answers))
    env_note = f"threads: torch default, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    port = free_port()
    bitune = Server(
        [str(BIN / "bitune"), "serve", target, "--port", str(port), "--model-name", "bitune",
         "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)],
        port, work / "bitune.log",
    )  # fmt: skip
    report = {"target": args.target or "untrained Bitune run of smollm2-135m-instruct", "note": env_note}
    try:
        client = OpenAI(base_url=f"{bitune.url}/v1", api_key="x", max_retries=0, timeout=600)
        prompts = questions(64)
        together = load(client, "bitune", prompts, 16, args.max_tokens)
        alone = [ask(client, "bitune", q, args.max_tokens) for q in prompts]
        failures = sum(
            1 for r in together["results"] if r["finish"] not in ("stop", "length") or r["tokens"] is None
        )
        mismatches = sum(1 for a, b in zip(together["results"], alone, strict=True) if a["text"] != b["text"])
        report["correctness"] = {
            "requests": len(prompts),
            "clients": 16,
            "failed_or_malformed": failures,
            "differ_from_alone": mismatches,
        }
        print(
            f"correctness: {len(prompts)} requests from 16 clients: {failures} failed/malformed, {mismatches} differ from alone"
        )
        report["bitune"] = [
            {
                k: v
                for k, v in load(
                    client, "bitune", level_prompts(prompts, c, args.requests_per_client), c, args.max_tokens
                ).items()
                if k != "results"
            }
            for c in args.clients
        ]
    finally:
        bitune.close()
    if args.plain_bitune:
        port = free_port()
        plain = Server(
            [str(BIN / "bitune"), "serve", "smollm2-135m-instruct", "--port", str(port), "--model-name", "plain",
             "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)],
            port, work / "plain.log",
        )  # fmt: skip
        try:
            client = OpenAI(base_url=f"{plain.url}/v1", api_key="x", max_retries=0, timeout=600)
            report["bitune_plain_base"] = [
                {
                    k: v
                    for k, v in load(
                        client,
                        "plain",
                        level_prompts(prompts, c, args.requests_per_client),
                        c,
                        args.max_tokens,
                    ).items()
                    if k != "results"
                }
                for c in args.clients
            ]
        finally:
            plain.close()
    if not args.no_baseline:
        from transformers import AutoTokenizer

        from bitune.references import packaged_model_path

        path = str(packaged_model_path("smollm2-135m-instruct"))
        tokenizer = AutoTokenizer.from_pretrained(path)

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        port = free_port()
        hf = Server(
            [str(BIN / "transformers"), "serve", path, "--port", str(port), "--continuous-batching"],
            port,
            work / "transformers.log",
        )
        try:
            client = OpenAI(base_url=f"{hf.url}/v1", api_key="x", max_retries=0, timeout=600)
            load(client, path, prompts[:2], 1, 4)  # warm-up
            report["transformers_serve"] = [
                {
                    k: v
                    for k, v in load(
                        client,
                        path,
                        level_prompts(prompts, c, args.requests_per_client),
                        c,
                        args.max_tokens,
                        count,
                    ).items()
                    if k != "results"
                }
                for c in args.clients
            ]
        finally:
            hf.close()
    print_table(report)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict) -> None:
    print(f"\n{report['target']}; {report['note']}")
    print("| clients | server | tokens/s | TTFT p50 [s] | latency p50 [s] | p95 [s] | tokens | requests |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("bitune", "bitune_plain_base", "transformers_serve"):
        for row in report.get(name, []):
            print(
                f"| {row['clients']} | {name} | {row['tokens_per_s']:.1f} | {row['ttft_p50']:.2f} | "
                f"{row['latency_p50']:.2f} | {row['latency_p95']:.2f} | {row['tokens']} | {row['requests']} |"
            )
    bitune = {r["clients"]: r["tokens_per_s"] for r in report.get("bitune", [])}
    if bitune:
        low, high = min(bitune), max(bitune)
        print(
            f"\nbitune throughput {high} clients / {low} client: {bitune[high] / bitune[low]:.2f}x (target >= 4x)"
        )
    hf = {r["clients"]: r["tokens_per_s"] for r in report.get("transformers_serve", [])}
    for clients in sorted(set(bitune) & set(hf)):
        print(f"bitune / transformers serve at {clients} clients: {bitune[clients] / hf[clients]:.2f}")


if __name__ == "__main__":
    main()
