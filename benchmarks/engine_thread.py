"""Cost of a decoding step by the thread that runs it, on CPU: the serving engine decodes in its own worker
thread, and whether another thread of the process ever ran parallel torch work changes its speed.

    python benchmarks/engine_thread.py [--batch-size 1] [--steps 30] [--repeats 5]

Three cases, each in a fresh process, on the packaged SmolLM2-135M-Instruct merged for inference as `bitune
serve` loads it: loaded and decoded in the main thread; loaded in the main thread and decoded in a worker
thread (how `bitune serve` ran before); loaded in a thread that ends (`bitune.serving.in_passing_thread`)
and decoded in a worker thread (how it runs now). Prints each case's best step time and its ratio to the
first. Do not run it while other jobs use the CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading

CASES = {
    "main": "loaded and decoded in the main thread",
    "worker after main": "loaded in the main thread, decoded in a worker thread",
    "worker after passing": "loaded in a thread that ended, decoded in a worker thread",
}


def measure(case: str, batch_size: int, steps: int, repeats: int) -> float:
    from bitune.inference import load_for_inference
    from bitune.serving import in_passing_thread
    from decode_steps import step_seconds

    def load():
        return load_for_inference("smollm2-135m-instruct")

    loaded = in_passing_thread(load) if case == "worker after passing" else load()
    model = loaded.model

    def best() -> float:
        return min(step_seconds(model.decode, model.prefill, batch_size, steps) for _ in range(repeats))

    if case == "main":
        return best()
    result = []
    worker = threading.Thread(target=lambda: result.append(best()))
    worker.start()
    worker.join()
    return result[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.batch_size, args.steps, args.repeats)))
        return
    seconds = {}
    for case in CASES:
        command = [sys.executable, __file__, "--case", case, "--batch-size", str(args.batch_size)]
        command += ["--steps", str(args.steps), "--repeats", str(args.repeats)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        seconds[case] = json.loads(output.strip().splitlines()[-1])
    print(f"batch {args.batch_size}, best of {args.repeats} x {args.steps} steps from a 40-token cache")
    print("| case | ms/step | / main thread |")
    print("|---|---|---|")
    for case, value in seconds.items():
        print(f"| {CASES[case]} | {1000 * value:.1f} | {value / seconds['main']:.2f} |")


if __name__ == "__main__":
    main()
