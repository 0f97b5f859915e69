"""Prompt formats: chat templates rendered exactly as ``apply_chat_template`` does (three real template
styles), multi-turn boundaries for ``turns: last`` and ``all``, templates that break the prefix property,
the paper's and the raw format, and the record a run keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitune.data import Conversation, PromptFormat, build_rows, load_rows, tokenize_pair
from bitune.data.collator import training_texts
from bitune.data.templates import Instruction

from conftest import EOS, char_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"
STYLES = {"smollm2": "<|im_end|>\n", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>\n"}
MESSAGES = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Blue."},
)


def tokenizer_with(style: str):
    tokenizer = char_tokenizer()
    tokenizer.chat_template = (TEMPLATES / f"{style}.jinja").read_text()
    tokenizer.bos_token = "^"
    return tokenizer


def chat(tokenizer, turns: str = "last") -> PromptFormat:
    return PromptFormat.for_tokenizer("chat", tokenizer, turns)


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("turns", ["last", "all"])
def test_chat_rows_are_exactly_what_apply_chat_template_renders(style, turns):
    tokenizer = tokenizer_with(style)
    pairs = chat(tokenizer, turns).training_pairs(tokenizer, Conversation(MESSAGES))
    trained = [2, 4] if turns == "all" else [4]
    assert len(pairs) == len(trained)
    for (prompt, answer), turn in zip(pairs, trained, strict=True):
        history = list(MESSAGES[:turn])
        assert prompt == tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        assert prompt + answer == tokenizer.apply_chat_template(list(MESSAGES[: turn + 1]), tokenize=False)
        assert answer.startswith(MESSAGES[turn]["content"]) and answer.endswith(
            STYLES[style]
        )  # end-of-turn kept
        assert MESSAGES[turn - 1]["content"] in prompt  # the history is the prompt (read twice by Bitune)


def test_a_chat_answer_gets_nothing_appended_and_its_eos_is_not_doubled():
    tokenizer = tokenizer_with("smollm2")
    tokenizer.eos_token = "|"  # an end-of-turn character that is also the EOS token
    [(prompt, answer)] = chat(tokenizer).training_pairs(tokenizer, Conversation(MESSAGES[1:3]))
    row = tokenize_pair(tokenizer, prompt, answer, chat(tokenizer))
    assert row["input_ids"] == tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    assert row["labels"][row["prompt_length"] :] == tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert row["input_ids"].count(tokenizer.eos_token_id) == (prompt + answer).count("|")


def test_conversations_the_template_does_not_render_as_prefixes_are_skipped_and_counted():
    tokenizer = tokenizer_with("counting")  # its header counts the messages: the history is never a prefix
    rows, report = build_rows(
        [Conversation(MESSAGES[1:3]), Conversation(MESSAGES)], tokenizer, prompt_format=chat(tokenizer)
    )
    assert rows == [] and report.skipped == {
        "the chat template does not render the history as a prefix of the conversation": 2
    }


def test_the_papers_template_takes_single_turn_conversations_and_skips_the_rest():
    tokenizer = char_tokenizer()
    single = Conversation(MESSAGES[:3])
    paper = PromptFormat("paper")
    assert training_texts(single, paper, tokenizer) == [
        ("Question: Be brief.\n\nName a colour.\n\nAnswer:", " Red.")
    ]
    rows, report = build_rows([single, Conversation(MESSAGES)], tokenizer, prompt_format=paper)
    assert len(rows) == 1 and list(report.skipped) == [
        "multi-turn conversation: the paper's template has one question and one answer; use template chat"
    ]


def test_raw_uses_the_text_verbatim_and_does_not_double_an_eos():
    tokenizer = char_tokenizer()
    raw = PromptFormat("raw")
    eos = tokenizer.eos_token
    rows, _ = build_rows(
        [Instruction("Q: 2+2=", "4"), Instruction("Q: 3+3=", "6" + eos)], tokenizer, prompt_format=raw
    )
    assert rows[0]["input_ids"] == tokenizer("Q: 2+2=4")["input_ids"] + [
        EOS
    ]  # no "Question:", no leading space
    assert rows[1]["input_ids"] == tokenizer("Q: 3+3=6")["input_ids"] + [EOS]
    assert rows[0]["prompt_length"] == len("Q: 2+2=")


def test_instructions_under_chat_are_single_turn_conversations():
    tokenizer = tokenizer_with("llama3")
    [(prompt, answer)] = training_texts(Instruction("Hi?", "Hello."), chat(tokenizer), tokenizer)
    assert (
        prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and answer == "Hello.<|eot_id|>"
    )


def test_the_format_round_trips_through_a_run_directory_and_renders_prompts_for_inference(tmp_path):
    tokenizer = tokenizer_with("gemma")
    fmt = chat(tokenizer, "all")
    fmt.save(tmp_path)
    again = PromptFormat.load(tmp_path)
    assert again == fmt and PromptFormat.load(tmp_path / "nothing") is None
    messages = [{"role": "user", "content": "Hi"}]
    plain = char_tokenizer()  # no chat template of its own: the recorded one is used
    plain.bos_token = "^"
    assert again.render(plain, messages) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    history = [*messages, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert (
        PromptFormat("paper").render(plain, history)
        == "Question: Hi\n\nAnswer: Hello.\n\nQuestion: Bye\n\nAnswer:"
    )


def test_template_auto_and_its_refusals(tmp_path):
    conversations = [{"messages": list(MESSAGES[1:3])}]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(__import__("json").dumps(c) for c in conversations) + "\n")
    assert load_rows(path, tokenizer_with("smollm2")).prompt_format.template == "chat"
    assert load_rows(path, char_tokenizer()).prompt_format.template == "paper"  # no chat template
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        load_rows(path, char_tokenizer(), template="chat")
    with pytest.raises(ValueError, match="conversations need 'chat'"):
        load_rows(path, tokenizer_with("smollm2"), template="raw")
    with pytest.raises(ValueError, match="is written with the paper's template"):
        load_rows("arc_easy", char_tokenizer(), template="chat")
