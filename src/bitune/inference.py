"""Using a model: load a trained run (or a checkpoint, a snapshot, a base model) with the prompt format it
was trained with, write prompts from messages, and generate answers. `bitune generate`, `bitune chat`
and the server (bitune.serving) all go through here, so they prompt a run exactly as training did.

    loaded = load_for_inference("runs/chat")                 # or "smollm2-135m-instruct": untrained, causal
    print(generate_text(loaded, [{"role": "user", "content": "Hi!"}], max_new_tokens=64))

A base model (no run) is wrapped as the untrained ``lora`` variant, which is exactly the base model, so one
code path serves both; its prompt format is its own chat template when it has one, else the paper's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, set_seed

from .data import PromptFormat, has_chat_template
from .data.chat import Message, normalize_messages
from .layout import is_model_dir
from .method.config import BituneConfig
from .method.model import BituneModel, get_bitune_model
from .method.saving import read_bitune_config
from .references import load_model, resolve_run

Messages = list[Message]


@dataclass
class LoadedModel:
    """A model ready to answer: the Bitune model (eval mode), its tokenizer and its prompt format."""

    model: BituneModel
    tokenizer: PreTrainedTokenizerBase
    prompt_format: PromptFormat
    name: str

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end an answer: the model's EOS ids (a chat template's end-of-turn among them)."""
        ids = self.model.base_model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def load_for_inference(
    target: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    merge: bool = True,
) -> LoadedModel:
    """Load a saved Bitune model (run, checkpoint or snapshot directory, or a published run's hub id) or a
    base model reference (packaged alias, directory, hub id).

    Args:
        merge: merge the causal LoRA adapter into the base weights so that decoding runs at the plain
            model's speed (`BituneModel.merge_for_inference`; PEFT methods other than plain LoRA stay unmerged).

    Raises:
        ValueError: for a target that is neither (with the reason), or a damaged saved model.
    """
    target = resolve_run(str(target))
    if is_model_dir(target):
        base_reference = read_bitune_config(target).get("base_model_name_or_path")
        if not base_reference:
            raise ValueError(f"{target} does not record its base model")
        base, tokenizer = load_model(base_reference, dtype=dtype, device=device)
        model = BituneModel.from_pretrained(base, target)
        prompt_format = PromptFormat.load(target) or PromptFormat("paper")  # runs from before formats
    else:
        base, tokenizer = load_model(target, dtype=dtype, device=device)
        model = get_bitune_model(base, BituneConfig(variant="lora")).eval()  # zero adapters: the base model
        template = "chat" if has_chat_template(tokenizer) else "paper"
        prompt_format = PromptFormat.for_tokenizer(template, tokenizer)
    for param in model.parameters():
        param.requires_grad_(False)
    if merge:
        model.merge_for_inference()
    return LoadedModel(model.eval(), tokenizer, prompt_format, str(target))


def prompt_ids(loaded: LoadedModel, messages: Messages) -> list[int]:
    """The token ids of the prompt that asks for the next assistant turn after ``messages``."""
    return loaded.prompt_format.prompt_ids(loaded.tokenizer, messages)


def request_messages(prompt: str | None = None, messages_file: str | Path | None = None) -> Messages:
    """The messages of a request: one user ``prompt``, or a JSON file holding a list of ``{role, content}``.

    Raises:
        ValueError: for both or neither, or a file that is not such a list.
    """
    if (prompt is None) == (messages_file is None):
        raise ValueError("give a prompt or a messages file (a JSON list of {role, content}), not both")
    if prompt is not None:
        return [{"role": "user", "content": prompt}]
    try:
        data = json.loads(Path(messages_file).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{messages_file} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    return list(normalize_messages(data))


def sampling_kwargs(
    max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None
) -> dict[str, Any]:
    """``generate`` arguments: greedy at temperature 0, sampling otherwise (seeded if ``seed``)."""
    if seed is not None:
        set_seed(seed)
    settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        settings.update(temperature=temperature, top_p=top_p)
    else:
        settings.update(temperature=None, top_p=None, top_k=None)  # no sampling settings with greedy decoding
    return settings


def clean_answer(loaded: LoadedModel, text: str) -> str:
    """An answer as a user sees it: the paper's template opens answers with a space."""
    return text[1:] if loaded.prompt_format.template == "paper" and text.startswith(" ") else text


@torch.no_grad()
def generate_text(
    loaded: LoadedModel,
    messages: Messages,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    streamer=None,
) -> str:
    """The model's next assistant turn after ``messages`` (streamed to ``streamer`` as it is produced).

    Raises:
        ValueError: if the prompt leaves no room for an answer in the model's context.
    """
    ids = prompt_ids(loaded, messages)
    if loaded.context_length and len(ids) >= loaded.context_length:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {loaded.context_length}")
    input_ids = torch.tensor([ids], device=loaded.model.device)
    output = loaded.model.generate(
        input_ids,
        streamer=streamer,
        eos_token_id=loaded.stop_token_ids,
        pad_token_id=loaded.tokenizer.pad_token_id,
        **sampling_kwargs(max_new_tokens, temperature, top_p, seed),
    )
    return clean_answer(loaded, loaded.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True))


class ChatSession:
    """A multi-turn conversation with a loaded model: the history is kept and prompted in full each turn.

    Args:
        loaded: the model.
        system: an optional system message that opens every conversation (and survives `reset`).
        **generation: `generate_text` settings (``max_new_tokens``, ``temperature``, ``top_p``, ``seed``).
    """

    def __init__(self, loaded: LoadedModel, system: str | None = None, **generation) -> None:
        self.loaded = loaded
        self.system = system
        self.generation = generation
        self.messages: Messages = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, streamer=None) -> str:
        """Add a user message, answer it, keep both in the history and return the answer."""
        self.messages.append({"role": "user", "content": text})
        try:
            answer = generate_text(self.loaded, self.messages, streamer=streamer, **self.generation)
        except Exception:
            self.messages.pop()  # a failed turn leaves the history as it was
            raise
        self.messages.append({"role": "assistant", "content": answer})
        return answer
