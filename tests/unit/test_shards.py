"""The shard format: the writer (webdataset's TarWriter, deterministic bytes) and the reader (tokenize_jobs/shards.py)
against each other and against the library's own `wds.WebDataset`, and the reader against hostile or damaged tars:
each must be refused with an error naming the shard, and nothing is extracted."""
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
from tokenize_jobs.writer import pack_samples, shard_bytes, unpack_samples, wds_sample


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
    return shard_bytes(wds_sample(k, ids, mask, meta) for k, ids, mask, meta in samples)


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
    a = tarfile.open(fileobj=io.BytesIO(shard_bytes([wds_sample(k1, ids, mask, meta)])))
    members = [(m, a.extractfile(m).read()) for m in a.getmembers()]
    other = _member(f"{k2}.meta.json", b"{}")
    interleaved = _raw_tar([members[0], other, members[1], members[2]])
    with pytest.raises(ShardError, match="lacks member|not contiguous"):
        list(shards.iter_samples([_write(tmp_path / "mixed.tar", interleaved)]))


def test_arrays_must_have_the_documented_types(tmp_path):
    body = shard_bytes([wds_sample("k", np.arange(4, dtype=np.int32), np.ones(3, bool), {"task": "text"})])
    with pytest.raises(ShardError, match="answer_mask is bool .*expected bool \\(4,\\)"):
        list(shards.iter_samples([_write(tmp_path / "shape.tar", body)]))
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


def test_the_webdataset_library_reads_the_shards_as_written(tmp_path):
    import webdataset as wds

    samples = _samples()
    url = _write(tmp_path / "s.tar", _shard_bytes(samples))
    got = list(wds.WebDataset(url, shardshuffle=False).decode())   # the library's default decoders: .npy, .json
    assert [g["__key__"] for g in got] == [s[0] for s in samples]
    for g, (_, ids, mask, meta) in zip(got, samples):
        assert np.array_equal(g["input_ids.npy"], ids) and g["input_ids.npy"].dtype == np.int32
        assert np.array_equal(g["answer_mask.npy"], mask) and g["meta.json"] == meta
    ours = list(shards.iter_samples([url]))
    assert [o["key"] for o in ours] == [g["__key__"] for g in got]


def test_shard_bytes_are_deterministic_with_pinned_headers():
    a, b = _shard_bytes(_samples()), _shard_bytes(_samples())
    assert a == b
    for m in tarfile.open(fileobj=io.BytesIO(a)).getmembers():
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644), m.name
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()


def test_packed_samples_between_stages_round_trip():
    samples = [(ids, mask, meta) for _, ids, mask, meta in _samples()]
    packed = pack_samples(samples)
    got = list(unpack_samples("fp", packed["ids"], packed["mask"], packed["metas"]))
    assert [g["__key__"] for g in got] == ["fp_0", "fp_1", "fp_2"]
    assert _shard_bytes([(f"fp_{j}", *s) for j, s in enumerate(samples)]) == shard_bytes(got)
    with pytest.raises(ValueError, match="input fp: 18 ids / 18 mask values for samples of 11 tokens"):
        list(unpack_samples("fp", packed["ids"], packed["mask"], packed["metas"].rsplit("\n", 1)[0]))


def test_library_written_shards_with_pickle_or_escaping_names_are_refused(tmp_path):
    """Whatever wrote a tar (here webdataset's own TarWriter), the reader refuses pickled arrays and member names
    that leave the archive."""
    import webdataset as wds

    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    good = wds_sample("k", np.arange(3, dtype=np.int32), np.ones(3, bool), {"task": "text"})
    for name, sample in (("pickle", {**good, "input_ids.npy": pickled.getvalue()}),
                         ("escape", {**good, "__key__": "../../evil"})):
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False) as w:
            w.write(sample)
        url = _write(tmp_path / f"{name}.tar", buf.getvalue())
        with pytest.raises(ShardError, match=rf"{name}\.tar: .*(not a valid \.npy|contains '\.\.')"):
            list(shards.iter_samples([url]))
    assert not (tmp_path.parent.parent / "evil.meta.json").exists()


# ---- the sample index -------------------------------------------------------------------------------------------

def _tokenized_rows(n_inputs: int = 6) -> list[dict]:
    """Rows as the tokenize actors hand them to write_shards: each input's samples packed, + their stats."""
    rows = []
    for i in range(n_inputs):
        samples = [(ids, mask, {**meta, "task": ("asr", "t2i")[j % 2], "n_tokens": len(ids)})
                   for j, (_, ids, mask, meta) in enumerate(_samples(3))]
        stats = [{"task": meta["task"], "n_tokens": len(ids), "n_answer": int(mask.sum())}
                 for ids, mask, meta in samples]
        rows.append({"fp": f"fp{i}", "file": "a.jsonl", "unit": "u", "source": f"a.jsonl:{i}", "unit_new": 0,
                     "status": "ok", "reason": "", "detail": "", "stats": json.dumps(stats),
                     **pack_samples(samples)})
    return rows


def test_written_shards_carry_a_sample_index_that_ranged_reads_use(tmp_path):
    from model.diffusion import eos_tail_spans
    from tokenize_jobs.writer import OutputState, ShardWriter, clean_orphans, write_shards

    out, eos = str(tmp_path / "out"), 7
    commits = write_shards(_tokenized_rows(), out, "run1", max_samples=9, max_bytes=2**30, eos_id=eos)
    header = {"vocab": Vocab(text_size=300).to_dict(), "job": {"kind": "text", "input": "x"}}
    w = ShardWriter(out, "run1", header, OutputState.load(out))
    for c in commits:
        w.add_commit(c)
    w.finish()
    (tmp_path / "out" / "index" / "run1-stray.samples.npz").write_bytes(b"orphan")
    entries = shards.shard_entries(out)
    assert len(entries) == 2 and all("index_url" in e for e in entries)
    assert clean_orphans(out, shards.read_manifest(out)) == ["index/run1-stray.samples.npz"]  # listed ones stay
    for e in entries:
        index, nbytes = shards.read_sample_index(e)
        # the writer built it from the samples it wrote and the tar's headers: the same bytes as a full parse
        assert Path(e["index_url"]).read_bytes() == shards.build_sample_index(Path(e["url"]).read_bytes(), "s", eos)
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
