"""`bitune train` on the HF Trainer: configs, checkpoints with trained weights only, resume after a
SIGKILL, logs, and data-parallel training with accelerate."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitune.layout import checkpoints, is_complete_checkpoint, latest_complete_checkpoint, snapshot_dir
from bitune.training.run_config import load_run_config
from bitune.training.trainer import train

from conftest import free_port, full_trained_weights, trained_weights, with_full_finetuning, write_run_config

REPO = Path(__file__).resolve().parents[2]


def write_config(directory: Path, output: str, **training) -> Path:
    return write_run_config(directory, output, **training)


def run_cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bitune", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_train_writes_model_checkpoints_and_logs(tmp_path):
    config = load_run_config(write_config(tmp_path, "run"))
    run_dir = train(config)
    assert (run_dir / "bitune_config.json").exists() and (run_dir / "run_config.yaml").exists()
    assert [p.name for p in checkpoints(run_dir)] == ["checkpoint-4", "checkpoint-8"]
    checkpoint = checkpoints(run_dir)[0]
    assert is_complete_checkpoint(checkpoint)
    files = {p.name for p in checkpoint.iterdir()}
    assert {
        "bitune_config.json",
        "causal",
        "bidir",
        "mixing.safetensors",
        "optimizer.pt",
        "scheduler.pt",
    } <= files
    assert not any(name.startswith("model") for name in files)  # no frozen base weights
    saved = [k for f in checkpoint.rglob("*.safetensors") for k in load_file(f)]
    assert saved and all("lora_" in k or k.startswith("theta_") for k in saved)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(len(r["alpha_k"]) == 3 and "learning_rate" in r and "loss" in r for r in records)
    header = (run_dir / "log.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "learning_rate", "alpha_k_00", "alpha_v_02"} <= set(header)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(config)


def test_schedule_is_linear_with_ten_percent_warmup(tmp_path):
    config = load_run_config(write_config(tmp_path, "run", max_steps=20, logging_steps=1, save_steps=20))
    run_dir = train(config)
    rates = [json.loads(line)["learning_rate"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    # the rate each update used: warmup from 0 over 2 of 20 updates, then linear decay towards 0
    assert rates[:3] == pytest.approx([0.0, 0.005, 0.01])
    assert rates[-1] == pytest.approx(0.01 / 18)
    assert all(a >= b for a, b in itertools.pairwise(rates[2:]))


def test_checkpointed_prompt_passes_train_to_the_same_weights(tmp_path):
    plain = train(load_run_config(write_config(tmp_path, "plain", max_steps=4)))
    recomputed = train(
        load_run_config(write_config(tmp_path, "recomputed", max_steps=4, checkpoint_prompt_passes=True))
    )
    expected, got = trained_weights(plain), trained_weights(recomputed)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    assert load_run_config(recomputed / "run_config.yaml").training.checkpoint_prompt_passes


def test_snapshots_keep_the_weights_after_the_chosen_updates(tmp_path):
    config = load_run_config(write_config(tmp_path, "run", snapshot_steps=[0, 3, 4], save_total_limit=1))
    run_dir = train(config)
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == ["step-0", "step-3", "step-4"]
    assert [p.name for p in checkpoints(run_dir)] == ["checkpoint-8"]  # rotation leaves snapshots alone
    initial = trained_weights(snapshot_dir(run_dir, 0))
    assert all(not v.any() for k, v in initial.items() if "lora_B" in k)
    assert all(torch.allclose(v, torch.tensor(0.01)) for k, v in initial.items() if k.startswith("mixing/"))
    # step 4 is the checkpoint the Trainer wrote at step 4 (the run saves every 4 updates)
    reference = train(load_run_config(write_config(tmp_path, "reference", max_steps=8)))
    ours, theirs = trained_weights(snapshot_dir(run_dir, 4)), trained_weights(reference / "checkpoint-4")
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=0, rtol=0, msg=name)
    assert any(not torch.equal(trained_weights(snapshot_dir(run_dir, 3))[n], ours[n]) for n in ours)
    with pytest.raises(ValueError, match=r"training\.snapshot_steps lists steps after max_steps=8"):
        load_run_config(write_config(tmp_path, "bad", snapshot_steps=[9]))


def test_legacy_optimizer_trains_with_its_own_update(tmp_path):
    runs = {
        name: train(load_run_config(write_config(tmp_path, name, max_steps=4, optimizer=name)))
        for name in ("adamw_torch", "adamw_legacy")
    }
    state = torch.load(runs["adamw_legacy"] / "checkpoint-4" / "optimizer.pt", weights_only=False)
    assert {type(s["step"]) for s in state["state"].values()} == {int}  # LegacyAdamW's state, not torch's
    torch_state = torch.load(runs["adamw_torch"] / "checkpoint-4" / "optimizer.pt", weights_only=False)
    assert {type(s["step"]) for s in torch_state["state"].values()} == {torch.Tensor}
    a, b = trained_weights(runs["adamw_torch"]), trained_weights(runs["adamw_legacy"])
    assert any(not torch.allclose(a[n], b[n]) for n in a)
    assert load_run_config(runs["adamw_legacy"] / "run_config.yaml").training.optimizer == "adamw_legacy"
    with pytest.raises(ValueError, match=r"training\.optimizer must be one of"):
        load_run_config(write_config(tmp_path, "bad", optimizer="sgd"))


def test_bad_config_fails_before_any_model_loads(tmp_path):
    path = write_config(tmp_path, "run")
    with pytest.raises(ValueError, match=r"training\.learning_rate must be a finite number in \(0, 1\.0\]"):
        load_run_config(path, ["training.learning_rate=0"])
    proc = run_cli("train", str(path), "bitune.variant=bidirectional")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "BituneConfig.variant must be one of" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    settings = dict(max_steps=400, save_steps=20, logging_steps=20, save_total_limit=2)
    reference = train(load_run_config(write_config(tmp_path, "reference", **settings)))
    path = write_config(tmp_path, "killed", **settings)
    run_dir = tmp_path / "killed"
    proc = run_cli("train", str(path))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        complete = [c for c in checkpoints(run_dir) if is_complete_checkpoint(c)]
        if complete and int(complete[-1].name.split("-")[1]) >= 60:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "bitune_config.json").exists()  # killed mid-training
    (run_dir / "checkpoint-9999").mkdir()  # what a kill during a save leaves
    (run_dir / "checkpoint-9999" / "optimizer.pt").write_bytes(b"partial")
    assert latest_complete_checkpoint(run_dir).name != "checkpoint-9999"

    resumed = run_cli("train", str(path), "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert not (run_dir / "checkpoint-9999").exists()
    ours, theirs = trained_weights(run_dir), trained_weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["peft", "full"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, finetune):
    def config(name: str, batch_size: int) -> Path:
        path = write_config(tmp_path, name, batch_size=batch_size, gradient_accumulation_steps=1)
        return with_full_finetuning(path) if finetune == "full" else path

    weights = full_trained_weights if finetune == "full" else trained_weights
    single = train(load_run_config(config("single", 4)))
    path = config("ddp", 2)
    # `--cpu --num_processes 2` starts a single process in accelerate 1.15 (multi-CPU needs mpirun there);
    # `--multi_gpu` on a machine without GPUs starts two torchrun processes that train on the CPU over gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port())]
    proc = subprocess.run(
        [*launch, "-m", "bitune", "train", str(path)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    epochs = [
        [json.loads(line)["epoch"] for line in (d / "log.jsonl").read_text().splitlines()]
        for d in (tmp_path / "ddp", single)
    ]
    assert epochs[0] == epochs[1]  # each process saw half of every global batch, not all the data
    ours, theirs = weights(tmp_path / "ddp"), weights(single)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    moved = [n for n in ours if ("lora_B" in n or n.startswith("bidir/")) and ours[n].abs().sum() > 0]
    assert moved  # training did change the weights


def test_trainer_args_pass_through_and_are_validated_up_front(tmp_path):
    path = write_config(
        tmp_path, "run", max_steps=2, trainer_args={"adam_beta2": 0.95, "torch_empty_cache_steps": 1}
    )
    run_dir = train(load_run_config(path))
    args = torch.load(run_dir / "training_args.bin", weights_only=False)
    assert args.adam_beta2 == 0.95 and args.torch_empty_cache_steps == 1
    for bad, message in [
        (
            {"adam_beta": 0.9},
            r"'adam_beta', which is not a TrainingArguments field; did you mean adam_beta2, adam_beta1",
        ),
        ({"learning_rate": 0.1}, r"sets 'learning_rate', which a run config sets as training\.learning_rate"),
        ({"gradient_checkpointing": True}, r"training\.checkpoint_prompt_passes"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_run_config(write_config(tmp_path, "bad", trainer_args=bad))
    config = load_run_config(write_config(tmp_path, "bad", trainer_args={"logging_strategy": "sometimes"}))
    with pytest.raises(ValueError, match="transformers refuses them"):
        train(config)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_evaluation_during_training_logs_eval_loss_and_early_stopping_keeps_the_best(tmp_path):
    path = write_config(
        tmp_path,
        "run",
        max_steps=40,
        save_steps=2,
        logging_steps=2,
        learning_rate=0.3,
        early_stopping_patience=1,
    )
    config = load_run_config(path, ["data.eval=0.25"])
    run_dir = train(config)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all(len(r["alpha_k"]) == 3 for r in evals)  # eval loss beside the mixing ratios
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] < 40  # stopped early (patience 1 at a learning rate that overshoots)
    best = state["best_model_checkpoint"]
    from bitune import BituneModel
    from bitune.references import load_model

    final = trained_weights(run_dir)
    best_weights = trained_weights(Path(best))
    assert all(
        torch.equal(final[n], best_weights[n]) for n in final
    )  # ended with the best checkpoint's weights
    base, _ = load_model(config.model.name)
    assert BituneModel.from_pretrained(base, run_dir) is not None
    with pytest.raises(ValueError, match=r"need evaluation data: set data\.eval"):
        load_run_config(write_config(tmp_path, "no-eval"), ["training.eval_steps=2"])
    with pytest.raises(ValueError, match=r"data\.eval as a held-out fraction must be in \(0, 1\)"):
        load_run_config(path, ["data.eval=1.5"])


def test_a_task_as_evaluation_data(tmp_path):
    path = write_config(tmp_path, "run", max_steps=2, save_steps=2)
    config = load_run_config(path, ["data.eval=arc_easy", "data.eval_limit=20", "data.max_length=400"])
    run_dir = train(config)
    evals = [
        json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if "eval_loss" in line
    ]
    assert len(evals) == 1 and evals[0]["eval_loss"] > 0


def test_bf16_weights_train_with_fp32_thetas_and_fp16_is_refused(tmp_path):
    run_dir = train(load_run_config(write_config(tmp_path, "run", max_steps=4), ["model.dtype=bfloat16"]))
    thetas = load_file(run_dir / "mixing.safetensors")
    assert all(t.dtype == torch.float32 for t in thetas.values())
    assert not torch.allclose(thetas["theta_k"], torch.tensor(0.01))  # they trained
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records)
    with pytest.raises(ValueError, match=r"model\.dtype float16 weights would train without loss scaling"):
        load_run_config(write_config(tmp_path, "half"), ["model.dtype=float16"])


def test_several_sources_train_together_and_must_write_prompts_alike(tmp_path):
    from bitune.training.trainer import training_data

    from conftest import char_tokenizer

    path = write_run_config(tmp_path)
    data_file = json.loads(path.read_text())["data"]["train"]
    other = tmp_path / "other.jsonl"
    other.write_text(
        "".join(json.dumps({"prompt": f"say {w}", "completion": w}) + "\n" for w in ("ab", "cd", "ef"))
    )
    tokenizer = char_tokenizer()
    alone, _, _ = training_data(load_run_config(path), tokenizer)
    both, _, fmt = training_data(load_run_config(path, [f"data.train=[{data_file},{other}]"]), tokenizer)
    assert len(both) == len(alone) + 3 and fmt.template == "paper"
    capped, _, _ = training_data(
        load_run_config(path, [f"data.train=[{data_file},{other}]", "data.limit=2"]), tokenizer
    )
    assert len(capped) == 4  # the limit applies to each source
    conversations = tmp_path / "chats.jsonl"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    conversations.write_text(json.dumps(chat) + "\n")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(ValueError, match="writes prompts as 'chat'"):
        training_data(load_run_config(path, [f"data.train=[{data_file},{conversations}]"]), tokenizer)
