"""KVMixing: eqs. 5-6 exactly, fp32 whatever the model dtype, neutral values."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from bitune import KVMixing
from bitune.method.mixing import mix


def cache(values, dtype=torch.float32):
    c = DynamicCache()
    for layer, v in enumerate(values):
        c.update(v.to(dtype), (v * 2).to(dtype), layer)
    return c


def test_initial_ratio_is_one_half_and_formula_is_eq6():
    mixing = KVMixing(3, theta_init=0.01)
    alpha_k, _ = mixing.ratios()
    torch.testing.assert_close(alpha_k, torch.full((3,), 0.5))
    with torch.no_grad():
        mixing.theta_k.copy_(torch.tensor([0.0, -0.03, 1.0]))
    expected = torch.tensor([0.0, 0.03 / 0.04, 1.0 / 1.01])
    torch.testing.assert_close(mixing.ratios()[0], expected)


@pytest.mark.parametrize("alpha_init", [0.5, 0.1, 0.02, 0.9])
def test_alpha_init_sets_the_initial_ratios_and_keeps_theta_init_as_scale(alpha_init):
    mixing = KVMixing(4, theta_init=0.01, alpha_init=alpha_init)
    for alpha in mixing.ratios():
        torch.testing.assert_close(alpha, torch.full((4,), alpha_init))
    torch.testing.assert_close(mixing.theta_k, torch.full((4,), 0.01 * alpha_init / (1 - alpha_init)))
    with torch.no_grad():  # eq. 6 still divides by theta_init, whatever the start
        mixing.theta_v.fill_(0.01)
    torch.testing.assert_close(mixing.ratios()[1], torch.full((4,), 0.5))


def test_paper_start_is_theta_init_exactly():
    assert torch.equal(KVMixing(2, theta_init=0.01).theta_k, torch.full((2,), 0.01))


def test_mix_is_eq5_per_layer():
    torch.manual_seed(0)
    causal = [torch.randn(2, 2, 5, 4) for _ in range(2)]
    bidir = [torch.randn(2, 2, 5, 4) for _ in range(2)]
    mixing = KVMixing(2, theta_init=0.1)
    with torch.no_grad():
        mixing.theta_k.copy_(torch.tensor([0.1, 0.3]))
        mixing.theta_v.copy_(torch.tensor([0.0, -0.1]))
    out = mixing(cache(causal), cache(bidir))
    a_k, a_v = [0.5, 0.75], [0.0, 0.5]
    for i in range(2):
        torch.testing.assert_close(out.layers[i].keys, causal[i] * (1 - a_k[i]) + bidir[i] * a_k[i])
        torch.testing.assert_close(out.layers[i].values, 2 * causal[i] * (1 - a_v[i]) + 2 * bidir[i] * a_v[i])


def test_thetas_stay_fp32_and_mix_runs_in_fp32_for_bf16_caches():
    mixing = KVMixing(1, theta_init=0.01).to(torch.bfloat16)
    assert mixing.theta_k.dtype == torch.float32
    mixing.half()
    assert mixing.theta_v.dtype == torch.float32
    c = torch.tensor([1.0, 256.0, -3.0]).to(torch.bfloat16)
    b = torch.tensor([1.0 + 2**-7, 257.0, 3.0]).to(torch.bfloat16)
    alpha = torch.tensor(1 / 3)
    fp32 = (c.float() * (1 - alpha) + b.float() * alpha).bfloat16()
    assert torch.equal(mix(c, b, alpha), fp32) and mix(c, b, alpha).dtype == torch.bfloat16
    out = mixing(
        cache([torch.randn(1, 1, 2, 2)], torch.bfloat16), cache([torch.randn(1, 1, 2, 2)], torch.bfloat16)
    )
    assert out.layers[0].keys.dtype == torch.bfloat16


def test_gradients_reach_theta_and_both_caches():
    causal = torch.randn(1, 1, 3, 2, requires_grad=True)
    bidir = torch.randn(1, 1, 3, 2, requires_grad=True)
    mixing = KVMixing(1, theta_init=0.01)
    out = mixing(cache([causal]), cache([bidir]))
    (out.layers[0].keys.sum() + out.layers[0].values.sum()).backward()
    assert mixing.theta_k.grad is not None and causal.grad is not None and bidir.grad is not None


def test_layer_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 layers but the caches have 1"):
        KVMixing(2, 0.01)(cache([torch.randn(1, 1, 2, 2)]), cache([torch.randn(1, 1, 2, 2)]))
