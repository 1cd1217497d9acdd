"""Reading tokenized shards safely: the manifest, the vocabulary, the shard list, and the samples.

Training, evaluation and benchmarks read what a tokenize job wrote through these functions:

    read_manifest(out) -> dict            manifest.json (the only list of shards that exist)
    manifest_vocab(out) -> Vocab          the vocabulary the shards were tokenized with
    shard_urls(out) -> list[str]          full paths/URIs of the committed shards
    iter_samples(out | urls)              {key, input_ids (int32), answer_mask (bool), meta (dict)} per sample
    read_sample_index(entry)              a shard's sample index (below), or None for a shard without one
    read_samples(url, index, wanted)      some samples of a shard by ranged reads, each checked by its digest

The sample index (`index/<name>.samples.npz` for `shards/<name>.tar`, listed in the shard's manifest entry as `samples_index` with
its size and sha256) holds one row per sample, in tar order: byte offset and size of its three members, token
count, the number of EOS tails the trainer will insert (model/diffusion.eos_tail_spans), task, and a
blake2b-64 digest of its bytes. A trainer plans packed rows from it without reading tokens and then fetches
only its own samples; the digest (under the manifest's sha256 of the index) keeps a ranged read as checked as
a whole-shard read. A shard written before the index existed has no `samples_index`; readers fall back to
reading it whole.

Shards are WebDataset tars (written by `webdataset.TarWriter`, tokenize_jobs/writer.py) and are read here with
webdataset's own tar iterator and key grouping; `wds.WebDataset(urls)` reads them too.

A shard is untrusted input (it may come from a bucket someone else can write). `iter_samples` never extracts
to disk: it reads each tar into memory, checks its size and sha256 against the manifest before parsing a
single member, and rejects member names that are absolute or contain `..`, members that are not regular files,
truncated archives, members of one sample that are not contiguous, arrays that are not what the format says,
and pickled arrays (`.npy` only, loaded with allow_pickle=False; no other decoder runs). Every error is a
`ShardError` naming the shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from common import storage
from model.vocab import Vocab

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUFFIXES = ("answer_mask.npy", "input_ids.npy", "meta.json")  # member order in a shard (TarWriter sorts)


class ShardError(ValueError):
    """A shard or manifest is malformed, corrupt or unsafe; the message names the file."""


def read_manifest(out: str) -> dict[str, Any]:
    uri = storage.join(out, MANIFEST)
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {MANIFEST} in {out}: it is not a tokenized output (or its first run has not committed a shard "
            f"yet). Run `omnidiff tokenize --kind ... --input ... --output {out}` first.") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise ShardError(f"{uri} is not valid JSON ({e}); rerun the tokenize job to rewrite it") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ShardError(f"{uri}: format_version {version!r} is not {FORMAT_VERSION}; this code reads only "
                         f"version {FORMAT_VERSION}: re-tokenize the corpus with this version")
    if "vocab" not in manifest:   # only a writer's fence (tokenize_jobs/writer.fence): nothing committed yet
        raise FileNotFoundError(f"{uri} holds no committed shard yet (a tokenize run took the output over and has "
                                f"not committed; rerun it if it stopped)")
    return manifest


def manifest_vocab(out: str) -> Vocab:
    return Vocab.from_dict(read_manifest(out)["vocab"])


def _safe_relpath(rel: str, where: str) -> str:
    """A path stored in a manifest must stay inside the output folder."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        raise ShardError(f"{where}: shard path {rel!r} is not a relative path")
    if ".." in rel.split("/") or posixpath.normpath(rel) != rel:
        raise ShardError(f"{where}: shard path {rel!r} is not a normalized path inside the output")
    return rel


def shard_entries(out: str, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Manifest shard entries with `url` (full path or URI) added."""
    manifest = manifest if manifest is not None else read_manifest(out)
    where = storage.join(out, MANIFEST)
    entries = []
    for s in manifest.get("shards", []):
        e = {**s, "url": storage.join(out, _safe_relpath(s["path"], where))}
        if "samples_index" in s:
            e["index_url"] = storage.join(out, _safe_relpath(s["samples_index"]["path"], where))
        entries.append(e)
    return entries


def shard_urls(out: str) -> list[str]:
    return [e["url"] for e in shard_entries(out)]


def _member_key(name: str, shard: str) -> tuple[str, str]:
    """`<key>.<suffix>` -> (key, suffix). Names are checked for path tricks before anything else."""
    if name.startswith("/") or "\\" in name:
        raise ShardError(f"{shard}: member {name!r} has an absolute path; refusing the shard")
    parts = name.split("/")
    if ".." in parts:
        raise ShardError(f"{shard}: member {name!r} contains '..'; refusing the shard")
    base = parts[-1]
    if "." not in base:
        raise ShardError(f"{shard}: member {name!r} has no '<key>.<suffix>' form")
    key, suffix = base.split(".", 1)
    prefix = "/".join(parts[:-1])
    return (f"{prefix}/{key}" if prefix else key), suffix


def _load_npy(data: bytes, shard: str, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise ShardError(f"{shard}: member {name} is not a valid .npy array ({e})") from None


def _make_sample(key: str, members: dict[str, bytes], shard: str) -> dict[str, Any]:
    missing = [s for s in SUFFIXES if s not in members]
    if missing:
        raise ShardError(f"{shard}: sample {key!r} lacks member(s) {missing} (or its members are not contiguous)")
    ids = _load_npy(members["input_ids.npy"], shard, f"{key}.input_ids.npy")
    mask = _load_npy(members["answer_mask.npy"], shard, f"{key}.answer_mask.npy")
    if ids.ndim != 1 or ids.dtype != np.int32:
        raise ShardError(f"{shard}: sample {key!r} input_ids is {ids.dtype} {ids.shape}; expected int32 (L,)")
    if mask.shape != ids.shape or mask.dtype not in (np.bool_, np.uint8):
        raise ShardError(f"{shard}: sample {key!r} answer_mask is {mask.dtype} {mask.shape}; expected bool "
                         f"{ids.shape}")
    try:
        meta = json.loads(members["meta.json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ShardError(f"{shard}: sample {key!r} meta.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ShardError(f"{shard}: sample {key!r} meta.json is not an object")
    return {"key": key, "input_ids": ids, "answer_mask": mask.astype(np.bool_), "meta": meta}


def _check_structure(data: bytes, shard: str) -> list[tuple[str, int, int]]:
    """Header pass over an in-memory tar, before any member's data is parsed: every member is a regular file with
    a safe `<key>.<suffix>` name, and the archive ends with its end-of-archive marker. -> (key, start, end) per
    run of members sharing a key: the bytes [start, end) its members span, headers and padding included."""
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError as e:
        raise ShardError(f"{shard}: not a readable tar archive ({e})") from None
    spans: list[tuple[str, int, int]] = []
    end = 0
    try:
        for info in tf:
            key, _ = _member_key(info.name, shard)
            if not info.isreg():
                raise ShardError(f"{shard}: member {info.name!r} is not a regular file "
                                 f"(type {info.type!r}); refusing the shard")
            end = info.offset_data + ((info.size + 511) // 512) * 512
            if end > len(data):
                raise ShardError(f"{shard}: member {info.name!r} is truncated")
            if spans and spans[-1][0] == key:
                spans[-1] = (key, spans[-1][1], end)
            else:
                spans.append((key, info.offset, end))
    except tarfile.TarError as e:
        raise ShardError(f"{shard}: truncated or corrupt tar ({e})") from None
    # tarfile stops quietly when the data ends on a header boundary: the end-of-archive marker (two zero
    # blocks) must be there, or the file was cut short.
    tail = data[end:]
    if len(tail) < 1024 or tail.strip(b"\0"):
        raise ShardError(f"{shard}: truncated tar (no end-of-archive marker after the last member)")
    return spans


def _written_spans(data: bytes, keys: Sequence[str], shard: str) -> list[tuple[str, int, int]]:
    """`_check_structure` of a tar just written from `keys` (`SUFFIXES` members each, plain ustar headers), read
    off each header's name and size fields, without tarfile's parse (a third of the write stage's time). Bytes
    laid out any other way (a pax header, other members) take the full check."""
    spans: list[tuple[str, int, int]] = []
    off = 0
    for key in keys:
        start = off
        for suffix in SUFFIXES:
            header = data[off:off + 512]
            if (len(header) < 512 or header[:100].rstrip(b"\0") != f"{key}.{suffix}".encode()
                    or header[156:157] not in (b"0", b"\0")):
                return _check_structure(data, shard)
            off += 512 + -(-int(header[124:136].rstrip(b"\0 ") or b"0", 8) // 512) * 512
        spans.append((key, start, off))
    if len(data) - off < 1024 or data[off:].strip(b"\0"):
        return _check_structure(data, shard)
    return spans


def parse_shard(data: bytes, shard: str) -> Iterator[dict[str, Any]]:
    """Samples of one in-memory tar (never written to disk), checked member by member."""
    for sample, _, _ in _parse_bounded(data, shard):
        yield sample


def _parse_bounded(data: bytes, shard: str) -> Iterator[tuple[dict[str, Any], int, int]]:
    """(sample, start, end) per sample of one in-memory tar: the structure is checked first
    (`_check_structure`), then webdataset's own tar iterator and key grouping read the members, and every
    sample is checked (contiguous, complete, arrays of the documented types, no pickle); its members span bytes
    [start, end) of the tar."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    spans = iter(_check_structure(data, shard))

    def refuse(exn: Exception) -> bool:
        if isinstance(exn, ShardError):
            raise exn
        raise ShardError(f"{shard}: {exn.args[0] if exn.args else exn}") from None

    # skip_meta=None, lcase=False: every member reaches the checks under its exact name
    files = ({**f, "__url__": shard} for f in tar_file_iterator(io.BytesIO(data), skip_meta=None, handler=refuse))
    seen: set[str] = set()
    for group in group_by_keys(files, lcase=False, handler=refuse):
        key = group.pop("__key__")
        group.pop("__url__", None)
        if key in seen:
            raise ShardError(f"{shard}: members of sample {key!r} are not contiguous")
        seen.add(key)
        span_key, start, end = next(spans)
        if span_key != key:   # group_by_keys and the header pass split the members alike
            raise ShardError(f"{shard}: sample {key!r} does not start where its members' headers say")
        yield _make_sample(key, group, shard), start, end


def _read_checked(entry: dict[str, Any], verify_sha: bool) -> bytes:
    url = entry["url"]
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise ShardError(f"shard {url} is listed in the manifest but does not exist") from None
    if verify_sha and "sha256" in entry:
        if "bytes" in entry and len(data) != entry["bytes"]:
            raise ShardError(f"shard {url} is {len(data)} bytes but the manifest says {entry['bytes']} "
                             f"(truncated or replaced); re-tokenize or restore it")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise ShardError(f"shard {url} sha256 {digest[:16]}... does not match the manifest's "
                             f"{entry['sha256'][:16]}... (corrupt or replaced); re-tokenize or restore it")
    return data


def iter_samples(out_or_urls: str | Iterable[str], verify_sha: bool = True) -> Iterator[dict[str, Any]]:
    """Samples of every committed shard of an output folder (checked against its manifest), or of the given
    shard URLs (no manifest, so no sha256 check)."""
    if isinstance(out_or_urls, str) and not out_or_urls.endswith(".tar"):
        entries = shard_entries(out_or_urls)
    else:
        urls = [out_or_urls] if isinstance(out_or_urls, str) else list(out_or_urls)
        entries = [{"url": u} for u in urls]
    for entry in entries:
        data = _read_checked(entry, verify_sha)
        yield from parse_shard(data, entry["url"])


# ---- the sample index ---------------------------------------------------------------------------------------

SAMPLE_INDEX_SUFFIX = ".samples.npz"
DIGEST_BYTES = 8
# Samples closer than this are fetched in one ranged read. Small: a rank's samples are spread through a shard
# (shuffled), so merging across other ranks' samples would read their bytes too; reads run concurrently on S3.
RANGE_GAP = 4 * 1024


@dataclass(frozen=True)
class SampleIndex:
    """One row per sample of a shard, in tar order."""
    offset: np.ndarray   # (N,) int64 byte offset of the sample's first member header
    size: np.ndarray     # (N,) int64 bytes of its three members, headers and padding included
    tokens: np.ndarray   # (N,) int64 len(input_ids)
    tails: np.ndarray    # (N,) int64 EOS tails the trainer inserts (answer spans not ending in EOS)
    task: np.ndarray     # (N,) int64 index into `tasks`
    tasks: tuple[str, ...]
    digest: np.ndarray   # (N, DIGEST_BYTES) uint8 blake2b of the sample's bytes

    def __len__(self) -> int:
        return int(self.offset.size)

    def task_names(self) -> list[str]:
        names = self.tasks
        return [names[i] for i in self.task.tolist()]


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def build_sample_index(data: bytes, shard: str, eos_id: int,
                       samples: Sequence[tuple[str, np.ndarray, np.ndarray, str]] | None = None) -> bytes:
    """The sample index of one shard's bytes (written next to it by the tokenize job), as .npz bytes.
    `samples`: (key, input_ids, answer_mask, task) of each sample in tar order, when the caller has them (the
    tokenize writer, which just wrote them): only the tar's headers are then read, for the byte spans (a quarter
    of a full parse's time); without them the shard is parsed."""
    from model.diffusion import eos_tail_spans   # the one rule for where tails go: trainer and index agree

    if samples is None:
        bounded = [((s["key"], s["input_ids"], s["answer_mask"], str(s["meta"].get("task", "text"))), start, end)
                   for s, start, end in _parse_bounded(data, shard)]
    else:
        spans = _written_spans(data, [k for k, _, _, _ in samples], shard)
        if [k for k, _, _ in spans] != [k for k, _, _, _ in samples]:
            raise ShardError(f"{shard}: its samples are not the {len(samples)} samples the index is built from")
        bounded = [(sample, start, end) for sample, (_, start, end) in zip(samples, spans)]
    rows = []
    for (_, ids, mask, task), start, end in bounded:
        ids = np.asarray(ids, dtype=np.int64)
        tails = int(eos_tail_spans(ids, np.asarray(mask, dtype=np.bool_), eos_id).sum())
        rows.append((start, end - start, ids.size, tails, task, _digest(data[start:end])))
    tasks = sorted({r[4] for r in rows})
    buf = io.BytesIO()
    # compressed: ~16 bytes a sample instead of ~31; every rank reads every index it plans through
    np.savez_compressed(buf, offset=np.array([r[0] for r in rows], dtype=np.uint64),
             size=np.array([r[1] for r in rows], dtype=np.uint32),
             tokens=np.array([r[2] for r in rows], dtype=np.uint32),
             tails=np.array([r[3] for r in rows], dtype=np.uint16),
             task=np.array([tasks.index(r[4]) for r in rows], dtype=np.uint8),
             tasks=np.array(tasks, dtype=str),
             digest=np.frombuffer(b"".join(r[5] for r in rows), dtype=np.uint8).reshape(len(rows), DIGEST_BYTES))
    return buf.getvalue()


def load_sample_index(blob: bytes, where: str, samples: int | None = None) -> SampleIndex:
    """Parse and check .npz sample-index bytes; `samples`: the count the manifest gives for the shard."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("offset", "size", "tokens", "tails", "task", "tasks", "digest")}
    except Exception as e:
        raise ShardError(f"{where}: not a valid sample index ({type(e).__name__}: {e}); re-tokenize the shard") \
            from None
    n = arrays["offset"].shape[0] if arrays["offset"].ndim == 1 else -1
    shapes_ok = n >= 0 and all(arrays[k].shape == (n,) for k in ("size", "tokens", "tails", "task")) \
        and arrays["digest"].shape == (n, DIGEST_BYTES) and arrays["tasks"].ndim == 1
    if not shapes_ok or (n and int(arrays["task"].max()) >= arrays["tasks"].size):
        raise ShardError(f"{where}: sample index arrays disagree in shape; re-tokenize the shard")
    if samples is not None and n != samples:
        raise ShardError(f"{where}: sample index lists {n} samples but the manifest says {samples}")
    as64 = {k: arrays[k].astype(np.int64) for k in ("offset", "size", "tokens", "tails", "task")}
    return SampleIndex(**as64, tasks=tuple(str(t) for t in arrays["tasks"].tolist()),
                       digest=arrays["digest"].astype(np.uint8))


def read_sample_index(entry: dict[str, Any]) -> tuple[SampleIndex, int] | None:
    """(index, bytes read) of a shard entry (from `shard_entries`), checked against the manifest's size and
    sha256 for it; None when the shard has no index (written before indexes existed)."""
    url = entry.get("index_url")
    if url is None:
        return None
    meta = entry["samples_index"]
    data = _read_checked({"url": url, **{k: meta[k] for k in ("bytes", "sha256") if k in meta}}, verify_sha=True)
    return load_sample_index(data, url, entry.get("samples")), len(data)


def read_samples(url: str, index: SampleIndex, wanted: Sequence[int], max_gap: int = RANGE_GAP
                 ) -> tuple[dict[int, dict[str, Any]], int]:
    """Samples `wanted` (positions in the index) of the shard at `url` by ranged reads, nearby samples merged
    into one read; each is checked against its digest before it is parsed. -> ({position: sample}, bytes
    read)."""
    order = sorted(set(int(i) for i in wanted))
    runs: list[list[int]] = []
    for i in order:
        if runs and index.offset[i] - (index.offset[runs[-1][-1]] + index.size[runs[-1][-1]]) <= max_gap \
                and index.offset[i] >= index.offset[runs[-1][-1]]:
            runs[-1].append(i)
        else:
            runs.append([i])
    spans = [(int(index.offset[run[0]]), int(max(index.offset[i] + index.size[i] for i in run))) for run in runs]
    try:
        blobs = storage.read_ranges(url, spans)
    except FileNotFoundError:
        raise ShardError(f"shard {url} is listed in the manifest but does not exist") from None
    out: dict[int, dict[str, Any]] = {}
    nbytes = 0
    for run, (lo, _), data in zip(runs, spans, blobs):
        nbytes += len(data)
        for i in run:
            a, b = int(index.offset[i]) - lo, int(index.offset[i] + index.size[i]) - lo
            where = f"{url} (sample {i}, bytes {a + lo}..{b + lo})"
            piece = data[a:b]
            if len(piece) != b - a or _digest(piece) != index.digest[i].tobytes():
                raise ShardError(f"{where}: bytes do not match the sample index's digest (corrupt or replaced "
                                 f"shard); re-tokenize or restore it")
            got = [s for s, _, _ in _parse_bounded(piece + b"\0" * 1024, where)]
            if len(got) != 1:
                raise ShardError(f"{where}: holds {len(got)} samples, expected one")
            out[i] = got[0]
    return out, nbytes
