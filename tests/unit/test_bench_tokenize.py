"""bench/tokenize.py pieces that run without Ray: the shard writer against raw tarfile (same bytes), and the bare
loop running the tokenize actor and the write tasks' own code."""
from __future__ import annotations

import math

from bench import tokenize as bt
from bench.common import Plan


def test_writer_and_raw_tarfile_write_the_same_bytes():
    r = bt.writer_vs_tarfile(40, repeats=2)
    assert r["same_bytes"] and r["shard_bytes"] > 40 * 3 * 512
    assert math.isfinite(r["writer_vs_tarfile"]["median"]) and r["writer_mb_per_s"]["n"] == 2


def test_bare_loop_tokenizes_and_writes_every_input(tmp_path):
    plan = Plan.for_mode("tiny")
    mod = bt.modalities(plan)["text"]
    corpus, artifacts = tmp_path / "corpus", tmp_path / "tokenizers"
    mod.write(corpus, 30)
    bt.fit_tokenizers(mod, corpus, artifacts)
    r = bt.bare_tokenize(mod, corpus, artifacts, tmp_path)
    assert r["samples"] == 30 and r["tokens"] > 30 * 12
    assert not (tmp_path / "bare").exists()   # its shards and indexes are removed after timing
