"""Using a trained run: it prompts with the format it trained with (recorded in the run, its checkpoints and
snapshots), `bitune generate` streams the same answer `BituneModel.generate` gives, `bitune chat` keeps
and resets its history; a base model works the same way, untrained."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch

from bitune.cli import main
from bitune.data import PromptFormat
from bitune.inference import ChatSession, generate_text, load_for_inference, prompt_ids, request_messages
from bitune.training.run_config import load_run_config
from bitune.training.trainer import train

from conftest import char_tokenizer, tiny_run_files

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny run trained on conversations with a chat template (two updates, a snapshot at 0)."""
    root = tmp_path_factory.mktemp("chat")
    model_dir, _ = tiny_run_files(root)
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    rows = [
        {"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}] * 2}
        for w in ("abc", "def", "ghi", "jkl")
    ]
    (root / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = {
        "model": {"name": str(model_dir)},
        "data": {"train": str(root / "chats.jsonl"), "turns": "all", "max_length": 128},
        "training": {
            "output_dir": str(root / "run"),
            "max_steps": 2,
            "batch_size": 2,
            "gradient_accumulation_steps": 1,
            "save_steps": 2,
            "snapshot_steps": [0],
            "report_to": ["none"],
        },
    }
    (root / "run.yaml").write_text(json.dumps(config))
    return train(load_run_config(root / "run.yaml")), model_dir


def test_the_run_its_checkpoints_and_snapshots_record_the_chat_format(chat_run):
    run_dir, _ = chat_run
    for folder in (run_dir, run_dir / "checkpoint-2", run_dir / "snapshots" / "step-0"):
        fmt = PromptFormat.load(folder)
        assert fmt.template == "chat" and fmt.turns == "all" and fmt.chat_template == CHAT_TEMPLATE, folder


def test_a_run_prompts_as_it_trained_and_generates_what_the_model_generates(chat_run):
    run_dir, _ = chat_run
    loaded = load_for_inference(str(run_dir))
    messages = [{"role": "user", "content": "abc"}]
    ids = prompt_ids(loaded, messages)
    assert ids == loaded.tokenizer("<user>abc|<assistant>", add_special_tokens=False)["input_ids"]
    text = generate_text(loaded, messages, max_new_tokens=5)
    output = loaded.model.generate(
        torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=loaded.stop_token_ids
    )
    assert text == loaded.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)


def test_a_base_model_is_used_untrained_with_its_own_format(chat_run):
    _, model_dir = chat_run
    loaded = load_for_inference(str(model_dir))
    assert loaded.prompt_format.template == "chat" and loaded.model.bitune_config.variant == "lora"
    plain = tiny_run_files(model_dir.parent / "plain")[0]
    assert load_for_inference(str(plain)).prompt_format.template == "paper"  # no chat template


def test_generate_streams_the_answer(chat_run, capsys, tmp_path):
    run_dir, _ = chat_run
    expected = generate_text(
        load_for_inference(str(run_dir)), [{"role": "user", "content": "abc"}], max_new_tokens=6
    )
    main(["generate", str(run_dir), "abc", "--max-new-tokens", "6"])
    assert capsys.readouterr().out.strip() == expected.strip()
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": "abc"}]))
    main(["generate", str(run_dir), "--messages", str(messages), "--max-new-tokens", "6"])
    assert capsys.readouterr().out.strip() == expected.strip()
    with pytest.raises(ValueError, match="give a prompt or a messages file"):
        request_messages("abc", messages)


def test_chat_keeps_and_resets_its_history(chat_run, capsys, monkeypatch):
    run_dir, _ = chat_run
    seen = []
    real_send = ChatSession.send

    def spy(self, text, streamer=None):
        seen.append(len(self.messages))
        return real_send(self, text, streamer=streamer)

    monkeypatch.setattr(ChatSession, "send", spy)
    lines = iter(["abc", "def", "/reset", "ghi", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    main(["chat", str(run_dir), "--max-new-tokens", "3", "--system", "be brief"])
    out = capsys.readouterr().out
    assert seen == [1, 3, 1]  # the system message; then it + one exchange; after /reset the system alone
    assert "(conversation cleared)" in out and out.count("bot> ") == 3


def test_sampling_is_seeded():
    from bitune.inference import sampling_kwargs

    assert sampling_kwargs(4)["do_sample"] is False
    assert sampling_kwargs(4, temperature=0.7, top_p=0.9, seed=1) == {
        "max_new_tokens": 4,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }


@pytest.mark.slow
def test_the_chat_example_trains_the_packaged_model_and_answers_from_the_run(tmp_path, capsys):
    """README's "Fine-tune a chat model" on the packaged SmolLM2-135M-Instruct, shortened to 2 updates."""
    config = load_run_config(
        Path(__file__).resolve().parents[1] / "configs" / "chat.yaml",
        [f"training.output_dir={tmp_path / 'chat'}", "training.max_steps=2"],
    )
    run_dir = train(config)
    fmt = PromptFormat.load(run_dir)
    assert fmt.template == "chat" and "<|im_start|>" in fmt.chat_template
    main(["generate", str(run_dir), "What is the capital of Italy?", "--max-new-tokens", "12"])
    answer = capsys.readouterr().out.strip()
    assert answer and "<|im_start|>" not in answer and "<|im_end|>" not in answer
    loaded = load_for_inference(str(run_dir))
    session = ChatSession(loaded, max_new_tokens=8)
    session.send("What is 3 plus 4?")
    session.send("Now multiply that by 2.")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_bitune_eval_asks_a_chat_run_in_its_chat_template(chat_run, monkeypatch, tmp_path):
    from bitune.evaluation import harness
    from bitune.evaluation.runner import evaluate_target

    run_dir, _ = chat_run
    contexts = []
    real = harness.BituneLM._loglikelihood_tokens

    def spy(self, requests, **kwargs):
        contexts.extend(self.tokenizer.decode(context) for _, context, _ in requests)
        return real(self, requests, **kwargs)

    monkeypatch.setattr(harness.BituneLM, "_loglikelihood_tokens", spy)
    scores = evaluate_target(str(run_dir), ["arc_easy"], limit=2, batch_size=2)
    assert scores["arc_easy"]["n"] == 2
    assert contexts and all(c.startswith("<user>Question:") and c.endswith("|<assistant>") for c in contexts)
