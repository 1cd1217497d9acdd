"""Training data: shard sets -> sources -> curriculum mixture -> planned rows -> this rank's samples -> batches.

Feeding path: every Ray Train worker reads the shards itself (tokenize_jobs/shards.py), not through Ray Data.
Measured here, the webdataset reader in one process gives ~9.5k samples/s against ~4.6k for Ray Data's
read_webdataset, and exact resume is simple: the whole data position is a few integers per source.

    plan_rows.py  the GLOBAL stream of packed rows, planned from sample lengths (each shard's sample index):
                  the same on every rank and independent of the world size; its position is StreamState
    feed.py       a rank reads only the samples of its own rows (ranged reads), and a background thread
                  plans, reads and collates the next steps ahead of the step loop
    this module   shard sets, sources and stages from the config; RowStream (plan + read); collate; masking

So a resumed run with 4 workers continues exactly after the last row the 2-worker run consumed, with no sample
repeated or skipped, while each rank reads about 1/world of the data (docs/training.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from model.diffusion import mask_answer_tokens
from model.tasks import TASKS
from model.vocab import Vocab
from pipelines.train.config import TrainConfig
from pipelines.train.feed import SHARD_CACHE_BYTES, SampleStore, ShardCache, read_shard
from pipelines.train.plan_rows import (DataError, PlannedSample, RowPlanner, Sample, Shard, Source, Stage,
                                       StreamState, _seed)

__all__ = ["Batch", "DataError", "RowStream", "Sample", "Shard", "ShardCache", "ShardSet", "Source", "Stage",
           "StreamState", "TrainData", "collate", "eval_prompts", "load_data", "mask_batch", "read_shard",
           "step_batches", "step_generator"]

log = logging.getLogger(__name__)


# ---- shard sets and sources ---------------------------------------------------------------------------------

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
    shards = [Shard(uri, e["url"], int(e["samples"]), e.get("sha256"), e.get("bytes"),
                    (e["index_url"], e["samples_index"].get("bytes"), e["samples_index"].get("sha256"))
                    if "index_url" in e else None)
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


class RowStream:
    """The global stream of packed rows (plan_rows.RowPlanner) and the reading of a rank's share of it
    (feed.SampleStore); `state` is the position, the same on every rank."""

    def __init__(self, sources: Sequence[Source], stages: Sequence[Stage], vocab: Vocab, *, seed: int,
                 seq_len: int, packing: str, max_tail: int, task_max_tail: dict[str, int] | None = None,
                 too_long: str = "drop", state: StreamState | None = None, read: str = "auto",
                 shard_cache_bytes: int = SHARD_CACHE_BYTES) -> None:
        self.store = SampleStore(vocab.size, vocab.eos_id, read, shard_cache_bytes)
        self.shard_cache = self.store.shard_cache   # one read per shard for all sources
        self.planner = RowPlanner(sources, stages, self.store.meta, seed=seed, seq_len=seq_len, packing=packing,
                                  max_tail=max_tail, task_max_tail=task_max_tail, too_long=too_long, state=state)
        self.vocab, self.seed = vocab, seed

    @property
    def state(self) -> StreamState:
        return self.planner.state

    def set_stage(self, stage: int) -> None:
        """Switch the mixture (at a step boundary). Source cursors carry over; the draw counter restarts."""
        self.planner.set_stage(stage)

    def next_row(self) -> list[Sample]:
        """The next global row, read in full (as a single rank reads it)."""
        return self.store.materialize([self.planner.next_row()], world=1, seed=self.seed)[0]

    def plan_step(self, world: int, rank: int, micro_batch: int, grad_accum: int) -> list[list[PlannedSample]]:
        """Plans one optimizer step (every rank's rows: the position moves by all of them); -> `rank`'s rows."""
        return self.planner.step_rows(world, rank, micro_batch, grad_accum)

    def step_rows(self, world: int, rank: int, micro_batch: int, grad_accum: int) -> list[list[list[Sample]]]:
        """The rows of one optimizer step for `rank`: grad_accum micro-batches of micro_batch rows each. Only
        this rank's samples are read."""
        mine = self.store.materialize(self.plan_step(world, rank, micro_batch, grad_accum), world=world,
                                      seed=self.seed)
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


def step_batches(stream: RowStream, stage: int, cfg: TrainConfig, world: int, rank: int) -> list[Batch]:
    """One optimizer step of `rank`: plan it (stage `stage`), read its samples, collate its micro-batches."""
    stream.set_stage(stage)
    rows = stream.step_rows(world, rank, cfg.data.micro_batch, cfg.data.grad_accum)
    return [collate(r, cfg.data.seq_len, stream.vocab) for r in rows]


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
                         state=state, read=cfg.data.read)

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
