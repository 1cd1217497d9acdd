"""The tokenize output's write side: shards and their indexes (written by the workers), and the manifest
(committed by the driver under the output's lease).

Output layout (local folder or s3:// prefix):

    shards/<run_id>-<uuid>.tar        WebDataset tars; each sample's 3 members contiguous
    index/<run_id>-<uuid>.jsonl       the index of the shard of the same name (or of a commit with no shard: its
                                      inputs were all quarantined or done): one line per input, tokenized or
                                      quarantined, and one per listing unit whose new inputs this run expanded
    index/<run_id>-<uuid>.samples.npz the sample index of the shard of the same name (tokenize_jobs/shards.py):
                                      offset, size, tokens, EOS tails, task and digest per sample, so that a
                                      training rank plans rows and reads only its own samples
    manifest.json                     vocab, tokenizers, job, shards, indexes, counts, runs (written last)
    quarantine.jsonl                  every quarantined input {source, reason, detail}, rebuilt at run end
    tokenizers/                       tokenizer artifacts (tokenizers.json, vocab.json, text.json, ...)
    _lock.json                        the run lock (tokenize_jobs/lock.py)

A commit is: a worker (a tokenizer actor, or a write task) uploads a shard and its index (two atomic writes,
under a name no other task or retried attempt can take: `ShardStream`) and hands the driver one metadata row
(`COMMIT_COLUMNS`: paths, size, sha256, counts, quarantine records); the driver rewrites the manifest listing
both (one conditional write: `fence`), while it holds the lease. Only the manifest makes a shard exist: a shard
of a failed or retried task attempt, or of a run killed before its commit, is a file no manifest lists, which the
next run deletes before it starts (it holds the lock and has fenced the output, so no one else can commit) and a
run that finishes deletes at its end. Inputs are marked done only through a committed index, so a killed run's
inputs are redone exactly once. Neither tokens nor fingerprints pass through the driver: it receives O(1) bytes
per shard.

Index lines (JSONL):

    {"fp", "file", "unit", "status": "ok", "samples"}                       a tokenized input
    {"fp", "file", "unit", "status": "quarantined", "source", "reason", "detail"}
    {"unit", "file", "new"}           the listing unit (first file `file`) yielded `new` inputs in this run

A unit is done (a rerun does not even open it) once the committed indexes of one run hold its `unit` line and
all `new` inputs of it (`OutputState.load` counts them per run, so no order between commits is assumed). A unit
not done whose first file earlier units named (a JSONL file with appended lines, a run killed half way) gets
the fingerprints of that file's finished inputs (`OutputState.load_done_inputs`), so only new lines are redone.

Why sidecar indexes rather than fingerprints inside the manifest: the manifest is rewritten at every commit;
with millions of inputs a manifest holding every fingerprint would make each commit rewrite (and each reader
parse) hundreds of MB. Index files are written once and read only by the next tokenize run, which streams them
and keeps the done units and the files they named (O(listing units), as the listing itself), and the
fingerprints only of the files a rerun opens again.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import signal
import tarfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from common import storage
from tokenize_jobs.lock import LockLost
from tokenize_jobs.shards import FORMAT_VERSION, MANIFEST, SAMPLE_INDEX_SUFFIX, build_sample_index

SHARDS_DIR = "shards"
INDEX_DIR = "index"
QUARANTINE = "quarantine.jsonl"
MAX_RUN_RECORDS = 100        # an hourly schedule would otherwise grow the manifest forever
INDEX_READ_BATCH = 256       # index files fetched per concurrent batch when a run loads what is done
COUNT_KEYS = ("samples_per_task", "tokens_per_task", "answer_tokens_per_task", "quarantined_by_reason")


# ---- tar bytes: webdataset's TarWriter, with every header field pinned -----------------------------------------

@functools.lru_cache(maxsize=8192)
def _npy_header(descr: str, n: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": (n,)})
    return buf.getvalue()


def _npy_bytes(arr: np.ndarray) -> bytes:
    """`np.save` of a 1-D array, byte for byte (format 1.0, no pickle), with its header cached per length:
    np.save's header formatting was a fifth of the write stage's time."""
    return _npy_header(np.lib.format.dtype_to_descr(arr.dtype), arr.shape[0]) + arr.tobytes()


def wds_sample(key: str, input_ids: np.ndarray, answer_mask: np.ndarray, meta: dict[str, Any] | bytes
               ) -> dict[str, Any]:
    """One sample as a WebDataset dict (suffix -> bytes). `key` has no '.' or '/' (WebDataset splits there);
    `meta` is a dict or its JSON already made (sorted keys, UTF-8)."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    if not isinstance(meta, bytes):
        meta = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return {"__key__": key,
            "input_ids.npy": _npy_bytes(np.ascontiguousarray(input_ids, dtype=np.int32).reshape(-1)),
            "answer_mask.npy": _npy_bytes(np.ascontiguousarray(answer_mask, dtype=np.bool_).reshape(-1)),
            "meta.json": meta}


class TarShard:
    """One shard's bytes in memory, written by `webdataset.TarWriter`. Deterministic: every header field that
    could vary (mtime, mode, uid/gid, user and group names) is pinned, members are in the writer's sorted suffix
    order, so the same samples always give the same bytes (and the same sha256 in the manifest)."""

    def __init__(self) -> None:
        import webdataset as wds   # imported here: its package import costs ~1 s, paid only where shards are made

        self._buf = io.BytesIO()
        # uid/gid stay tarfile's 0; encoder=False: members are bytes already (npy without pickle, JSON)
        self._tar = wds.TarWriter(self._buf, user="", group="", mode=0o644, mtime=0, encoder=False,
                                  compress=False)
        # TarWriter picks ustar but never hands it to tarfile (which then writes pax): the bytes are the same for
        # our short ASCII names, and ustar headers cost half as much to make.
        self._tar.tarstream.format = tarfile.USTAR_FORMAT
        self.samples = 0

    @property
    def size(self) -> int:
        """Bytes written so far (tarfile flushes every 10 KiB record: exact to a record, enough for a limit)."""
        return self._buf.tell()

    def write(self, sample: dict[str, Any]) -> None:
        self._tar.write(sample)
        self.samples += 1

    def close(self) -> bytes:
        """End-of-archive marker, padding to a whole record (tarfile's), and the bytes."""
        self._tar.close()
        return self._buf.getvalue()


def shard_bytes(samples: Iterable[dict[str, Any]]) -> bytes:
    shard = TarShard()
    for s in samples:
        shard.write(s)
    return shard.close()


# ---- an input's samples between the tokenizer actors and the writers -------------------------------------------

def pack_samples(samples: list[tuple[np.ndarray, np.ndarray, dict[str, Any]]]) -> dict[str, Any]:
    """An input's samples as three row columns: every sample's ids (int32) and answer masks (bool) concatenated,
    and one JSON meta line per sample (its `n_tokens` splits the arrays). Turning them into tar members is left
    to the write stage, off the tokenizer actors."""
    if not samples:
        return {"ids": b"", "mask": b"", "metas": ""}
    return {"ids": np.concatenate([np.asarray(s[0], dtype=np.int32) for s in samples]).tobytes(),
            "mask": np.concatenate([np.asarray(s[1], dtype=np.bool_) for s in samples]).tobytes(),
            # JSON escapes newlines inside strings, so "\n" separates lines (str.splitlines would also split
            # at U+2028, which ensure_ascii=False leaves raw)
            "metas": "\n".join(json.dumps(s[2], sort_keys=True, ensure_ascii=False) for s in samples)}


def split_samples(key: str, ids: bytes, mask: bytes, metas: str, lengths: list[int] | None = None
                  ) -> Iterator[tuple[str, np.ndarray, np.ndarray, str]]:
    """`pack_samples` -> (`<key>_<j>`, input_ids, answer_mask, meta JSON line) per sample. `lengths` (each
    sample's n_tokens, when the caller has them) saves parsing the meta lines."""
    all_ids = np.frombuffer(ids, dtype=np.int32)
    all_mask = np.frombuffer(mask, dtype=np.bool_)
    lines = metas.split("\n") if metas else []
    if lengths is None:
        lengths = [int(json.loads(line)["n_tokens"]) for line in lines]
    if len(lengths) != len(lines):
        raise ValueError(f"input {key}: {len(lines)} meta lines for {len(lengths)} samples")
    start = 0
    for j, (line, n) in enumerate(zip(lines, lengths)):
        end = start + n
        yield f"{key}_{j}", all_ids[start:end], all_mask[start:end], line
        start = end
    if start != all_ids.size or all_ids.size != all_mask.size:
        raise ValueError(f"input {key}: {all_ids.size} ids / {all_mask.size} mask values for samples of "
                         f"{start} tokens")


def unpack_samples(key: str, ids: bytes, mask: bytes, metas: str, lengths: list[int] | None = None
                   ) -> Iterator[dict[str, Any]]:
    """`pack_samples` -> WebDataset samples `<key>_<j>`."""
    for k, sample_ids, sample_mask, line in split_samples(key, ids, mask, metas, lengths):
        yield wds_sample(k, sample_ids, sample_mask, line.encode("utf-8"))


# ---- shards and indexes, written by the workers ----------------------------------------------------------------

# What a write task hands the driver per commit: a shard (or none) and its index, and what they hold.
COMMIT_COLUMNS = ("shard", "samples", "bytes", "sha256", "index", "inputs", "tokenized", "quarantined", "counts",
                  "quarantine", "samples_index")


class _IndexPart:
    """Index lines and counts of the inputs since the last shard closed: the next commit's."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.quarantine: list[str] = []
        self.tokenized = self.quarantined = 0
        self.counts: dict[str, Counter] = {k: Counter() for k in COUNT_KEYS}

    def add(self, row: dict[str, Any]) -> None:
        status = row["status"]
        if status == "unit":
            self.lines.append(json.dumps({"unit": row["unit"], "file": row["file"], "new": int(row["unit_new"])}))
            return
        where = {"fp": row["fp"], "file": row["file"], "unit": row["unit"]}
        if status == "ok":
            stats = json.loads(row["stats"])
            for st in stats:
                self.counts["samples_per_task"][st["task"]] += 1
                self.counts["tokens_per_task"][st["task"]] += st["n_tokens"]
                self.counts["answer_tokens_per_task"][st["task"]] += st["n_answer"]
            self.tokenized += 1
            self.lines.append(json.dumps({**where, "status": "ok", "samples": len(stats)}))
            return
        rec = {"source": row["source"], "reason": row["reason"], "detail": row["detail"]}
        self.quarantined += 1
        self.counts["quarantined_by_reason"][row["reason"]] += 1
        self.quarantine.append(json.dumps(rec, ensure_ascii=False))
        self.lines.append(json.dumps({**where, "status": "quarantined", **rec}, ensure_ascii=False))


class ShardStream:
    """Worker side of a commit: pack tokenized inputs (rows, in order, as `add` is given them) into shards of at
    most `max_samples` samples / `max_bytes` bytes (closing after the input that crosses a limit); upload each with
    the index of the inputs it closes (quarantined ones and unit lines included) under `<run_id>-<uuid>`, a name
    no other task or attempt can take, and keep one `COMMIT_COLUMNS` row per shard, plus (`finish`) one for an
    index without a shard when inputs follow the last shard (or none was tokenized). The driver commits those
    rows; files it never commits (a failed or retried attempt, a killed run) are orphans `clean_orphans` deletes.
    With `eos_id` (the vocabulary's), each shard also gets its sample index, built from the shard's own bytes.
    Holds one open shard: a worker streams any number of inputs through it. `crash_once` is fault injection
    (`crash_task_once`)."""

    def __init__(self, out: str, run_id: str, max_samples: int, max_bytes: int, eos_id: int | None = None,
                 crash_once: str = ""):
        self.out, self.run_id, self.max_samples, self.max_bytes = out, run_id, max_samples, max_bytes
        self.eos_id, self.crash_once = eos_id, crash_once
        self._commits: list[dict[str, Any]] = []
        self._open()

    def _open(self) -> None:
        self._shard, self._part = TarShard(), _IndexPart()
        self._written: list[tuple[str, np.ndarray, np.ndarray, str]] = []   # the shard's samples, for its index

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            if row["status"] == "ok":
                stats = json.loads(row["stats"])
                for (k, ids, mask, line), st in zip(split_samples(row["fp"], row["ids"], row["mask"], row["metas"],
                                                                  [st["n_tokens"] for st in stats]), stats):
                    self._shard.write(wds_sample(k, ids, mask, line.encode("utf-8")))
                    if self.eos_id is not None:
                        self._written.append((k, ids, mask, st["task"]))
            self._part.add(row)
            if self._shard.samples >= self.max_samples or self._shard.size >= self.max_bytes:
                self._close()

    def finish(self) -> list[dict[str, Any]]:
        """Close the open shard (or the index of inputs after the last one) and hand over every commit row."""
        if self._shard.samples or self._part.lines:
            self._close()
        commits, self._commits = self._commits, []
        return commits

    def _close(self) -> None:
        shard, part, out = self._shard, self._part, self.out
        stem = f"{self.run_id}-{uuid.uuid4().hex[:12]}"
        entry = {"shard": "", "samples": 0, "bytes": 0, "sha256": "", "samples_index": ""}
        if shard.samples:
            data = shard.close()
            rel = f"{SHARDS_DIR}/{stem}.tar"
            if self.eos_id is not None:
                blob = build_sample_index(data, rel, self.eos_id, self._written)
                samples_rel = f"{INDEX_DIR}/{stem}{SAMPLE_INDEX_SUFFIX}"
                storage.write_bytes_atomic(storage.join(out, samples_rel), blob)
                entry["samples_index"] = json.dumps({"path": samples_rel, "bytes": len(blob),
                                                     "sha256": hashlib.sha256(blob).hexdigest()})
            storage.write_bytes_atomic(storage.join(out, rel), data)
            entry.update({"shard": rel, "samples": shard.samples, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
        index_rel = f"{INDEX_DIR}/{stem}.jsonl"
        storage.write_text_atomic(storage.join(out, index_rel), "".join(line + "\n" for line in part.lines))
        self._commits.append({**entry, "index": index_rel, "inputs": part.tokenized + part.quarantined,
                             "tokenized": part.tokenized, "quarantined": part.quarantined,
                             "counts": json.dumps({k: dict(v) for k, v in part.counts.items()}, ensure_ascii=False),
                             "quarantine": "\n".join(part.quarantine)})
        self._open()
        if self.crash_once:
            crash_task_once(self.crash_once)


def write_shards(rows: list[dict[str, Any]], out: str, run_id: str, max_samples: int, max_bytes: int,
                 eos_id: int | None = None, crash_once: str = "") -> list[dict[str, Any]]:
    """`rows` through one `ShardStream`: their shards and indexes uploaded, their commit rows returned."""
    stream = ShardStream(out, run_id, max_samples, max_bytes, eos_id, crash_once)
    stream.add(rows)
    return stream.finish()


# ---- state of an output folder --------------------------------------------------------------------------------

class FencedOut(LockLost):
    """Another run committed to the output since this run took it over: this run must not commit."""


@dataclass
class OutputState:
    """What earlier runs committed: the manifest (None before the first commit; a manifest holding only the
    writer's fence counts as none), its version (for conditional commits), and what its indexes mark done."""
    manifest: dict[str, Any] | None
    version: str | None = None
    stored: dict[str, Any] | None = None                           # the manifest as stored (a fence-only one too)
    writer: dict[str, Any] | None = None                           # the fence: the run that owns the output
    done_units: set[str] = field(default_factory=set)              # listing units with every input done
    unit_files: set[str] = field(default_factory=set)              # first files of the units the indexes name
    done_by_file: dict[str, set[str]] = field(default_factory=dict)  # file -> finished inputs (files asked for)
    quarantine_lines: list[str] = field(default_factory=list)
    out: str = ""

    @classmethod
    def load(cls, out: str) -> OutputState:
        """The manifest, and from its indexes the done units (one streaming pass; no fingerprint is kept but
        those of units left half done, which a rerun opens again)."""
        data, version = storage.read_versioned(storage.join(out, MANIFEST))
        manifest = json.loads(data) if data is not None else None
        if manifest is None or "vocab" not in manifest:
            return cls(manifest=None, version=version, stored=manifest, out=out)
        state = cls(manifest=manifest, version=version, stored=manifest, out=out)
        # Per (run, unit): the inputs its `new` count says that run expanded, and the finished ones seen so far;
        # dropped as soon as complete, so only half-done units (and units whose lines are still to come) keep
        # fingerprints while the indexes stream past.
        open_units: dict[tuple[str, str], dict[str, Any]] = {}
        for run, rec in state._index_lines():
            state._add_line(rec, run, open_units)
        for (_, unit), o in open_units.items():
            if unit not in state.done_units:
                for file, fp in o["fps"]:
                    state.done_by_file.setdefault(file, set()).add(fp)
        return state

    def load_done_inputs(self, files: set[str]) -> None:
        """Add the finished inputs of `files` (the first files of the units a rerun will open) to
        `done_by_file`, from every committed index: a second pass, made only when one of them was seen before
        (a JSONL file that grew), so a rerun redoes none of their old lines."""
        wanted = files & self.unit_files
        if not wanted or self.manifest is None:
            return
        for _, rec in self._index_lines():
            if "fp" in rec and rec["file"] in wanted:
                self.done_by_file.setdefault(rec["file"], set()).add(rec["fp"])

    def _index_lines(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(run id, record) of every committed index line, fetched INDEX_READ_BATCH files at a time."""
        entries = (self.manifest or {}).get("indexes", [])
        for start in range(0, len(entries), INDEX_READ_BATCH):
            batch = entries[start:start + INDEX_READ_BATCH]
            blobs = storage.read_many([storage.join(self.out, e["path"]) for e in batch])
            for e in batch:
                for line in blobs[storage.join(self.out, e["path"])].decode("utf-8").splitlines():
                    yield e.get("run", ""), json.loads(line)

    def _add_line(self, rec: dict[str, Any], run: str, open_units: dict[tuple[str, str], dict[str, Any]]) -> None:
        if rec.get("status") == "quarantined":
            self.quarantine_lines.append(json.dumps(
                {"source": rec["source"], "reason": rec["reason"], "detail": rec["detail"]}, ensure_ascii=False))
        if "fp" not in rec:                       # a unit line
            if "new" not in rec:                  # written once all of the unit's inputs were committed
                self.done_units.add(rec["unit"])
                return
            self.unit_files.add(rec["file"])
            o = open_units.setdefault((run, rec["unit"]), {"new": None, "fps": []})
            o["new"] = int(rec["new"])
        elif "unit" not in rec:                   # an input line that does not name its unit: kept, as written
            self.done_by_file.setdefault(rec["file"], set()).add(rec["fp"])
            return
        else:
            o = open_units.setdefault((run, rec["unit"]), {"new": None, "fps": []})
            o["fps"].append((rec["file"], rec["fp"]))
        if o["new"] is not None and len(o["fps"]) >= o["new"]:
            self.done_units.add(rec["unit"])
            del open_units[(run, rec["unit"])]


def fence(out: str, run_id: str, lease: str, attempts: int = 5) -> OutputState:
    """Take the output over for this run, so that no earlier writer can commit again: rewrite its manifest (or
    create one holding only the fence) conditionally on the version just read. Every later commit of this run
    is conditional on the version it wrote (`ShardWriter`), and a writer that stalled past its lock's lease
    holds an older version: its next commit fails (`FencedOut`) instead of overwriting this run's. Called right
    after taking the lock, before deleting orphans (their writer can no longer commit them)."""
    uri = storage.join(out, MANIFEST)
    for _ in range(attempts):
        state = OutputState.load(out)
        current = dict(state.stored or {"format_version": FORMAT_VERSION, "shards": [], "indexes": [], "runs": []})
        current["writer"] = {"run_id": run_id, "lease": lease, "since": time.time()}
        try:
            state.version = storage.write_if(uri, json.dumps(current, indent=1, ensure_ascii=False).encode(),
                                             state.version)
            state.writer = current["writer"]
            return state
        except storage.VersionConflict:
            continue   # a stalled writer committed between our read and our write: read its commit, try again
    raise FencedOut(f"could not take over {out}: its manifest changed {attempts} times while this run tried; "
                    f"another writer is still committing there")


def clean_orphans(out: str, manifest: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """Delete shard/index files (whose names start with `prefix`) that no manifest lists: left by a killed run
    or by a task attempt that failed or was retried. Call only while holding the lock."""
    listed = set()
    if manifest:
        listed |= {e["path"] for e in manifest.get("shards", [])}
        listed |= {e["path"] for e in manifest.get("indexes", [])}
        listed |= {e["samples_index"]["path"] for e in manifest.get("shards", []) if "samples_index" in e}
    removed = []
    for sub in (SHARDS_DIR, INDEX_DIR):
        folder = storage.join(out, sub)
        if not storage.exists(folder):
            continue
        for path in storage.find(folder):
            name = path.rsplit("/", 1)[-1]
            if name.startswith(prefix) and f"{sub}/{name}" not in listed:
                storage.remove(storage.join(folder, name))
                removed.append(f"{sub}/{name}")
    return removed


def crash_task_once(marker: str) -> None:
    """Fault injection for retry tests (OMNIDIFF_CRASH_SHARD_WRITER_ONCE=<marker file>, passed to the shard
    writers by the driver): the first worker to upload a shard creates `marker` and kills its process, as a lost
    node would; Ray restarts the actor (or worker) and retries the task, whose new attempt writes under new
    names."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


def _fault_point(commits_done: int, stage: str) -> None:
    """Fault injection for crash tests: OMNIDIFF_FAIL_AFTER_SHARDS=k[:mode] fails once k shards are committed
    in this run. mode `raise` (default) raises in the driver; `kill` SIGKILLs the driver process; `mid` stops
    during the next commit, after its shard is uploaded and before its manifest is written; `stop` freezes the
    driver there (SIGSTOP: a writer stalled past its lease, resumed by SIGCONT)."""
    spec = os.environ.get("OMNIDIFF_FAIL_AFTER_SHARDS")
    if not spec:
        return
    k, _, mode = spec.partition(":")
    mode = mode or "raise"
    if commits_done != int(k) or (mode in ("mid", "stop")) != (stage == "mid"):
        return
    if mode == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure after {k} committed shard(s) (OMNIDIFF_FAIL_AFTER_SHARDS={spec})")


# ---- the writer -------------------------------------------------------------------------------------------------

class ShardWriter:
    """The driver's side of a commit: the workers wrote the shards and their indexes (`write_shards`); this
    lists each one in the manifest when its metadata row arrives (`add_commit`), a conditional write under the
    run's lease, so the driver handles O(1) bytes per shard. The caller calls `finish()` at the end (the run's
    record, quarantine.jsonl, and the orphans of this run's failed or retried task attempts)."""

    def __init__(self, out: str, run_id: str, header: dict[str, Any], state: OutputState,
                 check_lock: Callable[[], None] = lambda: None):
        self.out, self.run_id, self.header = out, run_id, header
        self.version = state.version   # every manifest commit is conditional on it (see `fence`)
        self.writer = state.writer or {"run_id": run_id}
        self.check_lock = check_lock
        prev = state.manifest or {}
        self.shards: list[dict[str, Any]] = list(prev.get("shards", []))
        self.indexes: list[dict[str, Any]] = list(prev.get("indexes", []))
        self.runs: list[dict[str, Any]] = list(prev.get("runs", []))
        c = prev.get("counts", {})
        self.totals = {
            "inputs_seen": c.get("inputs_seen", 0), "inputs_tokenized": c.get("inputs_tokenized", 0),
            "inputs_quarantined": c.get("inputs_quarantined", 0), "samples_written": c.get("samples_written", 0),
            **{k: Counter(c.get(k, {})) for k in COUNT_KEYS},
        }
        self.quarantine_lines = list(state.quarantine_lines)
        # this run
        self.run = {"inputs_tokenized": 0, "inputs_quarantined": 0, "samples_written": 0, "shards": 0,
                    "bytes": 0, "driver_bytes": 0, "samples_per_task": Counter(),
                    "tokens_per_task": Counter(), "quarantined_by_reason": Counter()}
        self.run_record = {"run_id": run_id, "kind": header["job"]["kind"], "input": header["job"]["input"],
                           "started": time.time(), "status": "running"}

    def add_commit(self, row: dict[str, Any]) -> None:
        """Commit what one worker wrote (a `COMMIT_COLUMNS` row): list its shard and index in the manifest."""
        # what reached the driver: the scale-out goal is O(shards), not O(inputs) or O(tokens)
        self.run["driver_bytes"] += len(json.dumps(row, ensure_ascii=False).encode("utf-8"))
        shard = row["shard"] or None
        counts = json.loads(row["counts"])
        samples = sum(counts["samples_per_task"].values())
        if samples != int(row["samples"]):
            raise RuntimeError(f"commit of {row['index']}: {row['samples']} samples in shard {shard} but its "
                               f"index counts {samples}")
        self.check_lock()
        if shard:
            _fault_point(self.run["shards"], "mid")
        self.check_lock()  # a run that lost its lock must not commit: the new owner may be writing
        tok, quar = int(row["tokenized"]), int(row["quarantined"])
        if shard:
            entry = {"path": shard, "samples": samples, "bytes": int(row["bytes"]), "sha256": row["sha256"]}
            if row.get("samples_index"):
                entry["samples_index"] = json.loads(row["samples_index"])
            self.shards.append(entry)
        self.indexes.append({"path": row["index"], "shard": shard, "inputs": tok + quar, "run": self.run_id})
        for key, n in (("inputs_tokenized", tok), ("inputs_quarantined", quar), ("samples_written", samples)):
            self.totals[key] += n
            self.run[key] += n
        self.totals["inputs_seen"] += tok + quar
        for k in COUNT_KEYS:
            self.totals[k].update(counts[k])
            if k in self.run:
                self.run[k].update(counts[k])
        if shard:
            self.run["shards"] += 1
            self.run["bytes"] += int(row["bytes"])
        new_quarantine = [line for line in row["quarantine"].split("\n") if line]
        self._write_manifest()
        self.quarantine_lines += new_quarantine
        if shard:
            _fault_point(self.run["shards"], "after")

    def manifest(self) -> dict[str, Any]:
        t = self.totals
        return {
            "format_version": FORMAT_VERSION,
            **self.header,
            "shards": self.shards,
            "indexes": self.indexes,
            "counts": {
                "inputs_seen": t["inputs_seen"], "inputs_tokenized": t["inputs_tokenized"],
                "inputs_quarantined": t["inputs_quarantined"], "samples_written": t["samples_written"],
                **{k: dict(sorted(t[k].items())) for k in COUNT_KEYS},
            },
            "runs": (self.runs + [self.run_record])[-MAX_RUN_RECORDS:],
            "writer": self.writer,
            "updated": time.time(),
        }

    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest(), indent=1, ensure_ascii=False)
        uri = storage.join(self.out, MANIFEST)
        try:
            self.version = storage.write_if(uri, text.encode("utf-8"), self.version)
        except storage.VersionConflict as e:
            raise FencedOut(f"run {self.run_id} stopped before committing to {self.out}: another run took the "
                            f"output over ({e}); this run's lock lease must have lapsed. Its uncommitted shards "
                            f"are deleted by the next run.") from None

    def finish(self, status: str = "done") -> list[str]:
        """The run's record, quarantine.jsonl, then the files of task attempts that failed or were retried
        (every task of this run has ended, and the lock keeps every other writer out). Returns those files."""
        self.run_record.update(status=status, finished=time.time(), inputs=self.run["inputs_tokenized"]
                               + self.run["inputs_quarantined"], samples=self.run["samples_written"])
        self.check_lock()
        self._write_manifest()
        text = "".join(line + "\n" for line in self.quarantine_lines)
        uri = storage.join(self.out, QUARANTINE)
        storage.write_text_atomic(uri, text)
        self.check_lock()
        return clean_orphans(self.out, self.manifest(), prefix=f"{self.run_id}-")
