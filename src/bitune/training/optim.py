"""The optimisers a run can choose (``training.optimizer``).

- ``adamw_torch``: ``torch.optim.AdamW`` (eps 1e-8), what the Hugging Face Trainer uses by default.
- ``adamw_legacy``: the ``AdamW`` that transformers shipped until version 4.x (``transformers.AdamW``,
  since removed), which the Bitune authors' released code trains with. It is not torch's AdamW with
  other defaults; per parameter, with gradient g at step t:

      m = b1 * m + (1 - b1) * g                  v = b2 * v + (1 - b2) * g^2
      p = p - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)          (eps = 1e-6)
      p = p - lr * weight_decay * p                                           (after the update)

  eps is added to the square root of the *uncorrected* second moment and the bias correction is folded
  into the step size, so it acts like torch's AdamW with a step-dependent eps of eps / sqrt(1 - b2^t)
  (about 30x larger at step 1); weight decay is applied after the Adam update, to the updated weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

OPTIMIZERS = ("adamw_torch", "adamw_legacy")


class LegacyAdamW(torch.optim.Optimizer):
    """transformers' legacy ``AdamW`` (see the module docstring), with its defaults."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"LegacyAdamW: lr must be >= 0, got {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"LegacyAdamW: betas must be in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"LegacyAdamW: eps must be >= 0, got {eps}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("LegacyAdamW does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(param.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denominator = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step = state["step"]
                    step_size *= math.sqrt(1 - beta2**step) / (1 - beta1**step)
                param.addcdiv_(exp_avg, denominator, value=-step_size)
                if group["weight_decay"] > 0:
                    param.add_(param, alpha=-group["lr"] * group["weight_decay"])
        return loss


def optimizer_cls_and_kwargs(
    name: str, learning_rate: float
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]] | None:
    """What the Trainer's ``optimizer_cls_and_kwargs`` takes for ``name`` (None: the Trainer's own ``optim``).

    The Trainer gives each parameter group its weight decay; the schedule scales ``learning_rate``.
    """
    if name == "adamw_torch":
        return None
    if name == "adamw_legacy":
        return LegacyAdamW, {"lr": learning_rate}
    raise ValueError(f"unknown optimizer {name!r}; known: {OPTIMIZERS}")
