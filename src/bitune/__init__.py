"""bitune: Bitune (bidirectional instruction-tuning) for any Hugging Face decoder-only model.

from bitune import BituneConfig, get_bitune_model
model = get_bitune_model(hf_model, BituneConfig())          # two adapters + fp32 mixing
loss = model(input_ids, attention_mask, labels=labels).loss  # labels -100 on the prompt
out = model.generate(prompt_ids, attention_mask, max_new_tokens=64)
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
__version__ = "0.1.0"
