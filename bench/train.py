"""train: one Ray Train FSDP2 worker (pipelines.train.trainer.run) against the floor, the trainer's own
`train_step` on the plain module in this process (no Ray, no FSDP, no process group, no MLflow), on the same
model, config, data stream and optimizer; 2 workers vs 1; achieved FLOP/s vs a measured matmul peak (MFU).

Ray Train's start-up (fit() call -> first steady step) is excluded from its throughput and reported on its own
line, from the step timestamps the trainer logs to MLflow.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from typing import Any

import numpy as np

from bench.common import (Suite, cuda_available, device_peak, goal_check, plain_autocast, plain_model, spread,
                          torch_threads)


def bare_train_loop(cfg, steps: int) -> dict[str, Any]:
    """The floor: pipelines.train.trainer.train_step, the worker's step itself, on the plain module with
    `build_model`'s weights, fed by the trainer's data stream and collate as the worker loop feeds it, in one
    process on the current torch threads (or the GPU). What a worker adds on top (Ray, FSDP2's collectives, the
    process group's all-reduces, MLflow logging, checkpoints) is what the ratio measures. One warm-up step,
    then `steps` timed."""
    import torch

    from pipelines.train.data import collate, load_data
    from pipelines.train.trainer import build_optimizer, train_step

    data = load_data(cfg, warn=False)
    stream = data.stream(cfg)
    vocab = data.vocab
    device = torch.device("cuda" if cuda_available() else "cpu")
    model = plain_model(cfg, vocab, device)
    optimizer, scheduler = build_optimizer(model, cfg)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, tokens, samples = [], [], []
    for step in range(steps + 1):
        t = time.perf_counter()
        s0 = stream.state.samples
        stream.set_stage(cfg.stage_at(step))
        micro = [collate(r, cfg.data.seq_len, vocab)
                 for r in stream.step_rows(1, 0, cfg.data.micro_batch, cfg.data.grad_accum)]
        with plain_autocast(cfg, device):
            stats = train_step(model, optimizer, scheduler, micro, vocab=vocab, cfg=cfg, step=step, rank=0,
                               world=1, device=device)
        sync()   # train_step's float() already waits; this also covers the optimizer's kernels
        if step > 0:  # step 0 is the warm-up (allocator, first-call kernels)
            times.append(time.perf_counter() - t)
            tokens.append(stats.tokens)
            samples.append(stream.state.samples - s0)
    processed = cfg.data.micro_batch * cfg.data.grad_accum * cfg.data.seq_len
    return {"steps": steps, "step_s": spread(times), "steps_per_s": spread([1 / x for x in times]),
            "tokens_per_s": spread([n / x for n, x in zip(tokens, times)]),
            "samples_per_s": spread([n / x for n, x in zip(samples, times)]),
            "samples_per_step": float(np.mean(samples)), "processed_tokens_per_step": processed,
            "flops_per_token": model.flops_per_token(cfg.data.seq_len), "params": model.num_params()}


def bare_train(suite: Suite) -> dict[str, Any]:
    """The floor's figures, measured once per suite: the read benchmark compares its reader with the same
    consumption the train benchmark compares Ray Train with."""
    if "bare_train" not in suite.shared:
        with torch_threads(suite.plan.threads):
            suite.shared["bare_train"] = bare_train_loop(suite.train_config("bare"), suite.plan.bare_steps)
    return suite.shared["bare_train"]


def ray_train_run(suite: Suite, workers: int) -> dict[str, Any]:
    """One pipelines.train.trainer.run fit; steady-state step times from the trainer's own MLflow metrics
    (step_time_s is the mean over each log window); the first window (warm-up) is dropped. Start-up = fit() call
    -> start of the first steady window."""
    from common import tracking
    from pipelines.train import trainer

    plan = suite.plan
    # Each worker gets `threads` CPUs (Ray sets its OMP/torch threads from that share), as the bare loop has
    # `threads` threads; on a GPU node each worker gets one GPU instead.
    cpus = plan.threads
    gpu = ["scaling.use_gpu=true", "scaling.gpus_per_worker=1"] if cuda_available() else []
    name = f"ray-{workers}w"
    shutil.rmtree(suite.work / "train" / name, ignore_errors=True)
    cfg = suite.train_config(name, [f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpus}",
                                    f"train.steps={plan.ray_steps}", f"train.log_every={plan.log_every}",
                                    f"train.checkpoint_every={plan.ray_steps}", *gpu])
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        result = trainer.run(cfg)
    wall = time.time() - start
    if getattr(result, "error", None):
        raise RuntimeError(f"bench train: Ray Train run {name} failed: {result.error}")
    run_id = tracking.find_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, name)
    hist = tracking.metric_history(cfg.mlflow.tracking_uri, run_id, "step_time_s")    # (step, value, time)
    tps = {s: v for s, v, _ in tracking.metric_history(cfg.mlflow.tracking_uri, run_id, "tokens_per_s")}
    steady = hist[1:] if len(hist) > 1 else hist
    step_s = [v for _, v, _ in steady]
    first_step, first_value, first_time = steady[0]
    startup = (first_time - start) - plan.log_every * first_value
    processed = workers * cfg.data.micro_batch * cfg.data.grad_accum * cfg.data.seq_len
    return {"workers": workers, "cpus_per_worker": cpus, "steps": plan.ray_steps, "windows": len(step_s),
            "step_s": spread(step_s), "steps_per_s": spread([1 / x for x in step_s]),
            "tokens_per_s": spread([tps[s] for s, _, _ in steady if s in tps]),
            "processed_tokens_per_step": processed, "startup_s": startup, "fit_wall_s": wall}


def run(suite: Suite) -> dict[str, Any]:
    """Ray Train with 1 worker vs the floor (steps/s); 2 workers vs 1 where the machine has room; MFU of each."""
    import torch

    plan = suite.plan
    suite.ray()
    cores = plan.threads
    # the peak the MFU is measured against: fp32 on this CPU at the workers' thread count, bf16 on a GPU
    peak = device_peak(cores, plan.matmul_n)
    bare = bare_train(suite)
    one = ray_train_run(suite, 1)
    room = torch.cuda.device_count() >= 2 if cuda_available() else (os.cpu_count() or 1) >= 2 * cores
    two = ray_train_run(suite, 2) if room else None
    # steady state of a fit is a handful of windows; the bare loop's steps spread the other side
    ratio = {"median": one["steps_per_s"]["median"] / bare["steps_per_s"]["median"],
             "min": one["steps_per_s"]["min"] / bare["steps_per_s"]["max"],
             "max": one["steps_per_s"]["max"] / bare["steps_per_s"]["min"], "n": one["windows"]}

    def mfu(side: dict[str, Any]) -> dict[str, Any]:
        # every position of every row is computed (padding included), so processed tokens, not real ones
        flops = bare["flops_per_token"] * side["processed_tokens_per_step"] * side["steps_per_s"]["median"]
        workers = side.get("workers", 1)
        # the peak is the best repeat: the hardware reached it, interference only lowers it
        return {"gflops": flops / 1e9, "mfu": flops / 1e9 / (peak["gflops"]["max"] * workers)}

    out = {"model": plan.train_model, "params": bare["params"], "seq_len": plan.seq_len,
           "micro_batch": plan.micro_batch, "matmul_peak": peak, "bare": bare, "ray_1": one, "ray_2": two,
           "ray_vs_bare": ratio, **goal_check("train.ray_vs_bare", ratio["median"]),
           "mfu_bare": mfu(bare), "mfu_ray_1": mfu(one), "mfu_ray_2": mfu(two) if two else None}
    if two:
        out["two_vs_one_tokens_per_s"] = two["tokens_per_s"]["median"] / one["tokens_per_s"]["median"]
    return out
