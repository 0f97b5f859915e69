"""Training step time and peak memory of Bitune against the LoRA users run today, as ratios measured in
one run.

    python benchmarks/train_step.py                                   # both shapes, 64:64, 50:200, 200:50
    python benchmarks/train_step.py --shapes smollm2-135m --lengths 64:64 --repeats 7
    python benchmarks/train_step.py --no-memory                       # time only

Methods (benchmarks/shapes.py): ``hf_peft_lora`` (HF model + PEFT LoRA over the whole sequence, labels
-100 on the prompt), bitune's ``lora`` and ``bitune``; same random-weight model and batch (4 rows). A
step is forward + backward + AdamW step. Steps of the methods are interleaved and medians taken, since
this machine is noisy; only ratios within one run mean anything. Peak memory is the peak resident set
(sampled every 2 ms) of a separate process per method during two steps (CPU: no allocator statistics),
reported as the total and as the part above the process's size just before training.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import METHODS, SHAPES, build, make_batch, random_model


def step_fn(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def time_steps(shape: str, prompt: int, answer: int, batch_size: int, repeats: int) -> dict[str, float]:
    base = random_model(shape)
    batch = make_batch(batch_size, prompt, answer, base.config.vocab_size)
    steps = {}
    for method in METHODS:
        model = build(method, base).train()
        steps[method] = step_fn(model, batch)
        steps[method]()  # warm-up
    times = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method in METHODS:
            times[method].append(steps[method]())
    return {m: statistics.median(t) for m, t in times.items()}


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def memory_child(shape: str, method: str, prompt: int, answer: int, batch_size: int) -> None:
    base = random_model(shape)
    model = build(method, base).train()
    del base
    batch = make_batch(batch_size, prompt, answer, model.config.vocab_size)
    step = step_fn(model, batch)
    before = rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # the resident set, every 2 ms, while the steps run
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    step()
    done.set()
    sampler.join()
    print(json.dumps({"peak_mb": peak[0], "training_mb": peak[0] - before}))


def measure_memory(shape: str, prompt: int, answer: int, batch_size: int) -> dict[str, dict[str, float]]:
    out = {}
    for method in METHODS:
        args = [
            sys.executable,
            __file__,
            "--memory-child",
            shape,
            method,
            str(prompt),
            str(answer),
            str(batch_size),
        ]
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        out[method] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--lengths", nargs="+", default=["64:64", "50:200", "200:50"], help="prompt:answer")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method (after one warm-up)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        shape, method, prompt, answer, batch = args.memory_child
        memory_child(shape, method, int(prompt), int(answer), int(batch))
        return

    print(
        f"batch={args.batch} repeats={args.repeats} threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(
        "| shape | prompt:answer | hf_peft_lora [s] | lora [s] | bitune [s] | bitune / hf_peft_lora "
        "| lora / hf_peft_lora | bitune / lora | peak MB hf / lora / bitune | peak ratio bitune / hf "
        "| training MB hf / lora / bitune |"
    )
    print("|---" * 11 + "|")
    for shape in args.shapes:
        for lengths in args.lengths:
            prompt, answer = (int(x) for x in lengths.split(":"))
            t = time_steps(shape, prompt, answer, args.batch, args.repeats)
            row = (
                f"| {shape} | {lengths} | {t['hf_peft_lora']:.3f} | {t['lora']:.3f} | {t['bitune']:.3f} "
                f"| {t['bitune'] / t['hf_peft_lora']:.3f} | {t['lora'] / t['hf_peft_lora']:.3f} "
                f"| {t['bitune'] / t['lora']:.3f} |"
            )
            if args.no_memory:
                print(row + " - | - | - |", flush=True)
                continue
            m = measure_memory(shape, prompt, answer, args.batch)
            peak = " / ".join(f"{m[x]['peak_mb']:.0f}" for x in METHODS)
            training = " / ".join(f"{m[x]['training_mb']:.0f}" for x in METHODS)
            ratio = m["bitune"]["peak_mb"] / m["hf_peft_lora"]["peak_mb"]
            print(f"{row} {peak} | {ratio:.3f} | {training} |", flush=True)


if __name__ == "__main__":
    main()
