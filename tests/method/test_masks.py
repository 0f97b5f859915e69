"""The anti-causal mask is the transpose of transformers' causal mask, additive, per layer type."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from bitune.method.masks import anti_causal_mask, prompt_pass_kwargs


def test_anti_causal_is_additive_transposed_causal_with_padding():
    config = AutoConfig.for_model("llama", num_hidden_layers=2)
    padding = torch.tensor([[0, 1, 1, 1]])
    mask = anti_causal_mask(padding, config, torch.float32)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.float32
    allowed = (mask == 0)[0, 0].int().tolist()
    assert allowed == [[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert mask.min() == torch.finfo(torch.float32).min


def test_anti_causal_gives_one_mask_per_layer_type_with_windows():
    config = AutoConfig.for_model(
        "gemma3_text",
        num_hidden_layers=2,
        sliding_window=2,
        layer_types=["sliding_attention", "full_attention"],
    )
    masks = anti_causal_mask(torch.ones(1, 4, dtype=torch.long), config, torch.bfloat16)
    assert set(masks) == {"sliding_attention", "full_attention"}
    assert (masks["sliding_attention"] == 0)[0, 0].int().tolist() == [
        [1, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 1],
        [0, 0, 0, 1],
    ]
    assert masks["full_attention"].dtype == torch.bfloat16


def test_kwargs_per_mask_and_errors():
    config = AutoConfig.for_model("llama", num_hidden_layers=2)
    padding = torch.ones(1, 3, dtype=torch.long)
    assert prompt_pass_kwargs("causal", padding, config, torch.float32) == {"attention_mask": padding}
    assert prompt_pass_kwargs("bidirectional", padding, config, torch.float32)["is_causal"] is False
    with pytest.raises(ValueError, match="unknown prompt mask"):
        prompt_pass_kwargs("prefix", padding, config, torch.float32)
    config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        anti_causal_mask(padding, config, torch.float32)
