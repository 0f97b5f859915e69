"""Model shapes of the benchmarks: the configurations of SmolLM2-135M and Gemma-3-270M with random
weights (the cost of a step does not depend on the weights), and the methods users compare."""

from __future__ import annotations

import copy

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from bitune import BituneConfig, default_peft_config, get_bitune_model

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): config.json values
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # google/gemma-3-270m: config.json values (5 of 6 layers slide over 512 tokens; 262k vocabulary)
    "gemma-3-270m": dict(
        model_type="gemma3_text",
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        query_pre_attn_scalar=256,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    ),
}
# the shapes of benchmarks/gpu_check.py (too large for this CPU, but a tiny one)
GPU_SHAPES = {
    # config.json values of meta-llama/Llama-3.2-1B (rope scaling left out: it does not change the cost)
    "llama-3.2-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    # google/gemma-2-2b: soft-capped logits and attention, a sliding window on every other layer
    "gemma-2-2b": dict(
        model_type="gemma2",
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        sliding_window=4096,
        query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    ),
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    # for CPU: the same code on a model that runs in seconds
    "tiny-llama": dict(
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
}
# what users run today (HF model + PEFT LoRA, labels -100 on the prompt), bitune's variants, and Bitune
# with its prompt passes recomputed in backward (checkpoint_prompt_passes: less memory, more time)
METHODS = ("hf_peft_lora", "lora", "bitune", "bitune_recompute")


def random_model(
    shape: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    device: str = "cpu",
) -> torch.nn.Module:
    settings = dict({**SHAPES, **GPU_SHAPES}[shape])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def build(method: str, base: torch.nn.Module) -> torch.nn.Module:
    """A fresh copy of ``base`` wrapped for ``method``."""
    model = copy.deepcopy(base)
    if method == "hf_peft_lora":
        return get_peft_model(model, default_peft_config())
    if method == "bitune_recompute":
        return get_bitune_model(model, BituneConfig(variant="bitune", checkpoint_prompt_passes=True))
    return get_bitune_model(model, BituneConfig(variant=method))


def make_batch(
    batch_size: int, prompt: int, answer: int, vocab: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Rows of ``prompt`` + ``answer`` random tokens; labels -100 on the prompt."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, prompt + answer), generator=generator)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
