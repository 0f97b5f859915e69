"""bitune.training.trl: one optimiser step through TRL's SFTTrainer equals one step through `bitune train` on the
same rows; conversational data, gradient checkpointing and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")

from trl import SFTConfig  # noqa: E402

from bitune import BituneConfig  # noqa: E402
from bitune.training.run_config import load_run_config  # noqa: E402
from bitune.training.trainer import train  # noqa: E402
from bitune.training.trl import BituneSFTTrainer, as_prompt_completion  # noqa: E402

from conftest import tiny_run_files  # noqa: E402

ROWS = 8


def sft_config(output_dir, **overrides) -> SFTConfig:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=1,
        per_device_train_batch_size=ROWS,
        gradient_accumulation_steps=1,
        learning_rate=0.01,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=3,
        data_seed=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataset_num_proc=None,
    )
    return SFTConfig(**{**settings, **overrides})


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_one_trl_step_equals_one_bitune_train_step(tmp_path):
    model_dir, data_file = tiny_run_files(tmp_path, rows=ROWS)
    config = {
        "model": {"name": str(model_dir)},
        "data": {"train": str(data_file), "template": "raw", "max_length": 64},
        "training": {
            "output_dir": str(tmp_path / "bitune"),
            "max_steps": 1,
            "batch_size": ROWS,
            "gradient_accumulation_steps": 1,
            "learning_rate": 0.01,
            "warmup_ratio": 0.0,
            "seed": 3,
            "logging_steps": 1,
            "report_to": ["none"],
        },
    }
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    run_dir = train(load_run_config(tmp_path / "run.yaml"))
    ours_loss = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])["loss"]

    dataset = datasets.load_dataset("json", data_files=str(data_file), split="train")
    trainer = BituneSFTTrainer(str(model_dir), args=sft_config(tmp_path / "trl"), train_dataset=dataset)
    trainer.train()
    trl_loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    assert trl_loss == pytest.approx(ours_loss, rel=1e-5)

    from bitune import BituneModel
    from bitune.references import load_model

    base, _ = load_model(str(model_dir))
    reference = trained(BituneModel.from_pretrained(base, run_dir, is_trainable=True))
    ours = {n.removeprefix("module."): p for n, p in trained(trainer.model).items()}
    assert ours.keys() == reference.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_conversations_train_their_last_turn_and_checkpointing_becomes_recomputation(tmp_path):
    model_dir, _ = tiny_run_files(tmp_path)
    rows = [
        {"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"}]},
        {"conversations": [{"from": "human", "value": "cd"}, {"from": "gpt", "value": "dc"}]},
    ]
    converted = as_prompt_completion(datasets.Dataset.from_list(rows[:1]))
    assert converted[0] == {
        "prompt": [{"role": "user", "content": "ab"}],
        "completion": [{"role": "assistant", "content": "ba"}],
    }
    sharegpt = as_prompt_completion(
        datasets.Dataset.from_list([*rows[1:], {"conversations": [{"from": "human", "value": "x"}]}])
    )
    assert len(sharegpt) == 1 and sharegpt[0]["completion"] == [{"role": "assistant", "content": "dc"}]

    from conftest import char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    trainer = BituneSFTTrainer(
        str(model_dir),
        args=sft_config(tmp_path / "chat", per_device_train_batch_size=1, gradient_checkpointing=True),
        train_dataset=datasets.Dataset.from_list(rows[:1] * 2),
        processing_class=tokenizer,
        bitune_config=BituneConfig(),
    )
    assert trainer.model.prompt_passes.options.recompute
    example = trainer.train_dataset[0]
    prompt = len(tokenizer("<user>ab|<assistant>", add_special_tokens=False)["input_ids"])
    assert example["labels"][:prompt] == [-100] * prompt and -100 not in example["labels"][prompt:]
    trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize(
    ("overrides", "data", "message"),
    [
        ({"packing": True}, [{"prompt": "a", "completion": "b"}], "packing"),
        ({"padding_free": True}, [{"prompt": "a", "completion": "b"}], "padding_free"),
        ({"completion_only_loss": False}, [{"prompt": "a", "completion": "b"}], "completion_only_loss"),
        ({}, [{"text": "just text"}], "has no prompt"),
    ],
)
def test_what_has_no_prompt_boundary_is_refused(tmp_path, overrides, data, message):
    model_dir, _ = tiny_run_files(tmp_path)
    with pytest.raises(ValueError, match=message):
        BituneSFTTrainer(
            str(model_dir),
            args=sft_config(tmp_path / "x", **overrides),
            train_dataset=datasets.Dataset.from_list(data),
        )
