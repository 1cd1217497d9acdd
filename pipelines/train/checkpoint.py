"""Checkpoints: one Stateful object through torch.distributed.checkpoint (DCP), reported to Ray Train; at the end
of training, the sharded model gathered for the export (whose format pipelines/export.py owns).

Layout of one checkpoint (Ray merges every rank's directory into `<run_dir>/<name>/step_XXXXXXXX/`):

    __<rank>_0.distcp         each rank's shards of the model and optimizer (DCP)
    .metadata                 DCP's index, written by rank 0 after every rank has written its data
    complete.rank<r>.json     completeness marker of rank r: step, world size, size and CRC32 of its files

A checkpoint is used only when the markers of all `world_size` ranks are present and every file they list has
its recorded size and CRC. A crash while writing or uploading leaves a marker missing or a file short, so resume
never picks it; if the newest checkpoint is damaged anyway, resume falls back to the previous one and says so.
Ray keeps the last `keep_last` (CheckpointConfig.num_to_keep), so there is a previous one to fall back to.

Safety: DCP's default planner unpickles non-tensor entries with `weights_only=False`; `SafeLoadPlanner` loads
them with `weights_only=True`, so a tampered checkpoint cannot run code.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

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
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415
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


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_local(state: TrainState, directory: str | Path, *, rank: int, world_size: int) -> Path:
    """DCP-save `state` into this rank's own local `directory`, then write this rank's marker (after a barrier,
    so rank 0's marker also covers `.metadata`, which DCP writes once every rank has finished)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save({"train": state}, checkpoint_id=str(directory))
    _barrier()
    files = {p.name: {"bytes": p.stat().st_size, "crc32": _crc32(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and not p.name.startswith("complete.")}
    marker = {"step": int(state.extra["step"]), "rank": rank, "world_size": world_size, "files": files}
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


# ---- finding and loading --------------------------------------------------------------------------------------

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


def verify(directory: str | Path) -> str | None:
    """None when the checkpoint in local `directory` is complete and intact, else what is wrong."""
    directory = Path(directory)
    markers = sorted(directory.glob("complete.rank*.json"))
    if not markers:
        return "no completeness marker (the write or upload did not finish)"
    try:
        first = json.loads(markers[0].read_text())
        world = int(first["world_size"])
    except (ValueError, KeyError) as e:
        return f"unreadable marker {markers[0].name} ({e})"
    for rank in range(world):
        path = directory / MARKER.format(rank=rank)
        if not path.is_file():
            return f"marker of rank {rank} of {world} is missing"
        try:
            files = json.loads(path.read_text())["files"]
        except (ValueError, KeyError) as e:
            return f"unreadable marker {path.name} ({e})"
        for name, info in files.items():
            f = directory / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != info["bytes"]:
                return f"{name} is {f.stat().st_size} bytes, expected {info['bytes']}"
            if _crc32(f) != info["crc32"]:
                return f"{name} fails its CRC32 check (corrupt)"
    if not (directory / ".metadata").is_file():
        return "DCP .metadata is missing"
    return None


def _all_ok(ok: bool) -> bool:
    """True only if every rank says ok (ranks must agree before a collective load)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _localize(uri: str, scratch: Path) -> Path:
    if not storage.is_s3(uri):
        return Path(uri)
    dest = scratch / uri.rstrip("/").rsplit("/", 1)[-1]
    storage.filesystem(uri).get(uri.rstrip("/") + "/", str(dest), recursive=True)
    return dest


def restore(state: TrainState, run_uri: str, latest_uri: str | None = None, *, say=print) -> int | None:
    """Load the newest intact checkpoint of the run into `state` (collective: every rank calls it).

    Candidates are the checkpoint directories under `run_uri` plus Ray's latest (`latest_uri`), newest first;
    a damaged one is skipped with a message naming it and the reason. Returns the restored step, or None when
    there is nothing to resume from. DCP reshards when the world size differs from the one that saved."""
    cands = list_checkpoints(run_uri)
    if latest_uri and all(c.uri.rstrip("/") != latest_uri.rstrip("/") for c in cands):
        m = CKPT_DIR.match(latest_uri.rstrip("/").rsplit("/", 1)[-1])
        cands.insert(0, Candidate(int(m.group(1)) if m else 1 << 62, latest_uri, (m.group(2) or "") if m else ""))
        cands.sort(key=lambda c: (c.step, c.attempt), reverse=True)
    skipped = []
    with tempfile.TemporaryDirectory(prefix="ckpt-restore-") as scratch:
        for cand in cands:
            try:
                local = _localize(cand.uri, Path(scratch))
                problem = verify(local)
            except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is just not a candidate
                problem = f"cannot read it ({e})"
            if not _all_ok(problem is None):
                skipped.append(cand)
                say(f"[checkpoint] {cand.uri} is not usable ({problem or 'damaged on another rank'}); "
                    f"trying the previous checkpoint")
                continue
            try:
                dcp.load({"train": state}, checkpoint_id=str(local), planner=SafeLoadPlanner())
                ok = True
            except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
                ok, problem = False, f"{type(e).__name__}: {str(e)[:500]}"
            if not _all_ok(ok):
                skipped.append(cand)
                say(f"[checkpoint] loading {cand.uri} failed ({problem or 'on another rank'}); trying the "
                    f"previous checkpoint")
                continue
            if skipped:
                say(f"[checkpoint] resumed from {cand.uri} (step {state.extra['step']}) instead of the newest "
                    f"{skipped[0].uri}, which is damaged")
            shutil.rmtree(Path(scratch), ignore_errors=True)
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
