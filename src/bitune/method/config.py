"""The configuration of a Bitune model: which variant of the method, the second pass's mask, the mixing
init and the PEFT method behind both adapters.

Every variant of the paper (Kopiczko et al., "Bitune: Bidirectional Instruction-Tuning", Tables 3 and 5)
is a recipe of *prompt passes*: each pass reads the prompt with one adapter under one attention mask and
leaves a KV cache. Two caches are mixed per layer (eqs. 5-6); one cache is used as is. The answer is
always modelled causally with the ``causal`` adapter on top of that cache.

| variant          | prompt passes (adapter / mask)                     | mixing | adapters        |
|------------------|----------------------------------------------------|--------|-----------------|
| ``bitune``       | causal / causal, bidir / ``second_pass_mask``      | yes    | causal, bidir   |
| ``naive_bidir``  | causal / ``second_pass_mask``                      | no     | causal          |
| ``no_mixing``    | bidir / ``second_pass_mask``                       | no     | causal, bidir   |
| ``only_causal``  | causal / causal, bidir / causal                    | yes    | causal, bidir   |
| ``shared_weights``| causal / causal, causal / ``second_pass_mask``    | yes    | causal          |
| ``lora``         | causal / causal (plain PEFT, same code path)       | no     | causal          |

With ``finetune="full"`` (the EMNLP version's full fine-tuning) the adapters are weight sets instead: the
``causal`` one is the model's own weights, all trained; the ``bidir`` one is a second, trained copy of every
weight that can reach a cached K/V (weights.py). ``lora`` with full fine-tuning is plain full fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig, PeftConfig

CAUSAL_ADAPTER = "causal"
BIDIR_ADAPTER = "bidir"

MASKS = ("bidirectional", "anti_causal", "causal")
FINETUNE_MODES = ("peft", "full")
STACK_MODES = ("auto", "always", "never")
SECOND = "second"  # placeholder in a recipe for the configured `second_pass_mask`
# Field metadata key of the options that change speed or memory only, never what a model computes or learns.
SAME_RESULTS = "same_results"

# variant -> (prompt passes as (adapter, mask), uses mixing)
_RECIPES: dict[str, tuple[tuple[tuple[str, str], ...], bool]] = {
    "bitune": (((CAUSAL_ADAPTER, "causal"), (BIDIR_ADAPTER, SECOND)), True),
    "naive_bidir": (((CAUSAL_ADAPTER, SECOND),), False),
    "no_mixing": (((BIDIR_ADAPTER, SECOND),), False),
    "only_causal": (((CAUSAL_ADAPTER, "causal"), (BIDIR_ADAPTER, "causal")), True),
    "shared_weights": (((CAUSAL_ADAPTER, "causal"), (CAUSAL_ADAPTER, SECOND)), True),
    "lora": (((CAUSAL_ADAPTER, "causal"),), False),
}
VARIANTS = tuple(_RECIPES)


def default_peft_config() -> LoraConfig:
    """The paper's PEFT setting (Table 10): LoRA rank 8, alpha 1, every linear layer of attention and MLP."""
    return LoraConfig(r=8, lora_alpha=1, lora_dropout=0.0, target_modules="all-linear")


@dataclass(frozen=True)
class PromptPass:
    """One read of the prompt: which adapter is active and which attention mask is used."""

    adapter: str
    mask: str


@dataclass(frozen=True)
class PromptPassOptions:
    """How the prompt passes run; never what they compute (every setting gives the same cache).

    Args:
        stack: run two prompt passes as one forward over the batch stacked twice, each row with its own
            mask and adapter. ``auto``: when one adapter serves both passes (measured faster on CPU);
            ``always``: also route two adapters per row (measured slower on CPU), or raise if the model or
            adapter type cannot; ``never``: one forward per pass.
        recompute: keep only the prompt caches from forward and recompute the prompt passes' activations
            in backward: less memory (those activations are most of Bitune's extra) for one more forward.
    """

    stack: str = "auto"
    recompute: bool = False

    def __post_init__(self) -> None:
        if self.stack not in STACK_MODES:
            raise ValueError(f"stack_prompt_passes must be one of {STACK_MODES}, got {self.stack!r}")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"checkpoint_prompt_passes must be true or false, got {self.recompute!r}")


@dataclass
class BituneConfig:
    """Configuration of a Bitune model. Invalid values raise ``ValueError`` naming the field."""

    variant: str = field(
        default="bitune",
        metadata={
            "help": f"Which method to run, one of {VARIANTS}. See the module docstring for the recipes."
        },
    )
    second_pass_mask: str | None = field(
        default=None,
        metadata={
            "help": f"Attention mask of the non-causal prompt pass, one of {MASKS} (paper Table 5b). "
            "Defaults to 'bidirectional'; 'only_causal' implies (and only accepts) 'causal'. Ignored by 'lora'."
        },
    )
    theta_init: float = field(
        default=0.01,
        metadata={
            "help": "Initial value of every mixing coefficient theta (> 0); alpha = |theta|/(theta_init+|theta|) "
            "starts at 0.5. Paper Table 5a compares 0.1, 0.01 (best) and 0.001."
        },
    )
    alpha_init: float = field(
        default=0.5,
        metadata={
            "help": "Initial bidirectional-to-causal ratio of every layer, in (0, 1). The paper starts at 0.5 "
            "(theta = theta_init); other values start theta at theta_init * alpha_init / (1 - alpha_init), so "
            "theta_init keeps its role as the scale of the ratio. A small value (e.g. 0.1) starts close to "
            "the pretrained causal model."
        },
    )
    peft_config: PeftConfig | dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "The PEFT method of each adapter: a peft config (or its dict with 'peft_type') that wraps "
            "linear layers. Default: LoRA r=8, lora_alpha=1, all linear layers of attention and MLP, dropout 0."
        },
    )

    finetune: str = field(
        default="peft",
        metadata={
            "help": f"One of {FINETUNE_MODES}. peft: each adapter is a PEFT adapter (peft_config) on frozen base "
            "weights. full: full fine-tuning, the causal side trains the model's own weights and the "
            "bidirectional side a second full copy of them (peft_config is then unused)."
        },
    )

    stack_prompt_passes: str = field(
        default="auto",
        metadata={
            "help": f"One of {STACK_MODES}: PromptPassOptions.stack (speed only, same results).",
            SAME_RESULTS: True,
        },
    )
    checkpoint_prompt_passes: bool = field(
        default=False,
        metadata={
            "help": "Recompute the prompt passes in backward instead of keeping their activations: "
            "PromptPassOptions.recompute (memory only, same results). Hugging Face's gradient checkpointing "
            "would drop the prompt caches and is refused.",
            SAME_RESULTS: True,
        },
    )

    def __post_init__(self) -> None:
        if self.variant not in _RECIPES:
            raise ValueError(f"BituneConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.second_pass_mask is None:
            self.second_pass_mask = "causal" if self.variant == "only_causal" else "bidirectional"
        if self.second_pass_mask not in MASKS:
            raise ValueError(
                f"BituneConfig.second_pass_mask must be one of {MASKS}, got {self.second_pass_mask!r}"
            )
        if self.variant == "only_causal" and self.second_pass_mask != "causal":
            raise ValueError(
                "BituneConfig.second_pass_mask must be 'causal' for variant 'only_causal' (both prompt passes are "
                f"causal by definition), got {self.second_pass_mask!r}; use variant 'bitune' to vary the mask"
            )
        if (
            isinstance(self.theta_init, bool)
            or not isinstance(self.theta_init, (int, float))
            or not math.isfinite(self.theta_init)
            or self.theta_init <= 0
        ):
            raise ValueError(f"BituneConfig.theta_init must be a finite number > 0, got {self.theta_init!r}")
        self.theta_init = float(self.theta_init)
        if (
            isinstance(self.alpha_init, bool)
            or not isinstance(self.alpha_init, (int, float))
            or not 0 < self.alpha_init < 1
        ):
            raise ValueError(
                f"BituneConfig.alpha_init must be a number in (0, 1) (0 would freeze the mixing: the gradient "
                f"of |theta| at 0 is 0), got {self.alpha_init!r}"
            )
        self.alpha_init = float(self.alpha_init)
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"BituneConfig.finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        self.peft_config = _validated_peft_config(self.peft_config)
        try:
            self.prompt_pass_options  # noqa: B018 (validates both fields)
        except ValueError as exc:
            raise ValueError(f"BituneConfig.{exc}") from None

    @property
    def prompt_passes(self) -> tuple[PromptPass, ...]:
        """The prompt passes of this variant, in order; with mixing, the first is the causal side."""
        passes, _ = _RECIPES[self.variant]
        return tuple(PromptPass(a, self.second_pass_mask if m == SECOND else m) for a, m in passes)

    @property
    def prompt_pass_options(self) -> PromptPassOptions:
        """How the prompt passes run (speed and memory, never results)."""
        return PromptPassOptions(stack=self.stack_prompt_passes, recompute=self.checkpoint_prompt_passes)

    @property
    def uses_mixing(self) -> bool:
        """Whether the variant mixes two prompt caches with learnable coefficients."""
        return _RECIPES[self.variant][1]

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Adapters the variant creates: the causal one always (it models the answer), the bidir one if used."""
        used = {p.adapter for p in self.prompt_passes}
        return (CAUSAL_ADAPTER,) + ((BIDIR_ADAPTER,) if BIDIR_ADAPTER in used else ())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that `from_dict` turns back into an equal config."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "peft_config": peft_config_to_dict(self.peft_config)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BituneConfig:
        """Inverse of `to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"BituneConfig got unknown fields {unknown}; known fields are {sorted(names)}")
        return cls(**data)


def peft_config_to_dict(config: PeftConfig) -> dict[str, Any]:
    """A PEFT config as plain JSON types (sets become sorted lists, enums their values)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (set, frozenset)):
            return sorted(plain(v) for v in value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if hasattr(value, "value") and type(value).__module__.startswith("peft"):
            return value.value
        return value

    return plain(config.to_dict())


def _validated_peft_config(value: PeftConfig | dict[str, Any] | None) -> PeftConfig:
    if value is None:
        return default_peft_config()
    if isinstance(value, dict):
        if "peft_type" not in value:
            raise ValueError(
                "BituneConfig.peft_config given as a dict needs a 'peft_type' (e.g. 'LORA', 'IA3')"
            )
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        config_class = PEFT_TYPE_TO_CONFIG_MAPPING.get(str(value["peft_type"]).upper())
        if config_class is None:
            raise ValueError(
                f"BituneConfig.peft_config has unknown peft_type {value['peft_type']!r}; "
                f"known: {sorted(PEFT_TYPE_TO_CONFIG_MAPPING)}"
            )
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(config_class)})
        if unknown:
            raise ValueError(f"BituneConfig.peft_config: {config_class.__name__} has no fields {unknown}")
        try:
            value = config_class(**{**value, "peft_type": str(value["peft_type"]).upper()})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"BituneConfig.peft_config could not be built from {value!r}: {exc}") from exc
    if not isinstance(value, PeftConfig):
        raise ValueError(
            f"BituneConfig.peft_config must be a peft config or dict, got {type(value).__name__}"
        )
    if value.is_prompt_learning:
        raise ValueError(
            f"BituneConfig.peft_config: {value.peft_type} is a prompt-learning method; Bitune needs a PEFT "
            "method that wraps linear layers (LoRA, DoRA, IA3, ...)"
        )
    rank = getattr(value, "r", None)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"BituneConfig.peft_config.r must be an integer >= 1, got {rank!r}")
    for attr in ("lora_alpha", "lora_dropout"):
        number = getattr(value, attr, None)
        if number is not None and (not isinstance(number, (int, float)) or not math.isfinite(number)):
            raise ValueError(f"BituneConfig.peft_config.{attr} must be a finite number, got {number!r}")
    dropout = getattr(value, "lora_dropout", None)
    if dropout is not None and not 0 <= dropout < 1:
        raise ValueError(f"BituneConfig.peft_config.lora_dropout must be in [0, 1), got {dropout!r}")
    for attr in ("modules_to_save", "trainable_token_indices"):
        if getattr(value, attr, None):
            raise ValueError(
                f"BituneConfig.peft_config.{attr} is not supported: a fully trained module would be duplicated "
                "per adapter; wrap linear layers only"
            )
    return copy.deepcopy(value)
