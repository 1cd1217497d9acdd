"""read: the trainer's data path (pipelines/train/data.py: shards -> sources -> packed rows -> collate) against raw
sequential tarfile reading of the same shards, and against what the model consumes in training (the training
floor's samples/s: the reader must keep well ahead of it)."""
from __future__ import annotations

import os
import tarfile
import time
from typing import Any, Sequence

from bench.common import Suite, goal_check, paired_ratio, spread
from bench.train import bare_train


def raw_tar_read(urls: Sequence[str], target: int) -> tuple[int, int, float]:
    """Sequential tarfile reading of the shards (every member's bytes), cycling until `target` samples.
    -> (samples, bytes, seconds)."""
    samples = nbytes = 0
    t = time.perf_counter()
    while samples < target:
        for url in urls:
            with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                keys = set()
                for m in tar:
                    if m.isfile():
                        data = tar.extractfile(m).read()  # type: ignore[union-attr]
                        keys.add(m.name.split(".", 1)[0])
                        assert len(data) == m.size
                samples += len(keys)
            nbytes += os.path.getsize(url)
            if samples >= target:
                break
    return samples, nbytes, time.perf_counter() - t


def stream_read(cfg, target: int) -> tuple[int, float]:
    """The trainer's data path on one rank: the row stream + collate, until `target` samples were packed."""
    from pipelines.train.data import collate, load_data

    data = load_data(cfg, warn=False)
    stream = data.stream(cfg)
    t = time.perf_counter()
    while stream.state.samples < target:
        for rows in stream.step_rows(1, 0, cfg.data.micro_batch, cfg.data.grad_accum):
            collate(rows, cfg.data.seq_len, data.vocab)
    return stream.state.samples, time.perf_counter() - t


def run(suite: Suite) -> dict[str, Any]:
    from tokenize_jobs.shards import read_manifest, shard_urls

    plan = suite.plan
    shards = suite.demo_shards()
    manifest = read_manifest(str(shards))
    urls = shard_urls(str(shards))
    total_bytes = sum(int(e["bytes"]) for e in manifest["shards"])
    total_samples = sum(int(e["samples"]) for e in manifest["shards"])
    bytes_per_sample = total_bytes / total_samples
    cfg = suite.train_config("read")
    stream_thr, raw_thr, raw_mbs = [], [], []
    for _ in range(plan.repeats):
        n, s = stream_read(cfg, plan.read_samples)
        stream_thr.append(n / s)
        n, b, s = raw_tar_read(urls, plan.read_samples)
        raw_thr.append(n / s)
        raw_mbs.append(b / s / 1e6)
    bare = bare_train(suite)
    consume = bare["samples_per_s"]
    # the bare loop's median consumption: it is the same work whichever repeat of the reader it is paired with
    vs_training = paired_ratio(stream_thr, [consume["median"]] * len(stream_thr))
    return {
        "shards": len(urls), "samples_in_shards": total_samples, "shard_bytes": total_bytes,
        "sources": len({t for t, n in manifest["counts"]["samples_per_task"].items() if n}),
        "reader_samples_per_s": spread(stream_thr),
        "reader_mb_per_s": spread([x * bytes_per_sample / 1e6 for x in stream_thr]),
        "raw_tar_samples_per_s": spread(raw_thr), "raw_tar_mb_per_s": spread(raw_mbs),
        "reader_vs_raw_tar": paired_ratio(stream_thr, raw_thr),
        "training_samples_per_s": consume, "training_model": plan.train_model,
        "reader_vs_training": vs_training,
        **goal_check("read.reader_vs_training", vs_training["median"]),
    }

