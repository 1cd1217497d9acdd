"""Checkpoints: one Stateful object through torch.distributed.checkpoint (DCP), reported to Ray Train; at the end
of training, the sharded model gathered for the export (whose format pipelines/export.py owns).

Layout of one checkpoint (Ray merges every rank's directory into `<run_dir>/<name>/step_XXXXXXXX/`):

    __<rank>_0.distcp         each rank's shards of the model and optimizer (DCP)
    .metadata                 DCP's index, written by rank 0 after every rank has written its data
    complete.rank<r>.json     completeness marker of rank r: step, world size, size and CRC32 of its files, and
                              the CRC32 of every item (byte range) DCP wrote into them

A checkpoint is used only when the markers of all `world_size` ranks are present and every file they list has
its recorded size. A crash while writing or uploading leaves a marker missing or a file short, so resume never
picks it; if the newest checkpoint is damaged anyway, resume falls back to the previous one and says so. Ray
keeps the last `keep_last` (CheckpointConfig.num_to_keep), so there is a previous one to fall back to.

Reading (`CheckpointReader`, the one DCP storage reader for local and s3:// checkpoints): each rank reads the
markers, `.metadata` and only the byte ranges its own load plan needs, straight from storage into memory (ranged
GETs on S3): nothing is copied to local disk, and a rank fetches about its share of the checkpoint, not all of
it. Every range is checked against the CRC32 its writer recorded before it is deserialized; `.metadata` against
rank 0's marker. A mismatch on any rank fails the load on every rank (`_all_ok`), and resume falls back.

Safety: nothing in a checkpoint is unpickled without restriction. `.metadata` goes through `MetadataUnpickler`,
which admits only the classes DCP's index is made of (`_METADATA_CLASSES`); tensors load with
`torch.load(weights_only=True)`, and so do non-tensor entries (`SafeLoadPlanner`, where DCP's default planner
would use `weights_only=False`). A tampered checkpoint is refused with an error naming the file; it cannot run code.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from common import storage
from model.vocab import Vocab
from pipelines import export as export_format

log = logging.getLogger(__name__)

MARKER = "complete.rank{rank}.json"
CKPT_DIR = re.compile(r"^step_(\d{8})(?:_([0-9a-f]+))?$")


def checkpoint_dir_name(step: int, attempt: str = "") -> str:
    """`step_00000120[_<attempt>]`: the attempt suffix (a hex start time) keeps names unique when a run that
    fell back to an older checkpoint reaches the same step again; it also orders such twins."""
    return f"step_{step:08d}_{attempt}" if attempt else f"step_{step:08d}"


class TrainState(Stateful):
    """Everything a resumed run needs: model and optimizer shards (DCP tensors) plus `extra`, plain data
    (step, stage, data position, scheduler, RNG, MLflow run id) identical on every rank."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.extra: dict[str, Any] = {"step": 0}

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "rng": torch.get_rng_state(),
                "extra": json.dumps({**self.extra, "scheduler": self.scheduler.state_dict()})}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        torch.set_rng_state(sd["rng"])
        extra = json.loads(sd["extra"])
        self.scheduler.load_state_dict(extra.pop("scheduler"))
        self.extra = extra


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, but non-tensor entries are read with torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# ---- saving -------------------------------------------------------------------------------------------------

def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_and_item_crcs(path: Path, ranges: list[tuple[int, int]]) -> tuple[int, list[list[int]]]:
    """CRC32 of the whole file and [offset, length, crc32] of each DCP item range in it, in one pass."""
    file_crc, items, pos = 0, [], 0
    with open(path, "rb") as f:
        def consume(n: int) -> int:
            nonlocal file_crc
            crc = 0
            while n > 0:
                chunk = f.read(min(n, 1 << 22))
                if not chunk:
                    raise ValueError(f"{path} ends before the item ranges DCP recorded for it")
                file_crc, crc, n = zlib.crc32(chunk, file_crc), zlib.crc32(chunk, crc), n - len(chunk)
            return crc

        for offset, length in sorted(set(ranges)):
            if offset < pos:
                raise ValueError(f"{path}: DCP item ranges overlap at offset {offset}")
            consume(offset - pos)
            items.append([offset, length, consume(length)])
            pos = offset + length
        while chunk := f.read(1 << 22):
            file_crc = zlib.crc32(chunk, file_crc)
    return file_crc, items


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_local(state: TrainState, directory: str | Path, *, rank: int, world_size: int) -> Path:
    """DCP-save `state` into this rank's own local `directory`, then write this rank's marker (after a barrier,
    so rank 0's marker also covers `.metadata`, which DCP writes once every rank has finished). The marker
    records each file's size and CRC32 and each item's CRC32, so a reader can check the ranges it reads alone."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = dcp.save({"train": state}, checkpoint_id=str(directory))   # the global index, on every rank
    _barrier()
    ranges: dict[str, list[tuple[int, int]]] = {}
    for info in metadata.storage_data.values():
        ranges.setdefault(info.relative_path, []).append((info.offset, info.length))
    files, items = {}, {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and not p.name.startswith(("complete.", ".complete.")):
            crc, its = _file_and_item_crcs(p, ranges.get(p.name, []))
            files[p.name] = {"bytes": p.stat().st_size, "crc32": crc}
            if its:
                items[p.name] = its
    marker = {"step": int(state.extra["step"]), "rank": rank, "world_size": world_size, "files": files,
              "items": items}
    tmp = directory / f".{MARKER.format(rank=rank)}.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, directory / MARKER.format(rank=rank))
    return directory


def report(state: TrainState, metrics: dict[str, Any], *, rank: int, world_size: int, attempt: str = "") -> None:
    """Save a checkpoint and hand it to Ray Train. Every rank calls this (report is a barrier)."""
    import ray.train

    step = int(state.extra["step"])
    with tempfile.TemporaryDirectory(prefix=f"ckpt-{step}-rank{rank}-") as d:
        save_local(state, d, rank=rank, world_size=world_size)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=checkpoint_dir_name(step, attempt))


# ---- finding and checking -----------------------------------------------------------------------------------

@dataclass
class Candidate:
    step: int
    uri: str           # local path or s3:// URI of the merged checkpoint directory
    attempt: str = ""


def list_checkpoints(run_uri: str) -> list[Candidate]:
    """Checkpoint directories under `<run_dir>/<name>`, newest first (by step)."""
    fs = storage.filesystem(run_uri)
    if not fs.exists(run_uri):
        return []
    out = []
    for entry in fs.ls(run_uri, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = CKPT_DIR.match(name)
        if m:
            uri = f"s3://{entry}" if storage.is_s3(run_uri) and not entry.startswith("s3://") else entry
            out.append(Candidate(int(m.group(1)), uri, m.group(2) or ""))
    return sorted(out, key=lambda c: (c.step, c.attempt), reverse=True)


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded: damaged (a size or CRC32 off) or refused (unsafe content)."""


@dataclass
class Recorded:
    """What the writers recorded in the markers of all ranks of one checkpoint."""
    world_size: int
    files: dict[str, dict[str, int]]              # file name -> {"bytes", "crc32"}
    items: dict[tuple[str, int, int], int]        # (file name, offset, length) -> CRC32 of that item


def inspect_checkpoint(uri: str) -> tuple[Recorded | None, str | None]:
    """(what the markers record, None) when the checkpoint at `uri` is complete: the marker of every rank is
    present and every file they list exists with its recorded size; else (None, what is wrong). Reads one
    listing and the markers (small JSON), none of the data."""
    listed = storage.find(uri.rstrip("/"), detail=True)
    sizes = {path.rstrip("/").rsplit("/", 1)[-1]: int(info.get("size") or 0) for path, info in listed.items()}
    present = sorted(n for n in sizes if re.fullmatch(r"complete\.rank\d+\.json", n))
    if not present:
        return None, "no completeness marker (the write or upload did not finish)"
    try:
        world = int(json.loads(storage.read_text(storage.join(uri, present[0])))["world_size"])
    except (ValueError, KeyError, TypeError) as e:
        return None, f"unreadable marker {present[0]} ({e})"
    names = [MARKER.format(rank=r) for r in range(world)]
    missing = [r for r, n in enumerate(names) if n not in sizes]
    if missing:
        return None, f"marker of rank {missing[0]} of {world} is missing"
    blobs = storage.read_many([storage.join(uri, n) for n in names])
    recorded = Recorded(world, {}, {})
    for name, blob in zip(names, blobs.values()):
        try:
            marker = json.loads(blob)
            recorded.files.update({f: {"bytes": int(i["bytes"]), "crc32": int(i["crc32"])}
                                   for f, i in marker["files"].items()})
            for f, its in marker.get("items", {}).items():   # absent in markers of older checkpoints
                recorded.items.update({(f, int(o), int(n)): int(c) for o, n, c in its})
        except (ValueError, KeyError, TypeError) as e:
            return None, f"unreadable marker {name} ({e})"
    for name, info in recorded.files.items():
        if name not in sizes:
            return None, f"{name} is missing"
        if sizes[name] != info["bytes"]:
            return None, f"{name} is {sizes[name]} bytes, expected {info['bytes']}"
    if ".metadata" not in recorded.files:
        return None, "DCP .metadata is missing"
    return recorded, None


# ---- reading --------------------------------------------------------------------------------------------------

# Every global a DCP `.metadata` of this trainer's state references (listed by unpickling a saved checkpoint's
# index with a recording `find_class`): DCP's metadata records, torch.Size, dtypes, the layout helper torch's own
# weights_only loader admits too, and the checkpoint id DCP stores as a path.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler admitting only `_METADATA_CLASSES` and torch dtypes: anything else (os.system, eval,
    a constructor with side effects) is refused before it can be called."""

    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.source}: refused, it references {module}.{name}, which a DCP checkpoint "
                              f"index never holds (the file was altered or not written by this trainer); "
                              f"delete this checkpoint or restore a trusted copy")


def load_metadata(data: bytes, source: str) -> Metadata:
    """DCP's index from the bytes of a `.metadata` file, through `MetadataUnpickler` (never plain pickle)."""
    try:
        metadata = MetadataUnpickler(data, source).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or garbled bytes
        raise CheckpointError(f"{source}: not a DCP index ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{source}: holds a {type(metadata).__name__}, not a DCP Metadata")
    return metadata


SPAN_GAP = 64 << 10      # items closer than this are fetched in one ranged GET (a wider gap would fetch
                         # other ranks' tensors lying between the replicated entries DCP spreads over files)
SPAN_MAX = 256 << 20     # ... up to this many bytes (memory held at once while reading)


class CheckpointReader(StorageReader):
    """DCP storage reader for one checkpoint directory, local or s3://. It reads `.metadata` (checked against
    rank 0's marker, unpickled by `MetadataUnpickler`) and then only the item ranges of this rank's load plan,
    by ranged reads into memory, each checked against the CRC32 its writer recorded. `bytes_read` counts what
    this rank fetched."""

    def __init__(self, uri: str, recorded: Recorded) -> None:
        super().__init__()
        self.uri, self.recorded = uri.rstrip("/"), recorded
        self.bytes_read = 0
        self.problem: str | None = None     # the first damage found, for the caller's message
        source = storage.join(self.uri, ".metadata")
        data = self._fetch(source, 0, recorded.files[".metadata"]["bytes"])
        if zlib.crc32(data) != recorded.files[".metadata"]["crc32"]:
            raise CheckpointError(f"{source} fails its CRC32 check (corrupt)")
        self.metadata = load_metadata(data, source)
        self.storage_data: dict[Any, Any] = self.metadata.storage_data

    def _fetch(self, uri: str, start: int, end: int) -> bytes:
        data = storage.read_range(uri, start, end)
        self.bytes_read += len(data)
        if len(data) != end - start:
            raise self._damage(f"{uri} ends at byte {start + len(data)}, before byte {end} that DCP recorded")
        return data

    def _damage(self, message: str) -> CheckpointError:
        self.problem = self.problem or message
        return CheckpointError(message)

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False   # never picked by DCP on its own: restore() passes it explicitly

    def read_metadata(self, *args: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def _check_whole_file(self, name: str) -> None:
        """Markers written before per-item CRCs record only whole files: stream the file once and check it."""
        uri, crc = storage.join(self.uri, name), 0
        with storage.open_read(uri) as f:
            while chunk := f.read(1 << 22):
                crc = zlib.crc32(chunk, crc)
                self.bytes_read += len(chunk)
        if crc != self.recorded.files[name]["crc32"]:
            raise self._damage(f"{name} fails its CRC32 check (corrupt)")

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[tuple[Any, ReadItem]]] = {}
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            if info.transform_descriptors:
                raise self._damage(f"{info.relative_path}: item {req.storage_index.fqn} has stream transforms "
                                   f"{info.transform_descriptors}, which this trainer never writes")
            if info.relative_path not in self.recorded.files:
                raise self._damage(f"{info.relative_path} is in .metadata but in no rank's marker")
            per_file.setdefault(info.relative_path, []).append((info, req))
        with_items = {key[0] for key in self.recorded.items}
        for name, reqs in per_file.items():
            per_item = name in with_items
            if not per_item:
                self._check_whole_file(name)
            for start, end, span in _spans(sorted(reqs, key=lambda r: r[0].offset)):
                blob = memoryview(self._fetch(storage.join(self.uri, name), start, end))
                for info, req in span:
                    data = blob[info.offset - start:info.offset - start + info.length]
                    if per_item:
                        want = self.recorded.items.get((name, info.offset, info.length))
                        if want is None or zlib.crc32(data) != want:
                            raise self._damage(f"{name} fails its CRC32 check at bytes {info.offset}.."
                                               f"{info.offset + info.length} (corrupt)")
                    self._load_item(planner, req, io.BytesIO(data))
        fut: Future = Future()
        fut.set_result(None)
        return fut

    @staticmethod
    def _load_item(planner: LoadPlanner, req: ReadItem, stream: io.BytesIO) -> None:
        # as DCP's FileSystemReader.read_data, minus stream transforms
        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, stream)
            return
        tensor = narrow_tensor_by_index(torch.load(stream, map_location="cpu", weights_only=True),
                                        req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise CheckpointError(f"{req.storage_index.fqn}: checkpoint holds {tuple(tensor.size())}, the "
                                  f"model expects {tuple(target.size())}")
        target.copy_(tensor)
        planner.commit_tensor(req, target)


def _spans(reqs: list[tuple[Any, ReadItem]]) -> list[tuple[int, int, list[tuple[Any, ReadItem]]]]:
    """Group items sorted by offset into [start, end) byte spans, each fetched with one read."""
    spans: list[tuple[int, int, list[tuple[Any, ReadItem]]]] = []
    for info, req in reqs:
        lo, hi = info.offset, info.offset + info.length
        if spans and lo - spans[-1][1] <= SPAN_GAP and max(hi, spans[-1][1]) - spans[-1][0] <= SPAN_MAX:
            start, end, items = spans[-1]
            spans[-1] = (start, max(end, hi), items + [(info, req)])
        else:
            spans.append((lo, hi, [(info, req)]))
    return spans


def _all_ok(ok: bool) -> bool:
    """True only if every rank says ok (ranks must agree before a collective load)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _load_failure(e: BaseException) -> str:
    """What went wrong in dcp.load, short: DCP gathers every rank's exception and traceback into one."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (exc, _) = min(e.failures.items())
        return f"on rank {rank}: {type(exc).__name__}: {str(exc)[:300]}"
    return f"{type(e).__name__}: {str(e)[:300]}"


def restore(state: TrainState, run_uri: str, latest_uri: str | None = None, *, say=print) -> int | None:
    """Load the newest intact checkpoint of the run into `state` (collective: every rank calls it).

    Candidates are the checkpoint directories under `run_uri` plus Ray's latest (`latest_uri`), newest first;
    a damaged or refused one is skipped with a message naming it and the reason. Each rank reads only what its
    load plan needs (`CheckpointReader`); nothing is copied to local disk. Returns the restored step, or None
    when there is nothing to resume from. DCP reshards when the world size differs from the one that saved."""
    cands = list_checkpoints(run_uri)
    if latest_uri and all(c.uri.rstrip("/") != latest_uri.rstrip("/") for c in cands):
        m = CKPT_DIR.match(latest_uri.rstrip("/").rsplit("/", 1)[-1])
        cands.insert(0, Candidate(int(m.group(1)) if m else 1 << 62, latest_uri, (m.group(2) or "") if m else ""))
        cands.sort(key=lambda c: (c.step, c.attempt), reverse=True)
    skipped = []
    for cand in cands:
        reader = None
        try:
            recorded, problem = inspect_checkpoint(cand.uri)
            if recorded is not None:
                reader = CheckpointReader(cand.uri, recorded)
        except CheckpointError as e:
            problem = str(e)
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is just not a candidate
            problem = f"cannot read it ({type(e).__name__}: {e})"
        if not _all_ok(problem is None):
            skipped.append(cand)
            say(f"[checkpoint] {cand.uri} is not usable ({problem or 'damaged on another rank'}); "
                f"trying the previous checkpoint")
            continue
        try:
            dcp.load({"train": state}, storage_reader=reader, planner=SafeLoadPlanner())
            ok = True
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            ok, problem = False, reader.problem or _load_failure(e)
        if not _all_ok(ok):
            skipped.append(cand)
            say(f"[checkpoint] loading {cand.uri} failed ({problem or 'on another rank'}); trying the "
                f"previous checkpoint")
            continue
        say(f"[checkpoint] restored step {state.extra['step']} from {cand.uri} ({reader.bytes_read / 1e6:.3f} MB "
            f"read by this rank)")
        if skipped:
            say(f"[checkpoint] resumed from {cand.uri} (step {state.extra['step']}) instead of the newest "
                f"{skipped[0].uri}, which is damaged")
        return int(state.extra["step"])
    if cands:
        raise RuntimeError(f"none of the {len(cands)} checkpoints under {run_uri} is usable (see the messages "
                           f"above); delete them to start over, or restore a copy")
    return None


# ---- final export -------------------------------------------------------------------------------------------

def export(model: torch.nn.Module, out_uri: str, *, rank: int, model_cfg: Any, vocab: Vocab,
           tokenizers_uri: str | None, step: int, run_name: str = "", mlflow_run_id: str | None = None) -> None:
    """Consolidate the sharded model and write it as the run's export (pipelines/export.py: the format, and
    the one writer). Collective: every rank gathers its shards; rank 0 writes."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    export_format.write(out_uri, full, model_config=dataclasses.replace(model_cfg, vocab_size=int(model.vocab_size)),
                        vocab=vocab, tokenizers_uri=tokenizers_uri, step=step, run_name=run_name,
                        mlflow_run_id=mlflow_run_id)
