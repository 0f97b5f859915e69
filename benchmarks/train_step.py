"""Training-step time of Bitune against LoRA, measured in one process, as ratios.

    python benchmarks/train_step.py                      # SmolLM2-135M shape, batch 4, prompt 64, answer 64
    python benchmarks/train_step.py --prompt 50 --answer 200 --repeats 7

Methods, all on the same randomly initialised model shape and the same batch (weights do not matter for
cost): ``hf_peft_lora`` is what users run today (HF model + PEFT LoRA over the whole sequence, labels -100
on the prompt); ``lora`` and ``bitune`` are bitune's variants. A step is forward + backward + AdamW step.
Steps of the methods are interleaved and the median is taken, because this machine is noisy; only ratios
measured within one run are meaningful.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from bitune import BituneConfig, default_peft_config, get_bitune_model

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): config.json values
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}


def build(method: str, base: torch.nn.Module):
    model = copy.deepcopy(base)
    if method == "hf_peft_lora":
        return get_peft_model(model, default_peft_config())
    return get_bitune_model(model, BituneConfig(variant=method))


def make_batch(
    batch_size: int, prompt: int, answer: int, vocab: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, prompt + answer), generator=generator)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--answer", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method (after one warm-up)")
    parser.add_argument("--methods", nargs="+", default=["hf_peft_lora", "lora", "bitune"])
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.shape])
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    batch = make_batch(args.batch, args.prompt, args.answer, config.vocab_size)
    models = {m: build(m, base) for m in args.methods}
    del base
    optimizers = {
        m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for m, model in models.items()
    }
    for model in models.values():
        model.train()

    def step(method: str) -> float:
        start = time.perf_counter()
        loss = models[method](**batch).loss
        loss.backward()
        optimizers[method].step()
        optimizers[method].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for m in args.methods:
        step(m)  # warm-up
    for _ in range(args.repeats):
        for m in args.methods:
            times[m].append(step(m))

    medians = {m: statistics.median(t) for m, t in times.items()}
    baseline = "lora" if "lora" in medians else args.methods[0]
    print(
        f"shape={args.shape} batch={args.batch} prompt={args.prompt} answer={args.answer} "
        f"repeats={args.repeats} threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(f"| method | median step [s] | min [s] | ratio vs {baseline} | ratio vs {args.methods[0]} |")
    print("|---|---|---|---|---|")
    for m in args.methods:
        print(
            f"| {m} | {medians[m]:.3f} | {min(times[m]):.3f} | {medians[m] / medians[baseline]:.3f} "
            f"| {medians[m] / medians[args.methods[0]]:.3f} |"
        )


if __name__ == "__main__":
    main()
