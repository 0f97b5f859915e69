"""Greedy answers of several models to the same chat questions, side by side: what `configs/chat.yaml`
trains, against LoRA on the same data, the pretrained model and the untrained Bitune model (the initial
mix), each with the template's default system prompt and with a system prompt of its own.

    python results/chat_example/probe.py TARGET ... --output results/chat_example/answers.json

A TARGET is a run directory or a base model; ``untrained:BASE[:ALPHA]`` is the Bitune model of BASE as
training starts (adapters at their initialisation, mixing ratio ALPHA, 0.5 by default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bitune import BituneConfig
from bitune.data import PromptFormat
from bitune.inference import LoadedModel, generate_text, load_for_inference
from bitune.method.model import get_bitune_model
from bitune.references import load_model

QUESTIONS = [
    "What is the capital of Italy?",  # a training question
    "What is the capital of Portugal?",
    'What is the opposite of "cold"?',
    "What is 20 plus 5?",
    'Spell "castle" backwards.',
    "How many grams are in 7 kilograms?",
]
OWN_SYSTEM = "You are a helpful assistant."
# pieces of either system prompt (the SmolLM2 template's default, "You are a helpful AI assistant named SmolLM,
# trained by Hugging Face", or OWN_SYSTEM) that an answer drifting into its system prompt repeats
SYSTEM_PROMPT_MARKERS = ("You are a helpful", "helpful AI", "helpful assistant", "SmolLM", "Hugging Face")


def load(target: str) -> LoadedModel:
    if not target.startswith("untrained:"):
        return load_for_inference(target)
    _, base_name, *alpha = target.split(":")
    base, tokenizer = load_model(base_name, dtype=torch.float32)
    config = BituneConfig(alpha_init=float(alpha[0])) if alpha else BituneConfig()
    torch.manual_seed(0)
    model = get_bitune_model(base, config).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return LoadedModel(model, tokenizer, PromptFormat.for_tokenizer("chat", tokenizer), target)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    results = {}
    for target in args.targets:
        loaded = load(target)
        answers = []
        for question in QUESTIONS:
            for system in (None, OWN_SYSTEM):
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": question}
                ]
                answer = generate_text(loaded, messages, max_new_tokens=args.max_new_tokens)
                answers.append(
                    {
                        "question": question,
                        "system": system or "(template default)",
                        "answer": answer,
                        "repeats_system_prompt": any(m in answer for m in SYSTEM_PROMPT_MARKERS),
                    }
                )
                print(f"[{target} | {'own system' if system else 'default system'}] {question} -> {answer!r}")
        drift = {
            key: sum(a["repeats_system_prompt"] for a in answers if (a["system"] == OWN_SYSTEM) == own)
            for key, own in (("default_system", False), ("own_system", True))
        }
        results[target] = {"answers": answers, "drifted": drift, "questions": len(QUESTIONS)}
        print(f"== {target}: answers that repeat their system prompt: {drift} of {len(QUESTIONS)} each")
    if args.output:
        args.output.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
