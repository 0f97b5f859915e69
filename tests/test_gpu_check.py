"""benchmarks/gpu_check.py, the check prepared for a GPU machine, runs on CPU on its tiny shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_its_tiny_shape_on_cpu_and_writes_every_figure(tmp_path):
    out = tmp_path / "check.json"
    command = [sys.executable, "benchmarks/gpu_check.py", "--shapes", "tiny-llama", "--steps", "1"]
    command += ["--decode", "3", "--rows", "2", "--prompt", "12", "--answer", "6", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["dtype"] == "torch.float32"
    (run,) = results["runs"]
    assert "error" not in run, run
    for method in ("hf_peft_lora", "bitune"):
        figures = run[method]
        assert figures["losses_finite"] and figures["peak_memory_mb"] is None  # no allocator stats on CPU
        assert all(figures[k] > 0 for k in ("train_step_s", "prefill_s", "decode_step_s"))
    assert run["bitune"]["thetas_fp32"]
    assert run["bitune"]["trainable_parameters"] > run["hf_peft_lora"]["trainable_parameters"]  # two adapters
    assert set(run["ratios"]) == {"train_step_s", "prefill_s", "decode_step_s"}
