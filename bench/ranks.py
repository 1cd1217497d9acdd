"""ranks: what each rank of a data-parallel run reads and spends on data per step, against the world size.

The dream-7b recipe (configs/train/dream-7b.yaml: its seq_len, packing and global batch of num_workers x
micro_batch x grad_accum rows, kept fixed while the world size changes) on synthetic shards written by the
tokenize job's own writer (tar + sample index), in one process: for each world size every rank's stream is
simulated in turn (pipelines/train/data.step_batches: plan the global step, read this rank's samples, collate).

Per rank per step: bytes read (sample indexes + sample ranges + whole shards), data seconds (plan + read +
collate), and the ratio of bytes to world-1 bytes / world (1.0 = exactly its share). Data time is compared with
an estimated step time: the model's training FLOPs per token (model.flops_per_token, as `omnidiff plan`) times
the rank's tokens per step, at an assumed MFU on an H100's dense bf16 peak (see ASSUMED_MFU). Shards are local
files (page cache): the bytes are what S3 would serve; the seconds leave out S3 latency, which the background
feeder hides behind the step (docs/training.md).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Suite

DREAM_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train" / "dream-7b.yaml"
PEAK_BF16 = 989e12      # H100/H200 SXM dense bf16 (common/tracking PEAK_FLOPS)
ASSUMED_MFU = 0.31      # the FSDP2 MFU measured with activation checkpointing on an H200 (docs/performance.md)
# Synthetic sample lengths per task (prompt + answer tokens), spanning what Dream-vocabulary samples hold:
# a 32x32 MAGVIT-v2 image is ~1,026 tokens, 10 s of 8-codebook EnCodec speech at 75 frames/s far more.
TASK_LENGTHS = {"t2i": (1040, 1110), "i2t": (1050, 1250), "asr": (300, 1600), "tts": (300, 1600),
                "s2i": (1300, 2600), "svqa": (400, 1800)}


def write_synthetic_shards(out: Path, vocab, per_task: int, shard_samples: int, seed: int = 0) -> Path:
    """Shards of random ids in the real format: the tokenize writer's tar members and sample index."""
    from tokenize_jobs.shards import SAMPLE_INDEX_SUFFIX, build_sample_index
    from tokenize_jobs.writer import TarShard, wds_sample

    rng = np.random.default_rng(seed)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "index").mkdir(exist_ok=True)
    items = [t for t in TASK_LENGTHS for _ in range(per_task)]
    items = [items[i] for i in rng.permutation(len(items))]
    entries = []
    for s, start in enumerate(range(0, len(items), shard_samples)):
        shard = TarShard()
        for j, task in enumerate(items[start:start + shard_samples]):
            lo, hi = TASK_LENGTHS[task]
            n = int(rng.integers(lo, hi))
            ids = rng.integers(0, vocab.text_size, size=n).astype(np.int32)
            answer = np.arange(n) >= n // 3            # one answer span, the last two thirds
            shard.write(wds_sample(f"s{s}x{j}", ids, answer, {"task": task, "n_tokens": n}))
        n_samples = shard.samples
        data = shard.close()
        rel, irel = f"shards/b-{s:05d}.tar", f"index/b-{s:05d}{SAMPLE_INDEX_SUFFIX}"
        (out / rel).write_bytes(data)
        blob = build_sample_index(data, rel, vocab.eos_id)
        (out / irel).write_bytes(blob)
        entries.append({"path": rel, "samples": n_samples, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "samples_index": {"path": irel, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}})
    counts = {t: per_task for t in TASK_LENGTHS}
    (out / "manifest.json").write_text(json.dumps({
        "format_version": 1, "vocab": vocab.to_dict(), "tokenizers": {}, "job": {"kind": "bench"},
        "shards": entries, "counts": {"samples_written": len(items), "samples_per_task": counts}}))
    return out


def recipe(shards: Path, world: int, read: str):
    """The dream-7b TrainConfig at `world` ranks, its global batch (rows per step) unchanged."""
    from common import configlib
    from pipelines.train.config import TrainConfig

    base = configlib.load(TrainConfig, str(DREAM_CONFIG))
    rows = base.scaling.num_workers * base.data.micro_batch * base.data.grad_accum
    if rows % (world * base.data.micro_batch):
        raise ValueError(f"world {world} does not divide the recipe's {rows} rows per step")
    # one stage mixing every task: the bench measures reading, not the curriculum
    over = [f"data.grad_accum={rows // (world * base.data.micro_batch)}", f"data.read={read}",
            "data.stages=[]", "train.steps=1000", f"data.shards=[{json.dumps(str(shards))}]", "data.prefetch=0"]
    return configlib.load(TrainConfig, str(DREAM_CONFIG), over), rows


def step_time_estimate(cfg, rows: int, world: int, vocab_size: int) -> float:
    """Seconds of one optimizer step of a rank: its tokens x the model's training FLOPs per token at
    ASSUMED_MFU of PEAK_BF16."""
    import torch

    from model.transformer import Transformer

    with torch.device("meta"):
        m = Transformer(cfg.model, vocab_size=vocab_size)
    tokens_per_rank = rows * cfg.data.seq_len / world
    return m.flops_per_token(cfg.data.seq_len) * tokens_per_rank / (PEAK_BF16 * ASSUMED_MFU)


def simulate(shards: Path, world: int, steps: int, read: str = "auto", ranks: list[int] | None = None
             ) -> dict[str, Any]:
    """Every rank (or `ranks`) of a `world`-rank run for 1 warm-up + `steps` steps, one after another.
    -> per-rank bytes and seconds per measured step, and their mean."""
    from pipelines.train.data import collate, load_data, step_batches

    cfg, rows = recipe(shards, world, read)
    data = load_data(cfg, warn=False)
    mb, ga = cfg.data.micro_batch, cfg.data.grad_accum
    per_rank = []
    for rank in ranks if ranks is not None else range(world):
        stream = data.stream(cfg)
        step_batches(stream, 0, cfg, world, rank)     # warm-up: the first indexes, imports
        b0 = stream.store.counts.total(stream.shard_cache)
        plan_s = read_s = 0.0
        for _ in range(steps):   # step_batches, its two parts timed apart
            t0 = time.perf_counter()
            mine = stream.plan_step(world, rank, mb, ga)
            t1 = time.perf_counter()
            samples = stream.store.materialize(mine, world=world, seed=stream.seed)
            [collate(samples[m * mb:(m + 1) * mb], cfg.data.seq_len, data.vocab) for m in range(ga)]
            plan_s, read_s = plan_s + t1 - t0, read_s + time.perf_counter() - t1
        per_rank.append({"rank": rank, "bytes": (stream.store.counts.total(stream.shard_cache) - b0) / steps,
                         "plan_s": plan_s / steps, "read_s": read_s / steps, "seconds": (plan_s + read_s) / steps})
    return {"world": world, "rows_per_step": rows, "grad_accum": cfg.data.grad_accum, "seq_len": cfg.data.seq_len,
            "bytes_per_rank": float(np.mean([r["bytes"] for r in per_rank])),
            "bytes_max_rank": float(max(r["bytes"] for r in per_rank)),
            # the median rank: on a shared machine a load spike hits some ranks' turns, not the data path
            "seconds_per_rank": float(np.median([r["seconds"] for r in per_rank])),
            "plan_s_per_rank": float(np.median([r["plan_s"] for r in per_rank])),
            "read_collate_s_per_rank": float(np.median([r["read_s"] for r in per_rank])), "ranks": per_rank}


def run(suite: Suite) -> dict[str, Any]:
    from bench.common import bench_vocab

    p = suite.plan
    vocab = bench_vocab(big=True)
    shards = write_synthetic_shards(suite.work / "ranks_shards", vocab, p.ranks_per_task, p.ranks_shard_samples)
    table = []
    for world in p.ranks_worlds:
        r = simulate(shards, world, p.ranks_steps, read="ranged")   # ranged at world 1 too: one baseline
        # whole shards instead, rank 0 only: what "read the shards your rows touch" costs per step
        whole = simulate(shards, world, p.ranks_steps, read="shard", ranks=[0])
        cfg, rows = recipe(shards, world, "auto")
        r["step_s_estimate"] = step_time_estimate(cfg, rows, world, vocab.size)
        r["whole_shard_bytes_rank0"] = whole["bytes_per_rank"]
        table.append(r)
        suite.say(f"[bench] ranks: world {world}: {r['bytes_per_rank'] / 1e6:.3f} MB and "
                  f"{r['seconds_per_rank'] * 1e3:.1f} ms per rank per step")
    b1, s1 = table[0]["bytes_per_rank"], table[0]["seconds_per_rank"]
    rc1 = table[0]["read_collate_s_per_rank"]
    for r in table:
        r["bytes_vs_share"] = r["bytes_per_rank"] / (b1 / r["world"])
        r["seconds_vs_share"] = r["seconds_per_rank"] / (s1 / r["world"])
        r["read_collate_vs_share"] = r["read_collate_s_per_rank"] / (rc1 / r["world"])
        r["data_fraction_of_step"] = r["seconds_per_rank"] / r["step_s_estimate"]
        del r["ranks"]
    worst = max(r["data_fraction_of_step"] for r in table)
    return {"table": table, "shard_samples": p.ranks_shard_samples, "samples": p.ranks_per_task * len(TASK_LENGTHS),
            "assumed_mfu": ASSUMED_MFU, "peak_flops": PEAK_BF16, "goal": "data < 5% of step",
            "met": worst < 0.05}
