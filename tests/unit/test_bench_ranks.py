"""bench/ranks.py, short: the dream-7b recipe's ranks each read about 1/world of a step's bytes (a count, not a
timing), planning the same global step whatever the world size."""
from __future__ import annotations

import pytest

from bench.common import bench_vocab
from bench.ranks import simulate, write_synthetic_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("ranks"), bench_vocab(big=True), per_task=50,
                                  shard_samples=40)


def test_bytes_per_rank_fall_as_one_over_world(shards):
    runs = {w: simulate(shards, w, steps=1, read="ranged") for w in (1, 2, 4, 8)}
    one = runs[1]["bytes_per_rank"]
    assert one > 1e6                                   # a 64 x 4096-token step of ~8 KB samples
    for w, r in runs.items():
        assert r["rows_per_step"] == 64 and r["grad_accum"] * w == 64
        # its share, plus the sample indexes every rank reads to plan (~16 bytes a sample)
        assert 0.95 < r["bytes_per_rank"] * w / one < 1.15, (w, r["bytes_per_rank"], one)
        assert r["bytes_max_rank"] < 1.5 * one / w
