"""Prompt repetition (`data.prompt_repeat`): the question is sent N times in training rows, and the run's
recorded prompt format makes evaluation, generation, chat and the server send it N times too."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from bitune.data import CLOZE, PromptFormat, load_rows, load_task
from bitune.data.templates import repeat_question
from bitune.evaluation.harness import BituneLM
from bitune.inference import generate_text, load_for_inference, prompt_ids
from bitune.training.run_config import load_run_config
from bitune.training.trainer import train

from conftest import char_tokenizer, write_run_config

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_repeat_question_sends_everything_before_the_answer_cue_again():
    prompt = "context\nQuestion: why?\n\nAnswer:"
    assert repeat_question(prompt, 1) == prompt
    assert repeat_question(prompt, 2) == "context\nQuestion: why?\n\ncontext\nQuestion: why?\n\nAnswer:"
    with pytest.raises(ValueError, match="does not end with"):
        repeat_question("no cue here", 2)


def test_training_rows_of_a_task_and_of_user_data_hold_the_question_twice(tmp_path):
    tokenizer = char_tokenizer()
    questions, _ = load_task("piqa", "train", limit=2)
    once = load_rows("piqa", tokenizer, limit=2, choices="cloze", verbose=False)
    twice = load_rows("piqa", tokenizer, limit=2, choices="cloze", prompt_repeat=2, verbose=False)
    assert twice.prompt_format.repeat == 2 and once.prompt_format.repeat == 1
    for question, a, b in zip(questions, once.rows, twice.rows, strict=True):
        prompt = CLOZE.prompt(question)
        assert a["input_ids"][: a["prompt_length"]] == tokenizer(prompt)["input_ids"]
        assert b["input_ids"][: b["prompt_length"]] == tokenizer(repeat_question(prompt, 2))["input_ids"]
        assert a["input_ids"][a["prompt_length"] :] == b["input_ids"][b["prompt_length"] :]  # same answer


def test_a_chat_template_sends_the_last_user_message_twice():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    fmt = PromptFormat.for_tokenizer("chat", tokenizer, repeat=2)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    messages += [{"role": "user", "content": "why"}]
    assert fmt.render(tokenizer, messages) == "<user>hi|<assistant>yo|<user>why\n\nwhy|<assistant>"
    from bitune.data import Conversation

    pairs = fmt.training_pairs(tokenizer, Conversation((*messages, {"role": "assistant", "content": "no"})))
    assert pairs == [("<user>hi|<assistant>yo|<user>why\n\nwhy|<assistant>", "no|")]
    with pytest.raises(ValueError, match="raw prompt"):
        PromptFormat("raw", repeat=2)


@pytest.fixture(scope="module")
def repeated_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("repeat")
    path = write_run_config(directory, max_steps=2)
    return train(load_run_config(path, ["data.prompt_repeat=2", "data.max_length=96"]))


def test_a_run_records_its_repetition_and_generate_chat_and_serve_ask_twice(repeated_run):
    assert PromptFormat.load(repeated_run).repeat == 2
    loaded = load_for_inference(str(repeated_run))
    messages = [{"role": "user", "content": "reverse:abc"}]
    ids = prompt_ids(loaded, messages)
    asked = "Question: reverse:abc\n\nQuestion: reverse:abc\n\nAnswer:"
    assert ids == loaded.tokenizer(asked)["input_ids"]
    output = loaded.model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = loaded.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).removeprefix(" ")
    assert generate_text(loaded, messages, max_new_tokens=4) == expected

    from starlette.testclient import TestClient

    from bitune.serving.app import create_app

    with TestClient(create_app(loaded, "run")) as client:
        body = {"model": "run", "messages": messages, "max_tokens": 4, "temperature": 0}
        answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["usage"]["prompt_tokens"] == len(ids)
    assert answer["choices"][0]["message"]["content"] == expected


def test_evaluation_asks_a_repeating_run_and_a_base_model_with_prompt_repeat_twice(repeated_run):
    base = load_for_inference(str(repeated_run)).model.config.name_or_path
    context, continuation = "Question: which?\n\nAnswer:", " abc"
    request = [Instance("loglikelihood", {}, (context, continuation), 0)]
    twice = [Instance("loglikelihood", {}, (repeat_question(context, 2), continuation), 0)]
    ours = BituneLM(pretrained=str(repeated_run), batch_size=1).loglikelihood(request)
    plain_base = HFLM(pretrained=base, device="cpu", batch_size=1)
    assert BituneLM(pretrained=base, prompt_repeat="2", batch_size=1).loglikelihood(request)[0][
        0
    ] == pytest.approx(plain_base.loglikelihood(twice)[0][0], abs=1e-4)
    assert BituneLM(pretrained=base, batch_size=1).loglikelihood(request)[0][0] == pytest.approx(
        plain_base.loglikelihood(request)[0][0], abs=1e-4
    )
    assert ours[0][0] == pytest.approx(
        BituneLM(pretrained=str(repeated_run), prompt_repeat="1", batch_size=1).loglikelihood(twice)[0][0],
        abs=1e-4,
    )
