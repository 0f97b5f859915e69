"""The prompt templates of the paper's appendix 6.5, for training and evaluation.

Every answer starts with a space and ends with the tokenizer's EOS token. Whitespace (the blank lines
before "Choices:" and "Answer:") is as in the authors' released training code, which the appendix table
renders without blank lines. The last token of every prompt is the ":" of "Answer:", which Bitune moves
to the start of the answer pass.

| task | prompt | answer |
|---|---|---|
| instruction (UltraFeedback, user data) | ``Question: {instruction}\\n\\nAnswer:`` | `` {completion}<EOS>`` |
| PIQA, ARC, CSQA | ``Question: {question}\\n\\nChoices:\\n{choice0}\\n...\\n\\nAnswer:`` | `` {answer text}<EOS>`` |
| SIQA | ``Question: Given the context, answer correctly the question.\\nContext: {context}\\n``
  ``Question: {question}\\n\\nChoices:\\n(0) {choice0}\\n(1) {choice1}\\n(2) {choice2}\\n\\nAnswer:`` | `` ({index})<EOS>`` |
| GSM8K | ``Question: {question}\\n\\nAnswer:`` | `` {solution ending in #### N}<EOS>`` |
| MMLU | ``Question: {question}\\n(0). {choice0}\\n...\\n(3). {choice3}\\n\\nAnswer:`` | `` ({index})<EOS>`` |

Beside the paper's templates, which list the choices in the prompt, every multiple-choice task can be
written as a **cloze** (``choices: cloze``; lm-eval's usual setup for ARC, PIQA, SciQ, HellaSwag): the prompt
``Question: {question}\\n\\nAnswer:`` (after a context line, e.g. SciQ's support paragraph, when the question
has one) and each choice's own text as the answer, `` {choice text}<EOS>``; the choices are not listed. This
is a departure from the paper's Table 2 templates.

Every prompt ends with `ANSWER_CUE`; `repeat_question` sends the question part of a prompt several times
(prompt repetition, Leviathan, Kalman, Matias 2025).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class MultipleChoice:
    """One multiple-choice question in a task-independent form."""

    question: str
    choices: tuple[str, ...]
    label: int  # index of the correct choice
    context: str | None = None  # SIQA's situation
    id: str | None = None


@dataclass(frozen=True)
class Instruction:
    """One instruction with its reference completion (UltraFeedback, GSM8K, user data)."""

    instruction: str
    completion: str
    id: str | None = None


ANSWER_CUE = "\n\nAnswer:"  # how every prompt of these templates ends
CHOICE_FORMATS = (
    "listed",
    "cloze",
)  # multiple-choice questions: choices listed in the prompt (paper), or not


def instruction_prompt(instruction: str) -> str:
    """The generic instruction template (UltraFeedback, GSM8K, user data)."""
    return f"Question: {instruction}{ANSWER_CUE}"


def repeat_question(prompt: str, times: int) -> str:
    """``prompt`` with everything before its closing `ANSWER_CUE` sent ``times`` times, blank-line separated:
    every token of a later copy has read the whole question (prompt repetition).

    Raises:
        ValueError: if ``prompt`` does not end with `ANSWER_CUE`.
    """
    if times == 1:
        return prompt
    if not prompt.endswith(ANSWER_CUE):
        raise ValueError(f"cannot repeat the question of a prompt that does not end with {ANSWER_CUE!r}")
    question = prompt[: -len(ANSWER_CUE)]
    return "\n\n".join([question] * times) + ANSWER_CUE


def _choices_block(choices: tuple[str, ...]) -> str:
    return "Choices:\n" + "\n".join(choices)


def _listed(question: MultipleChoice) -> str:
    return f"Question: {question.question}\n\n{_choices_block(question.choices)}\n\nAnswer:"


def _siqa(question: MultipleChoice) -> str:
    numbered = tuple(f"({i}) {c}" for i, c in enumerate(question.choices))
    return (
        "Question: Given the context, answer correctly the question.\n"
        f"Context: {question.context}\nQuestion: {question.question}\n\n{_choices_block(numbered)}\n\nAnswer:"
    )


def _cloze(question: MultipleChoice) -> str:
    context = f"{question.context}\n" if question.context else ""
    return f"{context}Question: {question.question}{ANSWER_CUE}"


def _mmlu(question: MultipleChoice) -> str:
    numbered = "\n".join(f"({i}). {c}" for i, c in enumerate(question.choices))
    return f"Question: {question.question.strip()}\n{numbered}\n\nAnswer:"


@dataclass(frozen=True)
class ChoiceTemplate:
    """How a multiple-choice task is written: the prompt, and the answer text of each choice."""

    name: str
    prompt: Callable[[MultipleChoice], str]
    by_index: bool  # answers are "(i)" rather than the choice's text

    def choice_answers(self, question: MultipleChoice) -> list[str]:
        """The answer text of each choice, without the leading space or EOS (lm-eval's continuations)."""
        if self.by_index:
            return [f"({i})" for i in range(len(question.choices))]
        return list(question.choices)

    def render(self, question: MultipleChoice, eos_token: str) -> tuple[str, str]:
        """(prompt, answer) for training: the answer is " " + the correct choice's answer text + EOS."""
        return self.prompt(question), " " + self.choice_answers(question)[question.label] + eos_token


CHOICE_TEMPLATES = {
    "piqa": ChoiceTemplate("piqa", _listed, by_index=False),
    "arc": ChoiceTemplate("arc", _listed, by_index=False),
    "csqa": ChoiceTemplate("csqa", _listed, by_index=False),
    "siqa": ChoiceTemplate("siqa", _siqa, by_index=True),
    "mmlu": ChoiceTemplate("mmlu", _mmlu, by_index=True),
}
CLOZE = ChoiceTemplate("cloze", _cloze, by_index=False)


def render_instruction(instruction: str, completion: str, eos_token: str) -> tuple[str, str]:
    """(prompt, answer) of an instruction-following example (UltraFeedback, GSM8K, user data)."""
    return instruction_prompt(instruction), " " + completion + eos_token
