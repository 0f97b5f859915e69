"""Generation decodes causally from the Bitune cache with Hugging Face ``generate`` semantics."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from bitune import left_pad

from conftest import ARCH_NAMES, EOS, PAD, bitune_pair, char_tokenizer, make_batch, plain_peft, zero_thetas

PROMPT_LENGTHS = [9, 5, 7]
NEW = 6


def greedy_by_full_recomputation(model, batch, steps: int):
    """Reference decoder: at every step run the whole Bitune forward on prompt + generated tokens."""
    outputs = []
    for row, mask in enumerate(batch["attention_mask"]):
        start, length = int(mask.argmax()), int(mask.sum())
        tokens = batch["input_ids"][row, start : start + length].tolist()
        prompt_length = len(tokens)
        for _ in range(steps):
            with torch.no_grad():
                out = model(torch.tensor([tokens]), prompt_lengths=torch.tensor([prompt_length]))
            tokens.append(int(out.logits[0, -1].argmax()))
            if tokens[-1] == EOS:
                break
        outputs.append(tokens[prompt_length:])
    return outputs


def new_tokens(sequences, width):
    rows = []
    for row in sequences[:, width:].tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_greedy_generate_equals_full_forward_loop(arch, side):
    model, _ = bitune_pair(arch)
    batch = make_batch(PROMPT_LENGTHS, PROMPT_LENGTHS, side=side, seed=3)
    sequences = model.generate(
        batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW, do_sample=False, pad_token_id=PAD
    )
    width = batch["input_ids"].shape[1]
    assert torch.equal(sequences[:, :width], left_pad(batch["input_ids"], batch["attention_mask"])[0])
    expected = greedy_by_full_recomputation(model, batch, NEW)
    assert new_tokens(sequences, width) == expected


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_beams=3),
        dict(do_sample=True, num_return_sequences=2, top_k=20),
        dict(generation_config=GenerationConfig(num_beams=2, num_return_sequences=2, max_new_tokens=5)),
    ],
    ids=["beams", "sampling", "generation_config"],
)
def test_beams_sampling_and_generation_config_match_plain_peft_at_zero_theta(arch, kwargs):
    model, reference_base = bitune_pair(arch)
    zero_thetas(model)
    reference = plain_peft(reference_base, model)
    batch = make_batch([8, 5], [8, 5], side="left")
    if "generation_config" not in kwargs:
        kwargs = dict(max_new_tokens=5, **kwargs)
    kwargs["pad_token_id"] = PAD
    torch.manual_seed(0)
    ours = model.generate(batch["input_ids"], batch["attention_mask"], **kwargs)
    torch.manual_seed(0)
    with torch.no_grad():
        theirs = reference.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
        )
    assert torch.equal(ours, theirs)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.chunks.append("end")


def test_streamer_sees_prompt_then_each_new_token():
    model, _ = bitune_pair("llama")
    batch = make_batch([7], [7])
    streamer = Collect()
    out = model.generate(
        batch["input_ids"], max_new_tokens=4, do_sample=False, streamer=streamer, pad_token_id=PAD
    )
    assert streamer.chunks[0] == batch["input_ids"][0].tolist()
    assert [c[0] for c in streamer.chunks[1:-1]] == out[0, 7:].tolist()
    assert streamer.chunks[-1] == "end"


def test_stop_strings_and_eos_end_generation():
    model, _ = bitune_pair("llama")
    tokenizer = char_tokenizer()
    batch = make_batch([7], [7], seed=5)
    free = model.generate(batch["input_ids"], max_new_tokens=6, do_sample=False, pad_token_id=PAD)[
        0, 7:
    ].tolist()
    assert EOS not in free
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # first new token not seen before
    stop = tokenizer.convert_ids_to_tokens(free[k])
    stopped = model.generate(
        batch["input_ids"],
        max_new_tokens=6,
        do_sample=False,
        stop_strings=[stop],
        tokenizer=tokenizer,
        pad_token_id=PAD,
    )
    assert stopped[0, 7:].tolist() == free[: k + 1]
    ended = model.generate(
        batch["input_ids"], max_new_tokens=6, do_sample=False, eos_token_id=free[1], pad_token_id=PAD
    )
    assert ended[0, 7:].tolist() == free[:2]


def test_generate_refuses_a_cache_and_prefill_needs_left_padding():
    model, _ = bitune_pair("llama")
    batch = make_batch([7, 5], [7, 5], side="right")
    with pytest.raises(ValueError, match="past_key_values"):
        model.generate(batch["input_ids"], batch["attention_mask"], past_key_values=object())
    with pytest.raises(ValueError, match="left-padded"):
        model.prefill(batch["input_ids"], batch["attention_mask"])
    ids, mask = left_pad(batch["input_ids"], batch["attention_mask"])
    cache = model.prefill(ids, mask)
    assert cache.get_seq_length() == ids.shape[1] - 1
