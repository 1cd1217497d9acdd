"""Compare two `omnidiff eval` runs of one checkpoint side by side: each task's headline metric and the run time.

For checking a faster sampler preset against the one it replaces (docs/inference.md, "Fast sampling"):

    omnidiff eval --checkpoint $CK --data $TEST --classifier-train-data $TRAIN --preset project --out /tmp/ev-plain
    omnidiff eval --checkpoint $CK --data $TEST --classifier-train-data $TRAIN --preset fast    --out /tmp/ev-fast
    python scripts/compare_eval.py /tmp/ev-plain /tmp/ev-fast

(A finished demo run: `python -m demo.compare runs/demo`, which uses the demo's own sampler settings.)

Prints one line per task: the metric (`Task.metric`: class_accuracy for images, exact_match otherwise) of each
run, their difference, and each run's wall time in seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.tasks import TASKS, spec


def load(folder: str) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; pass the --out folder of an `omnidiff eval` run")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="each task's headline metric in two eval runs, side by side")
    p.add_argument("a", help="the --out folder of the first run (e.g. --preset demo)")
    p.add_argument("b", help="the --out folder of the second run (e.g. --preset demo-fast)")
    args = p.parse_args(argv)
    a, b = load(args.a), load(args.b)
    print(f"{'task':6} {'metric':15} {'A':>8} {'B':>8} {'B - A':>8}")
    for task in TASKS:
        if task not in a["tasks"] or task not in b["tasks"]:
            continue
        metric = spec(task).metric
        x, y = a["tasks"][task].get(metric), b["tasks"][task].get(metric)
        diff = f"{y - x:+8.3f}" if x is not None and y is not None else f"{'-':>8}"
        print(f"{task:6} {metric:15} {x if x is not None else '-':>8.3} {y if y is not None else '-':>8.3} {diff}")
    print(f"seconds: A {a.get('seconds')}  B {b.get('seconds')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
