"""`bitune serve --engine vllm`: vLLM decodes, the `BituneConnector` hands it Bitune's mixed cache. Greedy
answers equal `BituneModel.generate` token for token (alone, under 16 concurrent clients, streamed, after
vLLM preempted and recomputed a request); a base model and a ``lora`` run are served by vLLM alone; bad
requests get the built-in server's bodies; what the connector cannot serve is refused before vLLM starts.

Runs in the environment of `make setup-vllm` (vLLM pins its own transformers): `make test-vllm`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from bitune import BituneConfig, get_bitune_model
from bitune.data import PromptFormat
from bitune.inference import load_for_inference, prompt_ids
from bitune.references import load_model
from bitune.serving.app import create_app
from bitune.serving.vllm_engine import VllmEngine, parse_vllm_args, vllm_plan

from .conftest import Server, chat_run, serve_process
from conftest import randomize_adapters

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes a share of all memory
# head_dim 32: vLLM's CPU attention kernels take head sizes that are multiples of 32
SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
FAST = ["--enforce-eager"]  # no graph compilation: starts in about 40 s on 2 CPU cores
PROMPTS = ["abc", "hello there", "xyz xyz", "a", "the quick brown fox", "mnop", "qq", "rst uvw"]


def expected(loaded, content: str, max_tokens: int) -> list[int]:
    """`BituneModel.generate`'s greedy tokens for one user message (EOS and end-of-turn end it)."""
    ids = prompt_ids(loaded, [{"role": "user", "content": content}])
    out = loaded.model.generate(
        torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=loaded.stop_token_ids
    )
    tokens = out[0, len(ids) :].tolist()
    return [t for t in tokens if t not in loaded.stop_token_ids]


def text_of(loaded, tokens: list[int]) -> str:
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True)


class Served:
    def __init__(self, run: str, name: str = "tiny", vllm_args=(), max_batch_size: int = 16) -> None:
        self.loaded = load_for_inference(run)
        self.engine = VllmEngine(self.loaded, max_batch_size, options=parse_vllm_args([*FAST, *vllm_args]))
        self.server = Server(create_app(self.loaded, name, engine=self.engine))
        self.client = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="unused", max_retries=0)
        self.name = name

    def chat(self, content: str, max_tokens: int = 12, **kwargs):
        return self.client.chat.completions.create(
            model=self.name,
            messages=[{"role": "user", "content": content}],
            temperature=0,
            max_tokens=max_tokens,
            **kwargs,
        )

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="class")
def bitune_served(tmp_path_factory):
    served = Served(str(chat_run(tmp_path_factory.mktemp("vllm"), **SHAPE)))
    yield served
    served.close()


class TestABituneRun:
    """One vLLM engine (with the connector) for these tests; vLLM keeps one connector per process."""

    def test_a_bitune_run_goes_through_the_connector_and_answers_as_generate(self, bitune_served):
        served = bitune_served
        assert served.engine.plan["connector"] and served.engine.plan["lora"]
        for content in PROMPTS[:4]:
            before = sum(served.engine.connector.loads.values())
            answer = served.chat(content).choices[0].message.content
            assert answer == text_of(served.loaded, expected(served.loaded, content, 12))
            assert sum(served.engine.connector.loads.values()) == before + 1  # its mixed cache was written

    def test_the_mixed_cache_is_what_makes_the_answers(self, bitune_served):
        """The test above can fail: the same prompts read causally by the causal adapter alone answer otherwise."""
        loaded = bitune_served.loaded
        assert loaded.model.is_merged  # its plain model is the base with the causal adapter merged in
        differ = 0
        for content in PROMPTS:
            ids = torch.tensor([prompt_ids(loaded, [{"role": "user", "content": content}])])
            causal = loaded.model._plain.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
            mixed = loaded.model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
            differ += not torch.equal(causal, mixed)
        assert differ > 0

    def test_sixteen_concurrent_clients_get_the_answers_they_get_alone(self, bitune_served):
        served = bitune_served
        contents = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            answers = list(
                pool.map(lambda c: served.chat(c, max_tokens=16).choices[0].message.content, contents)
            )
        assert answers == [text_of(served.loaded, expected(served.loaded, c, 16)) for c in contents]
        assert max(served.engine.batch_sizes) > 1 or served.engine.joined > 0  # they were decoded together

    def test_completions_streaming_n_stop_and_usage(self, bitune_served):
        served = bitune_served
        loaded = served.loaded
        prompt = "hello there"
        ids = loaded.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        out = loaded.model.generate(
            torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None
        )
        reference = text_of(
            loaded, [t for t in out[0, len(ids) :].tolist() if t not in loaded.stop_token_ids]
        )
        answer = served.client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=10)
        assert reference.startswith(answer.choices[0].text) and answer.usage.prompt_tokens == len(ids)
        stream = served.client.completions.create(
            model="tiny", prompt=prompt, temperature=0, max_tokens=10, stream=True
        )
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == answer.choices[0].text
        chat = served.chat("abc", n=2)
        assert [c.message.content for c in chat.choices] == [chat.choices[0].message.content] * 2  # greedy
        full = chat.choices[0].message.content
        if len(full) > 2:
            stop = full[1:3]
            cut = served.chat("abc", stop=[stop]).choices[0]
            assert cut.message.content == full[: full.find(stop)] and cut.finish_reason == "stop"

    def test_bad_requests_get_the_built_in_servers_bodies(self, bitune_served):
        served = bitune_served
        builtin = Server(create_app(served.loaded, "tiny"))
        try:
            bad = [
                {"model": "other", "messages": [{"role": "user", "content": "a"}]},
                {"model": "tiny", "messages": []},
                {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": -1},
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "a"}],
                    "tools": [{"type": "function"}],
                },
            ]
            for body in bad:
                theirs = httpx.post(f"{builtin.url}/v1/chat/completions", json=body)
                ours = httpx.post(f"{served.server.url}/v1/chat/completions", json=body)
                assert 400 <= ours.status_code < 500 and ours.status_code == theirs.status_code
                assert ours.json() == theirs.json()
        finally:
            builtin.close()


def test_a_preempted_request_gets_its_mixed_cache_again(tmp_path):
    """Six blocks of 32 tokens for four requests of ~100 tokens (4 blocks) each: vLLM must preempt some
    and recompute them (and the connector writes their mixed cache again)."""
    served = Served(
        str(chat_run(tmp_path, **SHAPE)),
        vllm_args=["--block-size", "32", "--num-gpu-blocks-override", "6", "--max-model-len", "128"],
    )
    try:
        contents = PROMPTS[:4]
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(lambda c: served.chat(c, max_tokens=90).choices[0].message.content, contents)
            )
        assert answers == [text_of(served.loaded, expected(served.loaded, c, 90)) for c in contents]
        assert max(served.engine.connector.loads.values()) > 1  # a request was preempted and written again
    finally:
        served.close()


@pytest.mark.parametrize("kind", ["base", "lora"])
def test_a_base_model_or_lora_run_is_served_by_vllm_alone(tmp_path, kind):
    run = chat_run(tmp_path, **SHAPE)
    target = str(tmp_path / "base")
    if kind == "lora":
        base, _ = load_model(target)
        model = get_bitune_model(base, BituneConfig(variant="lora"))
        randomize_adapters(model, std=0.2)
        model.save_pretrained(tmp_path / "lora")
        PromptFormat.load(run).save(tmp_path / "lora")
        target = str(tmp_path / "lora")
    served = Served(target)
    try:
        assert not served.engine.plan["connector"] and served.engine.connector is None
        assert bool(served.engine.plan["lora"]) == (kind == "lora")
        for content in PROMPTS[:3]:
            assert served.chat(content).choices[0].message.content == text_of(
                served.loaded, expected(served.loaded, content, 12)
            )
    finally:
        served.close()


def test_what_vllm_cannot_serve_exactly_is_refused_before_it_starts(tmp_path):
    with pytest.raises(ValueError, match="prefix caching"):
        parse_vllm_args(["--enable-prefix-caching"])
    with pytest.raises(ValueError, match="does not know"):
        parse_vllm_args(["--no-such-option", "1"])
    sliding = chat_run(tmp_path / "sliding", **SHAPE, sliding_window=4)
    with pytest.raises(ValueError, match="sliding-window"):
        vllm_plan(load_for_inference(str(sliding)))


def test_a_bitune_run_of_the_packaged_model_answers_as_generate(tmp_path):
    base, tokenizer = load_model("smollm2-135m-instruct")
    model = get_bitune_model(base, BituneConfig())
    randomize_adapters(model, std=0.01)
    with torch.no_grad():
        model.mixing.theta_k.uniform_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
        model.mixing.theta_v.uniform_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path / "run")
    PromptFormat.for_tokenizer("chat", tokenizer).save(tmp_path / "run")
    served = Served(str(tmp_path / "run"), name="smol", vllm_args=["--max-model-len", "1024"])
    try:
        questions = ["What is the capital of France?", "Name a colour.", "Write a haiku about rain."]
        with ThreadPoolExecutor(3) as pool:
            answers = list(
                pool.map(lambda q: served.chat(q, max_tokens=24).choices[0].message.content, questions)
            )
        assert answers == [text_of(served.loaded, expected(served.loaded, q, 24)) for q in questions]
        assert len(served.engine.connector.loads) == len(questions)
    finally:
        served.close()


def test_the_command_line_serves_a_bitune_run_on_vllm(tmp_path):
    """`bitune serve RUN --engine vllm -- <vLLM options>` as a user types it, in its own process."""
    run = chat_run(tmp_path, **SHAPE)
    proc, port = serve_process(str(run), "--model-name", "tiny", "--engine", "vllm", "--", *FAST)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        loaded = load_for_inference(str(run))
        for content in PROMPTS[:2]:
            answer = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=12
            )
            assert answer.choices[0].message.content == text_of(loaded, expected(loaded, content, 12))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert "Finished server process" in proc.stdout.read()


def test_the_command_line_refuses_prefix_caching_before_loading(tmp_path):
    run = chat_run(tmp_path, **SHAPE)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bitune",
            "serve",
            str(run),
            "--engine",
            "vllm",
            "--",
            "--enable-prefix-caching",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "prefix caching" in done.stderr
