"""The answer loss with and without materialised logits: time of forward + backward, as ratios in one run.

    python benchmarks/answer_loss.py                     # both shapes' heads, 256 and 800 answer tokens
    python benchmarks/answer_loss.py --rows 256 --repeats 9

``full`` is what a causal LM does (logits = head(hidden), fp32 cross-entropy, autograd through both);
``chunk=N`` is `bitune.method.loss.linear_cross_entropy` with N logits (rows x vocabulary) at a time, which holds
one chunk of logits instead of the logits, their log-softmax and their gradient. The head's weight is
random with each shape's size (SmolLM2-135M: 49152 x 576, Gemma-3-270M: 262144 x 640), frozen as in
fine-tuning. Calls are interleaved and medians taken.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bitune.method.loss import CHUNK_ELEMENTS, answer_loss, linear_cross_entropy

HEADS = {"smollm2-135m": (576, 49152), "gemma-3-270m": (640, 262144)}


def timer(fn, hidden: torch.Tensor):
    def run() -> float:
        start = time.perf_counter()
        fn(hidden).backward()
        hidden.grad = None
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--rows", nargs="+", type=int, default=[256, 800], help="supervised answer tokens")
    parser.add_argument("--chunks", nargs="+", type=int, default=[2**22, 2**24, CHUNK_ELEMENTS, 2**28])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"repeats={args.repeats} threads={torch.get_num_threads()} default chunk={CHUNK_ELEMENTS}")
    names = ["full", *(f"chunk={c}" for c in args.chunks)]
    print(
        "| head | rows | "
        + " | ".join(f"{n} [s]" for n in names)
        + " | "
        + " | ".join(f"{n} / full" for n in names[1:])
        + " |"
    )
    print("|---" * (2 + 2 * len(names) - 1) + "|")
    for shape in args.shapes:
        hidden_size, vocab = HEADS[shape]
        torch.manual_seed(0)
        head = nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
        for rows in args.rows:
            hidden = torch.randn(1, rows, hidden_size, requires_grad=True)
            targets = torch.randint(0, vocab, (1, rows))
            fns = {"full": lambda h, t=targets, w=head: answer_loss(w(h), t)}
            for c in args.chunks:
                fns[f"chunk={c}"] = lambda h, t=targets, c=c, w=head: linear_cross_entropy(
                    h, w, t, chunk_elements=c
                )
            runs = {n: timer(f, hidden) for n, f in fns.items()}
            for run in runs.values():
                run()  # warm-up
            times = {n: [] for n in names}
            for _ in range(args.repeats):
                for n in names:
                    times[n].append(runs[n]())
            med = {n: statistics.median(t) for n, t in times.items()}
            cells = [f"{med[n]:.3f}" for n in names] + [f"{med[n] / med['full']:.2f}" for n in names[1:]]
            print(f"| {shape} | {rows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
