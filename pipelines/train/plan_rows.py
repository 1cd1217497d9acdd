"""Planning the global stream of packed rows from sample lengths alone (no tokens read).

The stream is one GLOBAL sequence of packed rows, the same on every rank and independent of the world size:

    draw k of stage s -> rng([seed, s, k]) picks a source by the stage's weights, then draws that sample's EOS
                         tail lengths (model/diffusion.eos_tail_lengths): the row length of a sample is
                         tokens + its tails, known from the shard's sample index without its tokens
    source cursor     -> (epoch, shard position, index): shards in a seeded order per epoch, samples shuffled
                         within a shard; so a source is an endless, reproducible sequence
    packer            -> greedy: samples are appended to a row while they fit in seq_len (packing="pack"), or one
                         sample per row (packing="pad"); a row never splits a sample
    ranks             -> each optimizer step takes the next world * grad_accum * micro_batch rows; rank r takes
                         rows r, r + world, ... of them (strided)

Every rank plans every row (a few integers per sample, from the index) and then reads only the samples of its
own rows (pipelines/train/feed.py). So the position is the same on every rank and means the same thing at any
world size: a resumed run with 4 workers continues exactly after the last row the 2-worker run consumed, with
no sample repeated or skipped. A sample's tail is drawn from the same generator state when it is read
(`tail_generator`), so the read sample is exactly as long as planned.

A position is saved at row boundaries as the cursor BEFORE the next row's first sample was drawn, so restoring
it re-draws that sample; stage switches (at step boundaries) restart the draw counter k of the new stage while
every source keeps its cursor (stage 2 continues t2i where stage 1 left it).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from model.diffusion import eos_tail_lengths


class DataError(ValueError):
    """Bad training data or data config; the message names the shard set, shard or source at fault."""


@dataclass(frozen=True)
class Shard:
    set_uri: str       # the tokenize output holding it
    url: str           # full path or URI
    samples: int
    sha256: str | None
    nbytes: int | None
    index: tuple[str, int | None, str | None] | None = None   # sample index (url, bytes, sha256); None: none


@dataclass
class Source:
    name: str
    shards: list[Shard]
    tasks: frozenset[str] | None       # None = every task
    n_samples: int | None              # samples of its tasks per the manifests (None = unknown)


@dataclass
class Stage:
    name: str
    steps: int
    weights: dict[str, float]   # source name -> normalized weight (only sources with samples)


@dataclass
class Sample:
    key: str
    task: str
    ids: np.ndarray           # (L,) int64, EOS tail included
    answer_mask: np.ndarray   # (L,) bool
    tail_mask: np.ndarray     # (L,) bool


@dataclass(frozen=True)
class ShardMeta:
    """What planning needs of a shard's samples, in tar order (from its sample index, or from reading it)."""
    tasks: list[str]
    tokens: np.ndarray   # (N,) int64
    tails: np.ndarray    # (N,) int64 EOS tails append_eos_tail inserts


@dataclass(frozen=True)
class PlannedSample:
    shard: Shard
    position: int     # in the shard, tar order
    task: str
    tokens: int       # without its EOS tail
    length: int       # with it: what it takes of a row
    stage: int        # the draw (stage, k) that picked it: seeds its EOS tail when it is read
    draw: int
    max_tail: int


def _seed(*parts: int | str) -> list[int]:
    """Stable integer seed words (Python's hash() of a str changes per process)."""
    out = []
    for p in parts:
        out.append(int.from_bytes(p.encode()[:8].ljust(8, b"\0"), "little") if isinstance(p, str) else int(p))
    return out


def tail_generator(seed: int, stage: int, draw: int) -> np.random.Generator:
    """The generator of draw (stage, k) positioned where the sample's EOS tail is drawn: after the source pick.
    Planning and reading both take the tail from here, so they agree on every sample's length."""
    rng = np.random.default_rng(_seed(seed, 1_000_003, stage, draw))
    rng.random()   # the source pick
    return rng


class SourcePlanner:
    """An endless reproducible sequence of one source's samples; its position is (epoch, shard_pos, index)."""

    def __init__(self, source: Source, seed: int, meta: Callable[[Shard], ShardMeta]) -> None:
        self.source, self.seed, self.meta = source, seed, meta
        self._cache: tuple[tuple[int, int], Shard, ShardMeta, list[int]] | None = None
        if not source.shards:
            raise DataError(f"source {source.name!r} has no shards")

    def _shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(_seed(self.seed, self.source.name, epoch)).permutation(len(self.source.shards))

    def _samples(self, epoch: int, shard_pos: int) -> tuple[Shard, ShardMeta, list[int]]:
        if self._cache is None or self._cache[0] != (epoch, shard_pos):
            shard = self.source.shards[int(self._shard_order(epoch)[shard_pos])]
            meta = self.meta(shard)
            mine = [i for i, t in enumerate(meta.tasks) if self.source.tasks is None or t in self.source.tasks]
            perm = np.random.default_rng(_seed(self.seed, self.source.name, epoch, shard_pos)).permutation(len(mine))
            self._cache = ((epoch, shard_pos), shard, meta, [mine[i] for i in perm])
        return self._cache[1], self._cache[2], self._cache[3]

    def draw(self, pos: tuple[int, int, int]) -> tuple[tuple[Shard, ShardMeta, int], tuple[int, int, int]]:
        """-> ((shard, its meta, position in it), the cursor after it). Pure in `pos`."""
        epoch, shard_pos, index = pos
        empty_shards = 0
        while True:
            if shard_pos >= len(self.source.shards):
                epoch, shard_pos, index = epoch + 1, 0, 0
            shard, meta, order = self._samples(epoch, shard_pos)
            if index < len(order):
                return (shard, meta, order[index]), (epoch, shard_pos, index + 1)
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


class RowPlanner:
    """The global stream of packed rows as plans (see the module docstring); `state` is its position."""

    def __init__(self, sources: Sequence[Source], stages: Sequence[Stage], meta: Callable[[Shard], ShardMeta], *,
                 seed: int, seq_len: int, packing: str, max_tail: int, task_max_tail: dict[str, int] | None = None,
                 too_long: str = "drop", state: StreamState | None = None) -> None:
        self.sources = {s.name: SourcePlanner(s, seed, meta) for s in sources}
        self.stages, self.seed = list(stages), seed
        self.seq_len, self.packing, self.max_tail, self.too_long = seq_len, packing, max_tail, too_long
        self.task_max_tail = dict(task_max_tail or {})
        self._mixtures: dict[int, tuple[list[str], list[float]]] = {}
        self.state = state or StreamState()
        for name in self.sources:
            self.state.cursors.setdefault(name, [0, 0, 0])

    def set_stage(self, stage: int) -> None:
        """Switch the mixture (at a step boundary). Source cursors carry over; the draw counter restarts."""
        if stage != self.state.stage:
            self.state.stage, self.state.draws = stage, 0

    def _mixture(self, stage: int) -> tuple[list[str], list[float]]:
        """A stage's source names and cumulative weights (np.cumsum's values: the draw compares against them)."""
        hit = self._mixtures.get(stage)
        if hit is None:
            weights = self.stages[stage].weights
            names = list(weights)
            hit = self._mixtures[stage] = (names, np.cumsum([weights[n] for n in names]).tolist())
        return hit

    def _draw(self, st: StreamState) -> tuple[PlannedSample, str, list[int]]:
        names, cum = self._mixture(st.stage)
        rng = np.random.default_rng(_seed(self.seed, 1_000_003, st.stage, st.draws))
        name = names[min(bisect.bisect_right(cum, rng.random()), len(names) - 1)]
        (shard, meta, i), nxt = self.sources[name].draw(tuple(st.cursors[name]))
        task, tokens = meta.tasks[i], int(meta.tokens[i])
        max_tail = self.task_max_tail.get(task, self.max_tail)
        length = tokens + int(eos_tail_lengths(int(meta.tails[i]), max_tail, rng).sum())  # rng: as tail_generator
        return PlannedSample(shard, i, task, tokens, length, st.stage, st.draws, max_tail), name, list(nxt)

    def next_row(self) -> list[PlannedSample]:
        st, row, used = self.state, [], 0
        while True:
            sample, name, nxt = self._draw(st)
            n = sample.length
            if n > self.seq_len:
                if self.too_long == "error":
                    raise DataError(f"sample {sample.position} of shard {sample.shard.url} ({sample.task}) has {n} "
                                    f"tokens with its EOS tail, more than data.seq_len={self.seq_len}; raise "
                                    f"data.seq_len or set data.too_long=drop")
                st.cursors[name], st.draws, st.dropped = nxt, st.draws + 1, st.dropped + 1
                continue
            if row and (self.packing == "pad" or used + n > self.seq_len):
                break  # not consumed: the next row starts with this draw
            row.append(sample)
            used += n
            st.cursors[name], st.draws, st.samples = nxt, st.draws + 1, st.samples + 1
        st.rows += 1
        return row

    def step_rows(self, world: int, rank: int, micro_batch: int, grad_accum: int) -> list[list[PlannedSample]]:
        """Plans every row of one optimizer step (all ranks' rows: the position moves by all of them) and
        returns `rank`'s, in order: grad_accum * micro_batch rows."""
        rows = [self.next_row() for _ in range(world * micro_batch * grad_accum)]
        return rows[rank::world]
