"""The parts of the OpenAI protocol clients rely on, with the official `openai` client and lm-eval's API
models on loopback: log-probabilities equal to a log-softmax of the model's own logits (streamed too),
/tokenize, /detokenize and /tokenizer_info, echo for a plain causal model and its refusal for a Bitune run,
several prompts in one completions request, max_completion_tokens, the message shapes clients send, and a
client that hangs up on a request that is not streamed."""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from bitune.inference import load_for_inference, prompt_ids  # noqa: E402
from bitune.references import load_model  # noqa: E402
from bitune.serving.app import create_app  # noqa: E402

from .conftest import CHAT_TEMPLATE, Server, chat_run  # noqa: E402


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A Bitune run and its base with a context long enough for lm-eval's prompts (1,024 positions)."""
    root = tmp_path_factory.mktemp("protocol")
    chat_run(root, max_position_embeddings=1024)
    return root


@pytest.fixture(scope="module")
def servers(long_run):
    """The Bitune run and its base model, each served."""
    started = {
        name: Server(create_app(load_for_inference(str(long_run / name)), name)) for name in ("run", "base")
    }
    yield {name: server.url for name, server in started.items()}
    for server in started.values():
        server.close()


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def reference_logprobs(loaded, ids: list[int], generated: list[int]) -> list[torch.Tensor]:
    """log-softmax of BituneModel's own logits at each generated position (unmerged: the trained factors)."""
    fresh = load_for_inference(loaded.name, merge=False)
    full = torch.tensor([ids + generated])
    with torch.no_grad():
        logits = fresh.model(full, prompt_lengths=torch.tensor([len(ids)])).logits[0].float()
    return [torch.log_softmax(logits[i], dim=-1) for i in range(len(generated))]


def test_chat_logprobs_equal_a_log_softmax_of_the_models_logits(servers, long_run):
    loaded = load_for_inference(str(long_run / "run"))
    messages = [{"role": "user", "content": "abc"}]
    response = client(servers["run"]).chat.completions.create(
        model="run", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = response.choices[0].logprobs.content
    ids = prompt_ids(loaded, messages)
    generated = [loaded.tokenizer.convert_tokens_to_ids(e.token) for e in entries]
    expected = reference_logprobs(loaded, ids, generated)
    assert "".join(e.token for e in entries) == response.choices[0].message.content
    for entry, token, logprobs in zip(entries, generated, expected, strict=True):
        assert entry.logprob == pytest.approx(float(logprobs[token]), abs=1e-4)
        top = logprobs.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.token == entry.top_logprobs[0].token  # greedy: the chosen token is the most likely
        assert bytes(entry.bytes).decode() == entry.token
    streamed = client(servers["run"]).chat.completions.create(
        model="run",
        messages=messages,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    pieces = [e for chunk in streamed for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in pieces] == [
        (e.token, round(e.logprob, 5)) for e in entries
    ]


def test_echo_scores_the_prompt_of_a_base_model_and_is_refused_for_a_bitune_run(servers, long_run):
    loaded = load_for_inference(str(long_run / "base"))
    ids = loaded.tokenizer("hello world")["input_ids"]
    response = client(servers["base"]).completions.create(
        model="base", prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    choice = response.choices[0]
    assert choice.text.startswith("hello world") and choice.logprobs.token_logprobs[0] is None
    with torch.no_grad():
        logits = load_model(str(long_run / "base"))[0](torch.tensor([ids])).logits[0].float()
    expected = [float(torch.log_softmax(logits[i - 1], -1)[ids[i]]) for i in range(1, len(ids))]
    assert choice.logprobs.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert len(choice.logprobs.tokens) == len(ids) + 1 and choice.logprobs.text_offset[0] == 0
    refused = httpx.post(
        f"{servers['run']}/v1/completions",
        json={"model": "run", "prompt": "hello", "max_tokens": 1, "logprobs": 1, "echo": True},
    )
    assert refused.status_code == 400 and "bitune eval" in refused.json()["error"]["message"]


def test_several_prompts_token_ids_and_max_completion_tokens(servers):
    base = client(servers["base"])
    one = base.completions.create(model="base", prompt="abc", max_tokens=4, temperature=0).choices[0].text
    two = base.completions.create(model="base", prompt=["xy", "abc"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3] and two.choices[2].text == two.choices[
        3
    ].text == one
    ids = httpx.post(f"{servers['base']}/tokenize", json={"prompt": "abc"}).json()["tokens"]
    assert (
        base.completions.create(model="base", prompt=ids, max_tokens=4, temperature=0).choices[0].text == one
    )
    limited = base.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "abc"}], max_completion_tokens=2, temperature=0
    )
    assert limited.usage.completion_tokens <= 2 and limited.choices[0].finish_reason in ("length", "stop")


def test_message_shapes_clients_send(servers):
    run = client(servers["run"])
    plain = run.chat.completions.create(
        model="run", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "abc"}],
        max_tokens=4, temperature=0,
    )  # fmt: skip
    parts = run.chat.completions.create(
        model="run",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "bc"}]},
        ],
        max_tokens=4,
        temperature=0,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_tokenize_detokenize_and_tokenizer_info(servers, long_run):
    loaded = load_for_inference(str(long_run / "run"))
    url = servers["run"]
    tokens = httpx.post(
        f"{url}/tokenize", json={"model": "run", "prompt": "abc", "return_token_strs": True}
    ).json()
    assert tokens["tokens"] == loaded.tokenizer("abc")["input_ids"] and tokens["count"] == len(
        tokens["tokens"]
    )
    assert tokens["max_model_len"] == 1024 and tokens["token_strs"] == ["a", "b", "c"]
    messages = [{"role": "user", "content": "abc"}]
    chat = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == prompt_ids(loaded, messages)
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "abc"}
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == loaded.tokenizer.eos_token and info["chat_template"] == CHAT_TEMPLATE
    assert httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}).status_code == 400


def test_a_huge_prompt_is_refused_without_being_tokenized(servers):
    response = httpx.post(
        f"{servers['base']}/v1/completions", json={"model": "base", "prompt": "x" * 10_000_000}, timeout=600
    )
    assert (
        response.status_code == 400 and "more than the model's context" in response.json()["error"]["message"]
    )
    assert httpx.get(f"{servers['base']}/health").status_code == 200


def test_a_client_that_hangs_up_on_an_unstreamed_request_cancels_it(long_run):
    app = create_app(load_for_inference(str(long_run / "base")), "base")
    server = Server(app)
    engine, submitted = app.state.engine, threading.Event()
    original = engine.submit

    def noted(request):
        original(request)
        submitted.set()

    engine.submit = noted
    try:
        body = json.dumps({"model": "base", "prompt": "abc", "max_tokens": 900, "temperature": 0}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as connection:  # a client that hangs up
            connection.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert submitted.wait(600)  # the engine has it: now go away without reading the answer
        deadline = time.time() + 600  # a guard against a hang: the loop ends once the row is cancelled
        while engine.finished["cancelled"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert engine.finished["cancelled"] == 1 and engine.finished["length"] == 0  # it did not run to 900
    finally:
        server.close()


@pytest.mark.slow
def test_lm_eval_api_models_against_the_server(servers, long_run):
    """lm-eval's local-chat-completions gives bitune eval's answers on a generative task; local-completions
    scores a loglikelihood task through echo for a base model, and a Bitune run refuses it."""
    import lm_eval

    from bitune.evaluation.runner import evaluate

    settings = dict(limit=2, gen_kwargs={"max_gen_toks": 6}, apply_chat_template=True, log_samples=True)
    ours = evaluate({"pretrained": str(long_run / "run")}, ["bitune_gsm8k_packaged"], **settings)
    from lm_eval.tasks import TaskManager

    from bitune.evaluation.tasks import TASKS_DIR

    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    theirs = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args={"model": "run", "base_url": f"{servers['run']}/v1/chat/completions", "num_concurrent": 1},
        tasks=["bitune_gsm8k_packaged"],
        task_manager=tasks,
        **settings,
    )

    def answers(results):
        return [
            s["resps"] for s in sorted(results["samples"]["bitune_gsm8k_packaged"], key=lambda s: s["doc_id"])
        ]

    assert answers(theirs) == answers(ours)
    scored = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": "base",
            "base_url": f"{servers['base']}/v1/completions",
            "tokenizer_backend": "remote",
        },
        tasks=["bitune_copa_cloze_packaged"],
        task_manager=tasks,
        limit=3,
    )
    direct = evaluate({"pretrained": str(long_run / "base")}, ["bitune_copa_cloze_packaged"], limit=3)
    assert math.isclose(
        scored["results"]["bitune_copa_cloze_packaged"]["acc,none"],
        direct["results"]["bitune_copa_cloze_packaged"]["acc,none"],
    )
    with pytest.raises(Exception):  # noqa: B017  (lm-eval's own error after the server's 400)
        lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "model": "run",
                "base_url": f"{servers['run']}/v1/completions",
                "tokenizer_backend": "remote",
                "max_retries": 1,
            },
            tasks=["bitune_copa_cloze_packaged"],
            task_manager=tasks,
            limit=1,
        )
