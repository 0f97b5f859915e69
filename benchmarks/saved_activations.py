"""Activation memory of a training step: the tensors autograd saves for backward, per method.

    python benchmarks/saved_activations.py                          # SmolLM2-135M shape, batch 4, 64:64
    python benchmarks/saved_activations.py --shape gemma-3-270m --lengths 200:50

Counts every storage saved for backward during one forward (parameters excluded) with
``torch.autograd.graph.saved_tensors_hooks``. Unlike a peak resident set it does not depend on the
allocator, so it tells what a method must keep alive, i.e. its memory floor without recomputation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import METHODS, SHAPES, build, make_batch, random_model


def saved_megabytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """MB of distinct non-parameter storages saved for backward by one forward of ``model``."""
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss  # keeps the graph, so no saved storage is freed and reused meanwhile
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = sum(n for ptr, n in sizes.items() if ptr not in params) / 2**20
    del loss
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--lengths", default="64:64", help="prompt:answer")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    prompt, answer = (int(x) for x in args.lengths.split(":"))
    base = random_model(args.shape)
    batch = make_batch(args.batch, prompt, answer, base.config.vocab_size)
    weights = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    saved = {m: saved_megabytes(build(m, base).train(), batch) for m in METHODS}
    print(f"shape={args.shape} batch={args.batch} prompt={prompt} answer={answer} weights={weights:.0f} MB")
    print("| method | saved for backward [MB] | ratio vs hf_peft_lora | with weights, ratio |")
    print("|---|---|---|---|")
    for m in METHODS:
        ratio = saved[m] / saved["hf_peft_lora"]
        with_weights = (saved[m] + weights) / (saved["hf_peft_lora"] + weights)
        print(f"| {m} | {saved[m]:.0f} | {ratio:.2f} | {with_weights:.2f} |")


if __name__ == "__main__":
    main()
