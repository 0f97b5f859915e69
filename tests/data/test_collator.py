"""Tokenized rows and the collator keep the prompt boundary exact; long rows are dropped and counted."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bitune.data import BituneCollator, Instruction, build_rows, tokenize_pair
from bitune.method.batching import prompt_lengths_from_labels


def word_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    words = ["<pad>", "<s>", "</s>", "<unk>", "Question:", "Answer:", "a", "b", "c", "d", "long"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        from tokenizers.processors import TemplateProcessing

        backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def test_row_layout_with_and_without_bos():
    for bos, prefix in ((False, []), (True, [1])):
        row = tokenize_pair(word_tokenizer(bos), "Question: a\n\nAnswer:", " b c")
        prompt = [*prefix, 4, 6, 5]
        assert row["input_ids"] == [*prompt, 7, 8, 2]
        assert row["labels"] == [-100] * len(prompt) + [7, 8, 2]
        assert row["prompt_length"] == len(prompt)


def test_over_length_rows_are_dropped_and_counted():
    examples = [Instruction("a", "b"), Instruction("a " * 20, "b"), Instruction("c", "long " * 10)]
    rows, report = build_rows(examples, word_tokenizer(False), max_length=12)
    assert len(rows) == 1 and report.kept == 1
    assert report.skipped == {"longer than 12 tokens": 2}
    assert report.examples["longer than 12 tokens"] == 1


def test_collator_pads_right_and_boundary_matches_labels():
    tokenizer = word_tokenizer(True)
    rows, _ = build_rows([Instruction("a b", "c"), Instruction("a", "b c d")], tokenizer, max_length=None)
    batch = BituneCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in rows]
    assert batch["input_ids"][0, len(rows[0]["input_ids"]) :].eq(tokenizer.pad_token_id).all()
    assert torch.equal(
        batch["prompt_lengths"], prompt_lengths_from_labels(batch["labels"], batch["attention_mask"])
    )
    assert batch["prompt_lengths"].tolist() == [r["prompt_length"] for r in rows]
