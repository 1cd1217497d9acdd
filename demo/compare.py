"""Evaluate a finished demo run again with the demo's sampler and with its fast variant (a key/value cache and
confidence-threshold decoding where they keep accuracy: pipelines/infer/presets.py `FAST`), side by side.

    python -m demo.compare runs/demo          # after `make demo`; writes runs/demo/eval-{plain,fast}/

Both evaluations use the run's own export, held-out corpus, image classifier data and speech judge, with the
sampler settings of the demo config (configs/demo/demo.yaml), so the plain column reproduces the run's table.
Prints each task's headline metric (`Task.metric`) for both, their difference, and the seconds each took.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import cli, configlib
from demo.run import DEMO_YAML, DemoConfig, evaluate, start_ray
from model.tasks import TASKS, spec
from pipelines.infer.presets import with_fast_sampling


def evaluate_run(run: Path, demo: DemoConfig, folder: str) -> tuple[dict, float]:
    for need in ("train/export", "corpus/test.jsonl", "corpus/train.jsonl", "tok"):
        if not (run / need).exists():
            raise configlib.ConfigError(f"{run / need}: missing; pass the --out folder of a finished demo run")
    corpus = {"test": str(run / "corpus/test.jsonl"), "train": str(run / "corpus/train.jsonl")}
    t = time.perf_counter()
    res = evaluate(demo, str(run / "train/export"), corpus, run, 0, folder=folder, mlflow=False)
    return res["tasks"], time.perf_counter() - t


def table(plain: dict, fast: dict, seconds: tuple[float, float]) -> str:
    lines = [f"{'task':6} {'metric':16} {'plain':>7} {'fast':>7} {'fast-plain':>10}"]
    for task in TASKS:
        if task not in plain or task not in fast:
            continue
        metric = spec(task).metric
        a, b = plain[task].get(metric), fast[task].get(metric)
        if a is None or b is None:
            continue
        lines.append(f"{task:6} {metric:16} {a:7.3f} {b:7.3f} {b - a:+10.3f}")
    lines.append(f"seconds: plain {seconds[0]:.1f}, fast {seconds[1]:.1f} ({seconds[0] / seconds[1]:.2f}x)")
    return "\n".join(lines)


@cli.command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.compare", description=__doc__.split("\n\n")[0],
                                epilog=cli.EXIT_STATUS_HELP)
    p.add_argument("run", nargs="?", default="runs/demo", help="a finished demo run's --out folder (default runs/demo)")
    p.add_argument("--config", default=str(DEMO_YAML), help="the demo config the run used")
    p.add_argument("--set", dest="demo_overrides", action="append", default=[], metavar="key=value",
                   help="demo config override the run used, e.g. --set sampler.t2i.steps=8")
    args = p.parse_args(argv)
    run = Path(args.run).resolve()
    demo = configlib.load(DemoConfig, args.config, args.demo_overrides)
    started = start_ray()
    try:
        plain, t_plain = evaluate_run(run, demo, "eval-plain")
        demo.sampler = with_fast_sampling(demo.sampler)
        fast, t_fast = evaluate_run(run, demo, "eval-fast")
    finally:
        if started:
            import ray

            ray.shutdown()
    report = table(plain, fast, (t_plain, t_fast))
    (run / "compare.json").write_text(json.dumps({"plain": plain, "fast": fast, "seconds": [t_plain, t_fast]},
                                                 indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
