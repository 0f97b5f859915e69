"""Sharded training on 2 CPU processes over gloo: FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 through
``accelerate launch`` against one process with the same global batch, a kill and a resume, the thetas'
precision, and the saved run in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from bitune import BituneConfig
from bitune.layout import checkpoints, is_complete_checkpoint
from bitune.training import sharding
from bitune.training.run_config import load_run_config
from bitune.training.trainer import train

from conftest import free_port, full_trained_weights, trained_weights, with_full_finetuning, write_run_config

REPO = Path(__file__).resolve().parents[2]
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"
ZERO2_CONFIG = REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"
ZERO3_CONFIG = REPO / "configs" / "accelerate" / "deepspeed_zero3.yaml"

# `bitune train` in each launched process, with test hooks: KILL_AFTER kills every process once the checkpoint
# it names is saved whole (a kill between two checkpoints, as a sequence rather than a race); CHECK_THETAS
# asserts at every update that the thetas are whole fp32 parameters beside sharded adapters.
HOOKED_TRAIN = """
import os, signal, sys
import torch
import transformers
from bitune.cli import main

if os.environ.get("KILL_AFTER"):
    save_checkpoint = transformers.Trainer._save_checkpoint
    def killed(self, model, trial):
        save_checkpoint(self, model, trial)
        if self.state.global_step == int(os.environ["KILL_AFTER"]):
            torch.distributed.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
    transformers.Trainer._save_checkpoint = killed
if os.environ.get("CHECK_THETAS"):
    from torch.distributed.tensor import DTensor
    training_step = transformers.Trainer.training_step
    def checked(self, model, *args, **kwargs):
        bitune_model = self.accelerator.unwrap_model(model)
        thetas = list(bitune_model.mixing.parameters())
        assert thetas and all(type(t) is torch.nn.Parameter and t.dtype == torch.float32 for t in thetas)
        adapters = [p for n, p in bitune_model.named_parameters() if "lora_" in n]
        assert adapters and all(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in adapters)
        with open(os.environ["CHECK_THETAS"], "a") as handle:
            handle.write(f"{self.state.global_step}\\n")
        return training_step(self, model, *args, **kwargs)
    transformers.Trainer.training_step = checked
main(sys.argv[1:])
"""


def launch(
    directory: Path, *args: str, config: Path = FSDP_CONFIG, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``accelerate launch`` of an accelerate config (the shipped FSDP one unless ``config``) on 2 processes
    (over gloo on CPU)."""
    script = directory / "hooked_train.py"
    script.write_text(HOOKED_TRAIN)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--num_processes", "2", "--main_process_port", str(free_port()), str(script), *args]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def zero3_partitioning_everything(directory: Path) -> Path:
    """The shipped ZeRO-3 config with every parameter partitioned, the thetas and the tiny model's
    smallest ones too (DeepSpeed keeps parameters under 10 x hidden size whole by default)."""
    import yaml

    ds_config = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    (directory / "zero3.json").write_text(json.dumps(ds_config))
    config = yaml.safe_load(ZERO3_CONFIG.read_text())
    assert config["deepspeed_config"]["zero_stage"] == 3 and config["deepspeed_config"]["zero3_init_flag"]
    config["deepspeed_config"] = {
        "deepspeed_config_file": str(directory / "zero3.json"),
        "zero3_init_flag": True,
    }
    del config["mixed_precision"]  # set by the DeepSpeed file ("auto": the run config's)
    path = directory / "zero3.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check_sharded_run(tmp_path: Path, config: Path, finetune: str = "peft") -> None:
    """Two processes under the accelerate ``config``, killed after a checkpoint and resumed, against one
    process with the same global batch: the same logged losses and trained weights, checkpoints that keep
    only what trains, and a saved run that one process loads and scores alike."""

    def run_config(name: str, batch_size: int) -> Path:
        path = write_run_config(tmp_path, name, batch_size=batch_size, gradient_accumulation_steps=1)
        return with_full_finetuning(path) if finetune == "full" else path

    weights = full_trained_weights if finetune == "full" else trained_weights
    single = train(load_run_config(run_config("single", 4)))
    path = run_config("sharded", 2)
    run_dir = tmp_path / "sharded"

    killed = launch(tmp_path, "train", str(path), config=config, env={"KILL_AFTER": "4"})
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert [c.name for c in checkpoints(run_dir)] == ["checkpoint-4"] and is_complete_checkpoint(
        run_dir / "checkpoint-4"
    )
    assert not (run_dir / "bitune_config.json").exists()  # killed mid-training
    checkpoint = run_dir / "checkpoint-4"
    assert not list(checkpoint.glob("pytorch_model*"))  # no copy of the whole model (frozen base included)
    if finetune == "peft":
        saved = [k for f in checkpoint.rglob("*.safetensors") for k in load_file(f)]
        assert saved and all("lora_" in k or k.startswith("theta_") for k in saved)
        # DeepSpeed's own module states (beside its optimizer partitions) leave the frozen base out too
        for states in checkpoint.glob("global_step*/*model_states.pt"):
            module = torch.load(states, weights_only=False)["module"]
            assert module and all("lora_" in k or k.startswith("mixing.") for k in module), list(module)

    resumed = launch(tmp_path, "train", str(path), "--resume", config=config)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # FSDP2 reduce-scatters the mean gradient of the two halves of each global batch, DeepSpeed reduces it
    # into each process's partition, as DDP all-reduces it; clipping sees the same total norm (accelerate
    # and DeepSpeed gather the sharded norms), so the updates agree up to the order of float additions.
    assert losses(run_dir) == pytest.approx(losses(single), rel=1e-5)
    ours, theirs = weights(run_dir), weights(single)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    moved = [n for n in ours if ("lora_B" in n or n.startswith("bidir/")) and ours[n].abs().sum() > 0]
    assert moved  # training did change the weights
    assert {v.dtype for k, v in ours.items() if k.startswith("mixing/")} == {torch.float32}

    # the saved run is whole: one process loads it and scores as the one-process run does
    from bitune.method.model import BituneModel
    from bitune.references import load_model

    batch = torch.randint(3, 90, (2, 20), generator=torch.Generator().manual_seed(0))
    labels = batch.clone()
    labels[:, :12] = -100
    scores = []
    for directory in (run_dir, single):
        base, _ = load_model(str(tmp_path / "tiny-model"))
        model = BituneModel.from_pretrained(base, directory)
        with torch.no_grad():
            scores.append(model(input_ids=batch, labels=labels, skip_logits=False).logits)
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["peft", "full"])
def test_fsdp2_on_two_processes_matches_one_process_resumes_after_a_kill_and_loads_in_one(tmp_path, finetune):
    check_sharded_run(tmp_path, FSDP_CONFIG, finetune)


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["peft", "full"])
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_on_two_processes_matches_one_process_resumes_after_a_kill_and_loads_in_one(
    tmp_path, stage, finetune
):
    config = zero3_partitioning_everything(tmp_path) if stage == "zero3" else ZERO2_CONFIG
    check_sharded_run(tmp_path, config, finetune)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["fsdp", "zero3"])
def test_sharded_training_keeps_the_thetas_fp32_under_bf16_mixed_precision(tmp_path, sharding):
    path = write_run_config(
        tmp_path, "bf16", batch_size=2, gradient_accumulation_steps=2, trainer_args={"bf16": True}
    )
    steps = tmp_path / "steps.txt"
    config = FSDP_CONFIG if sharding == "fsdp" else zero3_partitioning_everything(tmp_path)
    proc = launch(tmp_path, "train", str(path), config=config, env={"CHECK_THETAS": str(steps)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(steps.read_text().split()) == 2 * 8 * 2  # every micro-step of both processes was checked
    fp32 = train(
        load_run_config(write_run_config(tmp_path, "fp32", batch_size=4, gradient_accumulation_steps=2))
    )
    # bf16 compute: the losses move off the fp32 ones by bf16's rounding (8 bits of mantissa), no more
    record, reference = losses(tmp_path / "bf16"), losses(fp32)
    assert record == pytest.approx(reference, rel=2e-2) and record != pytest.approx(reference, rel=1e-5)
    mixing = load_file(tmp_path / "bf16" / "mixing.safetensors")
    assert {v.dtype for v in mixing.values()} == {torch.float32}


def test_fsdp_configs_bitune_cannot_train_with_are_refused_by_name():
    from accelerate.utils import DistributedType

    for plugin, message in [
        (SimpleNamespace(fsdp_version=1, cpu_ram_efficient_loading=False), "FSDP2 only; set fsdp_version: 2"),
        (SimpleNamespace(fsdp_version=2, cpu_ram_efficient_loading=True), "fsdp_cpu_ram_efficient_loading"),
    ]:
        accelerator = SimpleNamespace(
            state=SimpleNamespace(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin)
        )
        with pytest.raises(ValueError, match=message):
            sharding.enable_fsdp(accelerator, SimpleNamespace(mixing=None, bitune_config=BituneConfig()))


def test_the_shipped_fsdp_config_asks_for_fsdp2_with_whole_decoder_layers():
    import yaml

    config = yaml.safe_load(FSDP_CONFIG.read_text())
    assert config["distributed_type"] == "FSDP"
    assert config["fsdp_config"]["fsdp_version"] == 2
    assert config["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is False


def test_the_shipped_deepspeed_configs_take_batch_accumulation_and_clipping_from_the_run_config():
    import yaml

    for path, stage in ((ZERO2_CONFIG, 2), (ZERO3_CONFIG, 3)):
        config = yaml.safe_load(path.read_text())
        assert config["distributed_type"] == "DEEPSPEED" and config["deepspeed_config"]["zero_stage"] == stage
        # unset here, DeepSpeed's "auto": the Trainer fills them in from the run config (a number that
        # differs from the run config's stops the launch)
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(config["deepspeed_config"])


def test_leaving_the_process_group_ends_it_and_does_nothing_without_one(tmp_path):
    # `bitune train` ends its launched process this way: a gloo group left alive at exit can abort the
    # process in its destructor after the run has finished
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        sharding.leave_process_group()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sharding.leave_process_group()  # one process: nothing to end
    assert not torch.distributed.is_initialized()
