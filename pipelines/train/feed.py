"""Reading a rank's samples and feeding its steps ahead of the step loop.

    SampleStore   what planning needs of a shard (ShardMeta: its sample index, or the shard read whole when it
                  has none) and the samples of planned rows: by ranged reads of their members (digest-checked),
                  or whole shards (sha256-checked, LRU-cached) when the rank needs every sample anyway
    StepFeeder    a background thread that plans, reads and collates the next steps into a bounded queue, so
                  the step loop does not wait on storage; each step comes with the stream position after it,
                  which is what a checkpoint of that step records

How a rank reads (data.read): "ranged" fetches only its own samples (nearby ones merged into one read),
"shard" reads every shard its rows touch whole, "auto" reads whole shards on a single rank (it needs every
sample; one read per shard) and ranged reads otherwise (a rank needs 1/world of each shard). Bytes per rank per
step, measured by `omnidiff bench ranks` (docs/performance.md): ranged falls as 1/world, shard stays flat.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from model.diffusion import append_eos_tail, eos_tail_spans
from pipelines.train.plan_rows import DataError, PlannedSample, Sample, Shard, ShardMeta, tail_generator

log = logging.getLogger(__name__)

SHARD_CACHE_BYTES = 512 * 2**20   # parsed ids + masks kept for a stream's sources (~55M tokens)
INDEX_CACHE = 4096                # sample indexes kept (a few dozen bytes per sample each)


def _checked_ids(shard_url: str, key: str, ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
        raise DataError(f"shard {shard_url}, sample {key}: token id {bad} is outside the vocabulary "
                        f"[0, {vocab_size}); the shard was tokenized with a different vocabulary than its "
                        f"manifest says. Re-tokenize it.")


def read_shard(shard: Shard, vocab_size: int) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """All samples of one shard as (key, task, ids, answer_mask), ids checked against the vocabulary: an id
    outside [0, vocab_size) means the shards were tokenized with another vocabulary."""
    from tokenize_jobs import shards as reader   # imported late: Ray workers import this module first

    entry: dict[str, Any] = {"url": shard.url}
    if shard.sha256 is not None:
        entry["sha256"] = shard.sha256
    if shard.nbytes is not None:
        entry["bytes"] = shard.nbytes
    out = []
    # size + sha256 checked against the manifest before any member is parsed
    for s in reader.parse_shard(reader._read_checked(entry, verify_sha=True), shard.url):
        ids = np.asarray(s["input_ids"]).astype(np.int64)
        _checked_ids(shard.url, s["key"], ids, vocab_size)
        out.append((s["key"], s["meta"].get("task", "text"), ids, np.asarray(s["answer_mask"]).astype(bool)))
    return out


class ShardCache:
    """Parsed, sha256-checked shards shared by the sources of one stream. Each per-task source reads every
    shard and keeps its own task's samples, so without sharing a shard would be fetched, hashed and parsed once
    per source (6 times with 6 tasks). Least recently used shards are dropped past `max_bytes` (the newest one
    always stays); a dropped shard is simply read again when a source reaches it. Caching changes no order:
    a shard's parsed samples are the same whichever source reads it first."""

    def __init__(self, vocab_size: int, max_bytes: int = SHARD_CACHE_BYTES) -> None:
        self.vocab_size, self.max_bytes = vocab_size, max_bytes
        self._entries: OrderedDict[tuple[str, str | None], tuple[list, int]] = OrderedDict()
        self._bytes = 0
        self.reads = 0        # shards actually read (misses), for tests and benchmarks
        self.bytes_read = 0   # their bytes as stored

    def get(self, shard: Shard) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
        key = (shard.url, shard.sha256)   # the sha256 too: a rewritten shard under the same url is re-read
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit[0]
        rows = read_shard(shard, self.vocab_size)
        self.reads += 1
        self.bytes_read += shard.nbytes or 0
        nbytes = 0
        for _, _, ids, answer in rows:
            # shared by every source: read-only, so no consumer can change another source's samples
            ids.flags.writeable = answer.flags.writeable = False
            nbytes += ids.nbytes + answer.nbytes
        self._entries[key] = (rows, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped
        return rows


@dataclass
class ReadCounts:
    """What a store fetched, for metrics and the ranks benchmark."""
    index_bytes: int = 0
    ranged_bytes: int = 0
    ranged_reads: int = 0
    samples_read: int = 0

    def total(self, cache: ShardCache) -> int:
        return self.index_bytes + self.ranged_bytes + cache.bytes_read


class SampleStore:
    """Shard metadata for planning and the samples of planned rows (see the module docstring)."""

    def __init__(self, vocab_size: int, eos_id: int, read: str = "auto",
                 shard_cache_bytes: int = SHARD_CACHE_BYTES) -> None:
        if read not in ("auto", "ranged", "shard"):
            raise DataError(f"data.read={read!r}; expected auto, ranged or shard")
        self.vocab_size, self.eos_id, self.read = vocab_size, eos_id, read
        self.shard_cache = ShardCache(vocab_size, shard_cache_bytes)
        self._index: OrderedDict[str, Any] = OrderedDict()
        self._meta: OrderedDict[tuple[str, str | None], ShardMeta] = OrderedDict()
        self._warned: set[str] = set()
        self.counts = ReadCounts()

    def _sample_index(self, shard: Shard):
        from tokenize_jobs import shards as reader

        assert shard.index is not None
        hit = self._index.get(shard.index[0])
        if hit is not None:
            self._index.move_to_end(shard.index[0])
            return hit
        url, nbytes, sha = shard.index
        entry = {"url": shard.url, "samples": shard.samples, "index_url": url,
                 "samples_index": {k: v for k, v in (("bytes", nbytes), ("sha256", sha)) if v is not None}}
        got = reader.read_sample_index(entry)
        assert got is not None
        index, n = got
        self.counts.index_bytes += n
        self._index[url] = index
        if len(self._index) > INDEX_CACHE:
            self._index.popitem(last=False)
        return index

    def meta(self, shard: Shard) -> ShardMeta:
        key = (shard.url, shard.sha256)
        hit = self._meta.get(key)
        if hit is not None:
            self._meta.move_to_end(key)
            return hit
        try:
            if shard.index is not None:
                idx = self._sample_index(shard)
                hit = ShardMeta(idx.task_names(), idx.tokens, idx.tails)
            else:
                if shard.set_uri not in self._warned:
                    self._warned.add(shard.set_uri)
                    log.warning("shard set %s: shards without a sample index (tokenized before indexes existed): "
                                "every rank reads them whole to plan rows; re-tokenize to read only a rank's share",
                                shard.set_uri)
                rows = self.shard_cache.get(shard)
                hit = ShardMeta([r[1] for r in rows], np.array([r[2].size for r in rows], dtype=np.int64),
                                np.array([int(eos_tail_spans(r[2], r[3], self.eos_id).sum()) for r in rows],
                                         dtype=np.int64))
            self._meta[key] = hit
            if len(self._meta) > INDEX_CACHE:
                self._meta.popitem(last=False)
            return hit
        except DataError:
            raise
        except Exception as e:   # a storage or format error: name the shard
            raise DataError(f"shard {shard.url}: {type(e).__name__}: {e}") from e

    def _fetch(self, shard: Shard, positions: list[int], whole: bool) -> dict[int, tuple]:
        """{position: (key, task, ids, answer_mask)} of some samples of one shard."""
        from tokenize_jobs import shards as reader

        if whole or shard.index is None:
            rows = self.shard_cache.get(shard)
            return {i: rows[i] for i in positions}
        index = self._sample_index(shard)
        got, nbytes = reader.read_samples(shard.url, index, positions)
        self.counts.ranged_bytes += nbytes
        self.counts.ranged_reads += 1
        out = {}
        for i, s in got.items():
            ids = np.asarray(s["input_ids"]).astype(np.int64)
            _checked_ids(shard.url, s["key"], ids, self.vocab_size)
            out[i] = (s["key"], s["meta"].get("task", "text"), ids, np.asarray(s["answer_mask"]).astype(bool))
        return out

    def materialize(self, rows: Sequence[Sequence[PlannedSample]], *, world: int, seed: int) -> list[list[Sample]]:
        """The samples of planned rows, EOS tails drawn as planned; each checked against its plan."""
        whole = self.read == "shard" or (self.read == "auto" and world == 1)
        by_shard: dict[Shard, list[int]] = {}
        for row in rows:
            for p in row:
                by_shard.setdefault(p.shard, []).append(p.position)
        fetched: dict[tuple[Shard, int], tuple] = {}
        for shard, positions in by_shard.items():
            try:
                for i, rec in self._fetch(shard, positions, whole).items():
                    fetched[(shard, i)] = rec
            except DataError:
                raise
            except Exception as e:   # a storage or format error: name the shard
                raise DataError(f"shard {shard.url}: {type(e).__name__}: {e}") from e
        out = []
        for row in rows:
            samples = []
            for p in row:
                key, task, ids, answer = fetched[(p.shard, p.position)]
                if task != p.task or ids.size != p.tokens:
                    raise DataError(f"shard {p.shard.url}, sample {key}: it holds {ids.size} tokens of task {task} "
                                    f"but its sample index says {p.tokens} of {p.task}; re-tokenize the shard")
                tp = append_eos_tail(ids, answer, eos_id=self.eos_id, generator=tail_generator(seed, p.stage, p.draw),
                                     max_tail=p.max_tail)
                if tp.ids.size != p.length:
                    raise DataError(f"shard {p.shard.url}, sample {key}: {tp.ids.size} tokens with its EOS tail, "
                                    f"planned {p.length}: its sample index disagrees with its answer spans; "
                                    f"re-tokenize the shard")
                samples.append(Sample(key, task, tp.ids, tp.answer_mask, tp.tail_mask))
            self.counts.samples_read += len(samples)
            out.append(samples)
        return out


# ---- feeding steps ahead ------------------------------------------------------------------------------------

@dataclass
class FedStep:
    step: int
    stage: int
    micro: list           # grad_accum collated Batches of this rank
    state: dict[str, Any]  # the stream position after this step (StreamState.to_dict): what its checkpoint saves
    data_s: float          # plan + read + collate seconds, in the feeding thread
    wait_s: float = 0.0    # how long the step loop waited for it


class _Failed:
    def __init__(self, step: int, error: BaseException) -> None:
        self.step, self.error = step, error


class StepFeeder:
    """Steps of one rank, `depth` ahead of the step loop, from a background thread (depth 0: in the loop).

    `make(state)` builds a stream (pipelines/train/data.RowStream) at a position; `produce(stream, step, stage)`
    plans, reads and collates one step and returns its micro-batches. `next(step, stage)` returns step `step`;
    when the stage the loop asks for is not the one the thread planned with (a time budget shortened the run and
    moved stage bounds), the feeder restarts from the position after the last step taken, so the steps fed are
    always those a synchronous loop would compute."""

    def __init__(self, make: Callable[[dict[str, Any] | None], Any], produce: Callable[[Any, int, int], list],
                 stage_at: Callable[[int], int], *, start_step: int, state: dict[str, Any] | None,
                 depth: int = 2) -> None:
        self.make, self.produce, self.depth = make, produce, depth
        self._state, self._step = state, start_step
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._stream: Any = None
        self._start(stage_at)

    def _one(self, stream: Any, step: int, stage_at: Callable[[int], int]) -> FedStep:
        t0 = time.perf_counter()
        stage = stage_at(step)
        micro = self.produce(stream, step, stage)
        return FedStep(step, stage, micro, stream.state.to_dict(), time.perf_counter() - t0)

    def _run(self, stage_at: Callable[[int], int], stop: threading.Event, q: queue.Queue, step: int,
             state: dict[str, Any] | None) -> None:
        try:
            stream = self.make(state)
            while not stop.is_set():
                item = self._one(stream, step, stage_at)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1
        except BaseException as e:  # noqa: BLE001 -- surfaced in the step loop by next()
            q.put(_Failed(step, e))

    def _start(self, stage_at: Callable[[int], int]) -> None:
        self.stage_at = stage_at
        if self.depth == 0:
            self._stream = self.make(self._state)
            return
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._run, args=(stage_at, self._stop, self._queue, self._step,
                                                                self._state),
                                        name="omnidiff-data-feed", daemon=True)
        self._thread.start()

    def next(self, step: int, stage_at: Callable[[int], int]) -> FedStep:
        if step != self._step:
            raise RuntimeError(f"StepFeeder: asked for step {step}, the next step is {self._step}")
        if self.depth == 0:
            item = self._one(self._stream, step, stage_at)
        else:
            t0 = time.perf_counter()
            item = self._queue.get()
            wait = time.perf_counter() - t0
            if isinstance(item, _Failed):
                self.close()
                raise DataError(f"reading training data for step {item.step} failed: {item.error}") from item.error
            if item.stage != stage_at(step):   # stage bounds moved since it was planned: plan again from here
                self.close()
                self._start(stage_at)
                return self.next(step, stage_at)
            item.wait_s = wait
        self._state, self._step = item.state, step + 1
        return item

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue or in a read: it exits at its next put)."""
        self._stop.set()
        if self._thread is not None:
            while True:   # drain so a blocked put returns
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=30)
            self._thread = None
