"""Splitting padded prompt + answer rows at the prompt boundary."""

from __future__ import annotations

import pytest
import torch

from bitune import left_pad
from bitune.method.batching import prompt_lengths_from_labels, split_prompt_answer


def rows(side):
    # row 0: 5 tokens, prompt 3; row 1: 3 tokens, prompt 2; width 6
    ids = torch.tensor([[11, 12, 13, 14, 15, 0], [21, 22, 23, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 14, 15, -100], [-100, -100, 23, -100, -100, -100]])
    if side == "left":
        ids, mask, labels = (
            torch.stack([r.roll(int((m == 0).sum())) for r, m in zip(t, mask, strict=True)])
            for t in (ids, mask, labels)
        )
    return ids, mask, labels


@pytest.mark.parametrize("side", ["right", "left"])
def test_split_layout(side):
    ids, mask, labels = rows(side)
    lengths = prompt_lengths_from_labels(labels, mask)
    assert lengths.tolist() == [3, 2]
    batch = split_prompt_answer(ids, mask, lengths, labels)
    # prompts minus their last token, left-padded
    assert batch.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert batch.prompt_ids[batch.prompt_mask.bool()].tolist() == [11, 12, 21]
    assert batch.prompt_positions.tolist() == [[0, 1], [0, 0]]
    # answer pass: the prompt's last token, then the answer; right-padded
    assert batch.answer_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.answer_ids[batch.answer_mask.bool()].tolist() == [13, 14, 15, 22, 23]
    assert batch.answer_positions.tolist() == [[2, 3, 4], [1, 2, 3]]
    assert batch.targets.tolist() == [[14, 15, -100], [23, -100, -100]]


def test_left_pad_keeps_width_and_tokens():
    ids, mask, _ = rows("right")
    padded, padded_mask = left_pad(ids, mask)
    assert padded_mask.tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert padded[padded_mask.bool()].tolist() == ids[mask.bool()].tolist()


@pytest.mark.parametrize(
    ("mask", "prompt_lengths", "message"),
    [
        ([[1, 0, 1, 1]], [2], "padding between real tokens"),
        ([[0, 0, 0, 0]], [1], "no real tokens"),
        ([[1, 1, 1, 0]], [4], r"prompt_lengths\[0\]=4 is outside \[1, 3\]"),
        ([[1, 1, 1, 0]], [0], "outside"),
        ([[1, 1, 1, 0]], [1, 2], "2 entries for 1 rows"),
    ],
)
def test_bad_batches_are_named(mask, prompt_lengths, message):
    mask = torch.tensor(mask)
    with pytest.raises(ValueError, match=message):
        split_prompt_answer(torch.ones_like(mask), mask, torch.tensor(prompt_lengths))


def test_rows_without_supervised_labels_need_explicit_prompt_lengths():
    mask = torch.ones(2, 4, dtype=torch.long)
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, -100]])
    with pytest.raises(ValueError, match="row 1 has no supervised"):
        prompt_lengths_from_labels(labels, mask)
