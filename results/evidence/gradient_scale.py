"""How large the adapters' gradient entries are after clipping, against the legacy optimiser's eps.

    python results/evidence/gradient_scale.py RUN_DIR [RUN_DIR ...] > results/evidence/gradient_scale.md

For every model a run saved (its snapshots after N updates and the final model), one gradient on the same
10 training rows (one update's worth, the first 10 of the carved ARC-Challenge training rows), split into
the mixing coefficients (thetas) and the adapters. Gradient clipping at 1.0 scales the whole gradient by
min(1, 1 / total norm), so when the thetas' gradient dominates the norm, the adapters' entries shrink with it.
The legacy ``AdamW`` divides by sqrt(uncorrected second moment) + 1e-6; for a steady gradient entry g the
uncorrected root second moment after t steps is sqrt(1 - 0.999^t) |g|, so eps dominates an entry when
sqrt(1 - 0.999^t) |g| < 1e-6: that entry's update shrinks by more than half (torch's AdamW: |g| < 1e-8).
One batch's gradient stands in for the second moment, so the fractions are estimates of scale, not exact.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

from bitune import BituneModel
from bitune.data import BituneCollator
from bitune.experiments.config import load_compare_config
from bitune.references import load_model
from bitune.training.trainer import training_data

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "evidence" / "arc_challenge.yaml"
ROWS = 10
BETA2 = 0.999


def saved_models(run_dir: Path) -> list[tuple[int, Path]]:
    """(updates, directory) of the snapshots and the final model, in order of updates."""
    found = [(int(d.name.split("-")[1]), d) for d in (run_dir / "snapshots").glob("step-*")]
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
    if checkpoints:
        found.append((int(checkpoints[-1].name.split("-")[1]), run_dir))
    return sorted(found)


def gradient_scale(model: BituneModel, batch: dict, updates: int) -> dict[str, float]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    thetas, adapters = [], []
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None:
            (thetas if "theta" in name else adapters).append(param.grad.detach().flatten())
    adapter = torch.cat(adapters)
    theta = torch.cat(thetas) if thetas else torch.zeros(0)
    total = math.hypot(adapter.norm().item(), theta.norm().item())
    clip = min(1.0, 1.0 / total)
    clipped = adapter.abs() * clip
    root = math.sqrt(1 - BETA2 ** max(updates, 1))  # sqrt(1 - b2^t): the uncorrected moment's scale
    return {
        "total": total,
        "theta": theta.norm().item(),
        "adapter": adapter.norm().item(),
        "clip": clip,
        "rms": clipped.pow(2).mean().sqrt().item(),
        "legacy_eps_dominates": (root * clipped < 1e-6).float().mean().item(),
        "torch_eps_dominates": (clipped < 1e-8).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run directories of configs/evidence/arc_challenge*.yaml"
    )
    args = parser.parse_args()
    run_config = load_compare_config(CONFIG).run_config("bitune", 42, "arc_challenge")
    _, tokenizer = load_model(run_config.model.name, dtype=torch.float32)
    with contextlib.redirect_stdout(sys.stderr):  # the data report, not part of the table
        rows = training_data(run_config, tokenizer)[0][:ROWS]
    batch = BituneCollator(tokenizer.pad_token_id)(rows)
    print(
        "| run | updates | grad norm | thetas | adapters | clip factor | adapter RMS after clip | "
        "entries eps dominates, legacy | same, torch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for run_dir in args.runs:
        name = "/".join(run_dir.resolve().parts[-2:])
        for updates, directory in saved_models(run_dir):
            base, _ = load_model(run_config.model.name, dtype=torch.float32)  # adapters go into the base
            model = BituneModel.from_pretrained(base, directory, is_trainable=True)
            s = gradient_scale(model, batch, updates)
            print(
                f"| {name} | {updates} | {s['total']:.3g} | {s['theta']:.3g} | {s['adapter']:.3g} | "
                f"{s['clip']:.3g} | {s['rms']:.2e} | {100 * s['legacy_eps_dominates']:.0f} % | "
                f"{100 * s['torch_eps_dominates']:.0f} % |",
                flush=True,
            )
            del model, base
    print(
        f"\nOne gradient per saved model on the first {ROWS} carved ARC-Challenge training rows; "
        f"`python {Path(__file__).relative_to(ROOT)} {' '.join(str(r) for r in args.runs)}`.",
    )


if __name__ == "__main__":
    main()
