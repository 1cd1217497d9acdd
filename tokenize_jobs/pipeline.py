"""The Ray Data plan: listed units -> inputs -> decoded media -> token ids -> shards -> rows the driver commits.

Most listings (many files or image pairs; `expand_in_actors`):

    from_items(units, blocks)               driver: the listing (plain dicts), one wave at a time
    .map_batches(TokenizeShards, ActorPool) actors, a block of units at a time, streamed as a bare loop would:
                                            list each unit's new inputs (`expand`), read + decode their media,
                                            encode media and text (batched), chat layout, pack the samples into
                                            shards (webdataset TarWriter) and upload them with their indexes
                                            (writer.ShardStream); one metadata row per shard leaves the actor
    .iter_batches()                         driver: lists each shard and index in the manifest under the lease
                                            (writer.ShardWriter.add_commit)

A listing where one unit is too large a share for one actor (one big JSONL or parquet file):

    from_items(units, blocks)
    .map_batches(expand)                    tasks: the unit's inputs, a block at a time
    .repartition(rows per block)            a streaming split: one big file feeds every actor
    .map_batches(Tokenize, ActorPool)       actors: read, decode, encode, chat layout -> samples per input
    .repartition(inputs per shard)          streaming: blocks the size of a shard
    .map_batches(write)                     tasks: pack and upload the shards (writer.write_shards)
    .iter_batches()                         driver: commits

Each stage passes every input on, tokenized or with a quarantine reason, so the indexes account for all of them.
Tokenizers are built once per actor from the artifacts the driver saved in `<out>/tokenizers/`, so every worker
tokenizes with the very same files. Rows carry only scalars (str, int, bytes) in typed Arrow tables
(`EXPAND_SCHEMA`, `OUT_SCHEMA`): an input's samples leave the tokenizer as concatenated arrays
(`writer.pack_samples`) and become tar members in the shard writer.
"""
from __future__ import annotations

import hashlib
import json
import os
import traceback
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from common import configlib, hostmem, storage
from model.prompts import count_placeholders, encode_messages
from model.tokenizers import TokenizerConfig, TokenizerSet
from model.tokenizers.base import BadInput
from model.tokenizers.text import PreEncodedText, text_pieces
from tokenize_jobs import sources
from tokenize_jobs.config import TokenizeJobConfig
from tokenize_jobs.writer import COMMIT_COLUMNS, ShardStream, pack_samples, write_shards

# Rows between the stages, typed: Ray Data takes and hands on these Arrow tables as they are, with no per-batch
# conversion to numpy object arrays and back, and no type inference on the way out.
_ROW_FIELDS = [("fp", pa.string()), ("file", pa.string()), ("unit", pa.string()), ("source", pa.string()),
               ("unit_new", pa.int64()), ("status", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
EXPAND_SCHEMA = pa.schema(_ROW_FIELDS + [("spec", pa.string()), ("data", pa.binary())])
OUT_SCHEMA = pa.schema(_ROW_FIELDS + [("ids", pa.binary()), ("mask", pa.binary()), ("metas", pa.string()),
                                      ("stats", pa.string())])
EXPAND_COLUMNS = tuple(EXPAND_SCHEMA.names)
OUT_COLUMNS = tuple(OUT_SCHEMA.names)

# Listed units per expand task, at most (a listing with a unit too large for one actor): expanding a unit is
# ~0.1-1 ms of work (fingerprint an image pair, or scan a JSONL file's lines), scheduling a task ~0.1-0.3 s.
UNITS_PER_EXPAND_TASK = 256
# Blocks of whole units per tokenizer actor, at least: the last blocks to finish leave the other actors idle, so
# a block is at most a sixteenth of an actor's share (a speech listing of 20 files spread over 2 actors at 1.8x one).
# A block's last shard closes with the block: a corpus of fewer than 16 shards' worth per actor gets smaller
# shards. A block holds at most `shards.max_samples` units, so a block of image pairs fills a shard or more.
ACTOR_BLOCKS_PER_ACTOR = 16

# Speech codes kept per Tokenize actor, keyed by the decoded waveform's digest: (n_q, T) int64 is ~1 KB per
# second of audio, so 8,192 clips of a few seconds stay in tens of MB.
AUDIO_CACHE_CLIPS = 8192

_TOKENIZERS: dict[str, TokenizerSet] = {}
_JOB_CONFIGS: dict[str, TokenizeJobConfig] = {}


def tokenizers_for(artifacts_dir: str, cfg_dict: dict[str, Any]) -> TokenizerSet:
    """One TokenizerSet per worker process (Ray reuses processes across tasks), with this job's input guards."""
    key = json.dumps([artifacts_dir, cfg_dict], sort_keys=True)
    if key not in _TOKENIZERS:
        cfg = configlib.from_dict(TokenizerConfig, cfg_dict)
        # artifacts exist: loads and checks them; media tokenizers on first use (a text job builds no EnCodec)
        _TOKENIZERS[key] = TokenizerSet.prepare(cfg, artifacts_dir, lazy_media=True)
    return _TOKENIZERS[key]


def job_config_for(job: dict[str, Any]) -> TokenizeJobConfig:
    """The typed job config, parsed once per worker process: parsing it per batch was a quarter of the
    decode stage's CPU time for cheap inputs (text)."""
    key = json.dumps(job, sort_keys=True)
    if key not in _JOB_CONFIGS:
        _JOB_CONFIGS[key] = configlib.from_dict(TokenizeJobConfig, job)
    return _JOB_CONFIGS[key]


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _scalar(batch[k][i]) for k in keys} for i in range(n)]


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _columns(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, list[Any]]:
    return {k: [r[k] for r in rows] for k in names}


def _quarantine(row: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {**row, "status": "quarantined", "reason": reason, "detail": detail[:2000], "spec": "{}", "data": b""}


def _unexpected(row: dict[str, Any], e: Exception, stage: str) -> dict[str, Any]:
    # A bug or an unforeseen kind of bad file: the input is quarantined (the job must go on), with the traceback
    # tail so the summary's `unexpected_error` count can be investigated.
    tb = traceback.format_exc(limit=3)
    print(f"[tokenize] unexpected error in {stage} for {row['source']}: {type(e).__name__}: {e}", flush=True)
    return _quarantine(row, "unexpected_error", f"{stage}: {type(e).__name__}: {e}\n{tb}")


# ---- stage 1: expand units -------------------------------------------------------------------------------------

def expand(batch: pa.Table, ctx: dict[str, Any], input_cfg: dict[str, Any], rows_per_block: int
           ) -> Iterator[pa.Table]:
    """Listed units (a pyarrow batch) -> their input rows, handed on `rows_per_block` at a time: a JSONL file of
    millions of lines is never a list here."""
    from tokenize_jobs.config import InputConfig

    storage.set_policy(ctx["storage"])
    cfg = configlib.from_dict(InputConfig, input_cfg)
    rows: list[dict[str, Any]] = []
    for unit in batch.to_pylist():
        done = set(unit.pop("done", None) or ())
        for row in sources.expand_unit(ctx, unit, cfg, done):
            rows.append(row)
            if len(rows) >= rows_per_block:
                yield pa.Table.from_pylist(rows, schema=EXPAND_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=EXPAND_SCHEMA)


# ---- read + decode (inside the tokenize actors) ------------------------------------------------------------------

def decode_inputs(rows: list[dict[str, Any]], ctx: dict[str, Any], cfg: TokenizeJobConfig, tok: TokenizerSet
                  ) -> list[tuple[int, dict[str, Any], dict[str, np.ndarray]]]:
    """Read and decode the pending inputs of `rows` (media through the tokenizers' `load`): (index, record,
    media) for each one decoded; an input that cannot be is replaced in `rows` by its quarantine row. Runs in the
    tokenize actor, next to the encoders: decoded media never travel between processes (Ray Data fused the two
    stages onto the actor anyway, and serializing media between them cost more than decoding text)."""
    out = []
    for i, row in enumerate(rows):
        if row["status"] != "pending":
            continue
        try:
            record, media = sources.decode_input(ctx, row, tok, cfg.templates, cfg.tasks, cfg.input)
            out.append((i, record, media))
        except BadInput as e:
            rows[i] = _quarantine(row, e.reason, str(e))
        except storage.StorageError:
            # Storage that fails past its retries says nothing about the input: quarantining would record it as
            # done and lose it. The task fails, nothing of this batch is committed, and a rerun redoes it.
            raise
        except Exception as e:  # noqa: BLE001  (see _unexpected)
            rows[i] = _unexpected(row, e, "decode")
    return out


# ---- stage 3: tokenize (actors) -------------------------------------------------------------------------------

class Tokenize:
    """Encodes a batch of decoded inputs: images in one batched call (one per shape), audio in batched calls,
    then text and chat layout per sample; emits each input's samples as arrays (`writer.pack_samples`)."""

    def __init__(self, artifacts_dir: str, tokenizers: dict[str, Any], max_tokens: int, audio_batch: int = 8,
                 ctx: dict[str, Any] | None = None, job: dict[str, Any] | None = None, batch_size: int = 0):
        # The text tokenizer's encode_batch threads (a Rust pool, sized at its first use) follow the actor's CPU
        # share, as torch's do: Ray sets OMP_NUM_THREADS from num_cpus.
        os.environ.setdefault("RAYON_NUM_THREADS", os.environ.get("OMP_NUM_THREADS") or "1")
        # Activations from the heap, not a fresh mmap per forward: MAGVIT-v2 tiny blocks took ~245 ms, ~160 with it.
        hostmem.keep_large_blocks()
        self.ctx = ctx                                         # the corpus and the job: for decoding inputs
        self.cfg = job_config_for(job) if job is not None else None
        self.tok = tokenizers_for(artifacts_dir, tokenizers)
        self.vocab = self.tok.vocab
        self.max_tokens = max_tokens
        self.audio_batch = audio_batch
        self.batch_size = batch_size            # inputs per tokenizer call; 0 = the whole block
        self._audio_cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.audio_cache_hits = 0

    def _encode_images(self, items: list[tuple[Any, np.ndarray]]) -> dict[Any, np.ndarray | Exception]:
        out: dict[Any, np.ndarray | Exception] = {}
        by_shape: dict[tuple, list] = {}
        for key, arr in items:
            by_shape.setdefault(arr.shape, []).append((key, arr))
        for group in by_shape.values():
            try:
                codes = self.tok.image.encode(np.stack([a for _, a in group]))  # (B, H, W, C) -> (B, N)
                out.update({k: codes[i] for i, (k, _) in enumerate(group)})
            except Exception:  # noqa: BLE001 - retry one by one so one bad image cannot sink the batch
                for k, a in group:
                    try:
                        out[k] = self.tok.image.encode(a[None])[0]  # (1, H, W, C) -> (N,)
                    except Exception as e:  # noqa: BLE001
                        out[k] = e
        return out

    def _encode_audio(self, items: list[tuple[Any, np.ndarray]]) -> dict[Any, np.ndarray | Exception]:
        out: dict[Any, np.ndarray | Exception] = {}
        # A clip reused by several inputs (one recording in ASR, TTS and speech-to-image lines) is encoded once
        # per actor: codes are a pure function of the decoded waveform, and encoding is the job's costliest step.
        digests = {k: hashlib.blake2b(a.tobytes(), digest_size=16).digest() for k, a in items}
        fresh: dict[bytes, tuple[Any, np.ndarray]] = {}   # digest -> the first input with it
        for k, a in items:
            hit = self._audio_cache.get(digests[k])
            if hit is not None:
                out[k] = hit
            else:
                fresh.setdefault(digests[k], (k, a))
        encoded = self._encode_audio_uncached(list(fresh.values()))
        for digest, (first, _) in fresh.items():
            if not isinstance(encoded[first], Exception):
                self._audio_cache[digest] = encoded[first]
                while len(self._audio_cache) > AUDIO_CACHE_CLIPS:
                    self._audio_cache.popitem(last=False)  # oldest first
        for k, _ in items:
            if k not in out:
                out[k] = encoded[fresh[digests[k]][0]]     # an error is shared by every input with that clip
        self.audio_cache_hits += len(items) - len(fresh)
        return out

    def _encode_audio_uncached(self, items: list[tuple[Any, np.ndarray]]) -> dict[Any, np.ndarray | Exception]:
        out: dict[Any, np.ndarray | Exception] = {}
        if not items:
            return out    # the speech tokenizer is built on its first clip
        # Similar lengths together: a batch is zero-padded to its longest clip.
        items = sorted(items, key=lambda kv: kv[1].size)
        encode_batch = getattr(self.tok.speech, "encode_batch", None)
        for start in range(0, len(items), self.audio_batch):
            group = items[start:start + self.audio_batch]
            try:
                if encode_batch is None:
                    raise NotImplementedError
                codes = encode_batch([a for _, a in group])
                out.update({k: codes[i] for i, (k, _) in enumerate(group)})
            except Exception:  # noqa: BLE001
                for k, a in group:
                    try:
                        out[k] = self.tok.speech.encode(a)
                    except Exception as e:  # noqa: BLE001
                        out[k] = e
        return out

    def __call__(self, block: pa.Table) -> pa.Table:
        """Expanded input rows (`EXPAND_SCHEMA`) -> the same inputs tokenized or quarantined (`OUT_SCHEMA`), in
        tokenizer calls of `batch_size` inputs. The block is batched here, not by Ray Data: `TokenizeShards`
        gets listed units from Ray, and tokenizes the inputs they expand to."""
        if self.ctx is None or self.cfg is None:
            raise RuntimeError("Tokenize needs ctx= and job= to decode inputs (build_dataset passes them)")
        storage.set_policy(self.ctx["storage"])
        step = self.batch_size or max(1, block.num_rows)
        return pa.concat_tables([self._tokenize(block.slice(i, step)) for i in range(0, block.num_rows, step)]
                                or [OUT_SCHEMA.empty_table()])

    def _tokenize(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        pending = decode_inputs(rows, self.ctx, self.cfg, self.tok)
        results = self.encode_inputs([(rows[i], record, media) for i, record, media in pending])
        for (i, _, _), (row, samples) in zip(pending, results):
            if row["status"] == "ok":
                stats = [{"task": m["task"], "n_tokens": m["n_tokens"], "n_answer": m["n_answer"]}
                         for _, _, m in samples]
                row = {**row, **pack_samples(samples), "stats": json.dumps(stats)}
            rows[i] = row
        out = []
        for row in rows:
            for k, empty in (("ids", b""), ("mask", b""), ("metas", ""), ("stats", "[]")):
                row.setdefault(k, empty)
            out.append(row)
        return pa.Table.from_pylist(out, schema=OUT_SCHEMA)   # columns not in the schema (spec, data) dropped

    def encode_inputs(self, items: list[tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]]
                      ) -> list[tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray, dict[str, Any]]]]]:
        """The tokenizers' work on decoded inputs, (row, record, media) each -> (row with status "ok" or a
        quarantine reason, its samples as (input_ids, answer_mask, meta)). Every tokenizer runs once per batch:
        images per shape, audio in `audio_batch` groups, and every text piece of every sample in one
        `encode_batch` call. The tokenize benchmark's bare loop calls this too, without Ray."""
        images, audios = [], []
        precomputed: dict[tuple[int, str], np.ndarray] = {}
        for i, (_, _, media) in enumerate(items):
            for name, arr in media.items():
                # speech codes given with the line (sources.speech_codes) need no encoding
                if name.startswith("audio") and arr.dtype.kind in "iu":
                    precomputed[(i, name)] = arr
                else:
                    (images if name.startswith("image") else audios).append(((i, name), arr))
        codes = {**self._encode_images(images), **self._encode_audio(audios), **precomputed}
        text = self.tok.text
        if hasattr(text, "encode_batch"):
            text = PreEncodedText(text, [piece for _, record, _ in items for sample in record["samples"]
                                         for piece in text_pieces(sample["messages"])])
        return [self._samples(row, record, {name: codes[(i, name)] for name in media}, text)
                for i, (row, record, media) in enumerate(items)]

    def _samples(self, row: dict[str, Any], record: dict[str, Any], media_codes: dict[str, np.ndarray | Exception],
                 text) -> tuple[dict[str, Any], list]:
        try:
            for name, c in media_codes.items():
                if isinstance(c, Exception):
                    raise BadInput("encode_error", f"{name}: {type(c).__name__}: {c}")
            samples = []
            for sample in record["samples"]:
                msgs = sample["messages"]
                imgs, auds = self._media_for(msgs, media_codes)
                enc = encode_messages(msgs, self.vocab, text, images=imgs, audios=auds)
                if not enc.answer_mask.any():
                    raise BadInput("no_answer", f"sample {sample['task']} has no assistant turn to learn")
                if self.max_tokens and len(enc) > self.max_tokens:
                    raise BadInput("too_many_tokens", f"{len(enc)} tokens > input.max_tokens={self.max_tokens}")
                meta = {**record["meta"], "task": sample["task"], "source": row["source"], "fingerprint": row["fp"],
                        "n_tokens": len(enc), "n_answer": int(enc.answer_mask.sum())}
                samples.append((enc.input_ids, enc.answer_mask, meta))
            return {**row, "status": "ok"}, samples
        except BadInput as e:
            return _quarantine(row, e.reason, str(e)), []
        except Exception as e:  # noqa: BLE001
            return _unexpected(row, e, "tokenize"), []

    @staticmethod
    def _media_for(messages: list[dict], media_codes: dict[str, np.ndarray]) -> tuple[list, list]:
        """Messages lines list their media in placeholder order; a paired input (one image or audio) fills
        every placeholder of its template with that one item."""
        n_img, n_aud = count_placeholders(messages)
        imgs = [media_codes[k] for k in sorted((k for k in media_codes if k.startswith("image")), key=_media_order)]
        auds = [media_codes[k] for k in sorted((k for k in media_codes if k.startswith("audio")), key=_media_order)]
        if len(imgs) == 1 and n_img != 1:
            imgs = imgs * n_img
        if len(auds) == 1 and n_aud != 1:
            auds = auds * n_aud
        return imgs, auds


def _media_order(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


class TokenizeShards(Tokenize):
    """The tokenizer actor that also expands its units and writes their shards: a block of listed units in,
    one commit row per shard out. Within a block it runs the bare loop (expand -> decode -> encode -> pack and
    upload), so no input, token or sample crosses a process; a block's last shard closes with the block."""

    def __init__(self, input_cfg: dict[str, Any], rows_per_block: int, write: dict[str, Any], **tokenize: Any):
        super().__init__(**tokenize)
        self.input_cfg = input_cfg          # InputConfig, as a dict: `expand` parses it
        self.rows_per_block = rows_per_block
        self.write = write                  # ShardStream's arguments: output, run id, shard limits, EOS id

    def __call__(self, units: pa.Table) -> dict[str, list]:
        stream = ShardStream(**self.write)          # `expand` sets the storage policy before any read or write
        for rows in expand(units, self.ctx, self.input_cfg, self.rows_per_block):
            stream.add(super().__call__(rows).to_pylist())
        return _columns(stream.finish(), COMMIT_COLUMNS)


# ---- the plan -------------------------------------------------------------------------------------------------

def write(batch: pa.Table, ctx: dict[str, Any], out: str, run_id: str, max_samples: int,
          max_bytes: int, eos_id: int, crash_once: str = "") -> dict[str, list]:
    """Pack a block of tokenized inputs into shards and upload them with their indexes (inputs and samples)
    from this worker (writer.write_shards): only their metadata rows go on to the driver."""
    storage.set_policy(ctx["storage"])
    return _columns(write_shards(batch.to_pylist(), out, run_id, max_samples, max_bytes, eos_id, crash_once),
                    COMMIT_COLUMNS)


def expand_in_actors(units: list[dict[str, Any]], actors: int) -> bool:
    """Whether the tokenizer actors expand the units themselves: yes unless some unit is too large a share of the
    listing to go to one actor whole (more than half of one actor's share of the listed bytes)."""
    sizes = [sum(f["size"] for f in u["files"]) for u in units]
    return actors == 1 or max(sizes, default=0) * 2 * actors <= sum(sizes)


def build_dataset(units: list[dict[str, Any]], ctx: dict[str, Any], cfg: TokenizeJobConfig, artifacts_dir: str,
                  out: str, run_id: str, eos_id: int):
    import ray

    job = configlib.to_dict(cfg)
    r = cfg.ray
    gpus = r.gpus_per_actor if ray.cluster_resources().get("GPU", 0) > 0 else 0
    per_block = r.rows_per_block(ctx["kind"], cfg.tokenizers)
    tokenize = {"artifacts_dir": artifacts_dir, "tokenizers": job["tokenizers"], "max_tokens": cfg.input.max_tokens,
                "ctx": ctx, "job": job, "batch_size": r.udf_batch_size(ctx["kind"], cfg.tokenizers)}
    shards = {"out": out, "run_id": run_id, "max_samples": cfg.shards.max_samples, "max_bytes": cfg.shards.max_bytes,
              "eos_id": eos_id, "crash_once": os.environ.get("OMNIDIFF_CRASH_SHARD_WRITER_ONCE", "")}
    # Four blocks queued per actor (Ray's default is two): the executor refills a queue once per scheduling step
    # (up to 0.1 s), which left gaps after blocks of ~0.1 s: text with 2 actors went from 1.3-1.4x one actor to 1.6x.
    pool = ray.data.ActorPoolStrategy(size=r.actors, max_tasks_in_flight_per_actor=4)
    actors = {"compute": pool, "batch_size": None, "batch_format": "pyarrow", "num_cpus": r.actor_cpus,
              "num_gpus": gpus}
    # Group units (one block per unit, Ray's default for a short list, would cost an actor call, and a shard, per
    # image pair or text file), but keep several blocks per actor so that the work spreads over them.
    if expand_in_actors(units, r.actors):
        n_blocks = min(len(units), max(-(-len(units) // max(1, cfg.shards.max_samples)),
                                       ACTOR_BLOCKS_PER_ACTOR * r.actors))
        ds = ray.data.from_items(units, override_num_blocks=max(1, n_blocks))
        # Against expand tasks, a repartition into shard-sized blocks and write tasks around the actors, the job
        # went from 0.80-1.02 of the bare loop per core (text, images, MAGVIT-v2 tiny) to 0.96-1.08 (2 cores).
        ds = ds.map_batches(TokenizeShards, fn_constructor_kwargs={
            **tokenize, "input_cfg": job["input"], "rows_per_block": per_block, "write": shards}, **actors)
    else:
        # A unit too large for one actor (a big JSONL or parquet file): expand tasks turn it into inputs,
        # `per_block` rows at a time, and a streaming repartition (no shuffle, no barrier) deals them out in blocks
        # of `per_block` rows, so one file feeds every actor. At most one expand task per actor: each holds a
        # worker process of its own.
        n_blocks = min(len(units), max(-(-len(units) // UNITS_PER_EXPAND_TASK), 2 * r.actors))
        ds = ray.data.from_items(units, override_num_blocks=max(1, n_blocks))
        ds = ds.map_batches(expand, fn_kwargs={"ctx": ctx, "input_cfg": job["input"], "rows_per_block": per_block},
                            batch_size=None, batch_format="pyarrow", num_cpus=r.decode_cpus, concurrency=r.actors)
        ds = ds.repartition(target_num_rows_per_block=per_block)
        ds = ds.map_batches(Tokenize, fn_constructor_kwargs=tokenize, **actors)
        # A block per shard (strict: small blocks are combined, not only large ones split): an input gives one
        # sample or a few (one per task), so a shard's worth of inputs closes one shard or a few.
        ds = ds.repartition(target_num_rows_per_block=max(1, cfg.shards.max_samples), strict=True)
        # At most one write task per actor: each holds a worker process of its own, and webdataset imports torch
        # (~1 s) in each.
        ds = ds.map_batches(write, fn_kwargs={"ctx": ctx, **shards}, batch_size=None, batch_format="pyarrow",
                            num_cpus=r.write_cpus, concurrency=r.actors)
    # A worker that dies is replaced and its task retried by Ray (system failures: without limit); the new attempt
    # writes under new names, and the files of the lost one are orphans (writer.clean_orphans).
    # Shards are committed in input order, not in the order their tasks finish: the manifest's shard list (and so
    # a training run's sample order) is the same on every run of the same corpus. This dataset only.
    ds.context.execution_options.preserve_order = True
    return ds
