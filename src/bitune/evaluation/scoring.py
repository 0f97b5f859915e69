"""Log-likelihood of continuations under a Bitune model, one prefill per prompt.

Multiple-choice evaluation asks for log p(continuation | prompt) of every choice. The Bitune prompt cache
depends only on the prompt, so each prompt is prefilled once (both prompt passes) and the cache is
shared by all of its continuations, which are scored together in one batched answer pass. The prompt's
last token opens each answer pass, exactly as in training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..method.model import BituneModel


@dataclass(frozen=True)
class ContinuationRequest:
    """Score ``continuation`` (token ids) after ``prompt`` (token ids, ending with the template's ":")."""

    prompt: tuple[int, ...]
    continuation: tuple[int, ...]


@torch.no_grad()
def score_continuations(
    model: BituneModel,
    requests: Sequence[ContinuationRequest],
    batch_size: int = 16,
    progress: Callable[[int], object] | None = None,
    scored: Callable[[int, tuple[float, bool]], object] | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, whether every token is the greedy choice) for each request.

    Requests that share a prompt share one prefill; ``batch_size`` counts distinct prompts per forward.
    ``progress`` is called with the number of requests scored after each forward, ``scored`` with each
    request's index and result as soon as it has one (e.g. to cache it).
    """
    if any(not r.prompt or not r.continuation for r in requests):
        raise ValueError("every request needs a non-empty prompt and continuation")
    # longest prompts first, so each group pads little (and a memory problem shows at once)
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        by_prompt.setdefault(r.prompt, []).append(i)
    prompts = sorted(by_prompt, key=len, reverse=True)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for start in range(0, len(prompts), batch_size):
        group = prompts[start : start + batch_size]
        members = [i for prompt in group for i in by_prompt[prompt]]
        for i, result in zip(
            members, _score_group(model, group, [requests[i] for i in members]), strict=True
        ):
            results[i] = result
            if scored is not None:
                scored(i, result)
        if progress is not None:
            progress(len(members))
    return results


def _score_group(model: BituneModel, prompts: list[tuple[int, ...]], requests: list[ContinuationRequest]):
    device = model.device
    cache, _, mask = model.prefill_tokens(prompts)  # over every prompt token but the last
    owner = torch.tensor([prompts.index(r.prompt) for r in requests], device=device)
    cache.batch_select_indices(owner)  # one copy of its prompt's cache per continuation

    lengths = [1 + len(r.continuation) for r in requests]
    answer = torch.zeros((len(requests), max(lengths)), dtype=torch.long, device=device)
    answer_mask = torch.zeros_like(answer)
    for row, r in enumerate(requests):
        answer[row, : lengths[row]] = torch.tensor((r.prompt[-1], *r.continuation), device=device)
        answer_mask[row, : lengths[row]] = 1
    prompt_lengths = mask.sum(dim=1)[owner]
    positions = prompt_lengths[:, None] - 1 + torch.arange(answer.shape[1], device=device)[None, :]
    logits = model.decode(cache, answer, torch.cat([mask[:, :-1][owner], answer_mask], dim=1), positions)

    scores = []
    for row, r in enumerate(requests):
        n = len(r.continuation)
        logprobs = torch.log_softmax(logits[row, :n].float(), dim=-1)  # position j predicts continuation[j]
        targets = torch.tensor(r.continuation, device=device)
        chosen = logprobs.gather(1, targets[:, None]).squeeze(1)
        scores.append((float(chosen.sum()), bool((logprobs.argmax(dim=-1) == targets).all())))
    return scores
