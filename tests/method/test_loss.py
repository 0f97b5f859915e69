"""The answer loss without materialised logits equals the loss from the model's own logits."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from torch import nn

from bitune.method.loss import IGNORE_INDEX, answer_loss, linear_cross_entropy

from conftest import ARCH_NAMES, LENGTHS, PROMPTS, bitune_pair, make_batch


def head_and_inputs(dtype=torch.float32, vocab=50, hidden=16, bias=True, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=bias).to(dtype).requires_grad_(False)
    states = torch.randn(3, 7, hidden, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (3, 7))
    targets[0, :2] = IGNORE_INDEX  # unsupervised positions (prompt, padding) are skipped
    targets[2, 5:] = IGNORE_INDEX
    return head, states, targets


def loss_and_grad(fn, states):
    loss = fn(states)
    (grad,) = torch.autograd.grad(loss, states)
    return loss, grad


@pytest.mark.parametrize("chunk_elements", [1, 3 * 50, 10**9])  # one row per chunk, 3 rows, all rows
@pytest.mark.parametrize("num_items", [None, 40])
def test_linear_cross_entropy_equals_cross_entropy_of_logits(chunk_elements, num_items):
    head, states, targets = head_and_inputs()
    expected = loss_and_grad(lambda h: answer_loss(head(h), targets, num_items), states)
    fused = loss_and_grad(
        lambda h: linear_cross_entropy(h, head, targets, num_items, chunk_elements=chunk_elements), states
    )
    torch.testing.assert_close(fused[0], expected[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused[1], expected[1], atol=1e-7, rtol=1e-5)


def test_linear_cross_entropy_in_bf16_matches_the_fp32_upcast_loss():
    head, states, targets = head_and_inputs(dtype=torch.bfloat16, bias=False)
    expected = loss_and_grad(lambda h: answer_loss(head(h), targets), states)
    fused = loss_and_grad(lambda h: linear_cross_entropy(h, head, targets, chunk_elements=100), states)
    assert fused[0].dtype == torch.float32 and fused[1].dtype == torch.bfloat16
    torch.testing.assert_close(fused[0], expected[0], atol=1e-5, rtol=1e-5)  # logits are bf16 in both
    torch.testing.assert_close(fused[1], expected[1], atol=1e-3, rtol=2e-2)


def test_linear_cross_entropy_without_gradients_and_with_a_trainable_head():
    head, states, targets = head_and_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            linear_cross_entropy(states, head, targets), answer_loss(head(states), targets)
        )
    head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen LM head"):
        linear_cross_entropy(states, head, targets)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_training_forward_without_logits_equals_forward_with_them(arch):
    model, _ = bitune_pair(arch)
    batch = make_batch(LENGTHS, PROMPTS)
    model.train()
    fused = model(**batch)
    assert fused.logits is None  # the default in training with labels
    fused.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    full = model(**batch, skip_logits=False)
    assert full.logits is not None
    full.loss.backward()
    torch.testing.assert_close(fused.loss, full.loss, atol=1e-6, rtol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(fused_grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_an_adapter_on_the_lm_head_falls_back_to_full_logits():
    """With LoRA on the head, the head is no longer a plain Linear; the loss must include the adapter."""
    peft_config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    model, _ = bitune_pair("llama", peft_config=peft_config)
    batch = make_batch(LENGTHS, PROMPTS)
    model.train()
    assert model._fusable_head() is None
    torch.testing.assert_close(model(**batch).loss, model(**batch, skip_logits=False).loss)
