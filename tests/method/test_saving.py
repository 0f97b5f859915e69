"""save_pretrained / from_pretrained: a round trip reproduces the model; a wrong base is refused."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from bitune import BituneConfig, BituneModel, get_bitune_model

from conftest import make_batch, randomize_adapters, tiny_model


def trained_like(arch: str, variant: str = "bitune", **kwargs) -> BituneModel:
    model = get_bitune_model(tiny_model(arch), BituneConfig(variant=variant, **kwargs))
    randomize_adapters(model)
    if model.mixing is not None:
        with torch.no_grad():
            model.mixing.theta_k.copy_(torch.linspace(-0.05, 0.2, model.mixing.num_layers))
            model.mixing.theta_v.copy_(torch.linspace(0.3, -0.01, model.mixing.num_layers))
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).logits


@pytest.mark.parametrize(
    ("arch", "variant", "kwargs"),
    [
        ("llama", "bitune", {}),
        ("llama", "bitune", {"alpha_init": 0.1, "theta_init": 0.1}),
        ("gemma3_text", "bitune", {}),
        ("phi3", "no_mixing", {"second_pass_mask": "anti_causal"}),
        ("qwen2", "lora", {}),
        (
            "llama",
            "bitune",
            {"peft_config": {"peft_type": "LORA", "r": 4, "use_dora": True, "target_modules": "all-linear"}},
        ),
        (
            "llama",
            "shared_weights",
            {
                "peft_config": {
                    "peft_type": "IA3",
                    "target_modules": ["k_proj", "v_proj", "down_proj"],
                    "feedforward_modules": ["down_proj"],
                }
            },
        ),
    ],
)
def test_round_trip_reproduces_logits_and_ratios(tmp_path, arch, variant, kwargs):
    model = trained_like(arch, variant, **kwargs)
    batch = make_batch([12, 8], [6, 5])
    model.save_pretrained(tmp_path / "run")
    loaded = BituneModel.from_pretrained(tiny_model(arch), tmp_path / "run")
    assert loaded.bitune_config == model.bitune_config
    assert loaded.mixing_ratios() == model.mixing_ratios()
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    trainable = BituneModel.from_pretrained(tiny_model(arch), tmp_path / "run", is_trainable=True)
    assert trainable.trainable_parameter_counts() == model.trainable_parameter_counts()


def test_an_untrained_model_keeps_its_alpha_init_through_saving(tmp_path):
    model = get_bitune_model(tiny_model("llama"), BituneConfig(alpha_init=0.1))
    model.save_pretrained(tmp_path / "run")
    loaded = BituneModel.from_pretrained(tiny_model("llama"), tmp_path / "run")
    assert loaded.bitune_config.alpha_init == 0.1
    assert loaded.mixing_ratios()["k"] == pytest.approx([0.1] * 3)


def test_saved_files_are_open_formats_and_each_adapter_is_plain_peft(tmp_path):
    model = trained_like("llama")
    model.save_pretrained(tmp_path / "run")
    files = sorted(
        p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*") if p.is_file()
    )
    assert files == [
        "bidir/adapter_config.json",
        "bidir/adapter_model.safetensors",
        "bitune_config.json",
        "causal/adapter_config.json",
        "causal/adapter_model.safetensors",
        "mixing.safetensors",
    ]
    meta = json.loads((tmp_path / "run" / "bitune_config.json").read_text())
    assert meta["bitune"]["variant"] == "bitune" and meta["base_model"]["num_hidden_layers"] == 3
    # the causal folder is an ordinary PEFT adapter; the root is not (no silent one-adapter loading)
    batch = make_batch([9], [9])
    plain = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "run" / "causal")
    with torch.no_grad():
        zero = model.mixing.theta_k.detach().clone()
        model.mixing.theta_k.zero_()
        model.mixing.theta_v.zero_()
        ours = model(batch["input_ids"], prompt_lengths=torch.tensor([9])).logits[0, -1]
        model.mixing.theta_k.copy_(zero)
        theirs = plain(batch["input_ids"]).logits[0, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "run")


@pytest.mark.parametrize(
    ("arch", "overrides", "field"),
    [
        ("qwen2", {}, "model_type"),
        ("llama", {"num_hidden_layers": 4}, "num_hidden_layers"),
        ("llama", {"hidden_size": 64}, "hidden_size"),
    ],
)
def test_a_different_base_model_is_refused(tmp_path, arch, overrides, field):
    trained_like("llama").save_pretrained(tmp_path / "run")
    with pytest.raises(ValueError, match=f"mismatch in .*{field}"):
        BituneModel.from_pretrained(tiny_model(arch, **overrides), tmp_path / "run")


def test_missing_directory_and_failed_save_leave_nothing_half_written(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"bitune_config\.json"):
        BituneModel.from_pretrained(tiny_model("llama"), tmp_path / "nothing")
    model = trained_like("llama")
    model.save_pretrained(tmp_path / "run")
    before = (tmp_path / "run" / "mixing.safetensors").read_bytes()

    import bitune.method.saving

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bitune.method.saving, "save_file", broken)
    with torch.no_grad():
        model.mixing.theta_k.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / "mixing.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no staging left


def test_saving_into_a_run_directory_keeps_other_files_and_drops_stale_ones(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text("{}\n")
    trained_like("llama").save_pretrained(run)
    trained_like("llama", "lora").save_pretrained(run)  # a variant without bidir adapter and mixing
    assert sorted(p.name for p in run.iterdir()) == ["bitune_config.json", "causal", "train_log.jsonl"]
    assert BituneModel.from_pretrained(tiny_model("llama"), run).bitune_config.variant == "lora"
