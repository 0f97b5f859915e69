"""bitune: Bitune (bidirectional instruction-tuning) for any Hugging Face decoder-only model.

from bitune import BituneConfig, get_bitune_model
model = get_bitune_model(hf_model, BituneConfig())          # two adapters + fp32 mixing
loss = model(input_ids, attention_mask, labels=labels).loss  # labels -100 on the prompt
out = model.generate(prompt_ids, attention_mask, max_new_tokens=64)
"""

from . import moved
from .method import *  # noqa: F403  (the public API)
from .method import __all__ as __all__

moved.install()  # old paths (bitune.model, bitune.config, bitune.hub, ...) still import, with a warning
__version__ = "0.1.0"
