"""Rows planned from sample indexes (pipelines/train/plan_rows.py), each rank reading only its own samples, and
the background step feeder (pipelines/train/feed.py): fast, no Ray."""
from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import pytest
import torch

from common.configlib import from_dict
from model.diffusion import append_eos_tail
from pipelines.train.config import TrainConfig
from pipelines.train.data import DataError, StreamState, load_data, read_shard, step_batches
from pipelines.train.feed import StepFeeder
from pipelines.train.plan_rows import _seed
from tests.helpers.shardgen import small_vocab, write_shard_set
from tokenize_jobs.shards import build_sample_index

VOCAB = small_vocab()
TASKS = {"t2i": 18, "i2t": 18, "asr": 12}
STAGES = [{"steps": 3, "mixture": {"t2i": 1}}, {"steps": 4, "mixture": {"t2i": 2, "i2t": 1, "asr": 1}}]


def make_cfg(shards, **data) -> TrainConfig:
    stages = data.pop("stages", STAGES)
    return from_dict(TrainConfig, {"data": {"shards": [str(s) for s in shards], "seq_len": 160, "stages": stages,
                                            **data}, "train": {"steps": sum(s["steps"] for s in stages)},
                                   "diffusion": {"task_max_tail": {"asr": 20}}})


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same samples twice: with sample indexes (as the tokenize job writes) and without (older shards)."""
    root = tmp_path_factory.mktemp("sets")
    kw = dict(samples_per_shard=9, media_len=24)
    return {"indexed": write_shard_set(root / "indexed", VOCAB, TASKS, **kw),
            "plain": write_shard_set(root / "plain", VOCAB, TASKS, sample_index=False, **kw)}


def reference_rows(data, cfg, n_rows: int, stage_of_row) -> list[list[tuple]]:
    """The stream as it was defined before planning from lengths: every shard read whole, each draw's sample
    tail-padded from the draw's generator, greedy packing on the padded lengths. Written out independently of
    plan_rows.py, so a change of order or packing there shows up here."""
    seed, seq_len, vocab = cfg.train.seed, cfg.data.seq_len, data.vocab
    shards = {}
    cursors = {s.name: [0, 0, 0] for s in data.sources}
    by_name = {s.name: s for s in data.sources}
    stage, draws, out = 0, 0, []

    def samples(src, epoch, shard_pos):
        order = np.random.default_rng(_seed(seed, src.name, epoch)).permutation(len(src.shards))
        sh = src.shards[int(order[shard_pos])]
        rows = [r for r in shards.setdefault(sh.url, read_shard(sh, vocab.size)) if src.tasks is None or r[1] in src.tasks]
        perm = np.random.default_rng(_seed(seed, src.name, epoch, shard_pos)).permutation(len(rows))
        return [rows[i] for i in perm]

    def draw(stage, k):
        weights = data.stages[stage].weights
        rng = np.random.default_rng(_seed(seed, 1_000_003, stage, k))
        names = list(weights)
        name = names[min(int(np.searchsorted(np.cumsum([weights[n] for n in names]), rng.random(), side="right")),
                         len(names) - 1)]
        epoch, pos, idx = cursors[name]
        while True:
            if pos >= len(by_name[name].shards):
                epoch, pos, idx = epoch + 1, 0, 0
            rows = samples(by_name[name], epoch, pos)
            if idx < len(rows):
                break
            pos, idx = pos + 1, 0
        key, task, ids, answer = rows[idx]
        tp = append_eos_tail(ids, answer, eos_id=vocab.eos_id, generator=rng,
                             max_tail=cfg.diffusion.task_max_tail.get(task, cfg.diffusion.max_tail))
        return (key, task, tp.ids, tp.tail_mask), name, [epoch, pos, idx + 1]

    for r in range(n_rows):
        if stage_of_row(r) != stage:
            stage, draws = stage_of_row(r), 0
        row, used = [], 0
        while True:
            s, name, nxt = draw(stage, draws)
            if s[2].size > seq_len:
                cursors[name], draws = nxt, draws + 1
                continue
            if row and (cfg.data.packing == "pad" or used + s[2].size > seq_len):
                break
            row.append(s)
            used += s[2].size
            cursors[name], draws = nxt, draws + 1
        out.append(row)
    return out


def as_tuples(rows) -> list[list[tuple]]:
    return [[(s.key, s.task, s.ids, s.tail_mask) for s in row] for row in rows]


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        len(ra) == len(rb) and all(x[0] == y[0] and x[1] == y[1] and np.array_equal(x[2], y[2])
                                   and np.array_equal(x[3], y[3]) for x, y in zip(ra, rb)) for ra, rb in zip(a, b))


@pytest.mark.parametrize("kind", ["indexed", "plain"])
@pytest.mark.parametrize("packing,seq_len", [("pack", 160), ("pack", 70), ("pad", 160)])
def test_planned_rows_equal_the_reference_stream_over_many_steps(sets, kind, packing, seq_len):
    """Order, packing, EOS tails and drops (seq_len 70 drops the longest samples) are exactly those of the
    stream read in full, through stage switches and several epochs, for indexed and older shards."""
    cfg = make_cfg([sets[kind]], packing=packing, seq_len=seq_len)
    data = load_data(cfg, warn=False)
    world, micro, accum, steps = 4, 2, 1, 7
    per_step = world * micro * accum
    stage_of_step = [cfg.stage_at(s) for s in range(steps)]
    want = reference_rows(data, cfg, per_step * steps, lambda r: stage_of_step[r // per_step])
    streams = [data.stream(cfg) for _ in range(world)]
    got = [None] * (per_step * steps)
    for step in range(steps):
        for rank, stream in enumerate(streams):
            stream.set_stage(stage_of_step[step])
            rows = [r for m in stream.step_rows(world, rank, micro, accum) for r in m]
            for j, row in enumerate(rows):   # rank r holds global rows r, r + world, ... of the step
                got[step * per_step + rank + j * world] = row
    assert same(as_tuples(got), want)
    assert sum(s[1] == "t2i" for r in want for s in r) > 2 * TASKS["t2i"]    # past epoch boundaries


def test_each_rank_reads_only_its_share(sets):
    cfg = make_cfg([sets["indexed"]], read="ranged")
    data = load_data(cfg, warn=False)
    read = {}
    for world in (1, 2, 4):
        streams = [data.stream(cfg) for _ in range(world)]
        for _ in range(3):
            for rank, s in enumerate(streams):
                s.step_rows(world, rank, 8 // world, 1)
        read[world] = [s.store.counts.samples_read for s in streams]
        assert all(s.shard_cache.reads == 0 for s in streams)          # no shard was read whole
    assert sum(read[2]) == sum(read[4]) == read[1][0]                   # every sample once, by one rank
    assert max(read[4]) < 0.4 * read[1][0]


def test_auto_reads_whole_shards_on_one_rank_and_older_shards_everywhere(sets, caplog):
    cfg = make_cfg([sets["indexed"]])
    stream = load_data(cfg, warn=False).stream(cfg)
    stream.step_rows(1, 0, 8, 1)
    assert stream.shard_cache.reads > 0 and stream.store.counts.ranged_reads == 0
    cfg = make_cfg([sets["plain"]])
    with caplog.at_level(logging.WARNING, logger="pipelines.train.feed"):
        stream = load_data(cfg, warn=False).stream(cfg)
        for _ in range(3):
            stream.step_rows(4, 1, 2, 1)
    lines = [r for r in caplog.records if "without a sample index" in r.getMessage()]
    assert len(lines) == 1 and str(sets["plain"]) in lines[0].getMessage()   # one clear line per shard set
    assert stream.store.counts.ranged_reads == 0 and stream.shard_cache.reads > 0


def _feeder(data, cfg, depth, world=2, rank=1, state=None, start=0, stage_at=None):
    return StepFeeder(lambda st: data.stream(cfg, None if st is None else StreamState.from_dict(st)),
                      lambda stream, s, stage: step_batches(stream, stage, cfg, world, rank),
                      stage_at or cfg.stage_at, start_step=start, state=state, depth=depth)


def test_prefetched_steps_and_positions_equal_inline_ones(sets):
    cfg = make_cfg([sets["indexed"]])
    data = load_data(cfg, warn=False)
    inline, ahead = _feeder(data, cfg, 0), _feeder(data, cfg, 3)
    try:
        for step in range(7):
            a, b = inline.next(step, cfg.stage_at), ahead.next(step, cfg.stage_at)
            assert a.state == b.state and a.stage == b.stage
            assert all(torch.equal(x.ids, y.ids) and torch.equal(x.tail_mask, y.tail_mask)
                       for x, y in zip(a.micro, b.micro))
        # resuming from a step's recorded position continues the same way (the prefetcher was further on)
        saved = b.state
        again = _feeder(data, cfg, 2, state=saved, start=7)
        more = [inline.next(s, cfg.stage_at) for s in (7, 8)]
        for s, m in zip((7, 8), more):
            assert again.next(s, cfg.stage_at).state == m.state
        again.close()
    finally:
        ahead.close()


def test_feeder_replans_when_stage_bounds_move(sets):
    """A time budget that shortens the run moves stage bounds: steps already planned with the old bounds are
    dropped and planned again from the last step taken."""
    cfg = make_cfg([sets["indexed"]])
    data = load_data(cfg, warn=False)
    moved = lambda s: 0 if s < 2 else 1   # noqa: E731 -- stage 2 starts at step 2 instead of 3
    ahead, inline = _feeder(data, cfg, 3), _feeder(data, cfg, 0)
    try:
        for step in range(2):
            assert ahead.next(step, cfg.stage_at).state == inline.next(step, cfg.stage_at).state
        time.sleep(0.2)                     # let the thread plan step 2 with the old bounds
        for step in range(2, 5):
            a, b = ahead.next(step, moved), inline.next(step, moved)
            assert a.stage == b.stage == 1 and a.state == b.state
    finally:
        ahead.close()


def test_a_read_error_in_the_feeder_surfaces_in_the_loop_with_the_shard(tmp_path):
    out = write_shard_set(tmp_path / "set", VOCAB, {"t2i": 40}, samples_per_shard=8)
    cfg = make_cfg([out], stages=[{"steps": 50, "mixture": {"t2i": 1}}])
    data = load_data(cfg, warn=False)
    victim = data.sources[0].shards[3].url
    with open(victim, "r+b") as f:   # damage the shard after the manifest was read
        f.seek(700)
        f.write(b"\xff" * 64)
    feeder = _feeder(data, cfg, 2)
    with pytest.raises(DataError, match=rf"step \d+.*{victim.split('/')[-1]}"):
        for step in range(50):
            feeder.next(step, cfg.stage_at)
    feeder.close()


def test_a_sample_index_that_disagrees_with_its_shard_is_refused(tmp_path):
    """An index written with another EOS id counts other EOS tails than the tokens give: refused at read."""
    out = write_shard_set(tmp_path / "set", VOCAB, {"i2t": 12}, samples_per_shard=12)
    # answers end in <im_end>: taken for EOS, no answer needs a tail, while the trainer adds one to each
    blob = build_sample_index((out / "shards" / "test-00000.tar").read_bytes(), "x", eos_id=VOCAB.im_end_id)
    (out / "index" / "test-00000.samples.npz").write_bytes(blob)
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][0]["samples_index"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (out / "manifest.json").write_text(json.dumps(m))
    cfg = make_cfg([out], stages=[{"steps": 2, "mixture": {"i2t": 1}}], read="ranged")
    stream = load_data(cfg, warn=False).stream(cfg)
    with pytest.raises(DataError, match=r"test-00000\.tar.*sample index disagrees"):
        stream.step_rows(2, 0, 2, 1)


def test_ranked_reads_from_s3_give_the_local_rows(sets):
    """Sample indexes and ranged GETs (common/storage.read_ranges) against a real S3 API (moto)."""
    from common import storage
    from tests.helpers.moto_s3 import moto_s3

    local = make_cfg([sets["indexed"]], read="ranged")
    want = [as_tuples(m) for m in load_data(local, warn=False).stream(local).step_rows(2, 1, 2, 2)]
    with moto_s3():
        fs = storage.filesystem("s3://tok")
        fs.mkdir("tok")
        fs.put(str(sets["indexed"]) + "/", "s3://tok/set/", recursive=True)
        cfg = make_cfg(["s3://tok/set"], read="ranged")
        stream = load_data(cfg, warn=False).stream(cfg)
        got = [as_tuples(m) for m in stream.step_rows(2, 1, 2, 2)]
    assert all(same(g, w) for g, w in zip(got, want)) and len(got) == 2
    assert stream.store.counts.ranged_reads > 0 and stream.shard_cache.reads == 0
