"""Generation time of Bitune against the HF model + PEFT LoRA, greedy, as ratios measured in one run.

    python benchmarks/generate.py                       # SmolLM2-135M shape, 50:200 and 200:50, batch 1 and 8
    python benchmarks/generate.py --repeats 5

Bitune prefills the prompt twice (its two prompt passes) and then decodes exactly like the plain model
(paper appendix 6.4). Random weights, so every sequence is forced to its full length (min_new_tokens).
The prefills are also timed alone (HF: one forward over the prompt, as ``generate`` starts; Bitune:
``model.prefill``), which gives the ratio the method cannot beat in this run:
floor = (hf generate + bitune prefill - hf prefill) / hf generate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, build, random_model


def timed_generate(model, ids: torch.Tensor, kwargs: dict) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return time.perf_counter() - start


def timed_prefill(name: str, model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        if name == "bitune":
            model.prefill(ids, torch.ones_like(ids))
        else:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    parser.add_argument("--lengths", nargs="+", default=["50:200", "200:50"], help="prompt:new tokens")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    base = random_model(args.shape)
    models = {"hf_peft_lora": build("hf_peft_lora", base).eval(), "bitune": build("bitune", base).eval()}
    print(f"shape={args.shape} repeats={args.repeats} threads={torch.get_num_threads()} greedy")
    print(
        "| prompt:new | batch | hf_peft_lora [s] | bitune [s] | ratio bitune / hf_peft_lora "
        "| prefill hf / bitune [s] | floor from prefills |"
    )
    print("|---|---|---|---|---|---|---|")
    for lengths in args.lengths:
        prompt, new = (int(x) for x in lengths.split(":"))
        for batch in args.batches:
            ids = torch.randint(
                3, base.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0)
            )
            kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

            times = {name: [] for name in models}
            prefills = {name: [] for name in models}
            for name in models:
                timed_generate(models[name], ids, kwargs)  # warm-up
            for _ in range(args.repeats):
                for name in models:
                    times[name].append(timed_generate(models[name], ids, kwargs))
                    prefills[name].append(timed_prefill(name, models[name], ids))
            hf, bt = statistics.median(times["hf_peft_lora"]), statistics.median(times["bitune"])
            p_hf, p_bt = statistics.median(prefills["hf_peft_lora"]), statistics.median(prefills["bitune"])
            floor = (hf + p_bt - p_hf) / hf
            print(
                f"| {lengths} | {batch} | {hf:.2f} | {bt:.2f} | {bt / hf:.3f} | {p_hf:.2f} / {p_bt:.2f} "
                f"| {floor:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
