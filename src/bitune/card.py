"""Model cards: the ``README.md`` of a run directory, with Hugging Face metadata (``base_model``,
``library_name: bitune``, tags) and what a reader needs: the base model, the variant, the PEFT config, the
data and its prompt format, the hyperparameters, the final mixing ratio of every layer, evaluation results
when the run has them, and how to load, evaluate, chat with and serve it.

Written when training ends and again when ``bitune eval`` scores the run; `push_files` lists what
``bitune push`` uploads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from omegaconf import OmegaConf

from .data import PromptFormat
from .layout import EVAL_DIR, RUN_CONFIG
from .method.mixing import mixing_ratio
from .method.saving import MIXING_NAME, read_bitune_config
from .references import PACKAGED_MODELS, is_hub_id

CARD_NAME = "README.md"


def mixing_ratios(directory: str | Path, theta_init: float) -> dict[str, list[float]]:
    """The per-layer bidirectional-to-causal ratios saved in ``directory`` (empty without mixing)."""
    path = Path(directory) / MIXING_NAME
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    thetas = load_file(str(path))
    return {kind: mixing_ratio(thetas[f"theta_{kind}"], theta_init).tolist() for kind in ("k", "v")}


def write_model_card(run_dir: str | Path) -> Path:
    """(Re)write ``README.md`` in a saved Bitune model directory; returns its path."""
    run_dir = Path(run_dir)
    meta = read_bitune_config(run_dir)
    method = meta["bitune"]
    base = meta.get("base_model_name_or_path") or "unknown"
    packaged = PACKAGED_MODELS.get(base)
    run = _read_yaml(run_dir / RUN_CONFIG)
    fmt = PromptFormat.load(run_dir) or PromptFormat("paper")
    full = method.get("finetune") == "full"
    peft = {} if full else method.get("peft_config", {})
    tuning = ["full-finetuning"] if full else ["peft", str(peft.get("peft_type", "")).lower()]
    tags = ["bitune", *tuning, method["variant"], "text-generation"]
    hub_base = packaged.hub_id if packaged else (base if is_hub_id(base) else None)
    data = ModelCardData(
        base_model=hub_base,
        library_name="bitune",
        pipeline_tag="text-generation",
        tags=[t for t in dict.fromkeys(tags) if t],
    )
    sections = [
        f"# Bitune fine-tune of {base}",
        _overview(base, packaged, method, peft, fmt),
        _hyperparameters(run),
        _ratios(run_dir, method),
        _evaluation(run_dir),
        _usage(run_dir.name, base),
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n")
    path = run_dir / CARD_NAME
    card.save(str(path))
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}


def _overview(base: str, packaged, method: dict, peft: dict, fmt: PromptFormat) -> str:
    source = f" (packaged copy of {packaged.upstream}, dequantized to fp32)" if packaged else ""
    lines = [
        "Trained with [bitune](https://arxiv.org/abs/2405.14862) (Bitune: bidirectional instruction-tuning): the "
        "prompt is read twice, causally and bidirectionally, with two adapters (two sets of weights under full "
        "fine-tuning); the two KV caches are mixed per layer with learnable coefficients, and the answer is "
        "generated causally from the mixed cache.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}`{source} |",
        f"| variant | `{method['variant']}` (second pass: `{method.get('second_pass_mask')}`) |",
        f"| mixing init | theta_init {method.get('theta_init')}, alpha_init {method.get('alpha_init', 0.5)} |",
        f"| PEFT | `{peft.get('peft_type')}` r={peft.get('r')}, alpha={peft.get('lora_alpha')}, "
        f"modules={peft.get('target_modules')} |"
        if peft
        else "| fine-tuning | full: the model's own weights (causal side) and a second copy (bidirectional side) |",
        f"| prompt format | `{fmt.template}` (turns: `{fmt.turns}`) |",
    ]
    return "\n".join(lines)


def _hyperparameters(run: dict) -> str:
    if not run:
        return ""
    training, data = run.get("training", {}), run.get("data", {})
    keys = ("learning_rate", "optimizer", "max_steps", "num_epochs", "batch_size", "gradient_accumulation_steps",
            "warmup_ratio", "lr_scheduler", "weight_decay", "max_grad_norm", "seed")  # fmt: skip
    rows = [
        f"| data | `{data.get('train')}` (source {data.get('source')}, max_length {data.get('max_length')}) |"
    ]
    rows += [f"| {k} | {training[k]} |" for k in keys if k in training]
    return "## Training\n\n| | |\n|---|---|\n" + "\n".join(rows)


def _ratios(run_dir: Path, method: dict) -> str:
    ratios = mixing_ratios(run_dir, float(method.get("theta_init", 0.01)))
    if not ratios:
        return ""
    header = "| layer | " + " | ".join(str(i) for i in range(len(ratios["k"]))) + " |"
    rule = "|---|" + "---|" * len(ratios["k"])
    rows = [
        f"| {kind.upper()} | " + " | ".join(f"{100 * a:.0f}" for a in ratios[kind]) + " |"
        for kind in ("k", "v")
    ]
    return (
        "## Final mixing ratios\n\nBidirectional share (%) of each layer's keys and values:\n\n"
        + "\n".join([header, rule, *rows])
    )


def _evaluation(run_dir: Path) -> str:
    path = run_dir / EVAL_DIR / "results.json"
    if not path.is_file():
        return ""
    scores = json.loads(path.read_text()).get("scores", {})
    rows = [
        f"| {task} | {s.get('metric', 'acc')} | {100 * s['acc']:.1f} | {s.get('n')} |"
        for task, s in scores.items()
    ]
    return (
        "## Evaluation (`bitune eval`)\n\n| task | metric | score (%) | n |\n|---|---|---|---|\n"
        + "\n".join(rows)
    )


def _usage(name: str, base: str) -> str:
    return f"""## Use

```bash
pip install bitune
bitune chat {name}                      # a directory, or the hub id this card is published under
bitune generate {name} "Your question"
bitune eval {name} --tasks arc_challenge
bitune serve {name} --port 8000         # OpenAI-compatible API
```

```python
from bitune import BituneModel
from bitune.references import load_model, resolve_run

base, tokenizer = load_model("{base}")
model = BituneModel.from_pretrained(base, resolve_run("{name}"))  # a hub id is downloaded first
```"""


PUSHED = ("bitune_config.json", "mixing.safetensors", "prompt_format.json", CARD_NAME, RUN_CONFIG)


def push_files(run_dir: str | Path) -> list[str]:
    """The files of a run that ``bitune push`` uploads: the trained model (adapters, mixing coefficients,
    config), its prompt format, model card and run config; never checkpoints, logs or base weights."""
    run_dir = Path(run_dir)
    meta = read_bitune_config(run_dir)
    files = [name for name in PUSHED if (run_dir / name).is_file()]
    for adapter in meta["adapters"]:
        files += sorted(
            p.relative_to(run_dir).as_posix() for p in (run_dir / adapter).rglob("*") if p.is_file()
        )
    return files


def push(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload `push_files` of a run to the Hugging Face hub repo ``repo_id``; returns its URL."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    write_model_card(run_dir)
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(run_dir), repo_id=repo_id, allow_patterns=push_files(run_dir))
    return f"https://huggingface.co/{repo_id}"
