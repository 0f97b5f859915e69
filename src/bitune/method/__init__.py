"""The Bitune method on any Hugging Face decoder; it needs only torch, transformers, PEFT and safetensors.

From the bottom up: the private PEFT/transformers parts used (compat.py); batch layout at the prompt
boundary (batching.py); the config and the variants' recipes (config.py), attention masks (masks.py), the
mixing of two KV caches (mixing.py) and the answer loss (loss.py); the two adapters (adapters.py) and what
the base model supports (probes.py); the prompt passes (prompt_passes.py), generation from a prefilled
cache (generation.py) and the files of a saved model (saving.py); and `BituneModel` (model.py), which runs
them in the paper's order.
"""

from .batching import left_pad
from .config import VARIANTS, BituneConfig, default_peft_config
from .mixing import KVMixing
from .model import BituneCausalLMOutput, BituneModel, get_bitune_model

__all__ = [
    "VARIANTS",
    "BituneCausalLMOutput",
    "BituneConfig",
    "BituneModel",
    "KVMixing",
    "default_peft_config",
    "get_bitune_model",
    "left_pad",
]
