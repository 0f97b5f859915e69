"""From examples to what ``BituneModel.forward`` takes: tokenized rows and a padding collator.

A row is the tokenized prompt followed by the tokenized answer. Prompt and answer are tokenized separately,
so the prompt boundary is exact whatever the tokenizer merges. How the texts are written is the run's
`PromptFormat` (chat.py): with the paper's template or raw text the prompt gets the tokenizer's own special
tokens (BOS for Gemma and Llama 3, none for SmolLM2 or Qwen) and the answer the EOS token; a chat template
writes its own special tokens and end-of-turn, and nothing is added. Rows longer than ``max_length``
tokens (512, as in the paper) are dropped and counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..method.batching import IGNORE_INDEX
from .chat import Conversation, PromptFormat
from .report import DataReport
from .templates import ChoiceTemplate, Instruction, MultipleChoice, render_instruction

MAX_LENGTH = 512
PAPER = PromptFormat("paper")


def render(
    example: MultipleChoice | Instruction, template: ChoiceTemplate | None, eos_token: str
) -> tuple[str, str]:
    """(prompt, answer) text of an example under the paper's templates (its task's, or the instruction one)."""
    if isinstance(example, MultipleChoice):
        if template is None:
            raise ValueError("a multiple-choice example needs its task's template")
        return template.render(example, eos_token)
    return render_instruction(example.instruction, example.completion, eos_token)


def training_texts(
    example: MultipleChoice | Instruction | Conversation,
    prompt_format: PromptFormat,
    tokenizer: PreTrainedTokenizerBase,
    template: ChoiceTemplate | None = None,
) -> list[tuple[str, str]]:
    """The (prompt, answer) texts an example trains under ``prompt_format`` (several for ``turns: all``).

    Raises:
        ValueError: why the example is skipped.
    """
    if isinstance(example, Conversation):
        return prompt_format.training_pairs(tokenizer, example)
    if isinstance(example, MultipleChoice) or prompt_format.template == "paper":
        prompt, answer = render(example, template, eos_token="")
        return [(prompt_format.ask(prompt), answer)]
    if prompt_format.template == "raw":
        return [(example.instruction, example.completion)]
    messages = (
        {"role": "user", "content": example.instruction},
        {"role": "assistant", "content": example.completion},
    )
    return prompt_format.training_pairs(tokenizer, Conversation(messages))


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, prompt_format: PromptFormat = PAPER
) -> dict[str, list[int]]:
    """One training row: ``input_ids``, ``labels`` (-100 on the prompt) and ``prompt_length``.

    With the paper's or the raw format the prompt gets the tokenizer's special tokens and the EOS id
    follows the answer (not doubled if the answer text already ends with it); a chat-template answer is
    taken as rendered.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before building rows")
    prompt_ids = prompt_format.encode(tokenizer, prompt, prompt=True)  # control tokens only from the template
    answer_ids = prompt_format.encode(tokenizer, answer, prompt=False)
    doubled = prompt_format.template == "raw" and answer.endswith(tokenizer.eos_token)  # TRL's rule
    if prompt_format.appends_eos and not doubled:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "prompt_length": len(prompt_ids),
    }


def build_rows(
    examples: Iterable[MultipleChoice | Instruction | Conversation],
    tokenizer: PreTrainedTokenizerBase,
    template: ChoiceTemplate | None = None,
    max_length: int | None = MAX_LENGTH,
    report: DataReport | None = None,
    prompt_format: PromptFormat = PAPER,
) -> tuple[list[dict[str, list[int]]], DataReport]:
    """Tokenize examples into training rows under ``prompt_format``, dropping (and counting) examples it
    cannot render and rows over ``max_length`` tokens."""
    report = report or DataReport("examples")
    stage = DataReport(report.source)
    rows = []
    for index, example in enumerate(examples):
        try:
            texts = training_texts(example, prompt_format, tokenizer, template)
        except ValueError as exc:
            stage.skip(str(exc), index)
            continue
        for prompt, answer in texts:
            row = tokenize_pair(tokenizer, prompt, answer, prompt_format)
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
