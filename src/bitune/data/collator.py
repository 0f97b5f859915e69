"""From examples to what ``BituneModel.forward`` takes: tokenized rows and a padding collator.

A row is the tokenized prompt followed by the tokenized answer and the EOS token. Prompt and answer are
tokenized separately, so the prompt boundary is exact whatever the tokenizer merges; the prompt gets the
tokenizer's own special tokens (BOS for Gemma and Llama 3, none for SmolLM2 or Qwen), the answer none.
Rows longer than ``max_length`` tokens (512, as in the paper) are dropped and counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..batching import IGNORE_INDEX
from .report import DataReport
from .templates import ChoiceTemplate, Instruction, MultipleChoice, render_instruction

MAX_LENGTH = 512


def render(
    example: MultipleChoice | Instruction, template: ChoiceTemplate | None, eos_token: str
) -> tuple[str, str]:
    """(prompt, answer) text of an example under its task's template (the instruction one if None)."""
    if isinstance(example, MultipleChoice):
        if template is None:
            raise ValueError("a multiple-choice example needs its task's template")
        return template.render(example, eos_token)
    return render_instruction(example.instruction, example.completion, eos_token)


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> dict[str, list[int]]:
    """One training row: ``input_ids``, ``labels`` (-100 on the prompt) and ``prompt_length``.

    ``answer`` is the answer text without EOS; the tokenizer's EOS id is appended.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before building rows")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "prompt_length": len(prompt_ids),
    }


def build_rows(
    examples: Iterable[MultipleChoice | Instruction],
    tokenizer: PreTrainedTokenizerBase,
    template: ChoiceTemplate | None = None,
    max_length: int | None = MAX_LENGTH,
    report: DataReport | None = None,
) -> tuple[list[dict[str, list[int]]], DataReport]:
    """Tokenize examples into training rows, dropping (and counting) those over ``max_length`` tokens."""
    report = report or DataReport("examples")
    stage = DataReport(report.source)
    rows = []
    for index, example in enumerate(examples):
        prompt, answer = render(example, template, eos_token="")
        row = tokenize_pair(tokenizer, prompt, answer)
        if max_length is not None and len(row["input_ids"]) > max_length:
            stage.skip(f"longer than {max_length} tokens", index)
            continue
        rows.append(row)
    stage.kept = len(rows)
    return rows, report.merge(stage)


@dataclass
class BituneCollator:
    """Pads rows on the right into ``input_ids``, ``attention_mask``, ``labels``, ``prompt_lengths``.

    Usable as a Hugging Face Trainer ``data_collator``.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(f["labels"])
        prompt_lengths = torch.tensor([int(f["prompt_length"]) for f in features], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_lengths": prompt_lengths}
