"""Training a BituneModel sharded over processes with FSDP2 (``accelerate launch`` with an FSDP config).

The Trainer shards through accelerate's FSDP2 code; what a BituneModel adds is here:

- accelerate switches FSDP on only beside an accelerator device, although torch's FSDP2 (``fully_shard``)
  also runs on CPU over gloo; on a machine without one, `enable_fsdp` switches it on for the CPU, so the
  code path that runs on GPUs is the one tested here;
- the mixing coefficients stay out of FSDP: a few floats per layer, kept whole on every process, in fp32
  under any mixed-precision policy (FSDP would cast them with the rest), their gradient averaged over the
  processes by a hook like DDP's (`keep_mixing_replicated`);
- what trains is gathered whole for saving (`gathered_trained_weights`, adapters and thetas only, never
  the frozen base) and loaded back into the shards to resume (`load_trained_weights`). Both are
  collective: every process calls them.

Sharded decoder layers are the base model's ``_no_split_modules`` (accelerate's transformer-based wrap).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

from ..method.model import BituneModel
from ..method.saving import read_bitune_config, read_trained_weights


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def fsdp_requested() -> bool:
    """Whether this process was launched with an FSDP config (``accelerate launch`` sets the variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp_supports(config) -> None:
    """Refuse, under an FSDP launch, what bitune cannot shard (before any model loads).

    Raises:
        ValueError: for full fine-tuning (``bitune.finetune: full``) under FSDP.
    """
    if fsdp_requested() and config.finetune == "full":
        raise ValueError(
            "FSDP: full fine-tuning (bitune.finetune: full) is not supported with FSDP yet (its second weight "
            "set is swapped into the sharded modules per pass); train it with DDP (configs/accelerate/ddp.yaml)"
        )


def enable_fsdp(accelerator, model: BituneModel) -> None:
    """Make ``accelerator`` shard ``model`` with FSDP2 as its launch config asked, on CPU too.

    Raises:
        ValueError: for a config bitune cannot train with (FSDP1, loading the weights on rank 0 only).
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    check_fsdp_supports(model.bitune_config)
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:  # accelerate's FSDP needs a GPU-like device
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        if state.mixed_precision != "no":
            state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
    plugin = state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(
            "FSDP: bitune trains with FSDP2 only; set fsdp_version: 2 in the accelerate config "
            "(configs/accelerate/fsdp.yaml)"
        )
    if plugin.cpu_ram_efficient_loading:
        raise ValueError(
            "FSDP: fsdp_cpu_ram_efficient_loading is not supported (the adapters and mixing coefficients are "
            "created on every process before sharding); set it to false"
        )
    if model.mixing is not None:
        plugin.ignored_modules = [model.mixing]
        keep_mixing_replicated(model)


@contextlib.contextmanager
def without_full_model_copy() -> Iterator[None]:
    """The Trainer's FSDP checkpoint without the whole model (``pytorch_model_fsdp.bin``, frozen base
    included): a checkpoint keeps only what trains, which the Trainer's ``save_model`` already wrote."""
    import transformers.trainer

    original = transformers.trainer.save_fsdp_model
    transformers.trainer.save_fsdp_model = lambda *args, **kwargs: None
    try:
        yield
    finally:
        transformers.trainer.save_fsdp_model = original


def keep_mixing_replicated(model: BituneModel) -> None:
    """Average the mixing coefficients' gradient over the processes after each backward (as DDP would),
    so the unsharded thetas stay equal everywhere."""
    world = dist.get_world_size()

    def average(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(world)

    for param in model.mixing.parameters():
        param.register_post_accumulate_grad_hook(average)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a shard (a DTensor of FSDP2)."""
    DTensor = _dtensor()
    return any(isinstance(p, DTensor) for p in model.parameters())


def gathered_trained_weights(model: BituneModel) -> dict[str, torch.Tensor] | None:
    """Every trained parameter, whole, by name, for `BituneModel.save_pretrained` (collective: every process
    calls it); None for a model that is not sharded (it saves its own weights)."""
    if not is_sharded(model):
        return None
    DTensor = _dtensor()
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def all_processes_agree(flag: bool) -> bool:
    """``flag`` if it holds on every process (collective when processes run; else ``flag``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (the tensor itself unless it is a shard)."""
    return tensor.to_local() if isinstance(tensor, _dtensor()) else tensor


def load_trained_weights(model: BituneModel, directory: str | Path) -> None:
    """Load the adapters and thetas saved in ``directory`` into ``model``, into its shards if it is sharded
    (then collective).

    Raises:
        ValueError: if a trained parameter of the model is not in the saved weights, or has another shape.
    """
    if not is_sharded(model):
        model.load_trained_weights(directory)
        return
    from torch.distributed.tensor import distribute_tensor

    meta = read_bitune_config(directory)
    adapters, thetas = read_trained_weights(directory, meta)
    saved = {f"mixing.{k}": v for k, v in (thetas or {}).items()}
    for name, weights in adapters.items():
        prefix = PEFT_TYPE_TO_PREFIX_MAPPING[model.peft_model.peft_config[name].peft_type]
        for key, value in _insert_adapter_name_into_state_dict(weights, name, prefix).items():
            saved[f"peft_model.{key}"] = value
    DTensor = _dtensor()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name not in saved or saved[name].shape != param.shape:
                raise ValueError(f"{directory}: no saved weight {name} of shape {tuple(param.shape)}")
            value = saved[name].to(device=param.device, dtype=param.dtype)
            if isinstance(param, DTensor):
                value = distribute_tensor(value, param.device_mesh, param.placements)
            param.copy_(value)
