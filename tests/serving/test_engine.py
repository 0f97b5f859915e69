"""The batching engine without HTTP: continuous batching that changes no answer, seeded sampling, stop
strings, cancellation and a failed batch that fails only its own requests."""

from __future__ import annotations

import threading

import pytest
import torch

from bitune.inference import generate_text, load_for_inference, prompt_ids
from bitune.serving.engine import BatchingEngine, Completion, GenerationRequest, _Batch, _Row


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_for_inference(str(run_dir))


@pytest.fixture
def engine(loaded):
    engine = BatchingEngine(loaded, max_batch_size=4, max_wait_ms=0)
    engine.start()
    yield engine
    engine.stop()


def complete(
    engine: BatchingEngine, *requests: GenerationRequest, submit: int | None = None
) -> list[Completion]:
    """Submit ``requests`` together (only the first ``submit`` ones: the others are submitted by them) and wait
    for every completion."""
    done: dict[int, Completion] = {}
    finished = threading.Event()

    def recorder(index):
        def record(completion):
            done[index] = completion
            if len(done) == len(requests):
                finished.set()

        return record

    for index, request in enumerate(requests):
        request.on_done = recorder(index)
    for request in requests[:submit]:
        engine.submit(request)
    assert finished.wait(60)
    return [done[i] for i in range(len(requests))]


def test_a_greedy_request_decodes_as_bitune_model_generate(engine, loaded):
    messages = [{"role": "user", "content": "hello there"}]
    (completion,) = complete(engine, GenerationRequest(prompt_ids(loaded, messages), max_tokens=10))
    assert completion.text == generate_text(loaded, messages, max_new_tokens=10)
    assert completion.finish_reason in ("length", "stop") and 0 < completion.completion_tokens <= 10


def test_stop_strings_cut_the_text_and_seeded_sampling_repeats(engine, loaded):
    ids = prompt_ids(loaded, [{"role": "user", "content": "abc"}])
    (whole,) = complete(engine, GenerationRequest(list(ids), max_tokens=12))
    assert len(whole.text) >= 4
    stop = whole.text[2:4]
    (stopped,) = complete(engine, GenerationRequest(list(ids), max_tokens=12, stop=(stop,)))
    assert stopped.text == whole.text[: whole.text.find(stop)] and stopped.finish_reason == "stop"

    def sampled():
        generator = torch.Generator().manual_seed(7)
        request = GenerationRequest(list(ids), max_tokens=8, temperature=1.0, top_p=0.9, generator=generator)
        return complete(engine, request)[0].text

    assert sampled() == sampled()


def test_a_cancelled_request_ends_as_cancelled_and_the_others_decode_on(engine, loaded):
    ids = prompt_ids(loaded, [{"role": "user", "content": "abc"}])
    (alone,) = complete(engine, GenerationRequest(list(ids), max_tokens=10))
    cancelled = GenerationRequest(list(ids), max_tokens=10)
    cancelled.cancelled.set()
    gone, kept = complete(engine, cancelled, GenerationRequest(list(ids), max_tokens=10))
    assert gone.finish_reason == "cancelled" and gone.text == ""
    assert kept.text == alone.text


def test_a_failing_batch_fails_its_requests_and_the_engine_keeps_serving(engine, loaded, monkeypatch):
    ids = prompt_ids(loaded, [{"role": "user", "content": "abc"}])

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(loaded.model, "prefill_tokens", broken)
        patch.setattr(loaded.model, "prefill_joined", broken)
        (failed,) = complete(engine, GenerationRequest(list(ids), max_tokens=4))
    assert failed.finish_reason == "error" and "out of memory" in failed.text
    assert complete(engine, GenerationRequest(list(ids), max_tokens=4))[0].finish_reason in ("length", "stop")


def test_requests_that_join_a_failing_batch_fail_with_it(engine, loaded, monkeypatch):
    """A request taken into a running batch is answered (with the error) if that batch then fails."""
    ids = prompt_ids(loaded, [{"role": "user", "content": "abc"}])
    joining = GenerationRequest(list(ids), max_tokens=4)
    joined = threading.Event()

    def broken(*args, **kwargs):
        joined.set()
        raise RuntimeError("out of memory")

    def submit_joining(text, logprobs):  # on the engine thread, while the first request decodes
        if not joined.is_set():
            engine.submit(joining)

    with monkeypatch.context() as patch:
        patch.setattr(loaded.model, "decode_joining", broken)
        patch.setattr(loaded.model, "can_join", lambda prompts: True)
        first = GenerationRequest(list(ids), max_tokens=8, on_text=submit_joining)
        done: list[Completion] = []
        finished = threading.Event()
        joining.on_done = lambda completion: (done.append(completion), finished.set())
        engine.submit(first)
        assert finished.wait(60)
    assert done[0].finish_reason == "error" and "out of memory" in done[0].text


def test_requests_that_join_a_decoding_batch_answer_as_served_alone(loaded):
    """Continuous batching: requests arriving mid-decode are prefilled (inside a decoding step of the running
    batch: a merged model) and merged into it (caches of other lengths, one of them empty: a one-token prompt),
    and still decode exactly as alone."""
    tokenizer = loaded.tokenizer
    prompts = {
        "long": prompt_ids(loaded, [{"role": "user", "content": "the quick brown fox jumps"}]),
        "short": prompt_ids(loaded, [{"role": "user", "content": "hi"}]),
        "one token": tokenizer("q", add_special_tokens=False)["input_ids"][:1],
    }
    engine = BatchingEngine(loaded, max_batch_size=4, max_wait_ms=0)
    engine.start()

    def run(names: list[str], join_on_first_text: bool) -> dict[str, str]:
        done, texts = threading.Event(), {}

        def finished(name):
            def record(completion):
                texts[name] = completion.text
                if len(texts) == len(names):
                    done.set()

            return record

        requests = {n: GenerationRequest(list(prompts[n]), max_tokens=12, on_done=finished(n)) for n in names}
        if join_on_first_text:  # the others arrive while the first request is decoding (engine thread)
            first, *others = names
            sent = []

            def submit_others(text, logprobs):
                if not sent:
                    sent.append(True)
                    for name in others:
                        engine.submit(requests[name])

            requests[first].on_text = submit_others
            engine.submit(requests[first])
        else:
            for name in names:
                engine.submit(requests[name])
        assert done.wait(60)
        return texts

    try:
        alone = {name: run([name], False)[name] for name in prompts}
        before = (engine.joined, len(engine.batch_sizes), engine.prefilled_while_decoding)
        together = run(["long", "short", "one token"], True)
        assert (engine.joined - before[0], len(engine.batch_sizes) - before[1]) == (2, 1)
        assert engine.prefilled_while_decoding - before[2] == 2  # in the decoding step's forward
    finally:
        engine.stop()
    assert together == alone
    messages = [{"role": "user", "content": "hi"}]
    assert alone["short"] == generate_text(loaded, messages, max_new_tokens=12)


def test_requests_sharing_a_system_prompt_reuse_its_causal_pass_and_answer_as_without(loaded):
    """The engine's prefix cache: later requests that begin with an earlier one's system prompt (alone, and
    joining a decoding batch) compute fewer causal-pass tokens and answer exactly as with the cache off."""
    system = {"role": "system", "content": "Be brief."}
    questions = ["abc", "two and two", "hi"]  # small prefills (joined forwards: `BituneModel.can_join`)
    prompts = [prompt_ids(loaded, [system, {"role": "user", "content": q}]) for q in questions]

    def answers(prefix_cache_tokens: int) -> tuple[list[str], BatchingEngine]:
        engine = BatchingEngine(loaded, max_batch_size=4, prefix_cache_tokens=prefix_cache_tokens)
        engine.start()
        try:
            (alone,) = complete(engine, GenerationRequest(list(prompts[0]), max_tokens=10))
            joining = [GenerationRequest(list(p), max_tokens=10) for p in prompts[1:]]

            def submit_joining(text, logprobs):  # on the engine thread, while the first request decodes
                if not sent:
                    sent.append(True)
                    for request in joining:
                        engine.submit(request)

            sent: list[bool] = []
            first = GenerationRequest(list(prompts[0]), max_tokens=10, on_text=submit_joining)
            done = complete(engine, first, *joining, submit=1)
            assert engine.prefilled_while_decoding == 2  # the two joined inside a decoding step
        finally:
            engine.stop()
        return [c.text for c in (alone, *done)], engine

    cached, engine = answers(2048)
    # the first prompt again (all its causal columns but the last), then the joining ones: the longest one's
    # row reuses the whole shared part ("<system>Be brief.|<user>")
    shared = next(i for i, tokens in enumerate(zip(*prompts, strict=False)) if len(set(tokens)) > 1)
    assert engine.prefixes.hits == engine.stats()["prefix_cache"]["hits"] == 2
    assert engine.prefixes.tokens_reused >= len(prompts[0]) - 2 + shared
    uncached, off = answers(0)
    assert off.prefixes is None
    assert cached == uncached


@torch.no_grad()
def test_a_batch_drops_the_cache_columns_that_no_row_reads_and_decodes_on_alike(loaded):
    """When the row with the longest prompt leaves, the padding it made the others carry goes with it: the
    cache is as wide as the remaining row's own tokens and that row's next logits are unchanged."""
    tokenizer = loaded.tokenizer
    long = tokenizer("the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    short = tokenizer("hi", add_special_tokens=False)["input_ids"]
    model = loaded.model

    def prefilled(prompts: list[list[int]]) -> _Batch:  # a batch about to decode its prompts' last tokens
        p = model.prefill_tokens(prompts)
        rows = [_Row(GenerationRequest(list(ids), 4)) for ids in prompts]
        return _Batch(rows, p.cache, p.attention_mask, p.positions, p.input_ids[:, -1:])

    batch, alone = prefilled([long, short]), prefilled([short])
    for b in (batch, alone):
        b.logits = model.decode(b.cache, b.current, b.mask, b.positions)[:, -1]
    token = int(alone.logits[0].argmax())
    batch.step([0, token], [True, False])
    alone.step([token], [False])
    assert batch.cache.get_seq_length() == alone.cache.get_seq_length() == len(short)
    assert batch.mask.tolist() == alone.mask.tolist() == [[1] * (len(short) + 1)]
    after = model.decode(batch.cache, batch.current, batch.mask, batch.positions)[:, -1]
    expected = model.decode(alone.cache, alone.current, alone.mask, alone.positions)[:, -1]
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)


def test_a_burst_is_admitted_a_few_at_a_time_inside_decoding_steps_and_answers_as_alone(loaded, monkeypatch):
    """Requests arriving together beyond what one joined forward takes are not prefilled as one large batch
    (which stalls every running stream): each step admits what fits, inside its forward, and the rest wait
    first in line; every answer is the one served alone."""
    topics = ["cats", "dogs", "rivers", "stars", "trains", "bread", "snow", "glass"]
    prompts = [prompt_ids(loaded, [{"role": "user", "content": f"tell me about {t} please"}]) for t in topics]
    model = loaded.model
    engine = BatchingEngine(loaded, max_batch_size=len(prompts))
    engine.start()
    try:
        alone = [complete(engine, GenerationRequest(list(p), max_tokens=8))[0].text for p in prompts]
        assert model.can_join(prompts[:1]) and not model.can_join(prompts)  # more than one forward takes

        def refuse(*args, **kwargs):
            raise AssertionError("a large prefill outside the decoding steps")

        joined = engine.prefilled_while_decoding
        with monkeypatch.context() as patch:
            patch.setattr(model, "prefill_tokens", refuse)
            burst = complete(engine, *(GenerationRequest(list(p), max_tokens=8) for p in prompts))
        assert engine.prefilled_while_decoding > joined
    finally:
        engine.stop()
    assert [c.text for c in burst] == alone
