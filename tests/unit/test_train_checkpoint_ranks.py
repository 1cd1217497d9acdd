"""pipelines/train/checkpoint.py with 2 ranks (2 gloo processes, FSDP2) against a moto S3 server over HTTP: each
rank saves its own directory and uploads it (as Ray merges them), and on restore each rank fetches about its own
share of the checkpoint and writes nothing of it to local disk; a byte flipped in one rank's file makes both
ranks fall back to the previous checkpoint together."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.parallelize import parallelize
from model.transformer import Transformer
from pipelines.train import checkpoint as ckpt
from tests.helpers import gloo
from tests.helpers.moto_s3 import moto_s3
from tests.helpers.shardgen import small_vocab

WORLD = 2
VOCAB = small_vocab()
READ = re.compile(r"\(([0-9.]+) MB read by this rank\)")


def _io() -> dict[str, int]:
    """This process's I/O counters: rchar/wchar count the bytes passed to read()/write() (files, pipes; socket
    recv/send are not counted), write_bytes what reached the block layer."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(v) for k, v in fields.items()}


def _state(seed: int, mesh) -> ckpt.TrainState:
    torch.manual_seed(seed)
    # debug depth, wider: ~9 MB of data per rank, so a rank's share stands well above the index and HTTP overhead
    cfg = dataclasses.replace(ModelConfig.preset("debug"), dim=256, hidden_dim=688)
    model = parallelize(Transformer(cfg, vocab_size=VOCAB.size), mesh,
                        activation_checkpointing=False, mixed_precision="fp32")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.zeros(1, 8, dtype=torch.long) + seed).sum().backward()
    opt.step()
    sched.step()
    return ckpt.TrainState(model, opt, sched)


def _full(state: ckpt.TrainState) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().clone() for n, p in state.model.named_parameters()}


def _worker(rank: int, tmp: str, bucket: str) -> None:
    from common import storage

    out: dict = {"rank": rank}
    mesh = dist.device_mesh.init_device_mesh("cpu", (WORLD,))
    src = _state(0, mesh)
    for step in (4, 8):
        src.extra = {"step": step, "mlflow_run_id": "abc"}
        local = Path(tmp) / f"rank{rank}" / ckpt.checkpoint_dir_name(step)
        ckpt.save_local(src, local, rank=rank, world_size=WORLD)
        for f in local.iterdir():    # every rank uploads its own files into the one directory, as Ray does
            storage.upload_file_atomic(f, f"{bucket}/run/{local.name}/{f.name}")
    want = _full(src)
    dist.barrier()

    # warm-up: the S3 client is built (botocore reads its service models from disk) before counting
    storage.read_text(f"{bucket}/run/{ckpt.checkpoint_dir_name(4)}/complete.rank{rank}.json")
    dst, said = _state(2, mesh), []
    before = _io()
    out["restored"] = ckpt.restore(dst, f"{bucket}/run", say=said.append)
    after = _io()
    out["io"] = {k: after[k] - before[k] for k in ("rchar", "wchar", "write_bytes")}
    out["said"] = said
    out["equal"] = all(torch.equal(want[n], t) for n, t in _full(dst).items())
    out["exp_avg_equal"] = all(
        torch.equal(a["exp_avg"].full_tensor(), b["exp_avg"].full_tensor())
        for a, b in zip(src.optimizer.state.values(), dst.optimizer.state.values()))

    # one byte flipped in rank 1's data file of the newest checkpoint: only rank 1 reads that file
    dist.barrier()
    if rank == 0:
        uri = f"{bucket}/run/{ckpt.checkpoint_dir_name(8)}/__1_0.distcp"
        raw = bytearray(storage.read_bytes(uri))
        raw[len(raw) // 2] ^= 0xFF
        storage.write_bytes_atomic(uri, bytes(raw))
    dist.barrier()
    said = []
    out["fallback"] = ckpt.restore(_state(3, mesh), f"{bucket}/run", say=said.append)
    out["fallback_said"] = said
    (Path(tmp) / f"result{rank}.json").write_text(json.dumps(out))


def test_each_rank_reads_its_share_from_s3_and_ranks_fall_back_together(tmp_path):
    from common import storage

    with moto_s3():
        storage.filesystem("s3://ranks").mkdir("ranks")
        gloo.spawn(_worker, str(tmp_path), "s3://ranks", world=WORLD)
        sizes = {p.rsplit("/", 1)[-1]: int(i["size"]) for p, i in
                 storage.find(f"s3://ranks/run/{ckpt.checkpoint_dir_name(8)}", detail=True).items()}
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(WORLD)]
    data_total = sizes["__0_0.distcp"] + sizes["__1_0.distcp"]
    assert sizes["__0_0.distcp"] > 20 * sizes[".metadata"] and sizes["__1_0.distcp"] > 20 * sizes[".metadata"]
    for r, res in enumerate(results):
        assert res["restored"] == 8 and res["equal"] and res["exp_avg_equal"], res
        own, io = sizes[f"__{r}_0.distcp"], res["io"]
        (fetched,) = [float(m.group(1)) * 1e6 for m in map(READ.search, res["said"]) if m]
        # what the rank fetched from S3: its own data file and the index; of the other rank's file only the few
        # replicated entries (RNG state, extra) DCP stored there once
        assert own <= fetched <= own + sizes[".metadata"] + 0.05 * data_total, (r, fetched, sizes)
        # local disk: nothing of the checkpoint written or read back (file reads/writes, sockets not counted)
        assert io["wchar"] < 0.05 * data_total and io["write_bytes"] < 0.05 * data_total, (r, io, sizes)
        assert io["rchar"] < 0.25 * data_total, (r, io, sizes)
    # the flipped byte is seen by rank 1 only; both ranks agree to fall back to step 4
    assert [res["fallback"] for res in results] == [4, 4]
    assert any("__1_0.distcp fails its CRC32 check" in s for s in results[1]["fallback_said"])
    assert any("on rank 1: CheckpointError: __1_0.distcp fails its CRC32 check" in s
               for s in results[0]["fallback_said"]), results[0]["fallback_said"]
    assert all(any("instead of the newest" in s for s in res["fallback_said"]) for res in results)
