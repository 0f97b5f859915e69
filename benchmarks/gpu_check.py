"""A check for the first machine with a GPU: Bitune against plain PEFT LoRA on models of real shapes with
random weights (nothing is downloaded), as ratios measured in one run, written to a JSON file.

    python benchmarks/gpu_check.py --out gpu_check.json                        # CUDA: the three real shapes
    python benchmarks/gpu_check.py --shapes tiny-llama --steps 2 --out x.json  # CPU: a tiny shape (tested)

For each shape and attention implementation (``sdpa``, and ``flash_attention_2`` too where it is installed; ``eager`` for Gemma 2, which
transformers runs only eagerly) it
builds the model in bf16 on CUDA (fp32 on CPU), wraps it as ``hf_peft_lora`` (PEFT LoRA over the whole
sequence, labels -100 on the prompt) and ``bitune`` (bitune's default variant), and measures a train step
(forward + backward + AdamW; median of ``--steps`` after one warm-up), its peak memory
(``torch.cuda.max_memory_allocated``; None on CPU), the prefill of the prompts and greedy decode steps. It
checks that the thetas are fp32 after training and every loss is finite. A configuration bitune refuses
(e.g. an attention implementation that takes no 4D masks, which the bidirectional pass needs) is recorded
with its error message instead of numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import DynamicCache

from bitune import BituneConfig, default_peft_config, get_bitune_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import GPU_SHAPES, random_model

REAL_SHAPES = ["llama-3.2-1b", "gemma-2-2b", "llama-3-8b"]
# transformers runs Gemma 2's soft-capped attention only eagerly (sdpa is refused at construction)
ATTENTION = {"gemma-2-2b": ["eager"]}


def wrap(method: str, base: torch.nn.Module) -> torch.nn.Module:
    if method == "hf_peft_lora":
        return get_peft_model(base, default_peft_config())
    return get_bitune_model(base, BituneConfig(variant="bitune"))


def batch(rows: int, prompt: int, answer: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, prompt + answer), generator=generator).to(device)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(method: str, base, inputs: dict, prompt: int, steps: int, decode: int, device: str) -> dict:
    model = wrap(method, base).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    losses = []

    def step() -> None:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    step_times = [timed(step, device) for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None

    model.eval()
    prompt_ids, mask = inputs["input_ids"][:, :prompt], inputs["attention_mask"][:, :prompt]
    with torch.no_grad():

        def prefill():
            if method == "bitune":
                return model.prefill(prompt_ids, mask)
            cache = DynamicCache()
            return model(input_ids=prompt_ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache)

        prefill()  # warm-up
        prefill_times = [timed(prefill, device) for _ in range(steps)]
        prefilled = prefill()
        cache = prefilled if method == "bitune" else prefilled.past_key_values
        token = prompt_ids[:, -1:]
        seen = prompt - 1

        def decode_step() -> None:
            nonlocal token, seen
            columns = torch.ones((token.shape[0], seen + 1), dtype=torch.long, device=device)
            positions = torch.full_like(token, seen)
            if method == "bitune":
                logits = model.decode(cache, token, columns, positions)
            else:
                logits = model(
                    input_ids=token, attention_mask=columns, position_ids=positions, past_key_values=cache
                ).logits
            token, seen = logits[:, -1:].argmax(-1), seen + 1

        decode_times = [timed(decode_step, device) for _ in range(decode)]
    record = {
        "train_step_s": statistics.median(step_times),
        "peak_memory_mb": peak,
        "prefill_s": statistics.median(prefill_times),
        "decode_step_s": statistics.median(decode_times[1:] or decode_times),
        "losses_finite": all(math.isfinite(x) for x in losses),
        "trainable_parameters": sum(p.numel() for p in trainable),
    }
    if method == "bitune":
        record["thetas_fp32"] = all(p.dtype == torch.float32 for p in model.mixing.parameters())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=REAL_SHAPES, choices=list(GPU_SHAPES))
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--answer", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed train steps / prefills (after a warm-up)")
    parser.add_argument("--decode", type=int, default=16, help="timed decode steps")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    attns = ["sdpa"]
    try:
        import flash_attn  # noqa: F401

        attns.append("flash_attention_2")
    except ImportError:
        pass
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "rows": args.rows,
        "prompt": args.prompt,
        "answer": args.answer,
        "runs": [],
    }
    for shape in args.shapes:
        for attn in ATTENTION.get(shape, attns):
            entry, base = {"shape": shape, "attn_implementation": attn}, None
            try:
                base = random_model(shape, dtype=dtype, attn_implementation=attn, device=device)
                inputs = batch(args.rows, args.prompt, args.answer, base.config.vocab_size, device)
                for method in ("hf_peft_lora", "bitune"):
                    model_base = copy.deepcopy(base) if method == "hf_peft_lora" else base
                    entry[method] = measure(
                        method, model_base, inputs, args.prompt, args.steps, args.decode, device
                    )
                    del model_base
                plain, ours = entry["hf_peft_lora"], entry["bitune"]
                entry["ratios"] = {
                    k: ours[k] / plain[k]
                    for k in ("train_step_s", "peak_memory_mb", "prefill_s", "decode_step_s")
                    if ours[k] is not None and plain[k]
                }
            except (ValueError, RuntimeError, torch.OutOfMemoryError) as exc:
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            results["runs"].append(entry)
            print(json.dumps(entry), flush=True)
            del base
            if device == "cuda":
                torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
