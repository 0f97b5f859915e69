"""Full fine-tuning (``finetune: full``): equivalence with plain full fine-tuning of the model at the
degenerate settings, with PEFT Bitune at initialisation, what trains, and saving."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitune import BituneConfig, get_bitune_model
from bitune.inference import generate_text, load_for_inference
from bitune.method import weights as full_weights_module
from bitune.method.model import BituneModel
from bitune.serving.vllm_engine import vllm_plan
from bitune.training.run_config import load_run_config
from bitune.training.trainer import train

from conftest import (
    LENGTHS,
    PROMPTS,
    full_trained_weights,
    make_batch,
    model_inputs,
    tiny_model,
    write_run_config,
    zero_thetas,
)


def full_pair(arch: str, variant: str = "bitune", **config):
    """(fully fine-tuned BituneModel, untouched copy of its base model)."""
    base = tiny_model(arch)
    reference = copy.deepcopy(base)
    return get_bitune_model(base, BituneConfig(variant=variant, finetune="full", **config)), reference


def assert_trains_as_plain_full_finetuning(model: BituneModel, reference) -> None:
    """One backward of ``model`` and of the plain ``reference`` on the same batch: equal losses, and the
    causal weights' gradients equal the reference's."""
    batch = make_batch(LENGTHS, PROMPTS)
    loss = model(**model_inputs(batch)).loss
    loss.backward()
    reference_loss = reference(**model_inputs(batch)).loss
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=1e-5)
    ours = {
        n.removeprefix("full_model."): p.grad
        for n, p in model.named_parameters()
        if n.startswith("full_model.")
    }
    theirs = {n: p.grad for n, p in reference.named_parameters()}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-4, msg=name)


def test_lora_variant_with_full_weights_equals_plain_full_finetuning(arch):
    model, reference = full_pair(arch, variant="lora")
    assert model.full_weights is None and model.mixing is None
    assert_trains_as_plain_full_finetuning(model, reference)


def test_zero_theta_equals_plain_full_finetuning_and_the_copy_gets_no_gradient(arch):
    model, reference = full_pair(arch)
    zero_thetas(model)
    assert_trains_as_plain_full_finetuning(model, reference)
    copies = list(model.full_weights.parameters())
    assert copies and all(p.grad is None or not p.grad.any() for p in copies)


@pytest.mark.parametrize("variant", ["bitune", "no_mixing", "shared_weights", "naive_bidir"])
def test_at_initialisation_full_equals_peft_bitune_with_zero_adapters(arch, variant):
    """Both start from the base weights (LoRA's B is zero): the same loss and the same theta gradients."""
    full = get_bitune_model(tiny_model(arch), BituneConfig(variant=variant, finetune="full"))
    peft = get_bitune_model(tiny_model(arch), BituneConfig(variant=variant))
    batch = make_batch(LENGTHS, PROMPTS)
    losses = []
    for model in (full, peft):
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)
    if full.mixing is not None:
        for a, b in zip(full.mixing.parameters(), peft.mixing.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-4)


def test_a_step_trains_both_weight_sets_apart_and_every_parameter_gets_a_gradient():
    model, _ = full_pair("llama")
    model.train()
    copies = model.full_weights.state()
    last = "model.layers.2."
    assert f"{last}self_attn.k_proj.weight" in copies and "model.embed_tokens.weight" in copies
    assert not any(n.startswith(("lm_head", f"{last}self_attn.q_proj", f"{last}mlp")) for n in copies)
    # frozen: only the copies that cannot reach the cache (they run in the bidir decoder, as in the causal one)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    trained_copies = {f"full_weights.{model.full_weights.parameter_name(n)}" for n in copies}
    assert frozen and all(n.startswith("full_weights.decoder.") and n not in trained_copies for n in frozen)
    assert all(
        n.startswith((f"full_weights.decoder.{last[6:]}", "full_weights.decoder.norm")) for n in frozen
    )
    counts = model.trainable_parameter_counts()
    assert counts["weights causal"] == sum(p.numel() for p in model.full_model.parameters())
    assert counts["weights bidir"] == sum(p.numel() for p in copies.values()) and counts["mixing"] == 6
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**model_inputs(make_batch(LENGTHS, PROMPTS))).loss.backward()
    unused = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert not unused, (
        f"trainable parameters without a gradient (DDP would need find_unused_parameters): {unused}"
    )
    optimizer.step()
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if p.requires_grad)
    own = dict(model.full_model.named_parameters())
    assert all(not torch.equal(copies[n], own[n]) for n in copies)  # the two sets moved apart


def test_bf16_full_finetuning_keeps_the_thetas_fp32():
    base = tiny_model("llama").to(torch.bfloat16)
    model = get_bitune_model(base, BituneConfig(finetune="full"))
    assert {p.dtype for p in model.full_weights.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.mixing.parameters()} == {torch.float32}
    loss = model(**model_inputs(make_batch(LENGTHS, PROMPTS))).loss
    loss.backward()
    assert torch.isfinite(loss) and model.mixing.theta_k.grad.dtype == torch.float32


def trained_a_step(model: BituneModel) -> BituneModel:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**model_inputs(make_batch(LENGTHS, PROMPTS))).loss.backward()
    optimizer.step()
    return model.eval()


@pytest.mark.parametrize("shard", [False, True])
def test_saved_full_run_loads_to_the_same_model(tmp_path, monkeypatch, shard):
    if shard:  # several files and an index, as a large model is saved
        monkeypatch.setattr(full_weights_module, "MAX_SHARD_SIZE", 20_000)
    model = trained_a_step(full_pair("llama")[0])
    model.save_pretrained(tmp_path / "run")
    for side in ("causal", "bidir"):
        folder = tmp_path / "run" / side
        index = folder / "model.safetensors.index.json"
        assert index.is_file() == shard and (folder / "model.safetensors").is_file() != shard
        assert not (folder / "adapter_config.json").exists()
    if shard:
        assert len(json.loads(index.read_text())["weight_map"]) == len(model.full_weights.names)
    loaded = BituneModel.from_pretrained(tiny_model("llama"), tmp_path / "run")
    assert loaded.is_full and not any(p.requires_grad for p in loaded.parameters())
    batch = make_batch(LENGTHS, PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**model_inputs(batch)).loss, model(**model_inputs(batch)).loss)
    prompts = make_batch([8, 5], [8, 5], side="left")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(prompts["input_ids"], prompts["attention_mask"], **kwargs)
    assert torch.equal(loaded.generate(prompts["input_ids"], prompts["attention_mask"], **kwargs), expected)
    assert loaded.merge_for_inference()  # decoding runs the model's own (causal) weights
    assert torch.equal(loaded.generate(prompts["input_ids"], prompts["attention_mask"], **kwargs), expected)


def test_a_full_run_and_a_peft_run_do_not_load_into_each_other(tmp_path):
    full_pair("llama")[0].save_pretrained(tmp_path / "full")
    get_bitune_model(tiny_model("llama"), BituneConfig()).save_pretrained(tmp_path / "peft")
    peft = get_bitune_model(tiny_model("llama"), BituneConfig())
    with pytest.raises(ValueError, match="finetune='full'"):
        peft.load_trained_weights(tmp_path / "full")
    with pytest.raises(ValueError, match="finetune='peft'"):
        full_pair("llama")[0].load_trained_weights(tmp_path / "peft")


def test_finetune_must_be_peft_or_full():
    with pytest.raises(ValueError, match="finetune must be one of"):
        BituneConfig(finetune="partial")


def test_bitune_train_with_full_finetuning_resumes_and_its_run_loads_everywhere(tmp_path):
    path = write_run_config(tmp_path, "full")
    config = load_run_config(path, ["bitune.finetune=full"])
    run_dir = train(config)
    saved = full_trained_weights(run_dir)
    assert {k.split("/")[0] for k in saved} == {"causal", "bidir", "mixing"}
    initial = dict(tiny_model("llama").named_parameters())
    assert not torch.equal(
        saved["causal/model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"]
    )
    assert not torch.equal(
        saved["bidir/model.layers.0.mlp.up_proj.weight"], saved["causal/model.layers.0.mlp.up_proj.weight"]
    )

    interrupted = tmp_path / "interrupted"  # what a kill after the first checkpoint leaves
    shutil.copytree(run_dir, interrupted)
    for entry in ("checkpoint-8", "causal", "bidir", "mixing.safetensors", "bitune_config.json"):
        target = interrupted / entry
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    checkpoint = interrupted / "checkpoint-4"
    assert (checkpoint / "causal" / "model.safetensors").is_file() and (
        checkpoint / "bidir" / "model.safetensors"
    ).is_file()
    altered = (
        tmp_path / "altered"
    )  # the same, with one weight of the checkpoint changed: resuming must read it
    shutil.copytree(interrupted, altered)
    file = altered / "checkpoint-4" / "bidir" / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.k_proj.weight"] += 1.0
    save_file(tensors, file)
    overrides = ["bitune.finetune=full", f"training.output_dir={altered}"]
    assert not torch.equal(
        full_trained_weights(train(load_run_config(path, overrides), resume=True))[
            "bidir/model.layers.0.self_attn.k_proj.weight"
        ],
        saved["bidir/model.layers.0.self_attn.k_proj.weight"],
    )
    resumed = train(
        load_run_config(path, ["bitune.finetune=full", f"training.output_dir={interrupted}"]), resume=True
    )
    ours, theirs = full_trained_weights(resumed), saved
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)

    loaded = load_for_inference(str(run_dir))
    assert loaded.model.is_full and loaded.model.is_merged
    text = generate_text(loaded, [{"role": "user", "content": "reverse:abcdef"}], max_new_tokens=6)
    unmerged = load_for_inference(str(run_dir), merge=False)
    assert generate_text(unmerged, [{"role": "user", "content": "reverse:abcdef"}], max_new_tokens=6) == text
    with pytest.raises(ValueError, match="fully fine-tuned"):  # vLLM would need the weights, not a LoRA
        vllm_plan(loaded)
    card = (run_dir / "README.md").read_text()
    assert "full-finetuning" in card and "| fine-tuning | full" in card
