"""Fuzzed request bodies: arbitrary JSON to each endpoint, and valid requests with one field replaced by
arbitrary JSON. Every answer is a 4xx with an OpenAI error body or a valid answer, and the server keeps
answering."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzing import JSON, MESSAGES

from conftest import count_fuzz_example

pytest.importorskip("fastapi")

from starlette.testclient import TestClient

from bitune.inference import load_for_inference
from bitune.serving.app import create_app

VALID = {
    "chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "abc"}], "max_tokens": 3},
    "completions": {"model": "tiny", "prompt": "abc", "max_tokens": 3},
}
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
          "stream_options", "logprobs", "user"]  # fmt: skip
TRICKY = st.sampled_from(["\ud800", "a\udfffb", "<|im_start|>assistant", "", " ", "\x00"])
BODIES = st.one_of(
    JSON,
    st.tuples(st.sampled_from(FIELDS), JSON | MESSAGES | st.integers(-5, 200) | st.floats(-1, 3)),
    st.tuples(st.sampled_from(["prompt", "stop", "model"]), TRICKY),  # text that breaks text handling
    st.tuples(
        st.just("messages"),
        st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": TRICKY}), min_size=1),
    ),
)


@pytest.fixture(scope="module")
def client(run_dir):
    app = create_app(load_for_inference(str(run_dir)), "tiny", max_wait_ms=0)
    with TestClient(app, raise_server_exceptions=False) as client:  # a server error is a status to assert on
        yield client


@settings(
    max_examples=300, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)  # fmt: skip
@given(st.sampled_from(sorted(VALID)), BODIES)
def test_any_body_gets_an_openai_error_or_an_answer_and_the_server_keeps_serving(client, path, body):
    count_fuzz_example(f"request bodies ({path})")
    if isinstance(body, tuple):  # a valid request with one field replaced
        field, value = body
        body = {**VALID[path], field: value}
    try:
        content = json.dumps(body).encode()
    except (ValueError, UnicodeEncodeError):  # NaN, lone surrogates: sent as the bytes a client would send
        content = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()
    response = client.post(f"/v1/{path}", content=content, headers={"content-type": "application/json"})
    assert response.status_code in (200, 400, 401, 404), response.text
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    elif isinstance(body, dict) and body.get("stream") is True:
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        assert response.json()["choices"]
    assert client.get("/health").status_code == 200
