"""The shard reader (tokenize_jobs/shards.py) against shards written by the writer's own tar code, and against
hostile or damaged tars: each must be refused with an error naming the shard, and nothing is extracted."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from model.vocab import Vocab
from tokenize_jobs import shards
from tokenize_jobs.shards import ShardError
from tokenize_jobs.writer import sample_tar_bytes, tar_end


def _samples(n: int = 3) -> list[tuple[str, np.ndarray, np.ndarray, dict]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        ids = rng.integers(0, 1000, size=5 + i).astype(np.int32)
        mask = np.arange(5 + i) >= 2
        out.append((f"fp{i:030d}_0", ids, mask, {"task": "text", "source": f"a.jsonl:{i + 1}", "fingerprint": "x",
                                                 "n_tokens": len(ids), "n_answer": int(mask.sum())}))
    return out


def _shard_bytes(samples) -> bytes:
    body = b"".join(sample_tar_bytes(k, ids, mask, meta) for k, ids, mask, meta in samples)
    return body + tar_end(len(body))


def _write_output(out: Path, data: bytes, **entry_overrides) -> dict:
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "shards" / "s-000000.tar").write_bytes(data)
    entry = {"path": "shards/s-000000.tar", "samples": 3, "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest(), **entry_overrides}
    manifest = {"format_version": 1, "vocab": Vocab(text_size=300).to_dict(), "shards": [entry]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _raw_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    info.linkname = "/etc/passwd"
    return info, None


def test_round_trip_through_output_folder(tmp_path):
    samples = _samples()
    _write_output(tmp_path, _shard_bytes(samples))
    got = list(shards.iter_samples(str(tmp_path)))
    assert [g["key"] for g in got] == [s[0] for s in samples]
    for g, (_, ids, mask, meta) in zip(got, samples):
        assert g["input_ids"].dtype == np.int32 and np.array_equal(g["input_ids"], ids)
        assert g["answer_mask"].dtype == np.bool_ and np.array_equal(g["answer_mask"], mask)
        assert g["meta"] == meta
    assert shards.shard_urls(str(tmp_path)) == [str(tmp_path / "shards" / "s-000000.tar")]
    assert shards.manifest_vocab(str(tmp_path)) == Vocab(text_size=300)


def test_shard_is_a_standard_tar_with_contiguous_members():
    data = _shard_bytes(_samples(2))
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert names == [f"fp{i:030d}_0.{s}" for i in range(2) for s in shards.SUFFIXES]
    assert len(data) % 10240 == 0


def test_sha256_mismatch_is_refused_before_parsing(tmp_path):
    data = bytearray(_shard_bytes(_samples()))
    _write_output(tmp_path, bytes(data))
    data[700] ^= 0xFF  # flip one byte inside the first sample's ids, same length
    (tmp_path / "shards" / "s-000000.tar").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"s-000000\.tar sha256 .* does not match"):
        next(shards.iter_samples(str(tmp_path)))
    # without verification the damaged (but well-formed) shard is readable: the check is what caught it
    assert len(list(shards.iter_samples(str(tmp_path), verify_sha=False))) == 3


def test_truncated_shard_is_refused(tmp_path):
    data = _shard_bytes(_samples())
    _write_output(tmp_path, data)
    (tmp_path / "shards" / "s-000000.tar").write_bytes(data[:1500])
    with pytest.raises(ShardError, match="s-000000.tar is 1500 bytes but the manifest says"):
        list(shards.iter_samples(str(tmp_path)))
    # with no manifest to compare against, the tar structure itself gives truncation away
    body_end = len(data.rstrip(b"\0"))  # the last member is meta.json, which ends in "}"
    body_end += (-body_end) % 512  # last member's data padded to a block: the end-of-archive marker starts here
    for cut in (1500, 1536, body_end):  # mid-member, on a header boundary, end marker cut off
        with pytest.raises(ShardError, match="truncated"):
            list(shards.iter_samples([_write(tmp_path / f"cut{cut}.tar", data[:cut])]))


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name", ["../evil.input_ids.npy", "a/../../evil.meta.json", "/tmp/evil.meta.json"])
def test_member_paths_that_escape_are_refused(tmp_path, name):
    url = _write(tmp_path / "bad.tar", _raw_tar([_member(name)]))
    with pytest.raises(ShardError, match=r"bad\.tar: member .*(absolute|\.\.)"):
        list(shards.iter_samples([url]))
    assert not (tmp_path.parent / "evil.input_ids.npy").exists() and not Path("/tmp/evil.meta.json").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE])
def test_non_regular_members_are_refused(tmp_path, kind):
    url = _write(tmp_path / "links.tar", _raw_tar([_member("k.input_ids.npy", kind=kind)]))
    with pytest.raises(ShardError, match="links.tar: member 'k.input_ids.npy' is not a regular file"):
        list(shards.iter_samples([url]))


def test_non_contiguous_and_incomplete_samples_are_refused(tmp_path):
    (k1, ids, mask, meta), (k2, *_rest) = _samples(2)
    one = sample_tar_bytes(k1, ids, mask, meta)
    a = tarfile.open(fileobj=io.BytesIO(one + tar_end(len(one))))
    members = [(m, a.extractfile(m).read()) for m in a.getmembers()]
    other = _member(f"{k2}.meta.json", b"{}")
    interleaved = _raw_tar([members[0], other, members[1], members[2]])
    with pytest.raises(ShardError, match="lacks member|not contiguous"):
        list(shards.iter_samples([_write(tmp_path / "mixed.tar", interleaved)]))


def test_arrays_must_have_the_documented_types(tmp_path):
    body = sample_tar_bytes("k", np.arange(4, dtype=np.int32), np.ones(3, bool), {"task": "text"})
    with pytest.raises(ShardError, match="answer_mask is bool .*expected bool \\(4,\\)"):
        list(shards.iter_samples([_write(tmp_path / "shape.tar", body + tar_end(len(body)))]))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bad = _raw_tar([_member("k.input_ids.npy", pickled.getvalue()), _member("k.answer_mask.npy", b""),
                    _member("k.meta.json", b"{}")])
    with pytest.raises(ShardError, match="not a valid .npy"):
        list(shards.iter_samples([_write(tmp_path / "pickle.tar", bad)]))


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json in .*omnidiff tokenize"):
        shards.read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ShardError, match="format_version 99"):
        shards.read_manifest(str(tmp_path))
    data = _shard_bytes(_samples())
    _write_output(tmp_path, data, path="../outside.tar")
    with pytest.raises(ShardError, match="shard path '../outside.tar'"):
        shards.shard_urls(str(tmp_path))
    _write_output(tmp_path, data)
    (tmp_path / "shards" / "s-000000.tar").unlink()
    with pytest.raises(ShardError, match="listed in the manifest but does not exist"):
        list(shards.iter_samples(str(tmp_path)))


# ---- the sample index -------------------------------------------------------------------------------------------

def _tokenized_rows(n_inputs: int = 6) -> list[dict]:
    """Rows as the tokenize actors hand them to write_shards: each input's samples as tar bytes + stats."""
    rows = []
    for i in range(n_inputs):
        samples = _samples(3)
        tar = b"".join(sample_tar_bytes(f"in{i}x{j}", ids, mask, {**meta, "task": ("asr", "t2i")[j % 2]})
                       for j, (_, ids, mask, meta) in enumerate(samples))
        stats = [{"task": ("asr", "t2i")[j % 2], "n_tokens": len(ids), "n_answer": int(mask.sum())}
                 for j, (_, ids, mask, _) in enumerate(samples)]
        rows.append({"fp": f"fp{i}", "file": "a.jsonl", "unit": "u", "source": f"a.jsonl:{i}", "unit_new": n_inputs,
                     "status": "ok", "reason": "", "detail": "", "stats": json.dumps(stats), "tar": tar})
    return rows


def test_written_shards_carry_a_sample_index_that_ranged_reads_use(tmp_path):
    from model.diffusion import eos_tail_spans
    from tokenize_jobs.writer import OutputState, ShardWriter, clean_orphans, write_shards

    out, eos = str(tmp_path / "out"), 7
    rows = write_shards(_tokenized_rows(), out, "run1", max_samples=9, max_bytes=2**30, eos_id=eos)
    header = {"vocab": Vocab(text_size=300).to_dict(), "job": {"kind": "text", "input": "x"}}
    w = ShardWriter(out, "run1", header, OutputState.load(out))
    for r in rows:
        w.add_row(r)
    w.finish()
    (tmp_path / "out" / "index" / "run1-stray.samples.npz").write_bytes(b"orphan")
    entries = shards.shard_entries(out)
    assert len(entries) == 2 and all("index_url" in e for e in entries)
    assert clean_orphans(out, shards.read_manifest(out)) == ["index/run1-stray.samples.npz"]  # listed ones stay
    for e in entries:
        index, nbytes = shards.read_sample_index(e)
        assert nbytes == e["samples_index"]["bytes"] and len(index) == e["samples"] == 9
        whole = list(shards.iter_samples([e["url"]], verify_sha=False))
        assert index.task_names() == [s["meta"]["task"] for s in whole]
        assert index.tokens.tolist() == [s["input_ids"].size for s in whole]
        assert index.tails.tolist() == [int(eos_tail_spans(s["input_ids"], s["answer_mask"], eos).sum())
                                        for s in whole]
        got, read = shards.read_samples(e["url"], index, [7, 1, 2], max_gap=0)
        assert sorted(got) == [1, 2, 7] and read == sum(int(index.size[i]) for i in (1, 2, 7))   # only theirs
        near, read_near = shards.read_samples(e["url"], index, [7, 1, 2], max_gap=2**20)   # gaps merged: one read
        assert read_near == int(index.offset[7] + index.size[7] - index.offset[1]) and near.keys() == got.keys()
        for i, s in got.items():
            assert s["key"] == whole[i]["key"] and np.array_equal(s["input_ids"], whole[i]["input_ids"])


def test_a_damaged_sample_or_index_is_refused_naming_the_shard(tmp_path):
    from tokenize_jobs.writer import write_shards

    out = str(tmp_path / "out")
    shard_row = [r for r in write_shards(_tokenized_rows(3), out, "r", 100, 2**30, eos_id=7) if r["shard"]][0]
    meta = json.loads(shard_row["samples_index"])
    url = str(tmp_path / "out" / shard_row["shard"])
    entry = {"url": url, "samples": 9, "index_url": str(tmp_path / "out" / meta["path"]), "samples_index": meta}
    index, _ = shards.read_sample_index(entry)
    data = bytearray(Path(url).read_bytes())
    data[int(index.offset[4]) + 600] ^= 0xFF                      # a byte inside sample 4's input_ids
    Path(url).write_bytes(bytes(data))
    shards.read_samples(url, index, [3])                          # the others still read
    with pytest.raises(ShardError, match=r"s?r-.*\.tar \(sample 4.*digest"):
        shards.read_samples(url, index, [4])
    Path(entry["index_url"]).write_bytes(b"not an index")
    with pytest.raises(ShardError, match=r"\.samples\.npz.*(sha256|bytes)"):
        shards.read_sample_index(entry)
