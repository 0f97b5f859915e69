"""Writes the YAML configs of the paper's experiments (appendix 6.2, Tables 7-10) into configs/paper/.

    python configs/paper/generate.py        # regenerates every file; tests check they are up to date

Each file opens with the command that runs it. Models are the paper's hub ids (online); data are the
paper's hub datasets (appendix Table 11). Shared settings (Table 7): AdamW, linear schedule, warmup 10% of
updates, weight decay 0, batch 10 (micro-batch 1 x accumulation 10, as the authors ran), seeds 42/43/44.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MODELS = {  # name -> hub id, feed-forward module names (IA3), downstream learning rate (Table 9)
    "gemma-2b": ("google/gemma-2b", ["gate_proj", "up_proj", "down_proj"], 1e-3),
    "gemma-7b": ("google/gemma-7b", ["gate_proj", "up_proj", "down_proj"], 3e-4),
    "llama2-7b": ("meta-llama/Llama-2-7b-hf", ["gate_proj", "up_proj", "down_proj"], 1e-3),
    "llama3-8b": ("meta-llama/Meta-Llama-3-8B", ["gate_proj", "up_proj", "down_proj"], 1e-3),
    "phi-2": ("microsoft/phi-2", ["fc1", "fc2"], 1e-3),
}
DOWNSTREAM_STEPS = {"piqa": 1605, "arc_challenge": 555, "csqa": 974, "siqa": 3341, "gsm8k": 747}  # Table 8
ABLATION_MODELS = ("gemma-2b", "llama3-8b")  # Tables 3-5
LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 1, "lora_dropout": 0.0, "target_modules": "all-linear"}


def run(model: str, train: str, steps: int, lr: float, output: str, **bitune) -> dict:
    return {
        "model": {"name": MODELS[model][0], "dtype": "auto"},
        "bitune": bitune,
        "data": {"train": train, "source": "hub", "max_length": 512},
        "training": {
            "output_dir": f"runs/paper/{output}/seed42",
            "learning_rate": lr,
            "max_steps": steps,
            "batch_size": 1,
            "gradient_accumulation_steps": 10,
            "warmup_ratio": 0.1,
            "weight_decay": 0.0,
            "seed": 42,
            "save_steps": 100,
        },
    }


def files() -> dict[str, dict]:
    out = {}
    for model in MODELS:
        base = f"instruct/{model}"
        out[f"{base}/bitune.yaml"] = run(
            model, "ultrafeedback", 3000, 3e-4, f"{base}/bitune", variant="bitune"
        )
        out[f"{base}/lora.yaml"] = run(model, "ultrafeedback", 3000, 3e-4, f"{base}/lora", variant="lora")
        out[f"{base}/lora_r16.yaml"] = run(
            model, "ultrafeedback", 3000, 3e-4, f"{base}/lora_r16", variant="lora", peft={**LORA, "r": 16}
        )
        for task, steps in DOWNSTREAM_STEPS.items():
            lr = MODELS[model][2]
            for variant in ("bitune", "lora"):
                name = f"downstream/{task}/{model}/{variant}"
                out[f"{name}.yaml"] = run(model, task, steps, lr, name, variant=variant)
    ablations = {
        "naive_bidir": {"variant": "naive_bidir"},
        "no_mixing": {"variant": "no_mixing"},
        "only_causal": {"variant": "only_causal"},
        "shared_weights": {"variant": "shared_weights"},
        "anti_causal": {"variant": "bitune", "second_pass_mask": "anti_causal"},
        "theta_init_0.1": {"variant": "bitune", "theta_init": 0.1},
        "theta_init_0.001": {"variant": "bitune", "theta_init": 0.001},
    }
    for model in ABLATION_MODELS:
        for name, method in ablations.items():
            path = f"ablations/{model}/{name}"
            out[f"{path}.yaml"] = run(model, "ultrafeedback", 3000, 3e-4, path, **method)
        ia3 = {"peft_type": "IA3", "target_modules": "all-linear", "feedforward_modules": MODELS[model][1]}
        peft = {
            "dora": ("lora", {**LORA, "use_dora": True}, 3e-4),
            "bitune_dora": ("bitune", {**LORA, "use_dora": True}, 3e-4),
            "ia3": ("lora", ia3, 1e-3),
            "bitune_ia3": ("bitune", ia3, 1e-3),
        }
        for name, (variant, config, lr) in peft.items():
            path = f"peft/{model}/{name}"
            out[f"{path}.yaml"] = run(model, "ultrafeedback", 3000, lr, path, variant=variant, peft=config)
    return out


def compare_files() -> dict[str, dict]:
    """One `bitune compare` grid per table of the paper and model, over seeds 42-44."""
    seeds = [42, 43, 44]
    zero_shot = {"tasks": ["piqa", "arc_challenge", "csqa", "siqa", "mmlu"], "source": "hub"}

    def grid(name: str, model: str, lr: float, methods: dict, **extra) -> dict:
        base = run(model, "ultrafeedback", 3000, lr, f"compare/{name}")
        del base["bitune"], base["training"]["output_dir"], base["training"]["seed"]
        return {
            "output_dir": f"runs/paper/compare/{name}",
            "run": base,
            "methods": methods,
            "seeds": seeds,
            "evaluation": zero_shot,
            **extra,
        }

    lora, bitune = {"bitune.variant": "lora"}, {"bitune.variant": "bitune"}
    out = {}
    for model in MODELS:
        out[f"compare/table1_{model}.yaml"] = grid(
            f"table1_{model}",
            model,
            3e-4,
            {
                "pretrained": None,
                "lora": lora,
                "lora_r16": {**lora, "bitune.peft": {**LORA, "r": 16}},
                "bitune": bitune,
            },
        )
        downstream = grid(f"table2_{model}", model, MODELS[model][2], {"lora": lora, "bitune": bitune})
        downstream["tasks"] = list(DOWNSTREAM_STEPS)
        downstream["task_overrides"] = {t: {"training.max_steps": n} for t, n in DOWNSTREAM_STEPS.items()}
        downstream["evaluation"] = {"source": "hub", "tasks": ["piqa"]}
        out[f"compare/table2_{model}.yaml"] = downstream
    for model in ABLATION_MODELS:
        variants = {
            v: {"bitune.variant": v} for v in ("naive_bidir", "no_mixing", "only_causal", "shared_weights")
        }
        out[f"compare/table3_{model}.yaml"] = grid(
            f"table3_{model}", model, 3e-4, {"lora": lora, **variants, "bitune": bitune}
        )
        ia3 = {"peft_type": "IA3", "target_modules": "all-linear", "feedforward_modules": MODELS[model][1]}
        dora = {**LORA, "use_dora": True}
        peft = {
            "lora": lora,
            "bitune": bitune,
            "dora": {**lora, "bitune.peft": dora},
            "bitune_dora": {**bitune, "bitune.peft": dora},
            "ia3": {**lora, "bitune.peft": ia3, "training.learning_rate": 1e-3},
            "bitune_ia3": {**bitune, "bitune.peft": ia3, "training.learning_rate": 1e-3},
        }
        out[f"compare/table4_{model}.yaml"] = grid(f"table4_{model}", model, 3e-4, peft)
        table5 = {
            **{f"theta_init_{t}": {**bitune, "bitune.theta_init": t} for t in (0.1, 0.01, 0.001)},
            **{
                f"second_pass_{m}": {**bitune, "bitune.second_pass_mask": m}
                for m in ("causal", "anti_causal")
            },
        }
        out[f"compare/table5_{model}.yaml"] = grid(f"table5_{model}", model, 3e-4, table5)
    return out


def render(path: str, config: dict) -> str:
    if path.startswith("compare/"):
        return (
            f"# bitune compare configs/paper/{path}\n# (generated by configs/paper/generate.py)\n"
            + yaml.safe_dump(config, sort_keys=False)
        )
    seed43 = config["training"]["output_dir"].replace("seed42", "seed43")
    header = (
        f"# bitune train configs/paper/{path}\n"
        f"# other seeds: bitune train configs/paper/{path} training.seed=43 training.output_dir={seed43}\n"
        "# (generated by configs/paper/generate.py)\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def main() -> None:
    for path, config in {**files(), **compare_files()}.items():
        target = HERE / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(path, config))


if __name__ == "__main__":
    main()
