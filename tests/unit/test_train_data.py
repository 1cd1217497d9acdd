"""pipelines/train/data.py (and the data side of pipelines/train/config.py): fast, no Ray."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from common.configlib import ConfigError, from_dict
from model.vocab import Vocab, VocabMismatch
from pipelines.train.config import TrainConfig
from pipelines.train.data import DataError, StreamState, collate, load_data, mask_batch, step_generator
from tests.helpers.shardgen import small_vocab, write_shard_set

VOCAB = small_vocab()


def make_cfg(shards, **data) -> TrainConfig:
    stages = data.pop("stages", [])
    steps = sum(s["steps"] for s in stages) or 10
    return from_dict(TrainConfig, {"data": {"shards": [str(s) for s in shards], "seq_len": 128, "stages": stages,
                                            **data}, "train": {"steps": steps}})


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("set"), VOCAB, {"t2i": 24, "i2t": 24, "asr": 16},
                           samples_per_shard=10)


def rows_keys(rows):
    return [[s.key for s in row] for row in rows]


def test_sources_default_to_tasks_and_stages_drop_missing_sources(shard_set, caplog):
    cfg = make_cfg([shard_set], stages=[{"name": "s1", "steps": 2, "mixture": {"t2i": 1, "i2t": 1}},
                                        {"name": "s2", "steps": 3, "mixture": {"t2i": 1, "i2t": 1, "asr": 2,
                                                                               "tts": 1}}])
    with caplog.at_level(logging.WARNING):
        data = load_data(cfg)
    assert sorted(s.name for s in data.sources) == ["asr", "i2t", "t2i"]
    assert data.stages[0].weights == {"i2t": 0.5, "t2i": 0.5}
    assert data.stages[1].weights == {"asr": 0.5, "i2t": 0.25, "t2i": 0.25}   # tts has no samples: dropped
    assert "tts" in caplog.text


def test_stage_with_no_available_source_is_an_error(shard_set):
    cfg = make_cfg([shard_set], stages=[{"steps": 2, "mixture": {"tts": 1, "s2i": 1}}])
    with pytest.raises(DataError, match="none of its sources"):
        load_data(cfg)


def test_stage_steps_must_add_up():
    with pytest.raises(ConfigError, match="add up to 5"):
        from_dict(TrainConfig, {"data": {"stages": [{"steps": 5, "mixture": {"t2i": 1}}]}, "train": {"steps": 6}})


def test_vocab_mismatch_with_model_names_the_field(shard_set):
    other = Vocab(text_size=VOCAB.text_size + 1, n_q=VOCAB.n_q, audio_codebook_size=16, image_codebook_size=17)
    with pytest.raises(VocabMismatch, match="text_size"):
        load_data(make_cfg([shard_set]), model_vocab=other)


def test_out_of_range_ids_fail_before_training_naming_the_shard(tmp_path):
    bad = write_shard_set(tmp_path / "bad", VOCAB, {"t2i": 20}, samples_per_shard=10, corrupt={"shard": 1})
    cfg = make_cfg([bad])
    load_data(cfg)                                    # the manifest alone looks fine
    with pytest.raises(DataError, match=r"test-00001\.tar.*outside the vocabulary"):
        load_data(cfg, validate=True)


def test_packing_fills_rows_with_segments(shard_set):
    cfg = make_cfg([shard_set])
    data = load_data(cfg)
    stream = data.stream(cfg)
    rows = [stream.next_row() for _ in range(6)]
    assert all(sum(s.ids.size for s in row) <= 128 for row in rows)
    assert max(len(row) for row in rows) >= 2            # samples are ~40-70 tokens: several fit a row
    batch = collate(rows, 128, data.vocab)
    for b, row in enumerate(rows):
        seg = batch.segment_ids[b]
        n = sum(s.ids.size for s in row)
        assert (seg[n:] == 0).all() and (seg[:n] > 0).all()
        assert seg[:n].unique().tolist() == list(range(1, len(row) + 1))
        assert torch.equal(batch.ids[b, :row[0].ids.size], torch.from_numpy(row[0].ids))
        assert (batch.ids[b, n:] == data.vocab.pad_id).all()
    assert batch.n_tokens == sum(s.ids.size for row in rows for s in row)


def test_pad_mode_puts_one_sample_per_row(shard_set):
    cfg = make_cfg([shard_set], packing="pad")
    stream = load_data(cfg).stream(cfg)
    assert all(len(stream.next_row()) == 1 for _ in range(5))


def test_eos_tail_is_added_and_only_answers_are_masked(shard_set):
    cfg = make_cfg([shard_set])
    data = load_data(cfg)
    stream = data.stream(cfg)
    rows = [stream.next_row() for _ in range(2)]
    batch = collate(rows, 128, data.vocab)
    assert batch.tail_mask.any()
    assert (batch.ids[batch.tail_mask] == data.vocab.eos_id).all()
    assert (batch.answer_mask | ~batch.tail_mask).all()   # the tail is part of the answer
    m = mask_batch(batch, data.vocab, step_generator(0, 0, 0, 0), scheme="per_token", eps=1e-3, tail_factor=0.6)
    assert m.is_masked.any()
    assert not (m.is_masked & ~batch.answer_mask).any()
    assert (m.noisy_ids[m.is_masked] == data.vocab.mask_id).all()


def test_mixture_follows_weights_and_stage_switch_keeps_cursors(shard_set):
    cfg = make_cfg([shard_set], packing="pad",
                   stages=[{"steps": 1, "mixture": {"t2i": 1}}, {"steps": 1, "mixture": {"t2i": 3, "asr": 1}}])
    stream = load_data(cfg).stream(cfg)
    first = [stream.next_row()[0] for _ in range(10)]
    assert {s.task for s in first} == {"t2i"}
    t2i_cursor = list(stream.state.cursors["t2i"])
    stream.set_stage(1)
    assert stream.state.cursors["t2i"] == t2i_cursor and stream.state.draws == 0
    tasks = [stream.next_row()[0].task for _ in range(400)]
    assert 0.65 < tasks.count("t2i") / len(tasks) < 0.85
    assert stream.state.cursors["t2i"] != t2i_cursor


def test_stage_switch_continues_each_source_where_it_was(shard_set):
    stages = [{"steps": 1, "mixture": {"t2i": 1}}, {"steps": 1, "mixture": {"t2i": 1}}]
    cfg = make_cfg([shard_set], packing="pad", stages=stages)
    one = load_data(cfg).stream(cfg)
    straight = [one.next_row()[0].key for _ in range(20)]
    two = load_data(cfg).stream(cfg)
    keys = [two.next_row()[0].key for _ in range(10)]
    two.set_stage(1)
    keys += [two.next_row()[0].key for _ in range(10)]
    assert keys == straight          # a single-source stream is unaffected by the switch: no repeat, no skip


def test_sources_cycle_through_epochs_with_a_new_order(shard_set):
    cfg = make_cfg([shard_set], packing="pad", sources=[{"name": "img", "tasks": ["t2i"]}],
                   stages=[{"steps": 1, "mixture": {"img": 1}}])
    stream = load_data(cfg).stream(cfg)
    keys = [stream.next_row()[0].key for _ in range(48)]
    assert sorted(keys[:24]) == sorted(keys[24:]) and len(set(keys[:24])) == 24  # each epoch: every sample once
    assert keys[:24] != keys[24:]


def test_resume_continues_the_stream_exactly(shard_set):
    cfg = make_cfg([shard_set])
    data = load_data(cfg)
    a = data.stream(cfg)
    for _ in range(7):
        a.next_row()
    saved = json.loads(json.dumps(a.state.to_dict()))       # what the checkpoint stores
    expect = rows_keys([a.next_row() for _ in range(9)])
    b = load_data(cfg).stream(cfg, StreamState.from_dict(saved))
    assert rows_keys([b.next_row() for _ in range(9)]) == expect


def test_resume_with_another_world_size_neither_repeats_nor_skips(shard_set):
    cfg = make_cfg([shard_set])
    data = load_data(cfg)
    ref_stream = data.stream(cfg)
    reference = rows_keys([ref_stream.next_row() for _ in range(2 * 2 * 2 + 1 * 2 * 3)])
    # 2 steps with 2 ranks (micro_batch 2), both ranks see the same stream and take strided rows
    streams = [data.stream(cfg) for _ in range(2)]
    seen = []
    for _ in range(2):
        per_rank = [s.step_rows(world=2, rank=r, micro_batch=2, grad_accum=1) for r, s in enumerate(streams)]
        assert streams[0].state.to_dict() == streams[1].state.to_dict()
        for m in range(2):   # rows interleave rank 0, rank 1, rank 0, rank 1
            seen += [rows_keys([per_rank[0][0][m]])[0], rows_keys([per_rank[1][0][m]])[0]]
    # then resume on 1 rank with grad_accum 3
    c = data.stream(cfg, StreamState.from_dict(streams[0].state.to_dict()))
    for micro in c.step_rows(world=1, rank=0, micro_batch=2, grad_accum=3):
        seen += rows_keys(micro)
    assert seen == reference


def test_overlong_samples_are_dropped_or_refused(shard_set):
    cfg = make_cfg([shard_set], seq_len=40)
    stream = load_data(cfg).stream(cfg)
    rows = [stream.next_row() for _ in range(3)]
    assert all(s.ids.size <= 40 for row in rows for s in row) and stream.state.dropped > 0
    cfg = make_cfg([shard_set], seq_len=40, too_long="error")
    with pytest.raises(DataError, match="data.seq_len=40"):
        for _ in range(20):
            load_data(cfg).stream(cfg).next_row()


def test_sources_share_each_read_shard_without_changing_the_stream(shard_set):
    from pipelines.train.data import RowStream

    cfg = make_cfg([shard_set])
    data = load_data(cfg)
    assert len(data.sources) == 3                               # one per task, every one over all 7 shards

    def stream(cache_bytes):
        return RowStream(data.sources, data.stages, data.vocab, seed=cfg.train.seed, seq_len=cfg.data.seq_len,
                         packing=cfg.data.packing, max_tail=cfg.diffusion.max_tail, shard_cache_bytes=cache_bytes)

    shared, one_shard = stream(2**30), stream(1)                # 1 byte: only the newest shard stays cached
    expect = rows_keys([one_shard.next_row() for _ in range(40)])
    assert rows_keys([shared.next_row() for _ in range(40)]) == expect
    n_shards = len(data.sources[0].shards)
    assert shared.shard_cache.reads == n_shards                 # 3 sources, one read and sha256 check per shard
    assert one_shard.shard_cache.reads > n_shards


def test_task_max_tail_sets_each_tasks_eos_tail(shard_set):
    """diffusion.task_max_tail: asr answers get tails up to 24 EOS, the other tasks up to diffusion.max_tail."""
    cfg = make_cfg([shard_set], seq_len=512)
    cfg.diffusion.max_tail, cfg.diffusion.task_max_tail = 2, {"asr": 24}
    stream = load_data(cfg).stream(cfg)
    longest: dict[str, int] = {}
    for _ in range(60):
        for s in stream.next_row():
            assert s.tail_mask.sum() >= 1 and (s.ids[s.tail_mask] == VOCAB.eos_id).all()
            longest[s.task] = max(longest.get(s.task, 0), int(s.tail_mask.sum()))
    assert longest["t2i"] <= 2 and longest["i2t"] <= 2 and 2 < longest["asr"] <= 24
    with pytest.raises(ConfigError, match="task_max_tail"):
        from_dict(TrainConfig, {"diffusion": {"task_max_tail": {"speech": 4}}})
