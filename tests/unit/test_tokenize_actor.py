"""tokenize_jobs/pipeline.py Tokenize actor, called directly (no Ray): the per-actor speech code cache."""
from __future__ import annotations

import numpy as np

from common import configlib
from model.tokenizers import TokenizerSet, default_tokenizer_config
from tests.helpers.export import corpus_texts, tone
from tokenize_jobs import pipeline


def test_repeated_clips_are_encoded_once_and_get_the_same_codes(tmp_path, monkeypatch):
    cfg = default_tokenizer_config()
    clips = [tone(0.3, 200.0 + 60 * i, seed=i) for i in range(3)]
    TokenizerSet.prepare(cfg, str(tmp_path / "tok"), texts=corpus_texts(), wavs=clips)
    actor = pipeline.Tokenize(str(tmp_path / "tok"), configlib.to_dict(cfg), max_tokens=0, audio_batch=2)
    encoded = []
    real = actor._encode_audio_uncached
    monkeypatch.setattr(actor, "_encode_audio_uncached", lambda items: encoded.extend(k for k, _ in items) or real(items))

    # batch 1: clip 0 three times (copies, not the same array object), clip 1 once
    first = actor._encode_audio([("a", clips[0]), ("b", clips[0].copy()), ("c", clips[1]), ("d", clips[0].copy())])
    # batch 2: clip 1 again (cached), clip 2 new, an empty waveform fails and the failure is per input
    second = actor._encode_audio([("e", clips[1].copy()), ("f", clips[2]), ("g", np.zeros(0, np.float32))])

    assert encoded == ["a", "c", "f", "g"]
    assert actor.audio_cache_hits == 3
    direct = [actor.tok.speech.encode(c) for c in clips]
    for key, i in (("a", 0), ("b", 0), ("d", 0), ("c", 1)):
        assert np.array_equal(first[key], direct[i])
    assert np.array_equal(second["e"], direct[1]) and np.array_equal(second["f"], direct[2])
    assert isinstance(second["g"], Exception)


def test_expand_cuts_a_large_file_into_blocks_of_rows_per_block(tmp_path):
    import json

    import pyarrow as pa

    from tokenize_jobs import sources
    from tokenize_jobs.config import InputConfig

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(7)))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one more"}) + "\n")
    ctx = sources.corpus_context("text", str(tmp_path))
    units = sources.list_units(ctx, InputConfig())
    expected = [r for u in units for r in sources.expand_unit(ctx, dict(u), InputConfig(), set())]
    batch = pa.Table.from_pylist([{**u, "done": []} for u in units])

    out = list(pipeline.expand(batch, ctx, configlib.to_dict(InputConfig()), rows_per_block=3))

    assert [b.num_rows for b in out] == [3, 3, 3, 1]            # 8 inputs + 2 unit rows, 3 at a time
    assert all(b.schema == pipeline.EXPAND_SCHEMA for b in out)
    rows = [row for b in out for row in b.to_pylist()]
    assert rows == expected
    assert [r["status"] for r in rows].count("unit") == 2


def test_blocks_hold_one_speech_batch_and_four_cheap_batches():
    from tokenize_jobs.config import TokenizeJobConfig

    cfg = TokenizeJobConfig()
    speech, text = (cfg.ray.udf_batch_size(k, cfg.tokenizers) for k in ("speech-text", "text"))
    assert cfg.ray.rows_per_block("speech-text", cfg.tokenizers) == speech
    assert cfg.ray.rows_per_block("text", cfg.tokenizers) == 4 * text


def test_actors_expand_units_unless_one_unit_is_too_large_a_share():
    def unit(size):
        return {"files": [{"rel": "f", "size": size, "version": ""}]}

    assert pipeline.expand_in_actors([unit(10)], actors=1)              # one actor takes everything anyway
    assert not pipeline.expand_in_actors([unit(10)], actors=2)          # one file: expand tasks deal it out
    assert pipeline.expand_in_actors([unit(10)] * 8, actors=2)          # eight even files spread over two
    assert not pipeline.expand_in_actors([unit(100)] + [unit(10)] * 8, actors=2)   # 100 > 180 / 4


def test_tokenize_batches_a_block_itself_and_keeps_every_input(tmp_path):
    import json

    import pyarrow as pa

    from tokenize_jobs import sources
    from tokenize_jobs.config import TokenizeJobConfig

    cfg = TokenizeJobConfig(tokenizers=default_tokenizer_config())
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(7)))
    ctx = sources.corpus_context("text", str(tmp_path / "corpus"))
    rows = [r for u in sources.list_units(ctx, cfg.input) for r in sources.expand_unit(ctx, u, cfg.input, set())]
    TokenizerSet.prepare(cfg.tokenizers, str(tmp_path / "tok"), texts=corpus_texts(), wavs=[tone(0.3, 200.0)])
    kwargs = {"max_tokens": 0, "ctx": ctx, "job": configlib.to_dict(cfg)}
    whole = pipeline.Tokenize(str(tmp_path / "tok"), configlib.to_dict(cfg.tokenizers), **kwargs)
    by_3 = pipeline.Tokenize(str(tmp_path / "tok"), configlib.to_dict(cfg.tokenizers), batch_size=3, **kwargs)
    block = pa.Table.from_pylist(rows, schema=pipeline.EXPAND_SCHEMA)

    out = by_3(block)

    assert out.schema == pipeline.OUT_SCHEMA
    assert out.to_pylist() == whole(block).to_pylist()
    assert [r["status"] for r in out.to_pylist()] == ["ok"] * 7 + ["unit"]
    assert by_3(block.slice(0, 0)).num_rows == 0


def test_the_stage_module_imports_without_torch():
    """An expand or repartition task's worker imports `tokenize_jobs.pipeline` and never encodes: no torch."""
    import subprocess
    import sys

    code = "import sys, tokenize_jobs.pipeline; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_shard_actor_streams_its_units_into_the_shards_of_one_bare_loop(tmp_path):
    """TokenizeShards on a block of listed units: expand in chunks, tokenize, and one shard stream across the
    chunks, so its shards are byte for byte those of Tokenize + write_shards over the same inputs at once."""
    import json

    import pyarrow as pa

    from tokenize_jobs import sources
    from tokenize_jobs.config import TokenizeJobConfig
    from tokenize_jobs.writer import COMMIT_COLUMNS, write_shards

    cfg = TokenizeJobConfig(tokenizers=default_tokenizer_config())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(7)))
    (corpus / "b.jsonl").write_text(json.dumps({"text": "one more"}) + "\n" + "{broken\n")
    ctx = sources.corpus_context("text", str(corpus))
    units = sources.list_units(ctx, cfg.input)
    TokenizerSet.prepare(cfg.tokenizers, str(tmp_path / "tok"), texts=corpus_texts(), wavs=[tone(0.3, 200.0)])
    tokenize = {"artifacts_dir": str(tmp_path / "tok"), "tokenizers": configlib.to_dict(cfg.tokenizers),
                "max_tokens": 0, "ctx": ctx, "job": configlib.to_dict(cfg), "batch_size": 2}
    write = {"run_id": "r", "max_samples": 4, "max_bytes": 1 << 30, "eos_id": 0}
    actor = pipeline.TokenizeShards(configlib.to_dict(cfg.input), rows_per_block=3,
                                    write={**write, "out": str(tmp_path / "actor")}, **tokenize)

    out = actor(pa.Table.from_pylist([{**u, "done": []} for u in units]))

    rows = [r for u in units for r in sources.expand_unit(ctx, dict(u), cfg.input, set())]
    tokenized = pipeline.Tokenize(**tokenize)(pa.Table.from_pylist(rows, schema=pipeline.EXPAND_SCHEMA))
    want = write_shards(tokenized.to_pylist(), str(tmp_path / "bare"), **write)
    assert set(out) == set(COMMIT_COLUMNS)
    assert out["samples"] == [c["samples"] for c in want] == [4, 4, 0]    # 8 lines; the last index has no shard
    assert out["sha256"] == [c["sha256"] for c in want]                   # the same shard bytes
    assert out["quarantined"] == [0, 0, 1] and sum(out["inputs"]) == 9    # the broken line is accounted for
