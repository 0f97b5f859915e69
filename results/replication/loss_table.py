"""First and last logged training loss per method and task (mean over seeds), from the runs' log.jsonl.

    python results/replication/loss_table.py runs/replication/downstream > results/replication/losses.md

The runs are the ones `bitune compare configs/replication/*.yaml` writes (runs/<task>/<method>/seed<k>/).
"""

import json
import statistics
import sys
from pathlib import Path


def losses(log: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [(row["step"], row["loss"], row.get("grad_norm", float("nan"))) for row in rows if "loss" in row]


def main(root: Path) -> None:
    print("| task | method | seeds | loss, first log (steps 1-5) | grad norm, first log | loss, last log |")
    print("|---|---|---|---|---|---|")
    for task in sorted(p for p in root.iterdir() if p.is_dir()):
        for method in sorted(p for p in task.iterdir() if p.is_dir()):
            curves = [losses(log) for log in sorted(method.glob("seed*/log.jsonl"))]
            curves = [curve for curve in curves if curve]
            if not curves:
                continue
            first = statistics.mean(curve[0][1] for curve in curves)
            norm = statistics.mean(curve[0][2] for curve in curves)
            last = statistics.mean(curve[-1][1] for curve in curves)
            print(f"| {task.name} | {method.name} | {len(curves)} | {first:.2f} | {norm:.1f} | {last:.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
