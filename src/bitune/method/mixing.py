"""Learnable mixing of the causal and bidirectional prompt features (paper eqs. 5-6).

For every layer l the mixed cache is

    K = K_c * (1 - a_k[l]) + K_b * a_k[l],      V = V_c * (1 - a_v[l]) + V_b * a_v[l],
    a_j[l] = |theta_j[l]| / (theta_init + |theta_j[l]|),

with one scalar theta per layer for keys and one for values. The paper initialises theta to ``theta_init``
(every ratio starts at 0.5); ``alpha_init`` generalises that start: theta = theta_init * alpha_init /
(1 - alpha_init) gives every ratio ``alpha_init`` while theta_init stays the scale of eq. 6.
The paper stresses that the mixing must run in full precision: thetas are kept in fp32 whatever dtype the
model is moved to, the mix is computed in fp32 and cast back to the cache dtype.
Neutral values: theta = 0 gives a pure causal cache (a = 0); |theta| -> inf gives a pure bidirectional one.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Cache


class KVMixing(nn.Module):
    """Per-layer mixing coefficients ``theta_k`` and ``theta_v`` (fp32) and the mix of two KV caches."""

    def __init__(
        self,
        num_layers: int,
        theta_init: float,
        alpha_init: float = 0.5,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"KVMixing needs at least one layer, got num_layers={num_layers}")
        if not 0 < alpha_init < 1:
            raise ValueError(f"KVMixing needs 0 < alpha_init < 1, got {alpha_init}")
        self.theta_init = float(theta_init)
        self.alpha_init = float(alpha_init)
        start = self.theta_init * self.alpha_init / (1 - self.alpha_init)
        self.theta_k = nn.Parameter(torch.full((num_layers,), start, dtype=torch.float32, device=device))
        self.theta_v = nn.Parameter(torch.full((num_layers,), start, dtype=torch.float32, device=device))

    @property
    def num_layers(self) -> int:
        return self.theta_k.numel()

    def ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bidirectional-to-causal ratios (alpha_k, alpha_v), each (L,) fp32, differentiable in theta."""
        return mixing_ratio(self.theta_k, self.theta_init), mixing_ratio(self.theta_v, self.theta_init)

    def forward(self, causal: Cache, bidirectional: Cache) -> Cache:
        """Mix ``bidirectional`` into ``causal`` layer by layer, in place, and return ``causal``.

        The cache objects are kept (only their tensors are replaced) so that layer state such as a
        sliding-window layer's cumulative length stays right for decoding.
        """
        if len(causal.layers) != self.num_layers or len(bidirectional.layers) != self.num_layers:
            raise ValueError(
                f"KVMixing has {self.num_layers} layers but the caches have {len(causal.layers)} and "
                f"{len(bidirectional.layers)}; was the model built for another base model?"
            )
        alpha_k, alpha_v = self.ratios()
        for i, (c, b) in enumerate(zip(causal.layers, bidirectional.layers, strict=True)):
            if c.keys is None or b.keys is None or c.keys.shape != b.keys.shape:
                raise ValueError(
                    f"cannot mix layer {i}: the two prompt passes left caches of different shapes"
                )
            c.keys = mix(c.keys, b.keys, alpha_k[i])  # (B, H_kv, T, D)
            c.values = mix(c.values, b.values, alpha_v[i])
        return causal

    def mix_stacked(self, cache: Cache, batch_size: int) -> Cache:
        """Mix a cache whose batch holds both passes stacked, rows [0, B) causal and [B, 2B) bidirectional,
        into the B-row mixed cache (in place, as `forward`)."""
        if len(cache.layers) != self.num_layers:
            raise ValueError(f"KVMixing has {self.num_layers} layers but the cache has {len(cache.layers)}")
        ratios = self.ratios()
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values = self.mix_rows(layer.keys, layer.values, batch_size, i, ratios)
        return cache

    def mix_rows(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        batch_size: int,
        layer: int,
        ratios: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s (2B, H_kv, T, D) stacked keys and values (rows [0, B) causal, [B, 2B)
        bidirectional) mixed into B rows with ``ratios`` (`ratios()`, computed once for all layers)."""
        alpha_k, alpha_v = ratios
        return (
            mix(keys[:batch_size], keys[batch_size:], alpha_k[layer]),
            mix(values[:batch_size], values[batch_size:], alpha_v[layer]),
        )

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)`, `.half()` and friends must not lower the thetas' precision (paper section 3.1).
        super()._apply(fn, recurse)
        for param in self.parameters(recurse=False):
            if param.dtype != torch.float32:
                param.data = param.data.float()
                if param.grad is not None:
                    param.grad.data = param.grad.data.float()
        return self

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, theta_init={self.theta_init}, alpha_init={self.alpha_init}"


def mixing_ratio(theta: torch.Tensor, theta_init: float) -> torch.Tensor:
    """Eq. 6: the bidirectional-to-causal ratio ``|theta| / (theta_init + |theta|)``, in fp32."""
    magnitude = theta.float().abs()
    return magnitude / (theta_init + magnitude)


def mix(causal: torch.Tensor, bidirectional: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``causal * (1 - alpha) + bidirectional * alpha`` computed in fp32, returned in ``causal``'s dtype."""
    alpha = alpha.float()
    return (causal.float() * (1 - alpha) + bidirectional.float() * alpha).to(causal.dtype)
