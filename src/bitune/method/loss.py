"""The answer loss: token-level cross-entropy over the supervised answer tokens, in fp32 like transformers.

Two ways to the same number:

- `answer_loss` takes the answer pass's logits (the model's own head, whatever it does);
- `linear_cross_entropy` takes the decoder's hidden states and the LM head's weight and never materialises
  the (tokens, vocabulary) logits: it keeps only the rows that have a target, runs the head over them in
  chunks and computes the gradient for the hidden states in the same sweep, so backward is one multiply.
  With large vocabularies (Gemma's 262k) the logits, their log-softmax and their gradient are the biggest
  tensors of a training step; here no more than one chunk of them exists at a time.

The second way is exact only when the model's logits are its output embedding applied to the decoder's
last hidden state. `bitune.method.probes.plain_lm_head` checks that at build time (Gemma 2's soft-capping, for
example, fails it), and the model falls back to the first way otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batching import IGNORE_INDEX

# Elements of one chunk of logits (fp32: 256 MB). Chunks that are too small re-read the head's weight
# (vocabulary x hidden) once per chunk; measured in benchmarks/RESULTS.md.
CHUNK_ELEMENTS = 2**26


def answer_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, T, V) against ``targets`` (B, T), IGNORE_INDEX skipped.

    The sum is divided by ``num_items_in_batch`` (the supervised tokens of all accumulated micro-batches,
    as the HF Trainer passes it) or by this batch's supervised tokens.
    """
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return _normalise(total, targets, num_items_in_batch)


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """`answer_loss` of ``head(hidden)`` without materialising the logits.

    Args:
        hidden: (B, T, H) last hidden states of the answer pass.
        head: the frozen output embedding (logits = hidden @ weight.T + bias).
        targets: (B, T) the token each position predicts, IGNORE_INDEX where none.
        num_items_in_batch: as in `answer_loss`.
        chunk_elements: logits computed at once (rows x vocabulary).
    """
    targets = targets.to(hidden.device)
    keep = targets != IGNORE_INDEX
    rows = max(1, chunk_elements // head.out_features)
    total = _LinearCrossEntropy.apply(hidden[keep], head.weight, head.bias, targets[keep], rows)
    return _normalise(total, targets, num_items_in_batch)


def _normalise(
    total: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None
) -> torch.Tensor:
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias``; the gradient for ``hidden`` is computed in
    forward, chunk by chunk (softmax - one_hot) @ weight, and only scaled in backward. The head is frozen:
    no gradient for ``weight`` or ``bias``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows_per_chunk):  # hidden (N, H), targets (N,)
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError("linear_cross_entropy needs a frozen LM head")
        need_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], rows_per_chunk):
            end = start + rows_per_chunk
            logits = F.linear(hidden[start:end], weight, bias).float()  # (n, V), fp32 like transformers
            target = targets[start:end, None]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
            total += (lse - logits.gather(1, target)).sum()
            if need_grad:
                probs = logits.sub_(lse).exp_()  # softmax, in place
                probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                grad[start:end] = probs.to(weight.dtype) @ weight  # (n, H)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None
