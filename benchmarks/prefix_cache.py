"""What the causal prefix cache saves, in process, on the packaged SmolLM2-135M-Instruct (an untrained Bitune
model merged for inference, as `bitune serve` runs it): the chat questions of `benchmarks/serve.py`, whose
template opens every prompt with the same system turn.

    python benchmarks/prefix_cache.py [--repeats 9]

Three ways to the first answer token of one prompt (what an engine serving one client does per request):
`prefill_tokens` (both passes stacked) and then `decode` of the prompt's last token over the mixed cache (two
forwards, the path without joining), `prefill_joined` with an empty prefix cache (one joined forward that
also reads the last token), and `prefill_joined` reusing the causal pass of the cached system turn. Then a decoding
step of a 16-row batch over 100 cache columns with two newcomers joined in it, without and with the prefix
cache. Each figure is the best of ``--repeats`` rounds, the contenders taking turns within a round; the
ratios are to the first contender of each group, measured in the same run. Do not run it while other jobs use
the CPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from bitune import BituneConfig, get_bitune_model
from bitune.method.joining import started_apart
from bitune.method.prefixes import CausalPrefixes
from bitune.references import load_model

sys.path.insert(0, str(Path(__file__).parent))
from serve import questions


def best_of(contenders: dict, repeats: int) -> dict[str, float]:
    """Each contender's best time over ``repeats`` rounds (contenders take turns within a round); a contender
    is ``(setup, run)``: ``run(setup())`` is timed, ``setup()`` is not."""
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(repeats):
        for name, (setup, run) in contenders.items():
            state = setup()
            start = time.perf_counter()
            run(state)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_model("smollm2-135m-instruct")
    model = get_bitune_model(base, BituneConfig()).eval()
    assert model.merge_for_inference() and model.can_join([[1, 2, 3]])

    def chat(question: str) -> list[int]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    prompts = [chat(q) for q in questions(20)]
    warm = CausalPrefixes()
    model.prefill_joined([prompts[0]], warm)  # the system turn (and the first question) cached

    def cached() -> CausalPrefixes:
        """A prefix cache holding the first prompt alone (each run adds its own prompts to its copy)."""
        store = CausalPrefixes()
        store.prefixes.update(warm.prefixes)
        store.tokens = warm.tokens
        return store

    one, two = prompts[1], prompts[2:4]
    shared = next(i for i, (a, b) in enumerate(zip(prompts[0], one, strict=False)) if a != b)
    print(f"prompt tokens {len(one)}, the first {shared} shared with the cached prompt")
    with torch.no_grad():
        prefills = best_of(
            {
                "prefill_tokens + decode (no prefix cache)": (
                    lambda: None,
                    lambda _: started_apart(model, [one]),
                ),
                "prefill_joined, empty prefix cache": (
                    CausalPrefixes,
                    lambda c: model.prefill_joined([one], c),
                ),
                "prefill_joined, system turn cached": (cached, lambda c: model.prefill_joined([one], c)),
            },
            args.repeats,
        )
        filler = torch.randint(0, 1000, (60,)).tolist()  # 16 rows of about 100 cache columns
        batch = model.prefill_tokens([p + filler for p in prompts[4:20]])
        mask = batch.attention_mask  # over the cache and the current token

        def step(state):
            cache, prefixes = state
            model.decode_joining(cache, batch.input_ids[:, -1:], mask, batch.positions, two, prefixes)

        steps = best_of(
            {
                "step + 2 newcomers (no prefix cache)": (lambda: (copy.deepcopy(batch.cache), None), step),
                "step + 2 newcomers, system turn cached": (
                    lambda: (copy.deepcopy(batch.cache), cached()),
                    step,
                ),
            },
            args.repeats,
        )
    for results in (prefills, steps):
        baseline = next(iter(results.values()))
        for name, seconds in results.items():
            print(f"{name}: {seconds * 1000:.0f} ms ({seconds / baseline:.2f}x)")


if __name__ == "__main__":
    main()
