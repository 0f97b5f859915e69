"""The batching engine behind ``bitune serve``: requests that arrive close together are prefilled together
(both prompt passes, batched) and decoded as one batch.

One worker thread owns the model. It waits for a request, then up to ``max_wait_ms`` for more (up to
``max_batch_size``), prefills them with `BituneModel.prefill` and decodes them step by step from the mixed
cache with the causal adapter, exactly as `BituneModel.generate` does (same positions, same masks, greedy
= argmax of the fp32 logits). Each step:

- every row gets its next token: greedy, or sampled with its request's temperature and top-p (transformers'
  logits warpers) from its request's own generator (so a seeded request samples the same whatever else is
  in the batch);
- new text reaches each request's ``on_text`` at once (held back only while it may be the start of a stop
  string);
- a row that ends (EOS or end-of-turn, a stop string, ``max_tokens``, or its client went away) is answered
  at once and leaves the batch: its cache rows are dropped, so the others decode on without it.

Requests that arrive while a batch decodes wait for the next one (static batching; vLLM-style continuous
batching would merge caches of different lengths mid-decode, which Hugging Face caches do not offer).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from ..batching import left_pad
from ..config import CAUSAL_ADAPTER
from ..inference import LoadedModel


@dataclass
class Completion:
    """What a finished request returns."""

    text: str
    finish_reason: str  # "stop" (EOS, end-of-turn or a stop string), "length" or "cancelled"
    completion_tokens: int


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to generate. ``on_text`` gets each new piece of text and ``on_done`` the `Completion`;
    both are called from the engine thread."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    generator: torch.Generator | None = None  # shared by the sequences of one API request (n > 1)
    on_text: Callable[[str], None] = lambda text: None
    on_done: Callable[[Completion], None] = lambda completion: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


class _Row:
    """A request being decoded: its tokens so far and the text already sent."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.tokens: list[int] = []
        self.sent = 0  # characters of the (stop-trimmed) text already sent
        warpers = []
        if request.temperature > 0:
            warpers.append(TemperatureLogitsWarper(request.temperature))
            if request.top_p < 1:
                warpers.append(TopPLogitsWarper(request.top_p))
        self.warpers = warpers


class BatchingEngine:
    """See the module docstring. Start with `start`, submit with `submit`, stop with `stop`."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int = 8, max_wait_ms: float = 20.0) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError(
                f"max_batch_size must be >= 1 and max_wait_ms >= 0, got {max_batch_size}, {max_wait_ms}"
            )
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.requests: queue.Queue[GenerationRequest | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="bitune-engine", daemon=True)
        self.stop_ids = set(loaded.stop_token_ids)
        self.batch_sizes: list[int] = []  # requests per batch run, and how requests ended (tests, logs)
        self.finished: Counter[str] = Counter()

    def start(self) -> None:
        self.thread.start()

    def submit(self, request: GenerationRequest) -> None:
        self.requests.put(request)

    def stop(self) -> None:
        """Finish what was submitted, then end the worker thread."""
        self.requests.put(None)
        self.thread.join()

    # ------------------------------------------------------------------------------------- the worker
    def _work(self) -> None:
        while True:
            first = self.requests.get()
            if first is None:
                return
            batch, closing = [first], False
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch_size:
                try:
                    request = self.requests.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if request is None:
                    closing = True
                    break
                batch.append(request)
            live = [r for r in batch if not r.cancelled.is_set()]
            for request in batch:
                if request.cancelled.is_set():
                    self._finish(request, Completion("", "cancelled", 0))
            if live:
                try:
                    self._run(live)
                except Exception as exc:  # a failed batch fails its requests, the server keeps serving
                    for request in live:
                        self._finish(request, Completion(f"{type(exc).__name__}: {exc}", "error", 0))
            if closing:
                return

    @torch.no_grad()
    def _run(self, requests: list[GenerationRequest]) -> None:
        self.batch_sizes.append(len(requests))
        model, device = self.loaded.model, self.loaded.model.device
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros((len(requests), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, request in enumerate(requests):
            ids[i, : len(request.prompt_ids)] = torch.tensor(request.prompt_ids, device=device)
            mask[i, : len(request.prompt_ids)] = 1
        ids, mask = left_pad(ids, mask)
        cache = model.prefill(ids, mask)  # both prompt passes, mixed; over every prompt token but the last
        rows = [_Row(r) for r in requests]
        current = ids[:, -1:]
        positions = mask.sum(dim=1, keepdim=True) - 1  # the last prompt token's position
        with model.adapters.use(CAUSAL_ADAPTER):
            while rows:
                logits = (
                    model.base_model(
                        input_ids=current,
                        attention_mask=mask,
                        position_ids=positions,
                        past_key_values=cache,
                        use_cache=True,
                    )
                    .logits[:, -1]
                    .float()
                )
                chosen = [self._next_token(row, logits[i : i + 1]) for i, row in enumerate(rows)]
                keep = [
                    i
                    for i, (row, token) in enumerate(zip(rows, chosen, strict=True))
                    if not self._advance(row, token)
                ]
                if len(keep) < len(rows):
                    index = torch.tensor(keep, device=device, dtype=torch.long)
                    cache.batch_select_indices(index)
                    mask, positions = mask[index], positions[index]
                    chosen = [chosen[i] for i in keep]
                    rows = [rows[i] for i in keep]
                if not rows:
                    return
                current = torch.tensor(chosen, device=device, dtype=torch.long)[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions + 1

    def _next_token(self, row: _Row, logits: torch.Tensor) -> int:
        if not row.warpers:
            return int(logits.argmax(dim=-1))
        history = torch.tensor([row.request.prompt_ids + row.tokens], device=logits.device)
        for warper in row.warpers:
            logits = warper(history, logits)
        probabilities = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=row.request.generator))

    def _advance(self, row: _Row, token: int) -> bool:
        """Add ``token`` to ``row``, send new text, and answer the request if it ends; True if it ended."""
        request = row.request
        if request.cancelled.is_set():
            self._finish(request, Completion("", "cancelled", len(row.tokens)))
            return True
        ended = token in self.stop_ids
        if not ended:
            row.tokens.append(token)
        text = self.loaded.tokenizer.decode(row.tokens, skip_special_tokens=True)
        reason = "stop" if ended else None
        for stop in request.stop:
            at = text.find(stop)
            if at >= 0:
                text, reason = text[:at], "stop"
        if reason is None and len(row.tokens) >= request.max_tokens:
            reason = "length"
        if reason is None:  # hold back what may be an incomplete character or the start of a stop string
            safe = len(text) - max((len(s) - 1 for s in request.stop), default=0)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
            if safe > row.sent:
                request.on_text(text[row.sent : safe])
                row.sent = safe
            return False
        if len(text) > row.sent:
            request.on_text(text[row.sent :])
        self._finish(request, Completion(text, reason, len(row.tokens)))
        return True

    def _finish(self, request: GenerationRequest, completion: Completion) -> None:
        self.finished[completion.finish_reason] += 1
        request.on_done(completion)
