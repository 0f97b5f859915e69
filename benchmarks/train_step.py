"""Training step time and peak memory of Bitune against the LoRA users run today, as ratios measured in
one run.

    python benchmarks/train_step.py                                   # both shapes, 64:64, 50:200, 200:50
    python benchmarks/train_step.py --shapes smollm2-135m --lengths 64:64 --repeats 7
    python benchmarks/train_step.py --no-memory                       # time only
    python benchmarks/train_step.py --sharding                        # DDP vs FSDP2 vs ZeRO-2/3, 2 processes

With ``--sharding``: ``bitune train`` of the packaged SmolLM2-135M-Instruct (real weights and shape) on 64
ARC-Easy rows, launched with ``configs/accelerate/ddp.yaml``, ``fsdp.yaml``, ``deepspeed_zero2.yaml`` and
``deepspeed_zero3.yaml`` on 2 processes (gloo on CPU), batch 2 per process, 12 updates; the Trainer's
``train_runtime`` (the same steps, data loading and logging in all) and the peak resident set of the
largest process, as ratios to DDP's.

Methods (benchmarks/shapes.py): ``hf_peft_lora`` (HF model + PEFT LoRA over the whole sequence, labels
-100 on the prompt), bitune's ``lora`` and ``bitune``, and ``bitune_recompute`` (``checkpoint_prompt_passes``);
same random-weight model and batch (4 rows), each in training mode as ``bitune train`` runs it. A
step is forward + backward + AdamW step. Steps of the methods are interleaved and medians taken, since
this machine is noisy; only ratios within one run mean anything. Peak memory is the peak resident set
(sampled every 2 ms) of a separate process per method during two steps (CPU: no allocator statistics),
reported as the total and as the part above the process's size just before training.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import METHODS, SHAPES, build, make_batch, random_model


def step_fn(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def time_steps(
    shape: str, prompt: int, answer: int, batch_size: int, repeats: int, methods: list[str]
) -> dict[str, float]:
    base = random_model(shape)
    batch = make_batch(batch_size, prompt, answer, base.config.vocab_size)
    steps = {}
    for method in methods:
        model = build(method, base).train()
        steps[method] = step_fn(model, batch)
        steps[method]()  # warm-up
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for method in methods:
            times[method].append(steps[method]())
    return {m: statistics.median(t) for m, t in times.items()}


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def memory_child(shape: str, method: str, prompt: int, answer: int, batch_size: int) -> None:
    base = random_model(shape)
    model = build(method, base).train()
    del base
    batch = make_batch(batch_size, prompt, answer, model.config.vocab_size)
    step = step_fn(model, batch)
    before = rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # the resident set, every 2 ms, while the steps run
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    step()
    done.set()
    sampler.join()
    print(json.dumps({"peak_mb": peak[0], "training_mb": peak[0] - before}))


def measure_memory(
    shape: str, prompt: int, answer: int, batch_size: int, methods: list[str]
) -> dict[str, dict[str, float]]:
    out = {}
    for method in methods:
        args = [
            sys.executable,
            __file__,
            "--memory-child",
            shape,
            method,
            str(prompt),
            str(answer),
            str(batch_size),
        ]
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        out[method] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def sharded_run(launcher: str, directory: Path) -> dict[str, float]:
    """One ``accelerate launch`` of ``bitune train`` (from a child process, so its peak is its own)."""
    repo = Path(__file__).resolve().parents[1]
    config = {
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"train": "arc_easy", "limit": 64, "max_length": 256},
        "training": {
            "output_dir": str(directory / launcher),
            "max_steps": 12,
            "batch_size": 2,
            "gradient_accumulation_steps": 1,
            "save_steps": 1000,
            "logging_steps": 4,
            "report_to": ["none"],
        },
    }
    path = directory / f"{launcher}.yaml"
    path.write_text(json.dumps(config))
    if launcher == "ddp":  # ddp.yaml's settings as flags: the launcher the tests run on CPU
        how = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        how = ["--config_file", str(repo / "configs" / "accelerate" / f"{launcher}.yaml")]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2"]
    launch += ["-m", "bitune", "train", str(path)]
    child = (
        "import json, resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(json.dumps(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))"
    )
    done = subprocess.run([sys.executable, "-c", child, *launch], cwd=repo, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{launcher}: {done.stderr[-2000:]}")
    state = json.loads((directory / launcher / "trainer_state.json").read_text())
    runtime = next(r["train_runtime"] for r in state["log_history"] if "train_runtime" in r)
    return {"seconds": runtime, "peak_mb": float(done.stdout.strip().splitlines()[-1])}


LAUNCHERS = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")  # DDP first: the baseline of the ratios


def compare_sharding(repeats: int, launchers: list[str]) -> None:
    import tempfile

    print(f"2 processes, SmolLM2-135M-Instruct, 12 updates of 2 x 2 rows, {repeats} runs each (medians)")
    runs = {"ddp": [], **{launcher: [] for launcher in launchers}}
    for _ in range(repeats):
        for launcher in runs:  # interleaved: the machine's noise falls on both
            with tempfile.TemporaryDirectory() as directory:
                runs[launcher].append(sharded_run(launcher, Path(directory)))
    cells = {
        k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_mb")} for k, v in runs.items()
    }
    print("| launcher | train_runtime [s] | peak RSS per process [MB] | time / DDP | memory / DDP |")
    print("|---|---|---|---|---|")
    for launcher, c in cells.items():
        t, m = c["seconds"] / cells["ddp"]["seconds"], c["peak_mb"] / cells["ddp"]["peak_mb"]
        print(f"| {launcher} | {c['seconds']:.1f} | {c['peak_mb']:.0f} | {t:.3f} | {m:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--lengths", nargs="+", default=["64:64", "50:200", "200:50"], help="prompt:answer")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method (after one warm-up)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument(
        "--sharding", action="store_true", help="DDP vs sharded launchers, 2 processes (see above)"
    )
    parser.add_argument(
        "--launchers",
        nargs="+",
        default=list(LAUNCHERS[1:]),
        choices=list(LAUNCHERS[1:]),
        help="with --sharding: the launchers measured against DDP",
    )
    args = parser.parse_args()
    if args.sharding:
        compare_sharding(args.repeats, args.launchers)
        return
    if args.memory_child:
        shape, method, prompt, answer, batch = args.memory_child
        memory_child(shape, method, int(prompt), int(answer), int(batch))
        return

    methods = ["hf_peft_lora", *(m for m in args.methods if m != "hf_peft_lora")]
    print(
        f"batch={args.batch} repeats={args.repeats} threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    others = methods[1:]
    header = ["shape", "prompt:answer", *(f"{m} [s]" for m in methods), *(f"{m} / hf" for m in others)]
    if not args.no_memory:
        header += [*(f"peak MB {m}" for m in methods), *(f"peak {m} / hf" for m in others)]
        header += [f"training MB {m}" for m in methods]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for shape in args.shapes:
        for lengths in args.lengths:
            prompt, answer = (int(x) for x in lengths.split(":"))
            t = time_steps(shape, prompt, answer, args.batch, args.repeats, methods)
            cells = [shape, lengths, *(f"{t[m]:.3f}" for m in methods)]
            cells += [f"{t[m] / t['hf_peft_lora']:.3f}" for m in others]
            if not args.no_memory:
                mem = measure_memory(shape, prompt, answer, args.batch, methods)
                cells += [f"{mem[m]['peak_mb']:.0f}" for m in methods]
                cells += [f"{mem[m]['peak_mb'] / mem['hf_peft_lora']['peak_mb']:.3f}" for m in others]
                cells += [f"{mem[m]['training_mb']:.0f}" for m in methods]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
