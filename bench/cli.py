"""`omnidiff bench <tokenize|read|train|sample|fsdp|ranks|all> [--quick] [--out runs/bench]`: every stage against its
floor.

Each benchmark (one module each in bench/) runs the pipeline's real code and, in the same process run, the bare
work it wraps, and reports the ratio. Side-by-side ratios hold on a noisy machine where absolute numbers do not:
runs of the two sides are interleaved (job, bare, job, bare, ...), every figure is the median of the repeats with
its min and max, and ratios are medians of the paired per-repeat ratios. These are measurements, not tests:
nothing here fails on a missed goal; the table says which goals are met.

Start-up is excluded from every throughput and reported on its own line: Ray start (once per suite), the
tokenize job's fixed cost, and Ray Train's fit() start.

Writes <out>/<bench>.json per benchmark and <out>/all.json (the host's load average is recorded in each: on a
shared machine the absolute numbers move, the ratios much less). See docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench import fsdp, ranks, read, sample, tokenize, train
from common import cli
from common.configlib import ConfigError
from bench.common import Plan, Suite, cuda_available, host_info
from bench.report import format_table, markdown_table

RUNNERS: dict[str, Callable[[Suite], dict[str, Any]]] = {
    "tokenize": tokenize.run, "read": read.run, "train": train.run, "sample": sample.run, "fsdp": fsdp.run,
    "ranks": ranks.run}
BENCHES = tuple(RUNNERS)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _strip(r: Any) -> Any:
    """Drop the bulky per-run lists kept only for pairing."""
    if isinstance(r, dict):
        return {str(k): _strip(v) for k, v in r.items() if k not in ("job_runs_thr", "job_runs_e2e", "bare_runs")}
    if isinstance(r, list):
        return [_strip(x) for x in r]
    return r


def run_benches(names: Sequence[str], plan: Plan, out: Path, work: Path | None = None,
                say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `names` in order in one Suite (one Ray, one work folder: a temporary one unless `work` is given);
    write <out>/<name>.json each and, for more than one, <out>/all.json. -> {"meta", "results", "table",
    "markdown"}."""
    out.mkdir(parents=True, exist_ok=True)
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="omnidiff-bench-")) if own_work else work
    work.mkdir(parents=True, exist_ok=True)
    suite = Suite(plan, out, work, say)
    results: dict[str, dict[str, Any]] = {}
    meta = {"plan": asdict(plan), "host_before": host_info(), "benches": list(names)}
    t0 = time.perf_counter()
    try:
        for name in names:
            t = time.perf_counter()
            say(f"[bench] {name} ({plan.mode}) ...")
            load_before = [round(x, 2) for x in os.getloadavg()]
            r = _strip(RUNNERS[name](suite))
            r["bench_wall_s"] = time.perf_counter() - t
            r["loadavg_before"], r["loadavg_after"] = load_before, [round(x, 2) for x in os.getloadavg()]
            r["mode"], r["ray_init_s"] = plan.mode, suite.ray_init_s
            results[name] = r
            (out / f"{name}.json").write_text(json.dumps(r, indent=1, default=_json_default) + "\n")
            say(f"[bench] {name} done in {r['bench_wall_s']:.0f} s -> {out / (name + '.json')}")
    finally:
        suite.close()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    meta.update({"host_after": host_info(), "wall_s": time.perf_counter() - t0, "ray_init_s": suite.ray_init_s})
    summary = {"meta": meta, "results": results, "table": format_table(results, meta),
               "markdown": markdown_table(results, meta)}
    if len(names) > 1:
        (out / "all.json").write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omnidiff bench",
        description="Benchmarks: each pipeline stage against its bare floor, measured side by side in one run "
                    "(ratios hold on a busy machine; absolute numbers do not). Prints a table and writes JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""benchmarks:
  tokenize  Ray Data tokenize job vs a single-process loop over the same tokenizers and inputs (text, pixel
            images, MAGVIT-v2 tiny images, EnCodec speech); 1 vs 2 actors; peak RSS on 1x and 10x corpora
  read      trainer data path vs raw tar reading of the same shards, and vs demo-model training consumption
  train     Ray Train FSDP2 (1 worker) vs the trainer's train_step on the plain module in one process;
            2 workers vs 1; MFU vs measured matmul peak
  sample    denoising step vs one plain forward; generated tokens/s at batch 1/4/16; MAGVIT-v2 encode/s
  fsdp      the trainer's FSDP2 step vs the plain module on one device, no Ray (runs on a bare GPU node):
            MFU, peak memory vs `omnidiff plan`, bf16 vs fp32 first-step loss
  ranks     the dream-7b recipe's data path per rank at world 1..64 (one process, synthetic shards): bytes
            and data seconds per rank per step vs 1/world, data time vs the estimated step time
  all       all of the above, Ray started once

examples:
  omnidiff bench all --quick                 # a few minutes on 2 CPU cores
  omnidiff bench train --out runs/bench-gpu  # on a GPU node: CUDA is used where the stage supports it
See docs/performance.md for what each ratio means.""")
    p.add_argument("bench", choices=[*BENCHES, "all"], help="which benchmark to run")
    p.add_argument("--quick", action="store_true", help="small sizes and 3 repeats (a few minutes on 2 cores)")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes: every code path, meaningless numbers")
    p.add_argument("--repeats", type=int, default=None, help="override the number of repeats per figure")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the bare training loop, sampling and matmul peak, and CPUs per Ray Train "
                        "worker (default 1: a worker is one core, as it is one GPU on a GPU node). Tokenize always "
                        "compares 1 actor with 1 thread.")
    p.add_argument("--out", default="runs/bench", help="folder for <bench>.json and all.json (default runs/bench)")
    p.add_argument("--profile", action="store_true",
                   help="fsdp: profile two more FSDP2 steps with torch.profiler -> <out>/fsdp_profile.txt")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="fsdp: TrainConfig overrides of its run, e.g. train.activation_checkpointing=false "
                        "data.micro_batch=8 model.preset=dream-7b")
    p.add_argument("--work", default=None,
                   help="keep corpora, shards and run dirs here (default: a temporary folder, deleted at the end)")
    return p


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)   # overrides may come after the options
    plan = Plan.for_mode("tiny" if args.tiny else "quick" if args.quick else "full")
    if args.repeats is not None:
        if args.repeats < 1:
            raise ConfigError(f"--repeats={args.repeats} must be >= 1")
        plan = replace(plan, repeats=args.repeats)
    if args.threads < 1:
        raise ConfigError(f"--threads={args.threads} must be >= 1")
    plan = replace(plan, threads=args.threads).for_device(cuda_available())
    plan = replace(plan, fsdp_overrides=tuple(args.overrides), fsdp_profile=args.profile)
    names = list(BENCHES) if args.bench == "all" else [args.bench]
    if (args.overrides or args.profile) and "fsdp" not in names:
        raise ConfigError("KEY=VALUE overrides and --profile apply to the fsdp benchmark only")
    summary = run_benches(names, plan, Path(args.out), Path(args.work) if args.work else None)
    m = summary["meta"]
    print(f"\nomnidiff bench {args.bench} ({plan.mode}): {m['host_before']['cpus']} CPUs, load average "
          f"{m['host_before']['loadavg']} -> {m['host_after']['loadavg']}, {m['wall_s']:.0f} s")
    print(summary["table"])
    print(f"\nJSON in {args.out}/")
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
