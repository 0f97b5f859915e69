"""Bitune in TRL: `BituneSFTTrainer`, a drop-in for TRL's ``SFTTrainer`` (``pip install bitune[trl]``).

    from trl import SFTConfig
    from bitune import BituneConfig
    from bitune.training.trl import BituneSFTTrainer

    trainer = BituneSFTTrainer("smollm2-135m-instruct", args=SFTConfig(output_dir="runs/sft"),
                               train_dataset=dataset, bitune_config=BituneConfig())
    trainer.train()

The model is a model reference (packaged alias, directory, hub id), a ``PreTrainedModel`` (wrapped with
``bitune_config``) or a ``BituneModel``. TRL prepares the data as usual; Bitune needs to know where the
prompt ends, so:

- prompt-completion datasets (plain or conversational) train on their completions, the prompt boundary
  being TRL's completion mask (``completion_only_loss`` must stay on);
- conversational datasets (``messages``, ShareGPT ``conversations``) train their last assistant turn with
  the conversation before it as the prompt: they are turned into conversational prompt-completion rows
  (rows that do not end with an assistant turn are dropped and counted), so no ``{% generation %}`` marker
  is needed in the chat template;
- language-modelling ``text`` datasets, packing and padding-free batches have no prompt to read twice and
  are refused with a clear error.

TRL's gradient checkpointing becomes Bitune's prompt-pass recomputation (Hugging Face's own would drop the
prompt caches). TRL's token-level metrics (``entropy``, ``mean_token_accuracy``) come from its fused LM head
over full-sequence logits, which Bitune's answer pass does not produce; they are not logged (said once in
the log). Checkpoints hold the trained weights only, as with ``bitune train``.
"""

from __future__ import annotations

import dataclasses
import logging

from transformers import PreTrainedModel, set_seed

from ..data.chat import Message
from ..data.formats import SHAREGPT_ROLES
from ..method.config import BituneConfig
from ..method.model import BituneModel, get_bitune_model
from ..packages import require_package
from ..references import load_model
from . import sharding
from .trainer import BituneTrainerMixin

require_package("trl", "pip install 'bitune[trl]'", "bitune.trl")

from trl import SFTConfig, SFTTrainer  # noqa: E402  (after the install hint above)

logger = logging.getLogger(__name__)
CONVERSATION_COLUMNS = ("messages", "conversations")


class BituneSFTTrainer(BituneTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` training a Bitune model (see the module docstring).

    Args:
        model: a model reference, a ``PreTrainedModel`` or a ``BituneModel``.
        args: TRL's ``SFTConfig`` (or ``TrainingArguments``).
        bitune_config: the method, for a model that is not a ``BituneModel`` yet (default: the paper's).
        train_dataset, eval_dataset, processing_class, **kwargs: as for ``SFTTrainer``.

    Raises:
        ValueError: for packing, padding-free batches, ``completion_only_loss=False``, a language-modelling
            dataset, or TRL's gradient checkpointing with a ``BituneModel`` built without recomputation.
    """

    def __init__(
        self,
        model: str | PreTrainedModel | BituneModel,
        args: SFTConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        bitune_config: BituneConfig | None = None,
        **kwargs,
    ) -> None:
        args = args if args is not None else SFTConfig(output_dir="bitune-sft")
        if not isinstance(args, SFTConfig):
            args = SFTConfig(**{k: v for k, v in args.to_dict().items() if k != "push_to_hub_token"})
        _check_args(args)
        names = [n for n in ("activation_checkpointing", "gradient_checkpointing") if hasattr(args, n)]
        recompute = any(getattr(args, n) for n in names)  # TRL turns it on by default
        if recompute:  # Hugging Face's would drop the prompt caches: recompute the prompt passes instead
            for name in names:
                setattr(args, name, False)
            logger.info("gradient checkpointing: Bitune recomputes its prompt passes in backward instead")
        bitune_config = dataclasses.replace(
            bitune_config or BituneConfig(), checkpoint_prompt_passes=recompute
        )
        if isinstance(model, str):
            set_seed(args.seed)  # the adapters' initialisation, as `bitune train` does
            model, tokenizer = load_model(model)
            processing_class = processing_class or tokenizer
        if isinstance(model, PreTrainedModel):
            with sharding.gathered(list(model.parameters())):  # under ZeRO-3, partitioned as it loaded
                model = get_bitune_model(model, bitune_config)
        elif not isinstance(model, BituneModel):
            raise ValueError(
                f"model must be a reference, a PreTrainedModel or a BituneModel, got {type(model).__name__}"
            )
        elif recompute and not model.prompt_passes.options.recompute:
            raise ValueError(
                "gradient_checkpointing=True with a BituneModel: build it with "
                "BituneConfig(checkpoint_prompt_passes=True) (Hugging Face's checkpointing drops the prompt caches)"
            )
        super().__init__(
            model=model,
            args=args,
            train_dataset=as_prompt_completion(train_dataset),
            eval_dataset=as_prompt_completion(eval_dataset),
            processing_class=processing_class,
            **kwargs,
        )
        self._metrics_note = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Bitune's answer loss; the prompt boundary is the first supervised label of each row."""
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            labels=inputs["labels"],
            num_items_in_batch=num_items_in_batch,
        )
        mode = "train" if self.model.training else "eval"
        if mode == "train" and "attention_mask" in inputs:
            self._total_train_tokens += (
                self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            )
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if not self._metrics_note:
            logger.info(
                "TRL's entropy and mean_token_accuracy need full-sequence logits; Bitune does not log them"
            )
            self._metrics_note = True
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def _check_args(args: SFTConfig) -> None:
    if args.packing:
        raise ValueError("packing joins rows, so a row has no single prompt to read twice: set packing=False")
    if args.padding_free:
        raise ValueError("padding_free batches have no per-row prompt boundary: set padding_free=False")
    if args.completion_only_loss is False:
        raise ValueError("Bitune trains the completion given its prompt: leave completion_only_loss on")
    if args.assistant_only_loss:
        raise ValueError(
            "assistant_only_loss is not needed: conversational datasets train their last assistant turn through "
            "prompt-completion rows (leave it off)"
        )


def as_prompt_completion(dataset):
    """A conversational dataset (``messages`` or ShareGPT ``conversations``) as conversational
    prompt-completion rows: the last assistant turn is the completion, everything before it the prompt.
    Other datasets pass through; a language-modelling ``text`` dataset is refused."""
    if dataset is None or isinstance(dataset, dict):
        return {k: as_prompt_completion(v) for k, v in dataset.items()} if isinstance(dataset, dict) else None
    columns = set(dataset.column_names or ())
    if "prompt" in columns:
        return dataset
    column = next((c for c in CONVERSATION_COLUMNS if c in columns), None)
    if column is None:
        raise ValueError(
            f"a dataset with columns {sorted(columns)} has no prompt: Bitune needs prompt-completion or "
            "conversational data (a language-modelling 'text' dataset has nothing to read bidirectionally)"
        )

    def split(row):
        messages = [_openai(m) for m in row[column]]
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    ends_with_answer = dataset.filter(
        lambda row: bool(row[column]) and _openai(row[column][-1])["role"] == "assistant"
    )
    dropped = len(dataset) - len(ends_with_answer)
    if dropped:
        logger.warning(
            "dropped %d of %d conversations that do not end with an assistant turn", dropped, len(dataset)
        )
    return ends_with_answer.map(split, remove_columns=list(columns))


def _openai(message: dict) -> Message:
    """A message of a TRL conversation (OpenAI or ShareGPT keys) as a `Message`."""
    if "role" in message:
        return Message(role=message["role"], content=message["content"])
    return Message(
        role=SHAREGPT_ROLES.get(message.get("from"), message.get("from")),
        content=message.get("value"),
    )
