"""Where the built-in engine's time goes, in process (no HTTP), on an untrained Bitune run of the packaged
SmolLM2-135M-Instruct merged for inference as `bitune serve` loads it, with the chat questions of
`benchmarks/serve.py` (up to 64 greedy tokens each).

    python benchmarks/engine_steps.py [--clients 1 16] [--requests-per-client 4] [--rounds 2]

Closed-loop clients (each sends its next request when its last one is answered, all starting together) at
each level, two ways: the engine as it is, which admits into a running batch only as many queued requests as
one joined forward takes (`BatchingEngine._admitted`), and the same engine admitting every queued request at
once (a burst then gets one large prefill between two steps). For each: tokens/s, each model call's count
and seconds, and the longest call, which is how long every running stream waits for its next token at
worst. Best round by tokens/s, the two ways taking turns within a round. Do not run it while other jobs use
the CPU.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve import questions, untrained_run

CALLS = ("prefill_tokens", "prefill_joined", "decode", "decode_joining")


class Timed:
    """Counts and times ``model``'s calls that an engine makes (each one's total and longest)."""

    def __init__(self, model) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.longest: collections.Counter[str] = collections.Counter()
        for name in CALLS:
            object.__setattr__(model, name, self._timed(name, getattr(model, name)))

    def _timed(self, name, call):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = call(*args, **kwargs)
            took = time.perf_counter() - start
            self.seconds[name] += took
            self.calls[name] += 1
            self.longest[name] = max(self.longest[name], took)
            return result

        return timed

    def clear(self) -> None:
        for counter in (self.seconds, self.calls, self.longest):
            counter.clear()


def serve(engine, prompts: list[list[int]], clients: int, max_tokens: int) -> tuple[float, int]:
    """Seconds and answer tokens for ``prompts`` sent by ``clients`` closed-loop clients."""
    from bitune.serving.engine import GenerationRequest

    lock, waiting, tokens = threading.Lock(), list(reversed(prompts)), [0]

    def client() -> None:
        while True:
            with lock:
                if not waiting:
                    return
                prompt = waiting.pop()
            done, answer = threading.Event(), []

            def finished(completion, answer=answer, done=done) -> None:
                answer.append(completion)
                done.set()

            engine.submit(GenerationRequest(list(prompt), max_tokens, on_done=finished))
            done.wait()
            with lock:
                tokens[0] += answer[0].completion_tokens

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, tokens[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from bitune.inference import load_for_inference, prompt_ids
    from bitune.serving import in_passing_thread
    from bitune.serving.engine import BatchingEngine

    # built and loaded in threads that end, as `bitune serve` loads (benchmarks/engine_thread.py: torch work
    # in the main thread slows the engine's worker thread)
    run = in_passing_thread(lambda: untrained_run(Path(tempfile.mkdtemp()) / "run", True))
    loaded = in_passing_thread(lambda: load_for_inference(str(run)))
    timed = Timed(loaded.model)
    prompts = [prompt_ids(loaded, [{"role": "user", "content": q}]) for q in questions(64)]
    engine = BatchingEngine(loaded, max_batch_size=16)  # one engine: a second worker thread slows both
    engine.start()
    serve(engine, prompts[:8], 4, args.max_tokens)  # warm up (and the joining check, once)

    def admitting(everything: bool) -> None:
        """Admit every queued request at once (as before), or as the engine does."""
        if everything:
            engine._admitted = engine._live
        else:
            engine.__dict__.pop("_admitted", None)

    ways = {"admits what one joined forward takes": False, "admits every queued request": True}
    for clients in args.clients:
        best: dict[str, tuple] = {}
        for _ in range(args.rounds):
            for name, everything in ways.items():
                admitting(everything)
                timed.clear()
                seconds, tokens = serve(engine, prompts[: clients * args.requests_per_client], clients,
                                        args.max_tokens)  # fmt: skip
                measured = (tokens / seconds, dict(timed.calls), dict(timed.seconds), dict(timed.longest))
                if name not in best or measured[0] > best[name][0]:
                    best[name] = measured
        print(f"\n{clients} clients")
        print("| engine | tokens/s | calls (count, s) | longest call [s] |\n|---|---|---|---|")
        for name, (rate, calls, seconds, longest) in best.items():
            spent = ", ".join(f"{c} {calls[c]} / {seconds[c]:.2f}" for c in CALLS if c in calls)
            print(
                f"| {name} | {rate:.1f} | {spent} | {max(longest.values()):.3f} ({max(longest, key=longest.get)}) |"
            )
    engine.stop()


if __name__ == "__main__":
    main()
