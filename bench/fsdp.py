"""fsdp: the trainer's own worker step (pipelines.train.trainer build_model + train_step: FSDP2, mixed precision,
activation checkpointing) on one device against the same step on the plain module. No Ray and no data shards
(synthetic packed rows), so it runs on a bare GPU node: MFU vs a measured matmul peak, peak memory vs
`omnidiff plan`'s estimate, bf16 vs fp32 loss on the same first batch."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from bench.common import (Plan, Suite, bench_vocab, cuda_available, device_peak, goal_check, plain_autocast,
                          plain_model, spread, torch_threads)


def synthetic_batches(vocab, seq_len: int, micro_batch: int, n: int, seed: int = 0) -> list:
    """`n` collated (micro_batch, seq_len) batches of packed samples with random ids: each sample 1/4 prompt,
    3/4 answer, a random task; the rows are packed to at least 90% as the trainer's packer fills them."""
    from model.tasks import TASKS
    from pipelines.train.data import Sample, collate

    rng = np.random.default_rng(seed)
    lo, hi = vocab.text_range()
    batches = []
    for _ in range(n):
        rows = []
        for _ in range(micro_batch):
            row, used = [], 0
            while used < 0.9 * seq_len:
                length = int(min(seq_len - used, rng.integers(seq_len // 8, seq_len // 2 + 1)))
                answer = np.arange(length) >= length // 4
                row.append(Sample(key=f"s{len(row)}", task=str(rng.choice(TASKS)),
                                  ids=rng.integers(lo, hi, length), answer_mask=answer,
                                  tail_mask=np.zeros(length, dtype=bool)))
                used += length
            rows.append(row)
        batches.append(collate(rows, seq_len, vocab))
    return batches


def fsdp_config(plan: Plan):
    from common import configlib
    from pipelines.train.config import TrainConfig

    # activation checkpointing on, as a model of this size is trained; everything else the trainer's defaults
    return configlib.load(TrainConfig, None, [
        f"model.preset={plan.fsdp_model}", f"data.seq_len={plan.fsdp_seq_len}",
        f"data.micro_batch={plan.fsdp_micro_batch}", "data.grad_accum=1", "train.activation_checkpointing=true",
        "optim.warmup_steps=1", f"train.steps={plan.fsdp_steps + 4}", *plan.fsdp_overrides])


def fsdp_side(cfg, vocab, batches: list, steps: int, device, *, sharded: bool,
              profile_to: Path | None = None) -> dict[str, Any]:
    """One side of the fsdp benchmark: `steps` timed optimizer steps (after one warm-up) of
    pipelines.train.trainer.train_step, on the trainer's FSDP2 model (`sharded`) or on the plain module with the same
    activation checkpointing and, on a GPU, bf16 autocast (what FSDP's mixed precision computes in)."""
    import gc

    import torch

    from pipelines.train.trainer import build_model, build_optimizer, train_step

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    out: dict[str, Any] = {}
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        model = build_model(cfg, vocab, device, init_device_mesh(device.type, (1,)))
        autocast = contextlib.nullcontext()
    else:
        model = plain_model(cfg, vocab, device)   # build_model's weights: both sides start equal
        autocast = plain_autocast(cfg, device)
        # the fp32 reference: the same first step's loss in full precision, weights left as they were (lr 0)
        optimizer, scheduler = build_optimizer(model, cfg)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        scheduler.base_lrs = [0.0] * len(scheduler.base_lrs)
        out["fp32_first_loss"] = train_step(model, optimizer, scheduler, [batches[0]], vocab=vocab, cfg=cfg,
                                            step=0, rank=0, world=1, device=device).loss
        del optimizer, scheduler
    optimizer, scheduler = build_optimizer(model, cfg)
    times, losses = [], []
    for step in range(steps + 1):
        sync()
        t = time.perf_counter()
        with autocast:
            st = train_step(model, optimizer, scheduler, [batches[step % len(batches)]], vocab=vocab, cfg=cfg,
                            step=step, rank=0, world=1, device=device)
        sync()   # train_step's float() already waits; this also covers the optimizer's kernels
        losses.append(st.loss)
        if step > 0:   # step 0 is the warm-up (allocator, kernel selection)
            times.append(time.perf_counter() - t)
    if profile_to is not None:
        out["profile"] = str(profile_steps(lambda k: train_step(
            model, optimizer, scheduler, [batches[k % len(batches)]], vocab=vocab, cfg=cfg, step=steps + 1 + k,
            rank=0, world=1, device=device), 2, device, profile_to))
    processed = cfg.data.micro_batch * cfg.data.seq_len
    out.update({"sharded": sharded, "steps": steps, "losses": losses, "first_loss": losses[0],
                "step_s": spread(times), "steps_per_s": spread([1 / x for x in times]),
                "tokens_per_s": spread([processed / x for x in times]), "processed_tokens_per_step": processed,
                "flops_per_token": model.flops_per_token(cfg.data.seq_len), "params": model.num_params()})
    if cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    del model, optimizer, scheduler
    return out


def profile_steps(step_fn: Callable[[int], Any], n: int, device, path: Path) -> Path:
    """Run `step_fn(k)` for k < n under torch.profiler; write the ops sorted by their own device time (self CPU
    time on CPU) to `path`, a table, and return it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for k in range(n):
            step_fn(k)
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70) + "\n")
    return path


@contextlib.contextmanager
def _one_process_group(device) -> Iterator[None]:
    """A torch.distributed group of this process alone (nccl on a GPU, gloo on CPU), as a Ray Train worker of a
    one-worker run has; torn down afterwards. Its store is in memory: a TCP store would listen on every
    interface for the rest of the process."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("bench fsdp runs in one process; start it without torchrun or Ray Train")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run(suite: Suite) -> dict[str, Any]:
    """The trainer's worker step, sharded vs plain, on one device: the bare side runs first with no process
    group, then the FSDP2 side in a one-process group. The sides run one after the other, not interleaved:
    holding both models would double the memory, and a dedicated GPU does not drift between them."""
    import torch

    from model.plan import plan as memory_plan

    plan = suite.plan
    device = torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")
    cfg = fsdp_config(plan)
    vocab = bench_vocab(plan.big_vocab)
    seq_len, micro_batch = cfg.data.seq_len, cfg.data.micro_batch   # overrides may change them
    batches = [b.to(device) for b in synthetic_batches(vocab, seq_len, micro_batch, plan.fsdp_distinct_batches)]
    peak = device_peak(plan.threads, plan.matmul_n)
    with torch_threads(plan.threads):
        bare = fsdp_side(cfg, vocab, batches, plan.fsdp_steps, device, sharded=False)
        with _one_process_group(device):
            fsdp = fsdp_side(cfg, vocab, batches, plan.fsdp_steps, device, sharded=True,
                             profile_to=suite.out / "fsdp_profile.txt" if plan.fsdp_profile else None)
    # the sides ran one after the other, so steps do not pair: a ratio of medians, with the extremes' ratios
    f, b = fsdp["steps_per_s"], bare["steps_per_s"]
    ratio = {"median": f["median"] / b["median"], "min": f["min"] / b["max"], "max": f["max"] / b["min"],
             "n": f["n"]}

    def mfu(side: dict[str, Any]) -> dict[str, Any]:
        flops = side["flops_per_token"] * side["tokens_per_s"]["median"]
        return {"gflops": flops / 1e9, "mfu": flops / 1e9 / peak["gflops"]["max"]}

    dtype = "bf16" if device.type == "cuda" and cfg.train.mixed_precision == "bf16" else "fp32"
    estimate = memory_plan(cfg.model, gpus=1, gpu_mem_gb=0.0, seq_len=seq_len, micro_batch=micro_batch,
                           activation_checkpointing=cfg.train.activation_checkpointing, dtype=dtype,
                           vocab_size=vocab.size)
    presets = [o.split("=", 1)[1] for o in plan.fsdp_overrides if o.startswith("model.preset=")]
    out = {"model": (presets or [plan.fsdp_model])[-1], "params": fsdp["params"], "vocab_size": vocab.size,
           "seq_len": seq_len, "micro_batch": micro_batch, "device": str(device),
           "distinct_batches": plan.fsdp_distinct_batches, "compute_dtype": dtype,
           "overrides": list(plan.fsdp_overrides), "activation_checkpointing": cfg.train.activation_checkpointing,
           "matmul_peak": peak, "bare": bare, "fsdp": fsdp,
           "sharded_vs_bare": ratio, **goal_check("fsdp.sharded_vs_bare", ratio["median"]),
           "mfu_bare": mfu(bare), "mfu_fsdp": mfu(fsdp),
           # the same weights and first batch: how far the compute dtype moves the loss from fp32
           "first_loss": {"fp32": bare["fp32_first_loss"], "bare": bare["first_loss"], "fsdp": fsdp["first_loss"]},
           "plan_total_gib": estimate["total_gib"], "plan_memory_gib": estimate["memory_gib"]}
    if "peak_allocated_gib" in fsdp:
        out["allocated_vs_plan"] = fsdp["peak_allocated_gib"] / estimate["total_gib"]
    return out

