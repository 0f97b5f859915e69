"""Bitune as an lm-evaluation-harness model type, ``bitune``.

    bitune-lm-eval --model bitune --model_args pretrained=runs/my-run --tasks bitune_paper_packaged
    bitune-lm-eval --model bitune --model_args pretrained=smollm2-135m-instruct,bitune=runs/my-run ...

``BituneLM`` is a small ``HFLM`` subclass. lm-eval joins context and continuation and truncates them before
``_model_call``, which loses the prompt boundary Bitune needs, so it overrides as little as possible above
that point:

- ``_loglikelihood_tokens``: each distinct context (the prompt) is prefilled once with the prompt passes
  and all of its continuations are scored from that one cache, batched (`score_continuations`);
- generation: lm-eval's own ``_model_generate`` runs with ``self.model`` pointing at the Bitune model, whose
  ``generate`` prefills with the prompt passes and then runs Hugging Face ``generate``;
- ``loglikelihood_rolling`` (perplexity over a document, no prompt) uses the causal adapter only, i.e.
  lm-eval's own scoring of the underlying model: there is no instruction to read bidirectionally;
- prompt repetition (the run's recorded ``repeat``, or the ``prompt_repeat`` model arg for a base model):
  each question is sent that many times, as the run was trained (`PromptFormat.ask` on the tasks' prompts,
  or the last user message under the run's chat template).

Model args are plain values (strings on lm-eval's command line, a dict from Python: never a string built
from a path), so data-parallel evaluation with ``accelerate launch`` works. lm-eval finds model types only
when their module is imported: use the ``bitune-lm-eval`` command (lm-eval's CLI with this module imported
and bitune's task folder included) or `bitune.evaluation.runner.evaluate` from Python.

A Bitune run directory is *not* a PEFT adapter directory: ``--model hf --model_args peft=RUN_DIR`` fails in
PEFT (no ``adapter_config.json`` at the root). ``RUN_DIR/causal`` alone is a plain LoRA adapter and would be
scored **without the bidirectional pass and the mixing**, i.e. not as Bitune.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..data import PromptFormat
from ..layout import is_model_dir
from ..method.config import BituneConfig
from ..method.model import BituneModel, get_bitune_model
from ..method.saving import read_bitune_config
from ..references import PACKAGED_MODELS, packaged_model_path, resolve_run
from .scoring import ContinuationRequest, score_continuations
from .tasks import DEFAULT_BATCH_SIZE, TASKS_DIR

# The parts of lm-eval's HFLM this plugin overrides or reads (checked by tests/test_compat.py, lm-eval 0.4.13).
HFLM_INTERNALS = ("_loglikelihood_tokens", "_model_generate", "loglikelihood_rolling", "_encode_pair")


def resolve_model_args(pretrained: str, bitune: str | None) -> tuple[str, str | None]:
    """(loadable base model path or hub id, Bitune model directory or None).

    ``pretrained`` may be a packaged alias (its cached safetensors copy is used) or a Bitune run
    directory, checkpoint or snapshot (its base model is the one recorded in it when it was saved).
    """
    pretrained = resolve_run(pretrained)
    if bitune is None and is_model_dir(pretrained):
        bitune, pretrained = pretrained, read_bitune_config(pretrained).get("base_model_name_or_path")
        if not pretrained:
            raise ValueError(
                f"{bitune} does not record its base model; pass it as pretrained=... with bitune=..."
            )
    if pretrained in PACKAGED_MODELS:
        pretrained = str(packaged_model_path(pretrained))
    return pretrained, resolve_run(bitune) if bitune is not None else None


@register_model("bitune")
class BituneLM(HFLM):
    """lm-eval's HF model with Bitune's prompt passes (see the module docstring)."""

    def __init__(
        self, pretrained: str, bitune: str | None = None, prompt_repeat: int | str | None = None, **kwargs
    ) -> None:
        pretrained, bitune = resolve_model_args(str(pretrained), bitune)
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained, **kwargs)
        prompt_format = PromptFormat()
        if bitune is not None:
            self.bitune_model = BituneModel.from_pretrained(self._model, bitune)
            prompt_format = PromptFormat.load(bitune) or prompt_format
            if prompt_format.template == "chat":  # the run's own template
                self.tokenizer.chat_template = prompt_format.chat_template
        else:  # the untrained `lora` variant is exactly the pretrained model, scored by the same code path
            self.bitune_model = get_bitune_model(self._model, BituneConfig(variant="lora")).eval()
        if prompt_repeat is not None:  # given (lm-eval passes strings): it overrides the run's own
            prompt_format = dataclasses.replace(prompt_format, repeat=int(prompt_repeat))
        self.prompt_format = prompt_format
        self._causal_only = False

    @contextmanager
    def _plain_causal(self) -> Iterator[None]:
        """Inside the block, log-likelihoods are lm-eval's own (the causal adapter, no prompt passes)."""
        self._causal_only = True
        try:
            yield
        finally:
            self._causal_only = False

    @contextmanager
    def _decoding_with_bitune(self) -> Iterator[None]:
        """Inside the block ``self.model`` is the Bitune model, whose ``generate`` prefills with the prompt
        passes: lm-eval's own generation code then decodes through Bitune."""
        hf_model = self._model
        self._model = self.bitune_model
        try:
            yield
        finally:
            self._model = hf_model

    # ------------------------------------------------------------------------------- prompt repetition
    def _ask(self, context: str) -> str:
        """A task's prompt with its question sent as the run asks (chat runs: in `apply_chat_template`)."""
        if self.prompt_format.repeat == 1 or self.prompt_format.template == "chat":
            return context
        return self.prompt_format.ask(context)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return super()._encode_pair(self._ask(context), continuation)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        asked = [dataclasses.replace(r, arguments=(self._ask(r.args[0]), *r.args[1:])) for r in requests]
        return super().generate_until(asked, disable_tqdm=disable_tqdm)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return super().apply_chat_template(self.prompt_format.asked(chat_history), add_generation_prompt)

    # ----------------------------------------------------------------------------------- the passes
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        with self._plain_causal():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self._causal_only:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        scored: list[ContinuationRequest] = []
        for _, context, continuation in requests:
            room = self.max_length + 1 - len(continuation)  # keep the continuation; cut the context's start
            if room < 1:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens does not fit max_length {self.max_length}"
                )
            scored.append(ContinuationRequest(tuple(context[-room:]), tuple(continuation)))
        batch_size = override_bs or (
            self.batch_size if isinstance(self.batch_size, int) else DEFAULT_BATCH_SIZE
        )
        progress = tqdm(
            total=len(scored), disable=disable_tqdm or self.rank != 0, desc="bitune loglikelihood"
        )
        results = score_continuations(
            self.bitune_model,
            scored,
            batch_size=batch_size,
            progress=progress.update,
            # into lm-eval's cache (`use_cache`) as each is scored: an interrupted scoring resumes there
            scored=lambda i, output: self.cache_hook.add_partial("loglikelihood", requests[i][0], output),
        )
        progress.close()
        return results

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        with self._decoding_with_bitune():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def lm_eval_main(argv: list[str] | None = None) -> None:
    """``bitune-lm-eval``: lm-eval's command line with the ``bitune`` model type and bitune's tasks."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv:
        argv += ["--include_path", str(TASKS_DIR)]
    setup_logging()
    cli = HarnessCLI()
    if argv and argv[0].startswith("-"):
        argv.insert(0, "run")  # lm-eval's own shorthand: options without a subcommand mean `run`
    cli.execute(cli._parser.parse_args(argv))  # HarnessCLI.parse_args would read the global sys.argv
