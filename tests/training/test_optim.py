"""The legacy transformers AdamW (``training.optimizer: adamw_legacy``) against a written-out reference."""

from __future__ import annotations

import math

import pytest
import torch

from bitune.training.optim import LegacyAdamW, optimizer_cls_and_kwargs


def reference_steps(weights, grads, lr, betas, eps, weight_decay):
    """The legacy update written out element by element in float64, one gradient per step."""
    beta1, beta2 = betas
    p = [float(w) for w in weights]
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        for i, gi in enumerate(g.tolist()):
            m[i] = beta1 * m[i] + (1 - beta1) * gi
            v[i] = beta2 * v[i] + (1 - beta2) * gi * gi
            p[i] = p[i] - step_size * m[i] / (math.sqrt(v[i]) + eps)
            p[i] = p[i] - lr * weight_decay * p[i]  # decoupled decay, after the update
    return torch.tensor(p, dtype=torch.float64)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_legacy_adamw_matches_the_written_out_algorithm(weight_decay):
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(6, generator=generator, dtype=torch.float64)
    # tiny gradients make eps matter: legacy adds it to sqrt(v) before the bias correction
    grads = [torch.randn(6, generator=generator, dtype=torch.float64) * 1e-5 for _ in range(5)]
    param = torch.nn.Parameter(start.clone())
    optimizer = LegacyAdamW([param], lr=1e-2, weight_decay=weight_decay)
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
    expected = reference_steps(start, grads, 1e-2, (0.9, 0.999), 1e-6, weight_decay)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-14)


def test_legacy_adamw_differs_from_torch_adamw_where_eps_matters():
    grads = [torch.full((3,), 1e-6, dtype=torch.float64) for _ in range(3)]
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(2)]
    optimizers = [LegacyAdamW([params[0]], lr=1e-3), torch.optim.AdamW([params[1]], lr=1e-3, weight_decay=0)]
    for g in grads:
        for param, optimizer in zip(params, optimizers, strict=True):
            param.grad = g.clone()
            optimizer.step()
    # torch's eps (1e-8) is negligible next to |g| = 1e-6: about lr per step. Legacy adds its 1e-6 to
    # sqrt(v) before bias correction (sqrt(v) ~ 3e-8 at step 1): steps of 0.03, 0.04, 0.05 x lr
    assert params[1][0].item() == pytest.approx(-3e-3, rel=0.02)
    assert params[0][0].item() == pytest.approx(-1.25e-4, rel=0.02)


def test_state_round_trips_through_state_dict():
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = LegacyAdamW([param])
    param.grad = torch.ones(2)
    optimizer.step()
    again = LegacyAdamW([torch.nn.Parameter(param.detach().clone())])
    again.load_state_dict(optimizer.state_dict())
    assert next(iter(again.state.values()))["step"] == 1


def test_optimizer_names():
    assert optimizer_cls_and_kwargs("adamw_torch", 1e-3) is None
    assert optimizer_cls_and_kwargs("adamw_legacy", 1e-3) == (LegacyAdamW, {"lr": 1e-3})
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        optimizer_cls_and_kwargs("sgd", 1e-3)
