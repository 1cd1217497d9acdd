"""Training data: shard sets -> sources -> curriculum mixture -> packed rows -> masked micro-batches.

Feeding path: every Ray Train worker reads the shards itself (tokenize_jobs/shards.py), not through Ray Data.
Measured here, the webdataset reader in one process gives ~9.5k samples/s against ~4.6k for Ray Data's
read_webdataset, and exact resume is simple: the whole data position is a few integers per source.

The stream is one GLOBAL sequence of packed rows, the same on every rank and independent of the world size:

    draw k of stage s -> rng([seed, s, k]) picks a source by the stage's weights and draws that sample's EOS tail
    source cursor     -> (epoch, shard position, index): shards in a seeded order per epoch, samples shuffled
                         within a shard; so a source is an endless, reproducible sequence
    packer            -> greedy: samples are appended to a row while they fit in seq_len (packing="pack"), or one
                         sample per row (packing="pad"); a row never splits a sample
    ranks             -> each optimizer step takes the next world * grad_accum * micro_batch rows; rank r takes
                         rows r, r + world, ... of them (strided)

Every rank reads every sample (tokenized samples are small, so this costs little next to a model step) and keeps
its own rows. In exchange the position is the same on every rank and means the same thing at any world size:
a resumed run with 4 workers continues exactly after the last row the 2-worker run consumed, with no sample
repeated or skipped. Splitting by shard would read less, but its position is per rank and does not survive a
change of world size.

A position is saved at row boundaries as the cursor BEFORE the next row's first sample was drawn, so restoring
it re-draws that sample; stage switches (at step boundaries) restart the draw counter k of the new stage while
every source keeps its cursor (stage 2 continues t2i where stage 1 left it).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from model.diffusion import append_eos_tail, mask_answer_tokens
from model.tasks import TASKS
from model.vocab import Vocab
from pipelines.train.config import TrainConfig

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad training data or data config; the message names the shard set, shard or source at fault."""


# ---- shard sets and sources ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    set_uri: str       # the tokenize output holding it
    url: str           # full path or URI
    samples: int
    sha256: str | None
    nbytes: int | None


@dataclass
class ShardSet:
    uri: str
    manifest: dict[str, Any]
    vocab: Vocab
    shards: list[Shard]
    samples_per_task: dict[str, int] | None   # None when the manifest does not say


def open_shard_set(uri: str) -> ShardSet:
    from tokenize_jobs import shards as reader  # imported late: Ray workers import this module first

    try:
        manifest = reader.read_manifest(uri)
    except FileNotFoundError as e:
        raise DataError(f"shard set {uri}: no manifest.json ({e}); point --shards at a tokenize job's output "
                        f"folder (the one holding manifest.json)") from None
    vocab = reader.manifest_vocab(uri)
    shards = [Shard(uri, e["url"], int(e["samples"]), e.get("sha256"), e.get("bytes"))
              for e in reader.shard_entries(uri, manifest)]
    # optional in a manifest: without it every source is assumed to have samples
    per_task = manifest.get("counts", {}).get("samples_per_task")
    counts = None if per_task is None else {k: int(v) for k, v in per_task.items()}
    return ShardSet(uri, manifest, vocab, shards, counts)


def check_vocab(sets: Sequence[ShardSet], model_vocab: Vocab | None = None) -> Vocab:
    """All shard sets must share one vocabulary, and it must be the model's (when the model already has one,
    e.g. a resumed run or a pretrained backbone); returns it."""
    if not sets:
        raise DataError("no shard sets: pass --shards <tokenize output> (or data.shards in the config)")
    first = sets[0]
    for s in sets[1:]:
        s.vocab.check_same(first.vocab, what=f"shard set {s.uri}", expected=f"shard set {first.uri}")
    if model_vocab is not None:
        first.vocab.check_same(model_vocab, what=f"shards ({first.uri})", expected="model")
    return first.vocab


@dataclass
class Source:
    name: str
    shards: list[Shard]
    tasks: frozenset[str] | None       # None = every task
    n_samples: int | None              # samples of its tasks per the manifests (None = unknown)


def resolve_sources(cfg: TrainConfig, sets: dict[str, ShardSet]) -> list[Source]:
    """data.sources, or one source per task found in the manifests when none are configured."""
    def count(set_uris: list[str], tasks: frozenset[str] | None) -> int | None:
        total = 0
        for u in set_uris:
            per_task = sets[u].samples_per_task
            if per_task is None:
                return None
            total += sum(n for t, n in per_task.items() if tasks is None or t in tasks)
        return total

    default_sets = list(cfg.data.shards)
    if not cfg.data.sources:
        tasks = sorted({t for u in default_sets for t, n in (sets[u].samples_per_task or {}).items() if n > 0})
        if not tasks:  # manifests without per-task counts: one source with everything
            return [Source("all", [sh for u in default_sets for sh in sets[u].shards], None, None)]
        return [Source(t, [sh for u in default_sets for sh in sets[u].shards], frozenset([t]),
                       count(default_sets, frozenset([t]))) for t in tasks]
    out = []
    for sc in cfg.data.sources:
        uris = list(sc.shards) or default_sets
        if not uris:
            raise DataError(f"data.sources {sc.name!r} has no shards and data.shards is empty; pass --shards")
        unknown = sorted(set(sc.tasks) - set(TASKS))
        if unknown:
            raise DataError(f"data.sources {sc.name!r}: unknown tasks {unknown}; tasks: {list(TASKS)}")
        tasks = frozenset(sc.tasks) if sc.tasks else None
        out.append(Source(sc.name, [sh for u in uris for sh in sets[u].shards], tasks, count(uris, tasks)))
    return out


@dataclass
class Stage:
    name: str
    steps: int
    weights: dict[str, float]   # source name -> normalized weight (only sources with samples)


def resolve_stages(cfg: TrainConfig, sources: Sequence[Source], warn: bool = True) -> list[Stage]:
    """Stages with their mixtures checked against the sources. A source with no samples is dropped from a
    stage (warning), so one curriculum runs on any tokenize output; unknown names and empty stages are errors."""
    by_name = {s.name: s for s in sources}
    if not cfg.data.stages:
        avail = {s.name: 1.0 for s in sources if s.n_samples != 0}
        if not avail:
            raise DataError("the shard sets hold no samples")
        return [Stage("all", cfg.train.steps, _normalize(avail))]
    out = []
    for i, sc in enumerate(cfg.data.stages):
        name = sc.name or f"stage{i + 1}"
        unknown = sorted(k for k in sc.mixture if k not in by_name and k not in TASKS)
        if unknown:
            raise DataError(f"data.stages[{i}] ({name}).mixture names unknown sources {unknown}; "
                            f"sources: {sorted(by_name)}")
        weights = {}
        for k, w in sc.mixture.items():
            src = by_name.get(k)
            if src is None or src.n_samples == 0:
                if warn:
                    log.warning("stage %s: source %r has no samples in the shard sets; dropped from the mixture",
                                name, k)
                continue
            if w > 0:
                weights[k] = w
        if not weights:
            raise DataError(f"data.stages[{i}] ({name}): none of its sources {sorted(sc.mixture)} has samples "
                            f"in the shard sets (sources with samples: "
                            f"{sorted(s.name for s in sources if s.n_samples != 0)})")
        out.append(Stage(name, sc.steps, _normalize(weights)))
    return out


def _normalize(w: dict[str, float]) -> dict[str, float]:
    total = sum(w.values())
    return {k: v / total for k, v in sorted(w.items())}


# ---- reading ------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    key: str
    task: str
    ids: np.ndarray           # (L,) int64, EOS tail included
    answer_mask: np.ndarray   # (L,) bool
    tail_mask: np.ndarray     # (L,) bool


def read_shard(shard: Shard, vocab_size: int) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """All samples of one shard as (key, task, ids, answer_mask), ids checked against the vocabulary: an id
    outside [0, vocab_size) means the shards were tokenized with another vocabulary."""
    from tokenize_jobs import shards as reader

    entry = {"url": shard.url}
    if shard.sha256 is not None:
        entry["sha256"] = shard.sha256
    if shard.nbytes is not None:
        entry["bytes"] = shard.nbytes
    out = []
    # size + sha256 checked against the manifest before any member is parsed
    for s in reader.parse_shard(reader._read_checked(entry, verify_sha=True), shard.url):
        ids = np.asarray(s["input_ids"]).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
            raise DataError(f"shard {shard.url}, sample {s['key']}: token id {bad} is outside the vocabulary "
                            f"[0, {vocab_size}); the shard was tokenized with a different vocabulary than its "
                            f"manifest says. Re-tokenize it.")
        out.append((s["key"], s["meta"].get("task", "text"), ids, np.asarray(s["answer_mask"]).astype(bool)))
    return out


def validate_ids(sources: Sequence[Source], vocab_size: int) -> int:
    """Read every shard once and check its ids (data.validate="all"): a bad shard fails here, before any worker
    starts, instead of hours into a run. Returns the number of samples checked."""
    seen: set[str] = set()
    n = 0
    for src in sources:
        for sh in src.shards:
            if sh.url not in seen:
                seen.add(sh.url)
                n += len(read_shard(sh, vocab_size))
    return n


SHARD_CACHE_BYTES = 512 * 2**20   # parsed ids + masks kept for a stream's sources (~55M tokens)


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
        self.reads = 0   # shards actually read (misses), for tests and benchmarks

    def get(self, shard: Shard) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
        key = (shard.url, shard.sha256)   # the sha256 too: a rewritten shard under the same url is re-read
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit[0]
        rows = read_shard(shard, self.vocab_size)
        self.reads += 1
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


def _seed(*parts: int | str) -> list[int]:
    """Stable integer seed words (Python's hash() of a str changes per process)."""
    out = []
    for p in parts:
        out.append(int.from_bytes(p.encode()[:8].ljust(8, b"\0"), "little") if isinstance(p, str) else int(p))
    return out


class SourceReader:
    """An endless reproducible sequence of one source's samples; its position is (epoch, shard_pos, index)."""

    def __init__(self, source: Source, seed: int, vocab_size: int, cache: ShardCache | None = None) -> None:
        self.source, self.seed, self.vocab_size = source, seed, vocab_size
        self.shard_cache = cache if cache is not None else ShardCache(vocab_size)
        self._cache: tuple[tuple[int, int], list] | None = None
        if not source.shards:
            raise DataError(f"source {source.name!r} has no shards")

    def _shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(_seed(self.seed, self.source.name, epoch)).permutation(len(self.source.shards))

    def _samples(self, epoch: int, shard_pos: int) -> list:
        if self._cache is None or self._cache[0] != (epoch, shard_pos):
            shard = self.source.shards[int(self._shard_order(epoch)[shard_pos])]
            rows = [r for r in self.shard_cache.get(shard)
                    if self.source.tasks is None or r[1] in self.source.tasks]
            perm = np.random.default_rng(_seed(self.seed, self.source.name, epoch, shard_pos)).permutation(len(rows))
            self._cache = ((epoch, shard_pos), [rows[i] for i in perm])
        return self._cache[1]

    def draw(self, pos: tuple[int, int, int]) -> tuple[tuple, tuple[int, int, int]]:
        """-> (sample at `pos`, the position after it). Pure in `pos`: drawing twice gives the same sample."""
        epoch, shard_pos, index = pos
        empty_shards = 0
        while True:
            if shard_pos >= len(self.source.shards):
                epoch, shard_pos, index = epoch + 1, 0, 0
            rows = self._samples(epoch, shard_pos)
            if index < len(rows):
                return rows[index], (epoch, shard_pos, index + 1)
            empty_shards += 1
            if empty_shards > len(self.source.shards):
                raise DataError(f"source {self.source.name!r} (tasks "
                                f"{sorted(self.source.tasks) if self.source.tasks else 'all'}) has no samples in "
                                f"its {len(self.source.shards)} shards")
            shard_pos, index = shard_pos + 1, 0


@dataclass
class StreamState:
    """The data position: JSON-serializable, identical on every rank, saved in every checkpoint."""
    stage: int = 0
    draws: int = 0                                  # draws made in the current stage (k)
    cursors: dict[str, list[int]] = field(default_factory=dict)   # source -> [epoch, shard_pos, index]
    rows: int = 0                                   # global rows consumed since the run began
    samples: int = 0
    dropped: int = 0                                # samples longer than seq_len, skipped

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "draws": self.draws, "cursors": {k: list(v) for k, v in self.cursors.items()},
                "rows": self.rows, "samples": self.samples, "dropped": self.dropped}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StreamState":
        return cls(int(d["stage"]), int(d["draws"]), {k: [int(x) for x in v] for k, v in d["cursors"].items()},
                   int(d["rows"]), int(d["samples"]), int(d["dropped"]))


class RowStream:
    """The global stream of packed rows (see the module docstring)."""

    def __init__(self, sources: Sequence[Source], stages: Sequence[Stage], vocab: Vocab, *, seed: int,
                 seq_len: int, packing: str, max_tail: int, task_max_tail: dict[str, int] | None = None,
                 too_long: str = "drop", state: StreamState | None = None,
                 shard_cache_bytes: int = SHARD_CACHE_BYTES) -> None:
        self.shard_cache = ShardCache(vocab.size, shard_cache_bytes)   # one read per shard for all sources
        self.readers = {s.name: SourceReader(s, seed, vocab.size, self.shard_cache) for s in sources}
        self.stages, self.vocab, self.seed = list(stages), vocab, seed
        self.seq_len, self.packing, self.max_tail, self.too_long = seq_len, packing, max_tail, too_long
        self.task_max_tail = dict(task_max_tail or {})
        self.state = state or StreamState()
        for name in self.readers:
            self.state.cursors.setdefault(name, [0, 0, 0])

    def set_stage(self, stage: int) -> None:
        """Switch the mixture (at a step boundary). Source cursors carry over; the draw counter restarts."""
        if stage != self.state.stage:
            self.state.stage, self.state.draws = stage, 0

    def _draw(self, st: StreamState) -> tuple[Sample, str, list[int]]:
        weights = self.stages[st.stage].weights
        rng = np.random.default_rng(_seed(self.seed, 1_000_003, st.stage, st.draws))
        names = list(weights)
        name = names[min(int(np.searchsorted(np.cumsum([weights[n] for n in names]), rng.random(), side="right")),
                         len(names) - 1)]
        (key, task, ids, answer), nxt = self.readers[name].draw(tuple(st.cursors[name]))
        tp = append_eos_tail(ids, answer, eos_id=self.vocab.eos_id, generator=rng,
                             max_tail=self.task_max_tail.get(task, self.max_tail))
        return Sample(key, task, tp.ids, tp.answer_mask, tp.tail_mask), name, list(nxt)

    def next_row(self) -> list[Sample]:
        st, row, used = self.state, [], 0
        while True:
            sample, name, nxt = self._draw(st)
            n = sample.ids.size
            if n > self.seq_len:
                if self.too_long == "error":
                    raise DataError(f"sample {sample.key} ({sample.task}) has {n} tokens with its EOS tail, more "
                                    f"than data.seq_len={self.seq_len}; raise data.seq_len or set "
                                    f"data.too_long=drop")
                st.cursors[name], st.draws, st.dropped = nxt, st.draws + 1, st.dropped + 1
                continue
            if row and (self.packing == "pad" or used + n > self.seq_len):
                break  # not consumed: the next row starts with this draw
            row.append(sample)
            used += n
            st.cursors[name], st.draws, st.samples = nxt, st.draws + 1, st.samples + 1
        st.rows += 1
        return row

    def step_rows(self, world: int, rank: int, micro_batch: int, grad_accum: int) -> list[list[list[Sample]]]:
        """The rows of one optimizer step for `rank`: grad_accum micro-batches of micro_batch rows each."""
        rows = [self.next_row() for _ in range(world * micro_batch * grad_accum)]
        mine = rows[rank::world]
        return [mine[m * micro_batch:(m + 1) * micro_batch] for m in range(grad_accum)]


# ---- collate ------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    ids: torch.Tensor          # (B, L) int64 clean ids, padding = eos
    answer_mask: torch.Tensor  # (B, L) bool
    tail_mask: torch.Tensor    # (B, L) bool
    segment_ids: torch.Tensor  # (B, L) int64: 1.. per packed sample, 0 = padding
    task_ids: torch.Tensor     # (B, L) int64: index into TASKS per position, -1 = padding
    n_tokens: int              # real (non-padding) tokens

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.ids.to(device), self.answer_mask.to(device), self.tail_mask.to(device),
                     self.segment_ids.to(device), self.task_ids.to(device), self.n_tokens)


def collate(rows: Sequence[Sequence[Sample]], seq_len: int, vocab: Vocab) -> Batch:
    """Rows of samples -> one (B, seq_len) batch. Each sample is its own segment (block-diagonal attention,
    positions restarting at 0), so packed samples never see each other; padding is segment 0."""
    B = len(rows)
    ids = np.full((B, seq_len), vocab.pad_id, dtype=np.int64)
    answer = np.zeros((B, seq_len), dtype=bool)
    tail = np.zeros((B, seq_len), dtype=bool)
    seg = np.zeros((B, seq_len), dtype=np.int64)
    task = np.full((B, seq_len), -1, dtype=np.int64)
    n_tokens = 0
    for b, row in enumerate(rows):
        at = 0
        for j, s in enumerate(row):
            n = s.ids.size
            ids[b, at:at + n] = s.ids
            answer[b, at:at + n] = s.answer_mask
            tail[b, at:at + n] = s.tail_mask
            seg[b, at:at + n] = j + 1
            task[b, at:at + n] = TASKS.index(s.task) if s.task in TASKS else TASKS.index("text")
            at += n
        n_tokens += at
    return Batch(torch.from_numpy(ids), torch.from_numpy(answer), torch.from_numpy(tail), torch.from_numpy(seg),
                 torch.from_numpy(task), n_tokens)


def mask_batch(batch: Batch, vocab: Vocab, generator: torch.Generator, *, scheme: str, eps: float,
               tail_factor: float):
    """The forward diffusion process on a collated batch (model/diffusion.mask_answer_tokens)."""
    return mask_answer_tokens(batch.ids, batch.answer_mask, batch.tail_mask, generator, mask_id=vocab.mask_id,
                              eps=eps, tail_factor=tail_factor, scheme=scheme, segment_ids=batch.segment_ids)


def step_generator(seed: int, step: int, rank: int, micro: int, device: torch.device | str = "cpu"
                   ) -> torch.Generator:
    """Masking randomness as a function of (seed, step, rank, micro-batch): a resumed run masks step n exactly
    as an uninterrupted run would, without saving generator states."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.default_rng(_seed(seed, 2_000_003, step, rank, micro)).integers(2**62)))
    return g


# ---- building it all from a config ------------------------------------------------------------------------

@dataclass
class TrainData:
    vocab: Vocab
    sets: dict[str, ShardSet]
    sources: list[Source]
    stages: list[Stage]

    def stream(self, cfg: TrainConfig, state: StreamState | None = None) -> RowStream:
        return RowStream(self.sources, self.stages, self.vocab, seed=cfg.train.seed, seq_len=cfg.data.seq_len,
                         packing=cfg.data.packing, max_tail=cfg.diffusion.max_tail,
                         task_max_tail=cfg.diffusion.task_max_tail, too_long=cfg.data.too_long,
                         state=state)

    def first_set(self) -> ShardSet:
        return next(iter(self.sets.values()))


def load_data(cfg: TrainConfig, model_vocab: Vocab | None = None, *, validate: bool = False,
              warn: bool = True) -> TrainData:
    """Open every shard set named by the config, check vocabularies, resolve sources and stages; with
    `validate` (and data.validate="all") also scan every shard's ids."""
    uris = list(dict.fromkeys(list(cfg.data.shards) + [u for s in cfg.data.sources for u in s.shards]))
    if not uris:
        raise DataError("no shard sets: pass --shards <tokenize output> (or set data.shards in the config)")
    sets = {u: open_shard_set(u) for u in uris}
    vocab = check_vocab(list(sets.values()), model_vocab)
    sources = resolve_sources(cfg, sets)
    stages = resolve_stages(cfg, sources, warn)
    if validate and cfg.data.validate == "all":
        validate_ids(sources, vocab.size)
    return TrainData(vocab, sets, sources, stages)


def eval_prompts(data: TrainData, per_task: int) -> list[Sample]:
    """A few samples per task (from the first shards, not advancing training's stream) to prompt at eval."""
    out: dict[str, list[Sample]] = {}
    for src in data.sources:
        for sh in src.shards[:4]:
            for key, task, ids, answer in read_shard(sh, data.vocab.size):
                if (src.tasks is None or task in src.tasks) and len(out.setdefault(task, [])) < per_task:
                    out[task].append(Sample(key, task, ids, answer, np.zeros_like(answer)))
    return [s for task in sorted(out) for s in out[task]]
