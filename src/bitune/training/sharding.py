"""Training a BituneModel sharded over processes: FSDP2 or DeepSpeed ZeRO (``accelerate launch`` with an
FSDP or DeepSpeed config).

The Trainer shards through accelerate's FSDP2 and DeepSpeed code; what a BituneModel adds is here.

FSDP2:

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

DeepSpeed (ZeRO stages 1-3; DeepSpeed runs on the CPU too, over gloo):

- under ZeRO-3 transformers partitions the base model as it loads (``deepspeed.zero.Init``), so the build
  of the Bitune model (its probes run the model on two tokens, PEFT reads the layers' shapes) sees the
  base model gathered (`gathered`): for that moment each process holds the whole base model;
- the mixing coefficients and adapters are partitioned like every other parameter (ZeRO-3); DeepSpeed
  gathers the ones a forward reads, and `gathered` makes the thetas whole where they are read outside a
  forward (the logged ratios), the trained weights whole for saving;
- a checkpoint keeps DeepSpeed's optimizer partitions (the fp32 master weights, which resume the trained
  weights) and no copy of the frozen base (`checkpoint_without_frozen_weights`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from peft.utils.save_and_load import _insert_adapter_name_into_state_dict
from transformers import TrainerCallback

from ..method.config import CAUSAL_ADAPTER
from ..method.model import BituneModel
from ..method.saving import read_bitune_config, read_trained_weights


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def fsdp_requested() -> bool:
    """Whether this process was launched with an FSDP config (``accelerate launch`` sets the variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_requested() -> bool:
    """Whether this process was launched with a DeepSpeed config (``accelerate launch`` sets the variable)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def zero3_enabled() -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the parameters (known once the TrainingArguments exist)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def enable_fsdp(accelerator, model: BituneModel) -> None:
    """Make ``accelerator`` shard ``model`` with FSDP2 as its launch config asked, on CPU too.

    Raises:
        ValueError: for a config bitune cannot train with (FSDP1, loading the weights on rank 0 only).
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

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
def checkpoint_without_frozen_weights(trainer) -> Iterator[None]:
    """The Trainer's own checkpoint of a sharded model without the frozen base: no ``pytorch_model_fsdp.bin``
    (the whole model) under FSDP, DeepSpeed's module states without the frozen parameters. A checkpoint
    keeps what trains, which the Trainer's ``save_model`` already wrote (and DeepSpeed's optimizer
    partitions)."""
    import transformers.trainer

    if trainer.is_fsdp_enabled:
        original = transformers.trainer.save_fsdp_model
        transformers.trainer.save_fsdp_model = lambda *args, **kwargs: None
        try:
            yield
        finally:
            transformers.trainer.save_fsdp_model = original
    elif trainer.is_deepspeed_enabled:
        engine = trainer.model_wrapped
        engine.save_checkpoint = functools.partial(
            type(engine).save_checkpoint, engine, exclude_frozen_parameters=True
        )
        try:
            yield
        finally:
            del engine.save_checkpoint
    else:
        yield


@contextlib.contextmanager
def deepspeed_resumes_without_frozen_weights() -> Iterator[None]:
    """Resuming from a DeepSpeed checkpoint written by `checkpoint_without_frozen_weights`: its module
    states lack the frozen base (which is the loaded base model's), so they load non-strictly."""
    import transformers.trainer

    original = transformers.trainer.deepspeed_load_checkpoint

    def load(engine, checkpoint, load_module_strict=True):
        return original(engine, checkpoint, load_module_strict=False)

    transformers.trainer.deepspeed_load_checkpoint = load
    try:
        yield
    finally:
        transformers.trainer.deepspeed_load_checkpoint = original


class MixingReadByTheWholeModel(TrainerCallback):
    """Under ZeRO-3, the thetas become parameters of the whole Bitune model's forward for DeepSpeed
    (``register_external_parameter``): the mixing module returns caches, not tensors, so DeepSpeed's
    backward hooks would not gather its thetas back for the backward of the mix. Registered once
    DeepSpeed has made them its parameters (at the start of training)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or model.mixing is None or not _partitioned(model.mixing.parameters()):
            return
        import deepspeed

        for param in model.mixing.parameters():
            deepspeed.zero.register_external_parameter(model, param)


def _partitioned(params) -> list[torch.Tensor]:
    return [p for p in params if hasattr(p, "ds_id")]  # DeepSpeed ZeRO-3's parameters


@contextlib.contextmanager
def gathered(params, modifier_rank: int | None = None) -> Iterator[None]:
    """``params`` whole for the block where DeepSpeed ZeRO-3 partitions them (collective: every process
    enters with the same parameters); nothing to do for others. With ``modifier_rank``, what that process
    writes into them is partitioned back to every process at the end."""
    partitioned = _partitioned(params)
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


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
    calls it); None for a model whose parameters are whole (it saves its own weights)."""
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if _partitioned(trained.values()):
        with gathered(trained.values()):
            return {name: p.detach().clone() for name, p in trained.items()}
    if not is_sharded(model):
        return None
    DTensor = _dtensor()
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for name, p in trained.items()}


def all_processes_agree(flag: bool) -> bool:
    """``flag`` if it holds on every process (collective when processes run; else ``flag``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def leave_process_group() -> None:
    """End a launched process's part in the run: wait for every process, then destroy the process group.

    A process that exits with its gloo group alive can abort in the group's destructor ("terminate called
    without an active exception") after the run has finished, failing the whole launch. Does nothing in one
    process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (the tensor itself unless it is a shard or a ZeRO-3 partition)."""
    if hasattr(tensor, "ds_tensor"):
        return tensor.ds_tensor
    return tensor.to_local() if isinstance(tensor, _dtensor()) else tensor


def _by_parameter_name(
    model: BituneModel, name: str, weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The saved weights of the adapter (or full weight set) ``name`` by the model's `named_parameters`
    names."""
    if model.is_full:
        if name == CAUSAL_ADAPTER:
            return {f"full_model.{k}": v for k, v in weights.items()}
        return {f"full_weights.{model.full_weights.parameter_name(k)}": v for k, v in weights.items()}
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING[model.peft_model.peft_config[name].peft_type]
    return {
        f"peft_model.{k}": v for k, v in _insert_adapter_name_into_state_dict(weights, name, prefix).items()
    }


def load_trained_weights(model: BituneModel, directory: str | Path) -> None:
    """Load the adapters and thetas saved in ``directory`` into ``model``, into its shards if it is sharded
    or partitioned (then collective).

    Raises:
        ValueError: if a trained parameter of the model is not in the saved weights, or has another shape.
    """
    trained = [p for p in model.parameters() if p.requires_grad]
    if _partitioned(trained):
        with gathered(trained, modifier_rank=0):
            if dist.get_rank() == 0:
                model.load_trained_weights(directory)
        return
    if not is_sharded(model):
        model.load_trained_weights(directory)
        return
    from torch.distributed.tensor import distribute_tensor

    meta = read_bitune_config(directory)
    adapters, thetas = read_trained_weights(directory, meta)
    saved = {f"mixing.{k}": v for k, v in (thetas or {}).items()}
    for name, weights in adapters.items():
        saved.update(_by_parameter_name(model, name, weights))
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
