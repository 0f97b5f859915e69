"""`bitune serve` on loopback with the official `openai` client: completions, chat, streaming, batching that
changes nothing, every bad input, authentication, disconnects and SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from bitune.inference import generate_text, load_for_inference, prompt_ids  # noqa: E402
from bitune.serving.app import create_app  # noqa: E402

from .conftest import Server, serve_process  # noqa: E402

PROMPTS = ["abc", "hello there", "xyz xyz", "a", "the quick brown fox", "mnop", "qq", "rst uvw"]


@pytest.fixture(scope="module")
def served(run_dir):
    loaded = load_for_inference(str(run_dir))
    app = create_app(loaded, "tiny", max_batch_size=8, max_wait_ms=300)
    server = Server(app)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    yield client, app.state.engine, loaded, server.url
    server.close()


def chat(client, content: str, max_tokens: int = 8, **kwargs):
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=max_tokens,
        **kwargs,
    )


def test_models_health_and_a_greedy_chat_answer_equal_to_generate(served):
    client, _, loaded, url = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    response = chat(client, "abc")
    health = httpx.get(f"{url}/health").json()["engine"]  # the engine's counters
    assert sum(health["finished"].values()) >= 1 and "hits" in health["prefix_cache"]
    expected = generate_text(loaded, [{"role": "user", "content": "abc"}], max_new_tokens=8)
    assert response.choices[0].message.content == expected and response.choices[0].message.role == "assistant"
    ids = prompt_ids(loaded, [{"role": "user", "content": "abc"}])
    assert response.usage.prompt_tokens == len(ids)
    assert response.usage.completion_tokens + response.usage.prompt_tokens == response.usage.total_tokens


def test_completions_continue_the_prompt_verbatim_like_bitune_generate(served):
    client, _, loaded, _ = served
    response = client.completions.create(model="tiny", prompt="abc def", temperature=0, max_tokens=6)
    ids = loaded.tokenizer("abc def")["input_ids"]
    output = loaded.model.generate(
        torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=loaded.stop_token_ids
    )
    assert response.choices[0].text == loaded.tokenizer.decode(
        output[0, len(ids) :], skip_special_tokens=True
    )
    assert response.choices[0].finish_reason in ("length", "stop")


def test_streaming_sends_the_same_text_in_chunks(served):
    client, _, _, _ = served
    whole = chat(client, "hello there").choices[0].message.content
    pieces, reasons = [], []
    for chunk in chat(client, "hello there", stream=True):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == whole and reasons[-1] in ("length", "stop") and len(pieces) > 2
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="abc", temperature=0, max_tokens=5, stream=True
        )
    )
    assert (
        text
        == client.completions.create(model="tiny", prompt="abc", temperature=0, max_tokens=5).choices[0].text
    )


def test_a_stream_asked_for_usage_ends_with_it(served):
    client, _, _, _ = served
    whole = chat(client, "count with me", n=2)
    chunks = list(chat(client, "count with me", n=2, stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    plain = list(chat(client, "count with me", stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)


def test_requests_batched_together_answer_exactly_as_served_alone(served):
    client, engine, loaded, _ = served
    alone = {p: chat(client, p).choices[0].message.content for p in PROMPTS}
    before, joined = len(engine.batch_sizes), engine.joined
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = dict(
            zip(PROMPTS, pool.map(lambda p: chat(client, p).choices[0].message.content, PROMPTS), strict=True)
        )
    assert max(engine.batch_sizes[before:]) > 1 or engine.joined > joined  # they did share batches
    assert together == alone
    for prompt in PROMPTS[:3]:  # and both equal BituneModel.generate
        assert alone[prompt] == generate_text(loaded, [{"role": "user", "content": prompt}], max_new_tokens=8)


def test_stop_strings_max_tokens_n_and_seeds(served):
    client, _, _, _ = served
    text = chat(client, "abc", max_tokens=12).choices[0].message.content
    assert len(text) >= 3
    stop = text[2:4]
    stopped = chat(client, "abc", max_tokens=12, stop=[stop]).choices[0]
    assert stopped.message.content == text[: text.find(stop)] and stopped.finish_reason == "stop"
    assert chat(client, "abc", max_tokens=1).choices[0].finish_reason in ("length", "stop")
    sampled = [
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "abc"}],
            temperature=1.0,
            top_p=0.9,
            max_tokens=6,
            n=2,
            seed=7,
        )
        for _ in range(2)
    ]
    assert len(sampled[0].choices) == 2 and [c.index for c in sampled[0].choices] == [0, 1]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]


BAD_REQUESTS = [
    ("chat/completions", b"{not json", 400, "not valid JSON"),
    ("chat/completions", {"model": "tiny"}, 400, "messages"),
    ("chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    (
        "chat/completions",
        {"model": "tiny", "messages": [{"role": "system", "content": "x"}]},
        400,
        "no non-empty user message",
    ),
    (
        "chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens must be >= 1",
    ),
    (
        "chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000},
        400,
        "exceed the model's context of 128",
    ),
    (
        "chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x" * 200}]},
        400,
        "the model's context is 128",
    ),
    (
        "chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        400,
        "temperature",
    ),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    (
        "chat/completions",
        {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model 'gpt-4' is not served here",
    ),
    ("completions", {"model": "tiny", "prompt": ""}, 400, "prompt is empty"),
    ("completions", {"model": "tiny", "prompt": ["a"] * 17}, 400, "at most 16 prompts"),
    ("completions", {"model": "tiny", "prompt": [[]]}, 400, "prompt is empty"),
    ("completions", {"model": "tiny", "prompt": [5, 10**9]}, 400, "outside the vocabulary"),
    ("completions", {"model": "tiny", "prompt": "x", "echo": True, "logprobs": 1}, 400, "bitune eval"),
    (
        "completions",
        {"model": "tiny", "prompt": "x", "suffix": "y"},
        400,
        "suffix (insertion) is not supported",
    ),
    (
        "chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 3,
            "max_completion_tokens": 4,
        },
        400,
        "max_tokens and max_completion_tokens differ",
    ),
    (
        "chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_k": 3},
        400,
        "unknown fields ['top_k']",
    ),
    (
        "chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        400,
        "tool calling is not supported",
    ),
    (
        "chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"},
        },
        400,
        "response_format",
    ),
    (
        "chat/completions",
        {"model": "tiny", "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
        400,
        "tool messages and tool calls are not supported",
    ),
    (
        "chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}],
        },
        400,
        "content is null",
    ),
    (
        "chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        },
        400,
        "messages.0.content",
    ),
    (
        "chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs needs logprobs",
    ),
    (
        "completions",
        {"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop takes up to 4",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"), BAD_REQUESTS, ids=[f"{b[0]}:{b[3]}" for b in BAD_REQUESTS]
)
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(served, path, body, status, message):
    client, _, _, url = served
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}/v1/{path}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    assert chat(client, "abc", max_tokens=2).choices  # still serving


def test_an_api_key_guards_every_endpoint_but_health(run_dir):
    server = Server(create_app(load_for_inference(str(run_dir)), "tiny", api_key="sesame"))
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        for key in (None, "wrong"):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            response = httpx.get(f"{server.url}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sesame", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        server.close()


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    client, engine, _, url = served
    before = engine.finished["cancelled"]
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "abc"}],
        "temperature": 0,
        "max_tokens": 100,
        "stream": True,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and '"content":' in line and '"content":""' not in line:
                break  # the first text arrived: leave
    deadline = time.time() + 600  # a guard against a hang: the loop ends when the row is cancelled
    while engine.finished["cancelled"] == before and time.time() < deadline:
        time.sleep(0.05)
    assert engine.finished["cancelled"] == before + 1  # the row left the batch without decoding to 100 tokens
    assert chat(client, "abc", max_tokens=2).choices


def test_sigterm_lets_requests_in_flight_finish(run_dir):
    proc, port = serve_process(str(run_dir), "--model-name", "tiny", OMP_NUM_THREADS="1")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        stream = chat(client, "abc", max_tokens=60, stream=True)
        pieces = [next(stream)]  # the request is in flight (its first chunk came back): now stop the server
        proc.send_signal(signal.SIGTERM)
        pieces += list(stream)
        assert pieces[-1].choices[0].finish_reason in ("length", "stop")  # answered in full after the SIGTERM
        expected = generate_text(load_for_inference(str(run_dir)), [{"role": "user", "content": "abc"}], 60)
        assert "".join(c.choices[0].delta.content or "" for c in pieces) == expected
        assert proc.wait(timeout=600) in (
            0,
            -signal.SIGTERM,
        )  # uvicorn re-raises the signal once it has drained
        log = proc.stdout.read()
        assert "Shutting down" in log and "Finished server process" in log
    finally:
        if proc.poll() is None:
            proc.kill()


# `bitune serve` whose every decoding step takes a second: a request of 1,000 tokens cannot finish within the
# drain timeout, whatever the machine (the hook makes the order of events certain, not a race of speeds)
SLOW_SERVE = """
import sys, time
import bitune.method.model as model
decode = model.BituneModel.decode
def slow(self, *args, **kwargs):
    time.sleep(1.0)
    return decode(self, *args, **kwargs)
model.BituneModel.decode = slow
from bitune.cli import main
main(sys.argv[1:])
"""


def test_sigterm_cancels_what_the_drain_timeout_cannot_wait_for(run_dir):
    proc, port = serve_process(str(run_dir), "--model-name", "tiny", "--drain-timeout", "2", code=SLOW_SERVE)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        stream = chat(client, "abc", max_tokens=100, stream=True)
        next(stream)  # in flight
        proc.send_signal(signal.SIGTERM)
        with pytest.raises((openai.APIError, httpx.HTTPError)):  # cut off, not answered in full
            for chunk in stream:
                assert chunk.choices[0].finish_reason is None  # never a finished answer
        assert proc.wait(timeout=600) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_loads_the_model_in_a_thread_that_ends_before_serving(monkeypatch):
    """The engine thread must be the only one that ran parallel torch work (see `in_passing_thread`)."""
    import bitune.inference
    from bitune.serving import serve

    seen = []

    def load(target, dtype):
        seen.append(threading.current_thread())
        raise ValueError(f"no model {target}")

    monkeypatch.setattr(bitune.inference, "load_for_inference", load)
    with pytest.raises(ValueError, match="no model missing-run"):  # its error still reaches the caller
        serve("missing-run")
    assert len(seen) == 1
    assert seen[0] is not threading.main_thread()
    assert not seen[0].is_alive()


def test_bad_serve_options_are_refused_before_loading(tmp_path):
    from bitune.serving import serve

    missing = str(tmp_path / "no-such-run")  # never loaded: the options fail first
    with pytest.raises(ValueError, match="prefix_cache_tokens >= 0"):
        serve(missing, prefix_cache_tokens=-1)
    with pytest.raises(ValueError, match="--prefix-cache-tokens sets the built-in engine"):
        serve(missing, engine="vllm", prefix_cache_tokens=4096)
