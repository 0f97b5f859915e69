"""Tiny random decoders of several families, built in process (no downloads), and batch helpers."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from bitune import BituneConfig, get_bitune_model
from bitune.method.adapters import adapter_parameters

# The vLLM tests run in vLLM's own environment (`make test-vllm`); this one has no vLLM to import.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["serving/test_vllm.py"]

VOCAB = 96
PAD, BOS, EOS = 0, 1, 2
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
    attention_dropout=0.0,
)
# Per family: what makes it a distinct test case. Windows (4) are shorter than the test prompts.
ARCHITECTURES = {
    "llama": {},
    "mistral": dict(sliding_window=4),  # every layer slides
    "qwen2": {},
    "qwen3": dict(head_dim=8),  # q/k norms
    "gemma3_text": dict(  # sliding + full layers, pre/post norms, tied embeddings, BOS
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "phi3": dict(num_key_value_heads=4),  # fused qkv_proj and gate_up_proj
    "gemma2": dict(head_dim=8, sliding_window=4),  # eager attention, logit soft-capping
    "stablelm": {},  # drops is_causal=False: its bidirectional passes get explicit 4D masks
    "gpt2": dict(  # Conv1D layers, learned absolute positions
        n_embd=32, n_layer=3, n_head=4, n_positions=128, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
    ),
}
ARCH_NAMES = list(ARCHITECTURES)
VARIANTS = ["bitune", "naive_bidir", "no_mixing", "only_causal", "shared_weights", "lora"]
# merged for inference, these prefill inside a decoding step (not: sliding-window caches, eager attention)
JOINS = {"mistral": False, "gemma3_text": False, "gemma2": False}


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded 3-layer random model of family ``arch`` in eval mode, fp32, on CPU."""
    config = AutoConfig.for_model(arch, **{**_COMMON, **ARCHITECTURES.get(arch, {}), **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def randomize_adapters(model, seed: int = 1, std: float = 0.3) -> None:
    """Give every adapter weight a random value so adapters differ from each other and from zero-init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_parameters(model.peft_model, model.bitune_config.adapter_names).values():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def bitune_pair(arch: str, variant: str = "bitune", randomize: bool = True, **config_kwargs):
    """(BituneModel, untouched copy of its base model) for one family."""
    base = tiny_model(arch)
    reference_base = copy.deepcopy(base)
    model = get_bitune_model(base, BituneConfig(variant=variant, **config_kwargs))
    if randomize:
        randomize_adapters(model)
    return model, reference_base


def plain_peft(reference_base, model, adapter: str = "causal"):
    """A plain PEFT model on ``reference_base`` carrying a copy of one adapter of the Bitune model."""
    peft_model = get_peft_model(
        reference_base, copy.deepcopy(model.adapter_configs[adapter]), adapter_name=adapter
    )
    weights = get_peft_model_state_dict(model.peft_model, adapter_name=adapter)
    set_peft_model_state_dict(peft_model, weights, adapter_name=adapter)
    return peft_model


# A batch of three rows of different lengths and prompt lengths, used by most model tests.
LENGTHS, PROMPTS = [13, 9, 11], [7, 4, 9]


def row_starts(lengths, side: str = "right", width: int | None = None) -> list[int]:
    """The first real column of each row of `make_batch` (the same arguments)."""
    width = width or max(lengths)
    return [0 if side == "right" else width - length for length in lengths]


def model_inputs(batch: dict) -> dict:
    """The entries of a batch that ``BituneModel.forward`` takes (all of `make_batch`'s)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "prompt_lengths") if k in batch}


def make_batch(lengths, prompt_lengths, side: str = "right", seed: int = 0, width: int | None = None):
    """Random rows of ``lengths`` real tokens padded on ``side``; labels are -100 on prompt and padding.

    Returns:
        dict with input_ids, attention_mask, labels and prompt_lengths (what the collator gives).
    """
    generator = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (length, prompt, start) in enumerate(
        zip(lengths, prompt_lengths, row_starts(lengths, side, width), strict=True)
    ):
        row = torch.randint(3, VOCAB, (length,), generator=generator)
        ids[i, start : start + length] = row
        mask[i, start : start + length] = 1
        labels[i, start + prompt : start + length] = row[prompt:]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "prompt_lengths": torch.tensor(prompt_lengths),
    }


def moved_thetas(model) -> None:
    """Mixing coefficients away from their initial value, different per layer (K and V)."""
    if model.mixing is not None:
        with torch.no_grad():
            model.mixing.theta_k.copy_(torch.linspace(0.002, 0.05, model.mixing.num_layers))
            model.mixing.theta_v.copy_(torch.linspace(0.04, 0.003, model.mixing.num_layers))


def merged_copy(model):
    """A copy of ``model`` merged for inference."""
    merged = copy.deepcopy(model)
    assert merged.merge_for_inference() and merged.is_merged
    return merged


def assert_same_start(model, ours, theirs) -> None:
    """Two `bitune.method.joining.Started` batches give the same first logits and, from their caches, the same next logits."""
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    assert ours.attention_mask.equal(theirs.attention_mask)
    mask = torch.cat([ours.attention_mask, torch.ones_like(ours.attention_mask[:, :1])], dim=1)
    chosen = ours.logits.argmax(-1)[:, None]
    after = [model.decode(s.cache, chosen, mask, s.positions) for s in (ours, theirs)]
    torch.testing.assert_close(after[0], after[1], atol=1e-5, rtol=1e-5)


def zero_thetas(model) -> None:
    with torch.no_grad():
        model.mixing.theta_k.zero_()
        model.mixing.theta_v.zero_()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer over the tiny vocabulary: token i is the ASCII character 32 + i."""
    vocab = {chr(32 + i): i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="#"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=chr(32 + PAD), eos_token=chr(32 + EOS))


@pytest.fixture(params=ARCH_NAMES)
def arch(request) -> str:
    return request.param


def tiny_run_files(directory, rows: int = 48, arch: str = "llama"):
    """A saved tiny model (with the character tokenizer) and a prompt/completion JSONL file in
    ``directory``, for end-to-end training tests. Returns (model_dir, data_file)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    model_dir = directory / "tiny-model"
    tiny_model(arch).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = []
    for _ in range(rows):
        word = "".join(letters[int(i)] for i in torch.randint(0, 26, (6,), generator=generator))
        lines.append(json.dumps({"prompt": f"reverse:{word}", "completion": word[::-1]}))
    data_file = directory / "train.jsonl"
    data_file.write_text("\n".join(lines) + "\n")
    return model_dir, data_file


def write_run_config(directory, name: str = "run", **training):
    """A run config (JSON is YAML) training a tiny model on `tiny_run_files` into ``directory/name``;
    ``training`` overrides the defaults below. Returns the config's path."""
    import json
    from pathlib import Path

    directory = Path(directory)
    model_dir, data_file = tiny_run_files(directory)
    settings = {
        "output_dir": str(directory / name),
        "learning_rate": 0.01,
        "max_steps": 8,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "save_steps": 4,
        "logging_steps": 2,
        "save_total_limit": None,
        "report_to": ["none"],
        "seed": 3,
        **training,
    }
    config = {
        "model": {"name": str(model_dir)},
        "data": {"train": str(data_file), "max_length": 64},
        "training": settings,
    }
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


def free_port() -> int:
    """A TCP port free on this machine now, for a launched job's rendezvous (torchrun's default 29500
    would collide with another launch running at the same time)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_full_finetuning(path):
    """The run config at ``path`` with ``bitune.finetune: full`` (rewritten in place); returns ``path``."""
    import json

    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "bitune": {"finetune": "full"}}))
    return path


def trained_weights(run_dir) -> dict[str, torch.Tensor]:
    """Every trained tensor of a saved Bitune model (adapters and thetas), by file and name."""
    from pathlib import Path

    from safetensors.torch import load_file

    run_dir, weights = Path(run_dir), {}
    for name in ("causal", "bidir"):
        weights.update(
            {f"{name}/{k}": v for k, v in load_file(run_dir / name / "adapter_model.safetensors").items()}
        )
    weights.update({f"mixing/{k}": v for k, v in load_file(run_dir / "mixing.safetensors").items()})
    return weights


def full_trained_weights(run_dir) -> dict[str, torch.Tensor]:
    """Every trained tensor of a fully fine-tuned run (both weight sets and thetas), by file and name."""
    from pathlib import Path

    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    weights = {
        f"{f.parent.name}/{k}": v
        for f in sorted(run_dir.glob("*/model*.safetensors"))
        for k, v in load_file(f).items()
    }
    return weights | {f"mixing/{k}": v for k, v in load_file(run_dir / "mixing.safetensors").items()}


def grid_config(tmp_path, methods=None):
    """A compare config of a pretrained, a LoRA and a Bitune method over two seeds on a tiny model."""
    from bitune.experiments import load_compare_config

    model_dir, data_file = tiny_run_files(tmp_path)
    config = {
        "output_dir": str(tmp_path / "grid"),
        "run": {
            "model": {"name": str(model_dir)},
            "data": {"train": str(data_file), "max_length": 64},
            "training": {
                "max_steps": 4,
                "batch_size": 4,
                "gradient_accumulation_steps": 1,
                "learning_rate": 0.01,
                "save_steps": 2,
                "logging_steps": 2,
                "report_to": ["none"],
            },
        },
        "methods": methods or {"pretrained": None, "lora": {"bitune.variant": "lora"}, "bitune": {}},
        "seeds": [1, 2],
        "evaluation": {"tasks": ["arc_easy"], "limit": 6, "batch_size": 3},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(config))
    return load_compare_config(path)


# ------------------------------------------------------------------------------ fuzz example counts
_FUZZ_COUNTS: dict[str, int] = {}


def count_fuzz_example(name: str) -> None:
    """Count one example a fuzz test ran (reported at the end of the session)."""
    _FUZZ_COUNTS[name] = _FUZZ_COUNTS.get(name, 0) + 1


def pytest_terminal_summary(terminalreporter) -> None:
    if _FUZZ_COUNTS:
        terminalreporter.write_sep("-", "fuzzed examples tried")
        for name, count in sorted(_FUZZ_COUNTS.items()):
            terminalreporter.write_line(f"{count:6d}  {name}")
