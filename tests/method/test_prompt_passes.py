"""Prompt passes recomputed in backward (``checkpoint_prompt_passes``) give the same loss and gradients and
keep less for backward."""

from __future__ import annotations

import pytest
import torch

from bitune.method import prompt_passes

from conftest import ARCH_NAMES, LENGTHS, PROMPTS, bitune_pair, make_batch


def batch_inputs():
    return make_batch(LENGTHS, PROMPTS)


def loss_grads_and_saved_bytes(model, inputs):
    """Loss, gradients of the trainable parameters, and bytes of the tensors autograd saved in forward
    (parameters excluded) -- what a training step holds between forward and backward."""
    parameters = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads, sum(saved.values())


@pytest.mark.parametrize(
    ("arch", "variant", "mask", "stack"),
    [(arch, "bitune", "bidirectional", "auto") for arch in ARCH_NAMES]
    + [
        ("llama", "bitune", "anti_causal", "auto"),
        ("llama", "bitune", "bidirectional", "always"),  # both passes in one forward, adapters routed per row
        ("gemma3_text", "shared_weights", "bidirectional", "auto"),  # stacked, one adapter
        ("mistral", "only_causal", "causal", "auto"),
        ("qwen2", "naive_bidir", "bidirectional", "auto"),
        ("qwen2", "no_mixing", "bidirectional", "auto"),
        ("llama", "lora", "bidirectional", "auto"),
    ],
)
def test_checkpointed_prompt_passes_give_the_same_loss_and_gradients(arch, variant, mask, stack):
    model, _ = bitune_pair(arch, variant=variant, second_pass_mask=None if variant == "only_causal" else mask)
    model.train()
    inputs = batch_inputs()
    with model.prompt_pass_options(stack=stack):
        loss, grads, saved = loss_grads_and_saved_bytes(model, inputs)
    with model.prompt_pass_options(stack=stack, recompute=True):
        loss_ckpt, grads_ckpt, saved_ckpt = loss_grads_and_saved_bytes(model, inputs)
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-7, rtol=1e-5, msg=name)
    assert saved_ckpt < saved


def test_checkpointing_is_off_without_gradients(monkeypatch):
    """Under no_grad (evaluation, generation) there is nothing to recompute: no checkpoint is made; with
    gradients, one per prompt pass."""
    model, _ = bitune_pair("llama", checkpoint_prompt_passes=True)  # the option as configured, not flipped
    calls = []
    original = prompt_passes.checkpoint
    monkeypatch.setattr(prompt_passes, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        model(**batch_inputs())
    assert not calls
    model(**batch_inputs())
    assert len(calls) == 2
