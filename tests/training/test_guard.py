"""Run directories protect themselves: one writer at a time (two processes), resumes that mean the same
run, logs with each step once, a diverged run stopped at its first non-finite update, Ctrl-C resumable."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bitune.training.trainer
from bitune.layout import checkpoints, is_model_dir, latest_complete_checkpoint
from bitune.training.callbacks import TrainingDiverged
from bitune.training.run_config import load_run_config
from bitune.training.trainer import train

from conftest import trained_weights, write_run_config

REPO = Path(__file__).resolve().parents[2]


def write_config(directory: Path, name: str = "run", **training) -> Path:
    settings = dict(max_steps=4, gradient_accumulation_steps=1, save_steps=2, logging_steps=1, seed=42)
    return write_run_config(directory, name, **{**settings, **training})


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bitune", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a test suite run in the background (`cmd &`) starts with SIGINT ignored, and a
        # child inheriting that would never see the Ctrl-C this file sends
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def newest_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint in ``run_dir`` (0 if none)."""
    latest = latest_complete_checkpoint(run_dir)
    return int(latest.name.split("-")[1]) if latest else 0


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_resume_refuses_a_different_run_and_extends_only_when_asked(tmp_path):
    path = write_config(tmp_path)
    run_dir = train(load_run_config(path))
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    for override, field in [
        ("training.learning_rate=0.02", "training.learning_rate: 0.01 -> 0.02"),
        ("model.name=smollm2-135m-instruct", "model.name"),
        ("bitune.variant=lora", "bitune.variant: 'bitune' -> 'lora'"),
        ("training.max_steps=6", "training.max_steps: 4 -> 6 (more training? pass --allow-change for it)"),
    ]:
        with pytest.raises(
            ValueError, match=r"--resume would continue .* with another config: " + re.escape(field)
        ):
            train(load_run_config(path, [override]), resume=True)
    with pytest.raises(ValueError, match=re.escape("takes ['training.max_steps', 'training.num_epochs']")):
        train(load_run_config(path), resume=True, allow_changes=["training.learning_rate"])
    before = (run_dir / "run_config.yaml").read_text()
    assert load_run_config(run_dir / "run_config.yaml").training.max_steps == 4 and before  # record intact

    extended = load_run_config(path, ["training.max_steps=6", "training.logging_steps=1"])
    train(extended, resume=True, allow_changes=["training.max_steps"])
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]  # continued from checkpoint-4, each step once
    resumes = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert resumes[0]["changes"] == {"training.max_steps": [4, 6]}
    assert load_run_config(run_dir / "run_config.yaml").training.max_steps == 6


def test_a_killed_run_resumes_with_its_log_holding_each_step_once(tmp_path):
    path = write_config(tmp_path, max_steps=8, save_steps=2)
    reference = train(load_run_config(write_config(tmp_path, "reference", max_steps=8, save_steps=2)))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-2").mkdir(parents=True)  # pretend: a run that was killed after step 3 ...
    train(load_run_config(path, ["training.max_steps=8"]), resume=True)  # (no complete checkpoint: fresh)
    assert logged_steps(run_dir) == logged_steps(reference) == list(range(1, 9))


def test_a_second_writer_is_refused_and_a_killed_one_leaves_the_lock_free(tmp_path):
    path = write_config(tmp_path, max_steps=2000, save_steps=20, logging_steps=100)
    first = cli("train", str(path))
    holder = tmp_path / "run" / ".bitune.lock.json"
    deadline = time.time() + 600  # a guard against a hang: the loop ends at the first checkpoint
    while (
        time.time() < deadline
        and first.poll() is None
        and not (holder.exists() and checkpoints(tmp_path / "run"))
    ):
        time.sleep(0.05)
    assert first.poll() is None and holder.exists(), first.communicate()
    second = cli("train", str(path), "--resume")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert (
        f"is being written by another training process (pid {first.pid} on " in err and "Traceback" not in err
    )
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = newest_step(tmp_path / "run")
    resumed = cli("train", str(path), "training.max_steps=2000", "--resume")
    # until the resumed run (holding the lock now) has saved a checkpoint of its own: one of a later step
    # than any the killed run left (a count of folders would miss it: save_total_limit rotates them)
    deadline = time.time() + 600
    while time.time() < deadline and resumed.poll() is None and newest_step(tmp_path / "run") <= killed_at:
        time.sleep(0.05)
    assert resumed.poll() is None and newest_step(tmp_path / "run") > killed_at, resumed.returncode
    resumed.send_signal(signal.SIGINT)  # Ctrl-C: a clear line saying how to continue, status 130
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 130, err
    expected = (
        f"bitune train: interrupted; resume with: bitune train {path} training.max_steps=2000 --resume\n"
    )
    assert expected in err and "Traceback" not in err


def test_training_stops_at_the_first_non_finite_update_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    config = load_run_config(write_config(tmp_path, max_steps=8, save_steps=2))
    built = bitune.training.trainer.get_bitune_model
    calls = []

    def diverging(model, bitune_config):
        bitune_model = built(model, bitune_config)

        def poison(module, args, output):  # the 5th forward (update 5) returns a NaN loss
            calls.append(1)
            if len(calls) == 5 and output.loss is not None:
                output.loss = output.loss * float("nan")
            return output

        bitune_model.register_forward_hook(poison)
        return bitune_model

    monkeypatch.setattr(bitune.training.trainer, "get_bitune_model", diverging)
    with pytest.raises(
        TrainingDiverged, match=r"training stopped at update 5: the gradient is not finite .*checkpoint-4"
    ):
        train(config)
    run_dir = tmp_path / "run"
    assert [c.name for c in checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4"]
    assert not is_model_dir(run_dir)  # the diverged model is not saved as the result
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]  # valid JSON
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


# A child `bitune train` with two test hooks: SLOW_SAVE makes a checkpoint save stop half way (the Trainer's
# state, written last, is not yet there) until the process is killed; GATE makes the process wait inside the
# run lock, before the model loads, until the test lets it go. Both turn a race into a sequence of events.
HOOKED_CLI = """
import os, pathlib, sys, time
import transformers
import bitune.training.trainer as trainer
from bitune.cli import main

if os.environ.get("SLOW_SAVE"):
    save_rng_state = transformers.Trainer._save_rng_state
    def stalled(self, output_dir):
        save_rng_state(self, output_dir)
        if output_dir.endswith(os.environ["SLOW_SAVE_AT"]):
            pathlib.Path(os.environ["SLOW_SAVE"]).write_text(output_dir)
            time.sleep(3600)
    transformers.Trainer._save_rng_state = stalled
if os.environ.get("GATE"):
    gate, build = pathlib.Path(os.environ["GATE"]), trainer._build_trainer
    def gated(config):
        (gate / f"locked-{os.getpid()}").touch()
        while not (gate / "open").exists():
            time.sleep(0.02)
        return build(config)
    trainer._build_trainer = gated
main(sys.argv[1:])
"""


def hooked_cli(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOOKED_CLI, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    """Until ``condition()`` (a guard of 600 s against a hang; the process must still run)."""
    deadline = time.time() + 600
    while not condition() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert condition(), f"{what}: {process.communicate()}"


@pytest.mark.parametrize("other", ["a second resume", "a fresh start"])
def test_killed_during_a_save_then_a_resume_and_another_writer_at_once_exactly_one_wins(tmp_path, other):
    settings = dict(max_steps=12, save_steps=4, logging_steps=4, save_total_limit=None)
    reference = train(load_run_config(write_config(tmp_path, "reference", **settings)))
    path = write_config(tmp_path, "run", **settings)
    run_dir, saving = tmp_path / "run", tmp_path / "saving"
    holder = hooked_cli("train", str(path), SLOW_SAVE=str(saving), SLOW_SAVE_AT="checkpoint-8")
    wait_for(saving.exists, holder, "the second save")
    holder.send_signal(signal.SIGKILL)  # in the middle of writing checkpoint-8
    holder.wait()
    assert [c.name for c in checkpoints(run_dir)] == ["checkpoint-4", "checkpoint-8"]
    assert latest_complete_checkpoint(run_dir).name == "checkpoint-4"  # the winner continues from it

    gate = tmp_path / "gate"
    gate.mkdir()
    second = ["--resume"] if other == "a second resume" else []
    started = [
        hooked_cli("train", str(path), "--resume", GATE=str(gate)),
        hooked_cli("train", str(path), *second, GATE=str(gate)),
    ]
    # the winner waits inside the lock; the other must have given up by the time it is let go
    wait_for(lambda: any(gate.glob("locked-*")), started[0], "a writer holding the lock")
    [winner] = [p for p in started if (gate / f"locked-{p.pid}").exists()]
    [loser] = [p for p in started if p is not winner]
    _, err = loser.communicate(timeout=600)
    assert loser.returncode == 2 and len(err.strip().splitlines()[-1:]) == 1 and "Traceback" not in err
    expected = (
        "is being written by another training process"
        if other == "a second resume"
        else "already holds a run"
    )
    assert expected in err, err
    (gate / "open").touch()
    _, err = winner.communicate(timeout=600)
    assert winner.returncode == 0, err
    assert not (gate / f"locked-{loser.pid}").exists()  # the loser never got in
    assert logged_steps(run_dir) == [4, 8, 12]  # continued from checkpoint-4, each step logged once
    ours, theirs = trained_weights(run_dir), trained_weights(reference)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)
