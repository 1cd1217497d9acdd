"""tokenize_jobs/writer.py without Ray: worker tasks write shards + indexes (`write_shards`), the driver commits
their metadata rows under the fence (`ShardWriter`), the next run reads what is done from the committed indexes
(`OutputState.load`), and uncommitted files of failed or retried attempts are orphans."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.vocab import Vocab
from tokenize_jobs import shards
from tokenize_jobs.writer import (COMMIT_COLUMNS, FencedOut, OutputState, ShardWriter, clean_orphans, fence,
                                  pack_samples, write_shards)


def _input(i: int, unit: str, n_samples: int = 2, length: int = 6) -> dict:
    """A row as the Tokenize actors emit it: one tokenized input with `n_samples` samples."""
    samples = []
    for j in range(n_samples):
        ids = np.arange(length, dtype=np.int32) + i
        mask = np.arange(length) >= 2
        samples.append((ids, mask, {"task": ("t2i", "i2t")[j % 2], "source": f"{unit}:{i}", "fingerprint": f"fp{i}",
                                    "n_tokens": length, "n_answer": int(mask.sum())}))
    stats = [{"task": m["task"], "n_tokens": m["n_tokens"], "n_answer": m["n_answer"]} for _, _, m in samples]
    return {"fp": f"fp{i:04d}", "file": f"{unit}.jsonl", "unit": unit, "source": f"{unit}.jsonl:{i}",
            "unit_new": 0, "status": "ok", "reason": "", "detail": "", **pack_samples(samples),
            "stats": json.dumps(stats)}


def _bad(i: int, unit: str) -> dict:
    return {**_input(i, unit, 0), "status": "quarantined", "reason": "bad_json", "detail": "line 1"}


def _unit(unit: str, new: int) -> dict:
    return {"fp": "", "file": f"{unit}.jsonl", "unit": unit, "source": "", "unit_new": new, "status": "unit",
            "reason": "", "detail": "", "ids": b"", "mask": b"", "metas": "", "stats": "[]"}


def _header() -> dict:
    return {"vocab": Vocab(text_size=300).to_dict(), "tokenizers": {}, "job": {"kind": "text", "input": "in"}}


def _commit_all(out: Path, run_id: str, blocks: list[list[dict]], max_samples: int = 4) -> ShardWriter:
    state = fence(str(out), run_id, "lease")
    writer = ShardWriter(str(out), run_id, _header(), state)
    for block in blocks:   # a write task per block
        for row in write_shards(block, str(out), run_id, max_samples, 1 << 30):
            writer.add_commit(row)
    writer.finish()
    return writer


def test_workers_write_shards_and_indexes_and_the_driver_gets_metadata_only(tmp_path):
    rows = [_input(i, "a") for i in range(5)] + [_bad(5, "a"), _unit("a", 6)]
    commits = write_shards(rows, str(tmp_path), "run1", 4, 1 << 30)
    # 2 samples per input, shards close at 4: two shards of 2 inputs, then one of the fifth input with the
    # quarantined input and the unit line
    assert [c["samples"] for c in commits] == [4, 4, 2]
    assert all(set(c) == set(COMMIT_COLUMNS) for c in commits)
    for c in commits:
        stem = c["shard"].removeprefix("shards/").removesuffix(".tar")
        assert stem.startswith("run1-") and c["index"] == f"index/{stem}.jsonl"
        assert (tmp_path / c["shard"]).stat().st_size == c["bytes"]
    last = [json.loads(line) for line in (tmp_path / commits[-1]["index"]).read_text().splitlines()]
    assert last == [{"fp": "fp0004", "file": "a.jsonl", "unit": "a", "status": "ok", "samples": 2},
                    {"fp": "fp0005", "file": "a.jsonl", "unit": "a", "status": "quarantined",
                     "source": "a.jsonl:5", "reason": "bad_json", "detail": "line 1"},
                    {"unit": "a", "file": "a.jsonl", "new": 6}]
    assert (commits[-1]["tokenized"], commits[-1]["quarantined"]) == (1, 1)
    # a block of quarantined inputs only: an index and no shard
    only_bad = write_shards([_bad(9, "b"), _unit("b", 1)], str(tmp_path), "run1", 4, 1 << 30)
    assert len(only_bad) == 1 and only_bad[0]["shard"] == "" and only_bad[0]["samples"] == 0
    # the same block written again (a retried task attempt) never reuses a name
    again = write_shards(rows, str(tmp_path), "run1", 4, 1 << 30)
    assert not {c["shard"] for c in again} & {c["shard"] for c in commits}


def test_driver_bytes_grow_with_shards_not_with_inputs(tmp_path):
    """What the driver receives per shard does not depend on how many inputs (or tokens) the shard holds."""
    per_shard = {}
    for n in (4, 64):
        out = tmp_path / str(n)
        writer = _commit_all(out, "r", [[_input(i, "a", 1, 32) for i in range(n)] + [_unit("a", n)]], max_samples=n)
        assert writer.run["shards"] == 1
        per_shard[n] = writer.run["driver_bytes"]
    assert per_shard[64] < 1.2 * per_shard[4] and per_shard[4] < 1024, per_shard


def test_commits_reconcile_and_the_library_reader_reads_a_committed_shard(tmp_path):
    import webdataset as wds

    blocks = [[_input(0, "a"), _input(1, "a"), _bad(2, "a")], [_input(3, "a"), _unit("a", 4)],
              [_bad(4, "b"), _unit("b", 1)]]
    writer = _commit_all(tmp_path, "run1", blocks)
    m = shards.read_manifest(str(tmp_path))
    c = m["counts"]
    assert (c["inputs_seen"], c["inputs_tokenized"], c["inputs_quarantined"]) == (5, 3, 2)
    assert c["samples_written"] == 6 == sum(s["samples"] for s in m["shards"])
    # block 1 closes a shard at 4 samples, then its quarantined input gets an index of its own
    assert c["quarantined_by_reason"] == {"bad_json": 2} and len(m["indexes"]) == 4
    assert all(e["run"] == "run1" for e in m["indexes"])
    assert (tmp_path / "quarantine.jsonl").read_text().count("bad_json") == 2
    ours = list(shards.iter_samples(str(tmp_path)))
    assert len(ours) == 6
    urls = shards.shard_urls(str(tmp_path))
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert [g["__key__"] for g in got] == [o["key"] for o in ours]
    for g, o in zip(got, ours):
        assert np.array_equal(g["input_ids.npy"], o["input_ids"]) and g["meta.json"] == o["meta"]
    assert writer.run["driver_bytes"] > 0


def test_the_done_set_comes_from_committed_indexes_per_run(tmp_path):
    """A unit is done when one run's committed indexes hold its unit line and all the inputs that line counts;
    of units left half done, only the committed inputs' fingerprints are kept (by file)."""
    out = str(tmp_path)
    state = fence(out, "run1", "lease")
    writer = ShardWriter(out, "run1", _header(), state)
    # unit a: all 3 inputs and its unit line committed (across two commits); unit b: its unit line and one of its
    # two inputs committed, the other input's commit never arrives (killed run); unit c: no unit line
    committed = write_shards([_input(0, "a"), _input(1, "a")], out, "run1", 4, 1 << 30)
    committed += write_shards([_input(2, "a"), _unit("a", 3), _input(3, "b"), _unit("b", 2), _input(5, "c")],
                              out, "run1", 100, 1 << 30)
    lost = write_shards([_input(4, "b")], out, "run1", 4, 1 << 30)
    for row in committed:
        writer.add_commit(row)
    state = OutputState.load(out)
    assert state.done_units == {"a"}
    assert state.done_by_file == {"b.jsonl": {"fp0003"}, "c.jsonl": {"fp0005"}}
    # the next run fences, deletes the lost commit's files, redoes b's missing input and marks b and c done
    state = fence(out, "run2", "lease2")
    removed = clean_orphans(out, state.manifest)
    assert sorted(removed) == sorted([lost[0]["shard"], lost[0]["index"]])
    writer = ShardWriter(out, "run2", _header(), state)
    for row in write_shards([_input(4, "b"), _unit("b", 1), _unit("c", 0)], out, "run2", 4, 1 << 30):
        writer.add_commit(row)
    writer.finish()
    state = OutputState.load(out)
    assert state.done_units == {"a", "b", "c"} and state.done_by_file == {}
    assert shards.read_manifest(out)["counts"]["inputs_seen"] == 6
    # a.jsonl grew (a new unit): the rerun gets the fingerprints of its old lines; a new file needs none
    state.load_done_inputs({"a.jsonl", "new.jsonl"})
    assert state.done_by_file == {"a.jsonl": {"fp0000", "fp0001", "fp0002"}}


def test_a_fenced_out_writer_cannot_commit_and_its_files_are_orphans(tmp_path):
    out = str(tmp_path)
    old = ShardWriter(out, "run1", _header(), fence(out, "run1", "lease1"))
    rows = write_shards([_input(0, "a"), _unit("a", 1)], out, "run1", 4, 1 << 30)
    new_state = fence(out, "run2", "lease2")          # another run took the output over
    with pytest.raises(FencedOut, match="another run took the output over"):
        old.add_commit(rows[0])
    assert sorted(clean_orphans(out, new_state.manifest)) == sorted([rows[0]["shard"], rows[0]["index"]])


def test_finish_deletes_this_runs_unlisted_attempts_only(tmp_path):
    """Files of this run's failed or retried task attempts go at its end; another run's files are left to the
    next run's start (it alone knows its lock is free)."""
    out = str(tmp_path)
    state = fence(out, "run2", "lease")
    retried = write_shards([_input(0, "a"), _unit("a", 1)], out, "run2", 4, 1 << 30)[0]   # the attempt that failed
    other = write_shards([_input(1, "b")], out, "run1", 4, 1 << 30)[0]
    writer = ShardWriter(out, "run2", _header(), state)
    for row in write_shards([_input(0, "a"), _unit("a", 1)], out, "run2", 4, 1 << 30):   # the retry
        writer.add_commit(row)
    removed = writer.finish()
    assert sorted(removed) == sorted([retried["shard"], retried["index"]])
    assert (tmp_path / other["shard"]).exists()
    assert len(list(shards.iter_samples(out))) == 2


def test_written_spans_read_off_the_headers_equal_the_full_check():
    import io
    import tarfile

    from tokenize_jobs.writer import shard_bytes, wds_sample

    samples = [wds_sample(f"k{i:03d}", np.arange(3 + 700 * i, dtype=np.int32), np.ones(3 + 700 * i, bool),
                          {"task": "text"}) for i in range(4)]
    data = shard_bytes(samples)
    keys = [s["__key__"] for s in samples]
    assert shards._written_spans(data, keys, "s.tar") == shards._check_structure(data, "s.tar")

    # a pax header (a name too long for ustar) is laid out differently: the full check answers
    long_key = "k" * 120
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for suffix in shards.SUFFIXES:
            info = tarfile.TarInfo(f"{long_key}.{suffix}")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    pax = buf.getvalue()
    assert shards._written_spans(pax, [long_key], "p.tar") == shards._check_structure(pax, "p.tar")
    # and bytes cut inside the last sample are refused, as the full check refuses them
    last_end = shards._check_structure(data, "s.tar")[-1][2]
    with pytest.raises(shards.ShardError):
        shards._written_spans(data[:last_end - 100], keys, "cut.tar")


def test_the_shard_writer_makes_the_same_bytes_as_a_ustar_tarfile():
    from bench.tokenize import raw_tarfile_bytes, writer_samples
    from tokenize_jobs.writer import shard_bytes

    samples = writer_samples(20)
    assert shard_bytes(samples) == raw_tarfile_bytes(samples)
