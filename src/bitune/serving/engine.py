"""The batching engine behind ``bitune serve``: continuous batching of Bitune requests.

One worker thread owns the model. It waits for a request, takes what else is queued (waiting up to
``max_wait_ms`` for more, default 0; up to ``max_batch_size``), prefills them with `BituneModel.prefill`
(both prompt passes, batched, mixed) and decodes them step by step from the mixed cache with the causal
adapter, exactly as `BituneModel.generate` does (same positions, same masks, greedy = argmax of the fp32
logits). Where the model allows (`BituneModel.can_join`: a merged model's small prefill), the prefill is one
forward that also reads each prompt's last token over the mixed cache, layer by layer as it is built
(`bitune.method.joining`), so the first token comes out of the prefill itself. Each step:

- every row gets its next token: greedy, or sampled with its request's temperature and top-p (transformers'
  logits warpers) from its request's own generator (so a seeded request samples the same whatever else is
  in the batch);
- new text reaches each request's ``on_text`` at once (held back only while it may be the start of a stop
  string);
- a row that ends (EOS or end-of-turn, a stop string, ``max_tokens``, or its client went away) is answered
  at once and leaves the batch: its cache rows are dropped, and so are the leading cache columns that only
  it read (its longer prompt's padding of the others), so the others decode on without it;
- requests that arrived meanwhile join the running batch while it has room: they are prefilled together
  (inside the next decoding step's forward where the model allows, their first tokens with it, reusing the
  causal prompt pass of a shared prefix, `bitune.method.prefixes`; after the step otherwise) and their mixed
  caches are merged into the running one (the
  shorter side left-padded with masked columns, each row keeping its own positions), so nobody waits for a
  batch to finish. Where the model joins, a burst of requests is admitted a few at a time, as many per step
  as one joined forward takes, the others waiting first in line, so that no step stalls the running
  streams with one large prefill. Caches that cannot
  be merged this way (sliding-window or other non-plain cache layers) make new requests wait for the next
  batch instead.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..inference import LoadedModel
from ..method.batching import pad_columns_left
from ..method.joining import Started
from ..method.prefixes import CausalPrefixes

# a token, its log-probability and the most likely alternatives (token, log-probability), from fp32 logits
TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]


@dataclass
class Completion:
    """What a finished request returns."""

    text: str
    finish_reason: str  # "stop" (EOS, end-of-turn or a stop string), "length" or "cancelled"
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # of the tokens whose text is in ``text`` (if asked for)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # of each prompt token given those before it


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to generate. ``on_text`` gets each new piece of text (with the log-probabilities of the
    tokens it completes, if asked for) and ``on_done`` the `Completion`; both are called from the engine
    thread.

    Args:
        logprobs: with each token, its log-probability and this many most likely alternatives (None: none).
        prompt_logprobs: also score the prompt itself, causally (the causal adapter alone; a plain causal
            model's prompt logprobs, as ``echo`` returns them).
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    generator: torch.Generator | None = None  # shared by the sequences of one API request (n > 1)
    seed: int | None = None  # for engines that seed each sequence (vLLM): the request's seed + its index
    logprobs: int | None = None
    prompt_logprobs: bool = False
    on_text: Callable[[str, list[TokenLogprob]], None] = lambda text, logprobs: None
    on_done: Callable[[Completion], None] = lambda completion: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    submitted: float = field(default_factory=time.perf_counter)


class _Row:
    """A request being decoded: its tokens so far and the text already sent."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.tokens: list[int] = []
        self.sent = 0  # characters of the (stop-trimmed) text already sent
        self.logprobs: list[TokenLogprob] = []  # of every token so far (when the request asks for them)
        self.sent_logprobs = 0  # how many of them went out with the text
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        warpers = []
        if request.temperature > 0:
            warpers.append(TemperatureLogitsWarper(request.temperature))
            if request.top_p < 1:
                warpers.append(TopPLogitsWarper(request.top_p))
        self.warpers = warpers


class _Batch:
    """The rows being decoded and their decoding state: the cache over every token before ``current``, the
    attention mask over the cache and ``current`` (one column wider than the cache), and each row's position."""

    def __init__(
        self, rows, cache, mask: torch.Tensor, positions: torch.Tensor, current: torch.Tensor
    ) -> None:
        self.rows, self.cache, self.mask, self.positions, self.current = rows, cache, mask, positions, current

    def step(self, chosen: list[int], ended: list[bool]) -> None:
        """Drop the rows that ended; the others move on to their chosen tokens."""
        keep = [i for i, done in enumerate(ended) if not done]
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.mask.device, dtype=torch.long)
            self.cache.batch_select_indices(index)
            self.mask, self.positions = self.mask[index], self.positions[index]
            self.rows = [self.rows[i] for i in keep]
            chosen = [chosen[i] for i in keep]
        self.current = torch.tensor(chosen, device=self.mask.device, dtype=torch.long)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions + 1
        self._trim()

    def _trim(self) -> None:
        """Drop the leading cache columns that every row masks (the padding of rows that left or of a longer
        prompt that joined and ended), so that each step's cache grows from the live rows' width only."""
        lead = int(self.mask.any(dim=0).int().argmax())
        if lead and self.can_merge():  # plain layers only: a sliding-window layer counts its columns
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self.mask = self.mask[:, lead:]

    def can_merge(self) -> bool:
        """Whether the cache is made of plain full-attention layers that all hold keys (so it can be padded)."""
        return bool(self.rows) and all(
            type(layer) is DynamicLayer and layer.keys is not None and layer.keys.numel() > 0
            for layer in self.cache.layers
        )

    def merge(self, other: _Batch) -> None:
        """Take ``other``'s rows into this batch: both sides left-padded to one width with masked columns."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        theirs_layers = other.cache.layers or [None] * len(self.cache.layers)  # one-token prompts: no cache
        for mine, theirs in zip(self.cache.layers, theirs_layers, strict=True):
            keys, values = _keys_values(theirs, len(other.rows), like=mine.keys)
            mine.keys = torch.cat([pad_columns_left(mine.keys, width - 1), pad_columns_left(keys, width - 1)])
            mine.values = torch.cat(
                [pad_columns_left(mine.values, width - 1), pad_columns_left(values, width - 1)]
            )
        self.mask = torch.cat([pad_columns_left(self.mask, width), pad_columns_left(other.mask, width)])
        self.positions = torch.cat([self.positions, other.positions])
        self.current = torch.cat([self.current, other.current])
        self.rows = self.rows + other.rows


def _keys_values(layer, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values; empty ones (rows, heads, 0, dim) shaped ``like`` if it holds none."""
    if layer is None or layer.keys is None or layer.keys.numel() == 0:
        empty = like.new_zeros((rows, like.shape[1], 0, like.shape[3]))
        return empty, empty
    return layer.keys, layer.values


class Engine:
    """What every engine behind the server shares: the queue of submitted requests, one worker thread, and
    how decoded tokens become text, stop strings and answers. Start with `start`, submit with `submit`,
    stop with `stop`; subclasses decode (``_work``)."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int = 8) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.requests: queue.Queue[GenerationRequest | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name=f"bitune-{type(self).__name__}", daemon=True)
        self.stop_ids = set(loaded.stop_token_ids)
        self.batch_sizes: list[int] = []  # requests per batch run, and how requests ended (tests, logs)
        self.finished: Counter[str] = Counter()
        self.joined = 0  # requests that joined a batch already decoding
        self._closing = False

    def start(self) -> None:
        self.thread.start()

    def submit(self, request: GenerationRequest) -> None:
        self.requests.put(request)

    def stop(self) -> None:
        """Finish what was submitted, then end the worker thread."""
        self.requests.put(None)
        self.thread.join()

    def _work(self) -> None:
        raise NotImplementedError

    def stats(self) -> dict:
        """Counters for /health: requests answered (by how they ended) and those that joined a running batch."""
        return {"finished": dict(self.finished), "joined": self.joined}

    # ------------------------------------------------------------------- shared by the engines
    def _take(self, limit: int, wait: float) -> list[GenerationRequest]:
        """Up to ``limit`` queued requests, waiting at most ``wait`` seconds for them; notes a stop signal."""
        taken: list[GenerationRequest] = []
        deadline = time.perf_counter() + wait
        while len(taken) < limit and not self._closing:
            try:
                request = self.requests.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if request is None:
                self._closing = True
            else:
                taken.append(request)
        return taken

    def _live(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        for request in requests:
            if request.cancelled.is_set():
                self._finish(request, Completion("", "cancelled", 0))
        return [r for r in requests if not r.cancelled.is_set()]

    def _advance(self, row: _Row, token: int) -> bool:
        """Add ``token`` to ``row``, send new text, and answer the request if it ends; True if it ended."""
        request = row.request
        if request.cancelled.is_set():
            self._finish(request, Completion("", "cancelled", len(row.tokens)))
            return True
        ended = token in self.stop_ids
        if not ended:
            row.tokens.append(token)
        return self._settle(row, "stop" if ended else None)

    def _settle(self, row: _Row, reason: str | None) -> bool:
        """Send the row's new text, or answer its request if it ends (``reason``, a stop string or its
        length); True if it ended."""
        request = row.request
        text = self.loaded.tokenizer.decode(row.tokens, skip_special_tokens=True)
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
                request.on_text(text[row.sent : safe], self._unsent_logprobs(row, len(row.logprobs)))
                row.sent = safe
            return False
        kept = self._tokens_in(row, len(text)) if request.logprobs is not None else 0
        if len(text) > row.sent or kept > row.sent_logprobs:
            request.on_text(text[row.sent :], self._unsent_logprobs(row, kept))
        logprobs = row.logprobs[:kept] if request.logprobs is not None else None
        self._finish(request, Completion(text, reason, len(row.tokens), logprobs, row.prompt_logprobs))
        return True

    def _tokens_in(self, row: _Row, length: int) -> int:
        """How many of the row's tokens the final text of ``length`` characters holds (a stop string cuts)."""
        count = len(row.tokens)
        while (
            count
            and len(self.loaded.tokenizer.decode(row.tokens[: count - 1], skip_special_tokens=True)) >= length
        ):
            count -= 1
        return count

    @staticmethod
    def _unsent_logprobs(row: _Row, upto: int) -> list[TokenLogprob]:
        """The log-probabilities not sent yet, up to token ``upto``; they go out with the text now sent."""
        entries = row.logprobs[row.sent_logprobs : upto]
        row.sent_logprobs = max(row.sent_logprobs, upto)
        return entries

    def _finish(self, request: GenerationRequest, completion: Completion) -> None:
        self.finished[completion.finish_reason] += 1
        request.done = True
        request.on_done(completion)


class BatchingEngine(Engine):
    """See the module docstring."""

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch_size: int = 8,
        max_wait_ms: float = 0.0,
        prefix_cache_tokens: int = 2048,
    ) -> None:
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        super().__init__(loaded, max_batch_size)
        self.max_wait = max_wait_ms / 1000
        # the causal prompt pass's keys and values of recent prompts, for the shared prefixes of later ones
        self.prefixes = CausalPrefixes(prefix_cache_tokens) if prefix_cache_tokens else None
        self.prefilled_while_decoding = 0  # joining requests prefilled inside a decoding step (tests, logs)
        self._running: list[GenerationRequest] = []  # the requests of the batch being run
        self._waiting: deque[GenerationRequest] = deque()  # taken from the queue, left for a later step

    def stats(self) -> dict:
        """`Engine.stats`, the requests prefilled inside a decoding step, and the causal prefix cache's use."""
        stats = {**super().stats(), "prefilled_while_decoding": self.prefilled_while_decoding}
        if self.prefixes is not None:
            stats["prefix_cache"] = {
                "hits": self.prefixes.hits,
                "tokens_reused": self.prefixes.tokens_reused,
                "tokens_stored": self.prefixes.tokens,
            }
        return stats

    # ------------------------------------------------------------------------------------- the worker
    def _work(self) -> None:
        while self._waiting or not self._closing:
            first = self._waiting.popleft() if self._waiting else self.requests.get()
            if first is None:
                return
            live = self._admitted([first, *self._queued(self.max_batch_size - 1, wait=self.max_wait)])
            if live:
                self._running = list(live)  # and those that join it
                try:
                    self._run(live)
                except Exception as exc:  # a failed batch fails its requests, the server keeps serving
                    for request in self._running:
                        if not request.done:
                            self._finish(request, Completion(f"{type(exc).__name__}: {exc}", "error", 0))

    @torch.no_grad()
    def _run(self, requests: list[GenerationRequest]) -> None:
        self.batch_sizes.append(len(requests))
        model = self.loaded.model
        batch = self._prefill(requests)
        while batch.rows:
            joining, joined, inside = self._joining(batch), None, False
            self._running += joining
            step = (batch.cache, batch.current, batch.mask, batch.positions)
            prompts = [r.prompt_ids for r in joining]
            if prompts and model.can_join(prompts):
                logits, started = model.decode_joining(*step, prompts, self.prefixes)
                joined, inside = self._started_batch(joining, started), True
            else:
                logits = model.decode(*step)
            batch.step(*self._choose(batch.rows, logits[:, -1]))
            if joining:
                joined = joined or self._prefill(joining)
                if joined.rows:
                    batch.merge(joined)
                self.joined += len(joining)
                self.prefilled_while_decoding += len(joining) if inside else 0

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> tuple[list[int], list[bool]]:
        """Each row's next token from its (V,) row of ``logits``, sent on; and whether the row has ended."""
        logits = logits.float()
        chosen = [self._next_token(row, logits[i : i + 1]) for i, row in enumerate(rows)]
        for i, (row, token) in enumerate(zip(rows, chosen, strict=True)):
            if row.request.logprobs is not None:
                row.logprobs.append(token_logprob(logits[i], token, row.request.logprobs))
        return chosen, [self._advance(row, token) for row, token in zip(rows, chosen, strict=True)]

    def _joining(self, batch: _Batch) -> list[GenerationRequest]:
        """The queued requests that join the running batch at this step (while it has room)."""
        room = self.max_batch_size - len(batch.rows)
        if room > 0 and (self._waiting or not self.requests.empty()) and batch.can_merge():
            return self._admitted(self._queued(room, wait=0.0))
        return []

    def _queued(self, limit: int, wait: float) -> list[GenerationRequest]:
        """Up to ``limit`` requests: those left waiting first, then from the queue (waiting up to ``wait``
        seconds only if none were left waiting)."""
        taken = [self._waiting.popleft() for _ in range(min(limit, len(self._waiting)))]
        return taken + self._take(limit - len(taken), wait=0.0 if taken else wait)

    def _admitted(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """Of ``requests`` (in arrival order, the cancelled answered and dropped), those prefilled now: as
        many as one joined forward takes (`BituneModel.can_join`), the rest left waiting, first in line, for
        the next steps, so that a burst of requests is prefilled a few at a time inside decoding steps
        rather than as one large prefill that stalls every running stream; all of them if not even the
        first one can join (they are prefilled together, as a model that never joins prefills)."""
        live, model = self._live(requests), self.loaded.model
        admitted = 0
        while admitted < len(live) and model.can_join([r.prompt_ids for r in live[: admitted + 1]]):
            admitted += 1
        if not admitted:
            return live
        self._waiting.extendleft(reversed(live[admitted:]))
        return live[:admitted]

    def _prefill(self, requests: list[GenerationRequest]) -> _Batch:
        model, prompts = self.loaded.model, [r.prompt_ids for r in requests]
        if model.can_join(prompts):  # one forward up to the first token; reuses and stores causal prefixes
            return self._started_batch(requests, model.prefill_joined(prompts, self.prefixes))
        prefilled = model.prefill_tokens(prompts)
        current = prefilled.input_ids[:, -1:]
        return _Batch(
            self._rows(requests), prefilled.cache, prefilled.attention_mask, prefilled.positions, current
        )

    def _started_batch(self, requests: list[GenerationRequest], started: Started) -> _Batch:
        """The batch of requests whose prompts were read whole (`Started`): their first tokens are chosen
        and sent here, and the batch goes on from them (without the requests that ended at once)."""
        rows = self._rows(requests)
        batch = _Batch(rows, started.cache, started.attention_mask, started.positions - 1, current=None)
        batch.step(*self._choose(rows, started.logits))
        return batch

    def _rows(self, requests: list[GenerationRequest]) -> list[_Row]:
        rows = [_Row(r) for r in requests]
        for row in rows:
            if row.request.prompt_logprobs:
                row.prompt_logprobs = self._prompt_logprobs(row.request)
        return rows

    def _prompt_logprobs(self, request: GenerationRequest) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it, read causally (the first has none)."""
        ids = torch.tensor([request.prompt_ids], device=self.loaded.model.device)
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
        cache = DynamicCache(config=self.loaded.model.config)
        logits = self.loaded.model.decode(cache, ids, torch.ones_like(ids), positions)[0].float()
        top = request.logprobs or 0
        return [None] + [
            token_logprob(logits[i - 1], token, top) for i, token in enumerate(request.prompt_ids) if i
        ]

    def _next_token(self, row: _Row, logits: torch.Tensor) -> int:
        if not row.warpers:
            return int(logits.argmax(dim=-1))
        history = torch.tensor([row.request.prompt_ids + row.tokens], device=logits.device)
        for warper in row.warpers:
            logits = warper(history, logits)
        probabilities = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=row.request.generator))


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under the (V,) fp32 ``logits`` and the ``top`` most likely tokens'."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives = ()
    if top:
        values, indices = logprobs.topk(top)
        alternatives = tuple(zip(indices.tolist(), values.tolist(), strict=True))
    return int(token), float(logprobs[token]), alternatives
