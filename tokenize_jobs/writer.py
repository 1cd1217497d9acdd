"""Committing tokenized samples: deterministic shards, per-shard input indexes, and the manifest, in that order.

Output layout (local folder or s3:// prefix):

    shards/<run_id>-<uuid>.tar        WebDataset tars; each sample's 3 members contiguous
    index/<run_id>-<seq:06d>.jsonl    what that commit finished: one line per input (tokenized or quarantined,
                                      with its fingerprint and file) and one per completed listing unit
    index/<run_id>-<uuid>.samples.npz the sample index of shards/<run_id>-<uuid>.tar (tokenize_jobs/shards.py):
                                      offset, size, tokens, EOS tails, task and digest per sample, so that a
                                      training rank can plan rows and read only its own samples
    manifest.json                     vocab, tokenizers, job, shards, indexes, counts, runs (written last)
    quarantine.jsonl                  every quarantined input {source, reason, detail}, rebuilt at run end
    tokenizers/                       tokenizer artifacts (tokenizers.json, vocab.json, text.json, ...)
    _lock.json                        the run lock (tokenize_jobs/lock.py)

A commit is: a worker uploads the shard (one atomic write, under a name no retried task can take:
`write_shards`) and hands the driver its metadata; the driver writes its index (one atomic write) and rewrites
the manifest (one conditional write: `fence`). Only the manifest makes a shard exist: a shard of a failed task
or of a run killed before its commit is a file no manifest lists, which the next run deletes before it starts
(it holds the lock and has fenced the output, so no one else can commit). Inputs are marked done only through a
committed index, so a killed run's inputs are redone exactly once. Tokens never pass through the driver: it
receives each input's metadata (fingerprint, status, sample counts) and each shard's path, size and sha256.

Why sidecar indexes rather than fingerprints inside the manifest: the manifest is rewritten at every commit;
with millions of inputs a manifest holding every fingerprint would make each commit rewrite (and each reader
parse) hundreds of MB. Index files are written once and read only by the next tokenize run, which loads them
all (concurrently on S3) into a set of 32-hex-digit fingerprints.
"""
from __future__ import annotations

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
from typing import Any, Callable

import numpy as np

from common import storage
from tokenize_jobs.lock import LockLost
from tokenize_jobs.shards import FORMAT_VERSION, MANIFEST, SAMPLE_INDEX_SUFFIX, build_sample_index

SHARDS_DIR = "shards"
INDEX_DIR = "index"
QUARANTINE = "quarantine.jsonl"
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads archives to whole records; so do we
MAX_RUN_RECORDS = 100        # an hourly schedule would otherwise grow the manifest forever


# ---- tar bytes (built in the tokenizer actors, concatenated by the writer) -----------------------------------

def _tar_member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0          # deterministic bytes: the same sample always gives the same member
    info.mode = 0o644
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    pad = (-len(data)) % TAR_BLOCK
    return header + data + b"\0" * pad


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def sample_tar_bytes(key: str, input_ids: np.ndarray, answer_mask: np.ndarray, meta: dict[str, Any]) -> bytes:
    """One sample's three tar members, contiguous. `key` has no dot (WebDataset splits key/suffix there)."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    return (_tar_member(f"{key}.input_ids.npy", _npy_bytes(np.ascontiguousarray(input_ids, dtype=np.int32)))
            + _tar_member(f"{key}.answer_mask.npy", _npy_bytes(np.ascontiguousarray(answer_mask, dtype=np.bool_)))
            + _tar_member(f"{key}.meta.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()))


def tar_end(size_so_far: int) -> bytes:
    """End-of-archive marker (two zero blocks), then zero padding to a whole record."""
    n = size_so_far + 2 * TAR_BLOCK
    return b"\0" * (2 * TAR_BLOCK + (-n) % TAR_RECORD)


# ---- shards, written by the workers ----------------------------------------------------------------------------

SHARD_COLUMNS = ("fp", "file", "unit", "source", "unit_new", "status", "reason", "detail", "stats", "shard",
                 "samples", "bytes", "sha256", "samples_index")


def write_shards(rows: list[dict[str, Any]], out: str, run_id: str, max_samples: int, max_bytes: int,
                 eos_id: int | None = None) -> list[dict[str, Any]]:
    """Worker side of a commit: pack the tokenized inputs of `rows` (in order) into shards of at most
    `max_samples` samples / `max_bytes` bytes (closing after the input that crosses a limit), upload each under
    a name no other task or attempt can take (`<run_id>-<uuid>.tar`), and return the rows without their tar
    bytes, each shard announced by a `status="shard"` row right after the inputs it holds. The driver commits
    at those rows (index + manifest); a shard it never commits (a failed task, a killed run) is an orphan the
    next run deletes. With `eos_id` (the vocabulary's), each shard gets its sample index beside it."""
    out_rows: list[dict[str, Any]] = []
    parts: list[bytes] = []
    size = samples = 0

    def close() -> None:
        nonlocal parts, size, samples
        data = b"".join(parts) + tar_end(size)
        rel = f"{SHARDS_DIR}/{run_id}-{uuid.uuid4().hex[:12]}.tar"
        index = ""
        if eos_id is not None:
            blob = build_sample_index(data, rel, eos_id)
            index_rel = f"{INDEX_DIR}/{rel[len(SHARDS_DIR) + 1:-len('.tar')]}{SAMPLE_INDEX_SUFFIX}"
            storage.write_bytes_atomic(storage.join(out, index_rel), blob)
            index = json.dumps({"path": index_rel, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
        storage.write_bytes_atomic(storage.join(out, rel), data)
        out_rows.append({**dict.fromkeys(SHARD_COLUMNS, ""), "unit_new": 0, "status": "shard", "shard": rel,
                         "samples": samples, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                         "samples_index": index})
        parts, size, samples = [], 0, 0

    for row in rows:
        tar = row.get("tar") or b""
        if row["status"] == "ok":
            parts.append(tar)
            size += len(tar)
            samples += len(json.loads(row["stats"]))
        out_rows.append({**{k: row.get(k, "") for k in SHARD_COLUMNS}, "samples": 0, "bytes": 0,
                         "shard": "", "sha256": "", "samples_index": ""})
        if samples >= max_samples or size >= max_bytes:
            close()
    if samples:
        close()
    return out_rows


# ---- state of an output folder --------------------------------------------------------------------------------

class FencedOut(LockLost):
    """Another run committed to the output since this run took it over: this run must not commit."""


@dataclass
class OutputState:
    """What earlier runs committed: the manifest (None before the first commit; a manifest holding only the
    writer's fence counts as none), its version (for conditional commits), and the done-sets of its indexes."""
    manifest: dict[str, Any] | None
    version: str | None = None
    stored: dict[str, Any] | None = None                           # the manifest as stored (a fence-only one too)
    writer: dict[str, Any] | None = None                           # the fence: the run that owns the output
    done: set[str] = field(default_factory=set)                    # input and unit fingerprints
    done_by_file: dict[str, set[str]] = field(default_factory=dict)  # file (relative) -> input fingerprints
    quarantine_lines: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, out: str) -> "OutputState":
        data, version = storage.read_versioned(storage.join(out, MANIFEST))
        manifest = json.loads(data) if data is not None else None
        if manifest is None or "vocab" not in manifest:
            return cls(manifest=None, version=version, stored=manifest)
        state = cls(manifest=manifest, version=version, stored=manifest)
        paths = [storage.join(out, e["path"]) for e in manifest.get("indexes", [])]
        blobs = storage.read_many(paths)
        for p in paths:
            for line in blobs[p].decode("utf-8").splitlines():
                rec = json.loads(line)
                if "unit" in rec:
                    state.done.add(rec["unit"])
                    continue
                state.done.add(rec["fp"])
                state.done_by_file.setdefault(rec["file"], set()).add(rec["fp"])
                if rec["status"] == "quarantined":
                    state.quarantine_lines.append(json.dumps(
                        {"source": rec["source"], "reason": rec["reason"], "detail": rec["detail"]},
                        ensure_ascii=False))
        return state


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


def clean_orphans(out: str, manifest: dict[str, Any] | None) -> list[str]:
    """Delete shard/index files no manifest lists (left by a killed run). Call only while holding the lock."""
    listed = set()
    if manifest:
        listed |= {e["path"] for e in manifest.get("shards", [])}
        listed |= {e["samples_index"]["path"] for e in manifest.get("shards", []) if "samples_index" in e}
        listed |= {e["path"] for e in manifest.get("indexes", [])}
    removed = []
    for sub in (SHARDS_DIR, INDEX_DIR):
        folder = storage.join(out, sub)
        if not storage.exists(folder):
            continue
        for path in storage.find(folder):
            name = path.rsplit("/", 1)[-1]
            if f"{sub}/{name}" not in listed:
                storage.remove(storage.join(folder, name))
                removed.append(f"{sub}/{name}")
    return removed


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
    """The driver's side of a commit: the workers wrote the shards (`write_shards`); this records what each one
    holds and commits index + manifest when a shard is announced, so the driver handles metadata only.

    `add_row` takes the pipeline's output rows (status ok/quarantined/unit, and shard rows). The caller calls
    `finish()` at the end (commits what is pending and rewrites quarantine.jsonl)."""

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
            "samples_per_task": Counter(c.get("samples_per_task", {})),
            "tokens_per_task": Counter(c.get("tokens_per_task", {})),
            "answer_tokens_per_task": Counter(c.get("answer_tokens_per_task", {})),
            "quarantined_by_reason": Counter(c.get("quarantined_by_reason", {})),
        }
        self.quarantine_lines = list(state.quarantine_lines)
        # this run
        self.run = {"inputs_tokenized": 0, "inputs_quarantined": 0, "samples_written": 0, "shards": 0,
                    "bytes": 0, "driver_bytes": 0, "samples_per_task": Counter(), "tokens_per_task": Counter(),
                    "quarantined_by_reason": Counter()}
        self.run_record = {"run_id": run_id, "kind": header["job"]["kind"], "input": header["job"]["input"],
                           "started": time.time(), "status": "running"}
        self._unit_expected: dict[str, int] = {}
        self._unit_seen: Counter = Counter()
        self._seq = 0
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._samples = 0              # samples of the inputs since the last commit: the next shard's
        self._index_lines: list[str] = []
        self._pending = {"tok": 0, "quar": 0, "per_task": Counter(), "tokens": Counter(), "answer": Counter(),
                         "reasons": Counter(), "quarantine_lines": []}

    # ---- rows -------------------------------------------------------------------------------------------
    def add_row(self, row: dict[str, Any]) -> None:
        # what reached the driver: tokens (tar bytes) and metadata; the scale-out goal is O(shards)
        self.run["driver_bytes"] += sum(len(v) for v in row.values() if isinstance(v, (bytes, str)))
        status, unit = row["status"], row["unit"]
        if status == "shard":  # a worker wrote a shard of the inputs since the last commit
            entry = {"path": row["shard"], "samples": int(row["samples"]), "bytes": int(row["bytes"]),
                     "sha256": row["sha256"]}
            if row.get("samples_index"):
                entry["samples_index"] = json.loads(row["samples_index"])
            self.commit(entry)
            return
        if status == "unit":  # a unit with nothing new to do (all of its inputs were done earlier)
            self._index_lines.append(json.dumps({"unit": unit}))
            return
        if status == "ok":
            stats = json.loads(row["stats"])
            self._samples += len(stats)
            for s in stats:
                self._pending["per_task"][s["task"]] += 1
                self._pending["tokens"][s["task"]] += s["n_tokens"]
                self._pending["answer"][s["task"]] += s["n_answer"]
            self._pending["tok"] += 1
            self._index_lines.append(json.dumps({"fp": row["fp"], "file": row["file"], "status": "ok",
                                                 "samples": len(stats)}))
        else:
            rec = {"source": row["source"], "reason": row["reason"], "detail": row["detail"]}
            self._pending["quar"] += 1
            self._pending["reasons"][row["reason"]] += 1
            self._pending["quarantine_lines"].append(json.dumps(rec, ensure_ascii=False))
            self._index_lines.append(json.dumps({"fp": row["fp"], "file": row["file"], "status": "quarantined",
                                                 **rec}, ensure_ascii=False))
        self._unit_expected[unit] = int(row["unit_new"])
        self._unit_seen[unit] += 1
        if self._unit_seen[unit] == self._unit_expected[unit]:
            self._index_lines.append(json.dumps({"unit": unit}))
            del self._unit_seen[unit], self._unit_expected[unit]

    # ---- commits ----------------------------------------------------------------------------------------
    def commit(self, shard_entry: dict[str, Any] | None = None) -> None:
        """Make everything pending durable: its index, then the manifest listing `shard_entry` (the shard the
        workers wrote of the pending inputs; None when they are all quarantined or done)."""
        if not self._index_lines and shard_entry is None:
            return
        if (shard_entry["samples"] if shard_entry else 0) != self._samples:
            raise RuntimeError(f"shard {shard_entry} does not hold the {self._samples} samples of the inputs "
                               f"announced before it: rows reached the driver out of order")
        self.check_lock()
        name = f"{self.run_id}-{self._seq:06d}"
        index_rel = f"{INDEX_DIR}/{name}.jsonl"
        index_text = "\n".join(self._index_lines) + "\n"
        storage.write_text_atomic(storage.join(self.out, index_rel), index_text)
        _fault_point(self.run["shards"], "mid")
        self.check_lock()  # a run that lost its lock must not commit: the new owner may be writing
        p = self._pending
        if shard_entry:
            self.shards.append(shard_entry)
        self.indexes.append({"path": index_rel, "shard": shard_entry["path"] if shard_entry else None,
                             "inputs": p["tok"] + p["quar"]})
        for key, n in (("inputs_tokenized", p["tok"]), ("inputs_quarantined", p["quar"])):
            self.totals[key] += n
            self.run[key] += n
        self.totals["inputs_seen"] += p["tok"] + p["quar"]
        self.totals["samples_written"] += self._samples
        self.totals["samples_per_task"].update(p["per_task"])
        self.totals["tokens_per_task"].update(p["tokens"])
        self.totals["answer_tokens_per_task"].update(p["answer"])
        self.totals["quarantined_by_reason"].update(p["reasons"])
        self.run["samples_written"] += self._samples
        self.run["samples_per_task"].update(p["per_task"])
        self.run["tokens_per_task"].update(p["tokens"])
        self.run["quarantined_by_reason"].update(p["reasons"])
        if shard_entry:
            self.run["shards"] += 1
            self.run["bytes"] += shard_entry["bytes"]
        self.quarantine_lines += p["quarantine_lines"]
        self._write_manifest()
        self._seq += 1
        self._reset_pending()
        if shard_entry:
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
                "samples_per_task": dict(sorted(t["samples_per_task"].items())),
                "tokens_per_task": dict(sorted(t["tokens_per_task"].items())),
                "answer_tokens_per_task": dict(sorted(t["answer_tokens_per_task"].items())),
                "quarantined_by_reason": dict(sorted(t["quarantined_by_reason"].items())),
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

    def finish(self, status: str = "done") -> None:
        self.commit()
        self.run_record.update(status=status, finished=time.time(), inputs=self.run["inputs_tokenized"]
                               + self.run["inputs_quarantined"], samples=self.run["samples_written"])
        self.check_lock()
        self._write_manifest()
        text = "".join(line + "\n" for line in self.quarantine_lines)
        uri = storage.join(self.out, QUARANTINE)
        storage.write_text_atomic(uri, text)

    def abort(self) -> None:
        """Drop what is pending (a failed run): committed shards stay; shards written but never committed are
        deleted by the next run (`clean_orphans`)."""
        self._reset_pending()
