"""Training step time and peak memory of Bitune against the LoRA users run today, as ratios measured in
one run.

    python benchmarks/train_step.py                                   # both shapes, 64:64, 50:200, 200:50
    python benchmarks/train_step.py --shapes smollm2-135m --lengths 64:64 --repeats 7
    python benchmarks/train_step.py --no-memory                       # time only

Methods (benchmarks/shapes.py): ``hf_peft_lora`` (HF model + PEFT LoRA over the whole sequence, labels
-100 on the prompt), bitune's ``lora`` and ``bitune``, and ``bitune_recompute`` (``checkpoint_prompt_passes``);
same random-weight model and batch (4 rows), each in training mode as ``bitune train`` runs it. A
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


def time_steps(
    shape: str, prompt: int, answer: int, batch_size: int, repeats: int, methods: list[str]
) -> dict[str, float]:
    base = random_model(shape)
    batch = make_batch(batch_size, prompt, answer, base.config.vocab_size)
    steps = {}
    for method in methods:
        model = build(method, base).train()
        steps[method] = step_fn(model, batch)
        steps[method]()  # warm-up
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for method in methods:
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


def measure_memory(
    shape: str, prompt: int, answer: int, batch_size: int, methods: list[str]
) -> dict[str, dict[str, float]]:
    out = {}
    for method in methods:
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
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        shape, method, prompt, answer, batch = args.memory_child
        memory_child(shape, method, int(prompt), int(answer), int(batch))
        return

    methods = ["hf_peft_lora", *(m for m in args.methods if m != "hf_peft_lora")]
    print(
        f"batch={args.batch} repeats={args.repeats} threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    others = methods[1:]
    header = ["shape", "prompt:answer", *(f"{m} [s]" for m in methods), *(f"{m} / hf" for m in others)]
    if not args.no_memory:
        header += [*(f"peak MB {m}" for m in methods), *(f"peak {m} / hf" for m in others)]
        header += [f"training MB {m}" for m in methods]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for shape in args.shapes:
        for lengths in args.lengths:
            prompt, answer = (int(x) for x in lengths.split(":"))
            t = time_steps(shape, prompt, answer, args.batch, args.repeats, methods)
            cells = [shape, lengths, *(f"{t[m]:.3f}" for m in methods)]
            cells += [f"{t[m] / t['hf_peft_lora']:.3f}" for m in others]
            if not args.no_memory:
                mem = measure_memory(shape, prompt, answer, args.batch, methods)
                cells += [f"{mem[m]['peak_mb']:.0f}" for m in methods]
                cells += [f"{mem[m]['peak_mb'] / mem['hf_peft_lora']['peak_mb']:.3f}" for m in others]
                cells += [f"{mem[m]['training_mb']:.0f}" for m in methods]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
