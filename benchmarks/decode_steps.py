"""Cost of one decoding step by batch size: the packaged SmolLM2-135M-Instruct plain, and inside a Bitune
model with its causal adapter active (what `bitune serve` decodes with), from a 40-token cache.

    python benchmarks/decode_steps.py [--batch-sizes 1 4 16] [--steps 20]

Explains the serving benchmark's throughput ratios: the step cost at batch B over batch 1 bounds how much
batching can gain. Do not run it while other jobs use the CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from bitune import BituneConfig, get_bitune_model
from bitune.method.config import CAUSAL_ADAPTER
from bitune.references import load_model


@torch.no_grad()
def step_seconds(model, batch_size: int, steps: int, cache_length: int = 40) -> float:
    ids = torch.randint(0, 1000, (batch_size, cache_length))
    mask = torch.ones_like(ids)
    cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    current = ids[:, -1:]
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = mask.sum(dim=1, keepdim=True) - 1
        model(input_ids=current, attention_mask=mask, position_ids=positions, past_key_values=cache)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    plain, _ = load_model("smollm2-135m-instruct")
    base, _ = load_model("smollm2-135m-instruct")
    bitune = get_bitune_model(base, BituneConfig()).eval()
    print(
        "| batch | plain [ms/step] | Bitune, causal adapter [ms/step] | adapter / plain | tokens/s (Bitune) |"
    )
    print("|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        plain_s = step_seconds(plain, batch_size, args.steps)
        with bitune.method.adapters.use(CAUSAL_ADAPTER):
            bitune_s = step_seconds(bitune.base_model, batch_size, args.steps)
        print(
            f"| {batch_size} | {plain_s * 1000:.1f} | {bitune_s * 1000:.1f} | {bitune_s / plain_s:.2f} | "
            f"{batch_size / bitune_s:.1f} |"
        )


if __name__ == "__main__":
    main()
