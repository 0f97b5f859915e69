"""Multiple-choice evaluation time: Bitune's lm-eval model type against lm-eval's `hf` model with the
PEFT adapter, on the same model, tasks and questions, in one process.

    python benchmarks/eval_time.py                       # SmolLM2-135M-Instruct (packaged), ARC-Challenge + PIQA
    python benchmarks/eval_time.py --limit 100 --repeats 3

lm-eval's `hf` model runs prompt + choice through the model once per choice; `bitune` prefills each prompt
once (its two prompt passes) and scores all choices from that cache in one batched pass. Prints the
median wall time of each and the ratio bitune / hf+peft per task.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from bitune import BituneConfig, get_bitune_model
from bitune.evaluation.harness import TASKS_DIR, BituneLM
from bitune.references import load_model, packaged_model_path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tasks", nargs="+", default=["arc_challenge", "piqa"])
    parser.add_argument("--limit", type=int, default=60, help="questions per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    base_path = str(packaged_model_path(args.model))
    run_dir = tempfile.mkdtemp(prefix="bitune-bench-")
    base, _ = load_model(args.model)
    get_bitune_model(base, BituneConfig()).save_pretrained(run_dir)  # cost does not depend on the weights
    models = {
        "hf+peft": HFLM(
            pretrained=base_path, peft=f"{run_dir}/causal", device="cpu", batch_size=args.batch_size
        ),
        "bitune": BituneLM(pretrained=base_path, bitune=run_dir, batch_size=args.batch_size),
    }
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    times = {(m, t): [] for m in models for t in args.tasks}
    accuracy = {}
    for _ in range(args.repeats):
        for task in args.tasks:
            for name, lm in models.items():
                start = time.perf_counter()
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[f"bitune_{task}_packaged"], limit=args.limit, task_manager=manager
                )
                times[(name, task)].append(time.perf_counter() - start)
                accuracy[(name, task)] = out["results"][f"bitune_{task}_packaged"]["acc,none"]
    print(f"model={args.model} limit={args.limit} batch_size={args.batch_size} repeats={args.repeats}")
    print("| task | hf+peft [s] | bitune [s] | ratio bitune / hf+peft | acc hf+peft | acc bitune |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        hf, bt = (statistics.median(times[(m, task)]) for m in ("hf+peft", "bitune"))
        print(
            f"| {task} | {hf:.1f} | {bt:.1f} | {bt / hf:.2f} | {accuracy[('hf+peft', task)]:.3f} "
            f"| {accuracy[('bitune', task)]:.3f} |"
        )


if __name__ == "__main__":
    main()
