"""Laying out a padded batch of prompt + answer rows for the prompt passes and the answer pass.

Row i holds ``L_i`` real tokens (contiguous; the batch may be padded on the left or the right), of which
the first ``P_i`` are the prompt. The last prompt token (the ":" of "Answer:") is not read by the prompt
passes: it opens the answer pass (paper section 3.1). So the prompt passes see ``P_i - 1`` tokens and the
answer pass ``L_i - P_i + 1``.

Prompts are laid out **left-padded** (every prompt ends in the last column) and answers right-padded
right after them. Each row is then one contiguous run of columns ``[pad..., prompt, answer, pad...]``,
which keeps sliding-window attention (measured in cache columns) exact, and is the layout in which Hugging
Face ``generate`` continues from a cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class AnswerPass:
    """Inputs of the causal answer pass that continues a prompt cache.

    ``ids`` (B, Ta) are right-padded answer-pass tokens (the prompt's last token first), ``mask`` (B, Ta)
    marks real ones, ``positions`` (B, Ta) are their position ids, ``prompt_mask`` (B, Tp) is the padding
    mask of the cached prompt columns.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    prompt_mask: torch.Tensor

    def decode_inputs(self) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (over the cached prompt, then the answer) and ``position_ids``
        of the decoder call that continues the prompt cache (`BituneModel.decode`)."""
        return dict(
            input_ids=self.ids,
            attention_mask=torch.cat([self.prompt_mask, self.mask], dim=1),
            position_ids=self.positions,
        )


@dataclass
class PromptAnswerBatch:
    """A batch split at the prompt boundary. Shapes: prompt (B, Tp), answer (B, Ta)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_positions: torch.Tensor
    answer_ids: torch.Tensor
    answer_mask: torch.Tensor
    answer_positions: torch.Tensor
    targets: torch.Tensor | None  # (B, Ta): the label each answer-pass logit predicts, IGNORE_INDEX if none

    @property
    def answer(self) -> AnswerPass:
        return AnswerPass(self.answer_ids, self.answer_mask, self.answer_positions, self.prompt_mask)


def real_token_spans(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First column and count of the real tokens of each row.

    Raises:
        ValueError: if a row's real tokens are not one contiguous run or a row is empty.
    """
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be 2D (batch, length), got shape {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"row {row} of the batch has no real tokens (its attention_mask is all zeros)")
    starts = mask.int().argmax(dim=1)
    columns = torch.arange(mask.shape[1], device=mask.device)
    expected = (columns >= starts[:, None]) & (columns < (starts + lengths)[:, None])
    if not torch.equal(expected, mask):
        row = int((expected != mask).any(dim=1).nonzero()[0])
        raise ValueError(
            f"row {row} of attention_mask has padding between real tokens; rows must be padded on one side only"
        )
    return starts, lengths


def prompt_lengths_from_labels(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Prompt length of each row: the run of IGNORE_INDEX labels that starts the row's real tokens."""
    starts, _ = real_token_spans(attention_mask)
    supervised = (labels != IGNORE_INDEX) & attention_mask.bool()
    if not bool(supervised.any(dim=1).all()):
        row = int((~supervised.any(dim=1)).nonzero()[0])
        raise ValueError(
            f"row {row} has no supervised (non -100) label among its real tokens, so its prompt length cannot "
            "be derived; pass prompt_lengths explicitly"
        )
    return supervised.int().argmax(dim=1) - starts


def split_prompt_answer(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_lengths: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> PromptAnswerBatch:
    """Split rows into left-padded prompts (minus their last token) and right-padded answer-pass inputs.

    Args:
        input_ids: (B, T) prompt + answer tokens.
        attention_mask: (B, T), 1 for real tokens; None means no padding.
        prompt_lengths: (B,) prompt tokens per row, including the template's last token (1 <= P_i <= L_i).
        labels: optional (B, T) labels aligned with ``input_ids`` (HF convention, unshifted).

    Returns:
        The split batch; ``targets[i, j]`` is the label of the token that answer-pass logit j predicts.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2D (batch, length), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )
    starts, lengths = real_token_spans(attention_mask)
    prompt_lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).long().reshape(-1)
    if prompt_lengths.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"prompt_lengths has {prompt_lengths.shape[0]} entries for {input_ids.shape[0]} rows"
        )
    bad = (prompt_lengths < 1) | (prompt_lengths > lengths)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"prompt_lengths[{row}]={int(prompt_lengths[row])} is outside [1, {int(lengths[row])}] (the row's "
            "real tokens); it counts the prompt tokens including the template's last one"
        )

    n_prompt = prompt_lengths - 1  # tokens read by the prompt passes
    n_answer = lengths - n_prompt  # tokens of the answer pass (last template token + answer)
    width_p, width_a = int(n_prompt.max()), int(n_answer.max())
    device = input_ids.device

    # prompt column c of row i holds token start_i + c - (Tp - n_prompt_i); left padding before it
    cols_p = torch.arange(width_p, device=device)[None, :]
    prompt_offset = cols_p - (width_p - n_prompt)[:, None]  # position within the prompt, < 0 on padding
    prompt_mask = prompt_offset >= 0
    prompt_ids = _gather(input_ids, starts[:, None] + prompt_offset)
    # answer column j of row i holds token start_i + n_prompt_i + j
    cols_a = torch.arange(width_a, device=device)[None, :]
    answer_mask = cols_a < n_answer[:, None]
    answer_source = (starts + n_prompt)[:, None] + cols_a
    answer_ids = _gather(input_ids, answer_source)

    targets = None
    if labels is not None:
        has_target = cols_a < (n_answer - 1)[:, None]
        targets = _gather(labels, answer_source + 1).masked_fill(~has_target, IGNORE_INDEX)

    return PromptAnswerBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask.long(),
        prompt_positions=prompt_offset.clamp(min=0),
        answer_ids=answer_ids,
        answer_mask=answer_mask.long(),
        answer_positions=n_prompt[:, None] + cols_a,
        targets=targets,
    )


def left_pad(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows with their real tokens moved to the right end (left padding), width unchanged.

    Padding columns repeat a real token of the row; they are masked out and never attended to.
    """
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    starts, lengths = real_token_spans(attention_mask)
    width = input_ids.shape[1]
    cols = torch.arange(width, device=input_ids.device)[None, :]
    offset = cols - (width - lengths)[:, None]
    return _gather(input_ids, starts[:, None] + offset), (offset >= 0).long()


def left_padded(
    sequences: Sequence[Sequence[int]], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch: (B, T) ``input_ids`` (padding columns hold 0, masked) and
    ``attention_mask``, T the longest list.

    Raises:
        ValueError: for no sequences or an empty one.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("left_padded needs at least one sequence and no empty one")
    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(sequences):
        ids[row, width - len(tokens) :] = torch.as_tensor(list(tokens), dtype=torch.long)
        mask[row, width - len(tokens) :] = 1
    return ids.to(device), mask.to(device)


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids of a padded batch: each real token's index among its row's real tokens (padding 0)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def pad_columns_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` zero-padded on the left of its sequence dimension to ``width``: the last of a 2D mask, -2 of
    keys or values ((..., T, dim))."""
    if tensor.dim() == 2:
        return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0))
    return torch.nn.functional.pad(tensor, (0, 0, width - tensor.shape[-2], 0))


def is_left_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row's last column is a real token (rows without padding count as left-padded)."""
    return bool(attention_mask[:, -1].bool().all())


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[i, index[i, j]] with out-of-range indices clamped (those cells are masked by the caller)."""
    return values.gather(1, index.clamp(0, values.shape[1] - 1))
