"""Cost of one decoding step by batch size, from a 40-token cache, on the packaged SmolLM2-135M-Instruct: the
plain model; a Bitune model decoding with its causal adapter unmerged (PEFT's LoRA layers); and the same
model merged for inference (`BituneModel.merge_for_inference`: what `bitune serve`, `generate` and `chat`
decode with), all through `BituneModel.decode` where it applies.

    python benchmarks/decode_steps.py [--batch-sizes 1 16] [--steps 30] [--repeats 5]

Target: merged / plain <= 1.05 at batch 1 and 16 (the ratios, measured in the same run; each figure is the
best of ``--repeats`` timings). Do not run it while other jobs use the CPU.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bitune import BituneConfig, get_bitune_model
from bitune.references import load_model


@torch.no_grad()
def step_seconds(step, prefill, batch_size: int, steps: int, cache_length: int = 40) -> float:
    """The mean time of ``steps`` decoding steps from a fresh ``cache_length``-token cache."""
    ids = torch.randint(0, 1000, (batch_size, cache_length))
    mask = torch.ones_like(ids)
    cache = prefill(ids, mask)
    current = ids[:, -1:]
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = mask.sum(dim=1, keepdim=True) - 1
        step(cache, current, mask, positions)
    return (time.perf_counter() - start) / steps


def best_of(contenders: dict, repeats: int, **run) -> dict[str, float]:
    """Each contender's best time over ``repeats`` rounds, the contenders taking turns within a round (so that
    the machine's drift reaches them alike)."""
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(repeats):
        for name, (step, prefill) in contenders.items():
            best[name] = min(best[name], step_seconds(step, prefill, **run))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    plain, _ = load_model("smollm2-135m-instruct")
    plain.eval()
    base, _ = load_model("smollm2-135m-instruct")
    unmerged = get_bitune_model(base, BituneConfig()).eval()
    merged = copy.deepcopy(unmerged)
    assert merged.merge_for_inference()

    def plain_prefill(ids, mask):
        return plain(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values

    def plain_step(cache, current, mask, positions):
        return plain(
            input_ids=current, attention_mask=mask, position_ids=positions, past_key_values=cache
        ).logits

    def bitune_prefill(model):
        return lambda ids, mask: model.prefill(
            torch.cat([ids, ids[:, -1:]], dim=1), torch.cat([mask, mask[:, -1:]], dim=1)
        )

    print(
        "| batch | plain [ms/step] | unmerged [ms/step] | merged [ms/step] | unmerged / plain | merged / plain |"
    )
    print("|---|---|---|---|---|---|")
    contenders = {
        "plain": (plain_step, plain_prefill),
        "unmerged": (unmerged.decode, bitune_prefill(unmerged)),
        "merged": (merged.decode, bitune_prefill(merged)),
    }
    for batch_size in args.batch_sizes:
        best = best_of(contenders, args.repeats, batch_size=batch_size, steps=args.steps)
        plain_s, unmerged_s, merged_s = best["plain"], best["unmerged"], best["merged"]
        print(
            f"| {batch_size} | {plain_s * 1000:.1f} | {unmerged_s * 1000:.1f} | {merged_s * 1000:.1f} | "
            f"{unmerged_s / plain_s:.2f} | {merged_s / plain_s:.2f} |"
        )


if __name__ == "__main__":
    main()
