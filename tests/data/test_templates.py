"""The paper's appendix 6.5 templates, character for character (blank lines as in the authors' code)."""

from __future__ import annotations

from bitune.data import CHOICE_TEMPLATES, Instruction, MultipleChoice, render

EOS = "</s>"


def test_instruction_template():
    prompt, answer = render(Instruction("Name a prime.", "Seven."), None, EOS)
    assert prompt == "Question: Name a prime.\n\nAnswer:"
    assert answer == " Seven.</s>"


def test_piqa_template():
    q = MultipleChoice("How to open a jar?", ("Twist the lid.", "Freeze it."), label=0)
    prompt, answer = CHOICE_TEMPLATES["piqa"].render(q, EOS)
    assert prompt == "Question: How to open a jar?\n\nChoices:\nTwist the lid.\nFreeze it.\n\nAnswer:"
    assert answer == " Twist the lid.</s>"


def test_arc_and_csqa_templates_list_every_choice():
    q = MultipleChoice("Which is a gas?", ("ice", "steam", "rock", "wood"), label=1)
    assert CHOICE_TEMPLATES["arc"].render(q, EOS) == (
        "Question: Which is a gas?\n\nChoices:\nice\nsteam\nrock\nwood\n\nAnswer:",
        " steam</s>",
    )
    q5 = MultipleChoice("Where is a bank?", ("town", "river", "sea", "sky", "mall"), label=4)
    assert CHOICE_TEMPLATES["csqa"].render(q5, EOS) == (
        "Question: Where is a bank?\n\nChoices:\ntown\nriver\nsea\nsky\nmall\n\nAnswer:",
        " mall</s>",
    )


def test_siqa_template_answers_by_index():
    q = MultipleChoice("What will Tom do?", ("sleep", "run", "eat"), label=2, context="Tom was hungry.")
    prompt, answer = CHOICE_TEMPLATES["siqa"].render(q, EOS)
    assert prompt == (
        "Question: Given the context, answer correctly the question.\nContext: Tom was hungry.\n"
        "Question: What will Tom do?\n\nChoices:\n(0) sleep\n(1) run\n(2) eat\n\nAnswer:"
    )
    assert answer == " (2)</s>"
    assert CHOICE_TEMPLATES["siqa"].choice_answers(q) == ["(0)", "(1)", "(2)"]


def test_gsm8k_template_keeps_the_full_solution():
    solution = "3 + 4 = <<3+4=7>>7\n#### 7"
    assert render(Instruction("What is 3 + 4?", solution), None, EOS) == (
        "Question: What is 3 + 4?\n\nAnswer:",
        " 3 + 4 = <<3+4=7>>7\n#### 7</s>",
    )


def test_mmlu_template():
    q = MultipleChoice(" What is 2+2? ", ("3", "4", "5", "6"), label=1)
    prompt, answer = CHOICE_TEMPLATES["mmlu"].render(q, EOS)
    assert prompt == "Question: What is 2+2?\n(0). 3\n(1). 4\n(2). 5\n(3). 6\n\nAnswer:"
    assert answer == " (1)</s>"


def test_every_prompt_ends_with_the_colon_that_opens_the_answer():
    q = MultipleChoice("q", ("a", "b", "c", "d"), label=0, context="c")
    for template in CHOICE_TEMPLATES.values():
        assert template.render(q, EOS)[0].endswith("\nAnswer:")
        assert template.render(q, EOS)[1].startswith(" ")
