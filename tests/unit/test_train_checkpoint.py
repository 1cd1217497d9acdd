"""pipelines/train/checkpoint.py in one process (no Ray, no process group): markers, fallback, safe loading, export."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from model.config import ModelConfig
from model.transformer import Transformer
from model.weights import load_native
from pipelines import export
from pipelines.train import checkpoint as ckpt
from tests.helpers.shardgen import small_vocab

VOCAB = small_vocab()


def make_state(seed: int) -> ckpt.TrainState:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("debug"), vocab_size=VOCAB.size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    opt.step()
    sched.step()
    return ckpt.TrainState(model, opt, sched)


def save(state: ckpt.TrainState, run: Path, step: int) -> Path:
    state.extra = {"step": step, "stage": step // 4, "data": {"rows": step * 2}, "mlflow_run_id": "abc"}
    return ckpt.save_local(state, run / ckpt.checkpoint_dir_name(step), rank=0, world_size=1)


def test_restores_newest_complete_checkpoint_with_all_its_state(tmp_path):
    src = make_state(0)
    save(src, tmp_path, 4)
    save(src, tmp_path, 8)
    dst = make_state(1)
    assert ckpt.restore(dst, str(tmp_path)) == 8
    assert dst.extra["data"] == {"rows": 16} and dst.extra["mlflow_run_id"] == "abc" and dst.extra["stage"] == 2
    for a, b in zip(src.model.parameters(), dst.model.parameters()):
        assert torch.equal(a, b)
    assert dst.scheduler.last_epoch == src.scheduler.last_epoch
    assert dst.optimizer.state_dict()["state"][0]["exp_avg"].equal(src.optimizer.state_dict()["state"][0]["exp_avg"])


def test_corrupt_newest_checkpoint_falls_back_to_previous_and_says_so(tmp_path):
    src = make_state(0)
    save(src, tmp_path, 4)
    newest = save(src, tmp_path, 8)
    data = next(newest.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                   # same size, one flipped byte
    data.write_bytes(bytes(raw))
    said = []
    assert ckpt.restore(make_state(1), str(tmp_path), say=said.append) == 4
    assert any("CRC32" in s for s in said) and any("instead of the newest" in s for s in said)


def test_checkpoint_without_marker_is_never_picked(tmp_path):
    src = make_state(0)
    save(src, tmp_path, 4)
    newest = save(src, tmp_path, 8)
    (newest / "complete.rank0.json").unlink()    # as if the process died before the marker
    said = []
    assert ckpt.restore(make_state(1), str(tmp_path), say=said.append) == 4
    assert "no completeness marker" in said[0]


def test_nothing_to_resume_and_nothing_usable(tmp_path):
    assert ckpt.restore(make_state(0), str(tmp_path / "none")) is None
    bad = save(make_state(0), tmp_path, 4)
    (bad / ".metadata").unlink()
    with pytest.raises(RuntimeError, match="none of the 1 checkpoints"):
        ckpt.restore(make_state(1), str(tmp_path), say=lambda s: None)


class Evil:
    def __reduce__(self):
        return (Path.touch, (Path(EVIL_FILE),))


EVIL_FILE = ""


def test_pickled_payload_in_a_checkpoint_is_refused(tmp_path):
    global EVIL_FILE
    EVIL_FILE = str(tmp_path / "pwned")
    good = make_state(0)
    d = tmp_path / ckpt.checkpoint_dir_name(4)
    sd = good.state_dict()
    sd["extra"] = Evil()
    dcp.save({"train": sd}, checkpoint_id=str(d))
    files = {p.name: {"bytes": p.stat().st_size, "crc32": ckpt._crc32(p)} for p in d.iterdir()}
    (d / "complete.rank0.json").write_text(json.dumps({"step": 4, "rank": 0, "world_size": 1, "files": files}))
    with pytest.raises(RuntimeError, match="none of the 1"):
        ckpt.restore(make_state(1), str(tmp_path), say=lambda s: None)
    assert not Path(EVIL_FILE).exists()


class Shell:
    """Unpickling this runs a shell command (os.system), as a poisoned .metadata would."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def poison_metadata(ckpt_dir: Path, marker: Path) -> None:
    """Replace `.metadata` with a pickle that creates `marker`, and re-record its size and CRC32 in rank 0's
    marker: whoever can write the run directory can rewrite both."""
    meta = ckpt_dir / ".metadata"
    meta.write_bytes(pickle.dumps(Shell(f"touch {marker}")))
    m = json.loads((ckpt_dir / "complete.rank0.json").read_text())
    m["files"][".metadata"] = {"bytes": meta.stat().st_size, "crc32": ckpt._crc32(meta)}
    (ckpt_dir / "complete.rank0.json").write_text(json.dumps(m))


def test_poisoned_metadata_is_refused_naming_the_file(tmp_path):
    src = make_state(0)
    save(src, tmp_path, 4)
    newest = save(src, tmp_path, 8)
    marker = tmp_path / "pwned"
    poison_metadata(newest, marker)
    said = []
    assert ckpt.restore(make_state(1), str(tmp_path), say=said.append) == 4
    assert not marker.exists()
    assert any(f"{newest / '.metadata'}: refused, it references posix.system" in s for s in said), said
    with pytest.raises(ckpt.CheckpointError, match=r"^x/\.metadata: refused, it references posix\.system"):
        ckpt.load_metadata((newest / ".metadata").read_bytes(), "x/.metadata")
    assert not marker.exists()
    pickle.loads((newest / ".metadata").read_bytes())   # the payload is live: plain pickle.load runs it
    assert marker.exists()


def test_metadata_unpickler_admits_a_real_index_and_refuses_other_globals(tmp_path):
    d = save(make_state(0), tmp_path, 4)
    md = ckpt.load_metadata((d / ".metadata").read_bytes(), ".metadata")
    assert "train.model.output.weight" in md.state_dict_metadata
    for obj in (print, pickle.loads, Path.touch, torch.load):   # a builtin, the pickle module, a method, torch
        with pytest.raises(ckpt.CheckpointError, match="refused"):
            ckpt.load_metadata(pickle.dumps(obj), ".metadata")
    with pytest.raises(ckpt.CheckpointError, match="not a DCP Metadata"):
        ckpt.load_metadata(pickle.dumps({"a": 1}), ".metadata")


def test_export_holds_weights_vocab_config_and_tokenizers(tmp_path):
    state = make_state(0)
    tok = tmp_path / "set" / "tokenizers"
    tok.mkdir(parents=True)
    (tok / "tokenizers.json").write_text("{}")
    ckpt.export(state.model, str(tmp_path / "export"), rank=0, model_cfg=state.model.cfg, vocab=VOCAB,
                tokenizers_uri=str(tok), step=3, run_name="r", mlflow_run_id="abc")
    out = tmp_path / "export"
    weights, meta = load_native(out / "model.safetensors")
    assert torch.equal(weights["tok_embeddings.weight"], state.model.tok_embeddings.weight)
    assert (out / "vocab.json").read_text() == VOCAB.to_json() == meta["vocab"]
    assert (out / "tokenizers" / "tokenizers.json").is_file()
    config = export.read_config(str(out))
    assert (config.step, config.run_name, config.mlflow_run_id) == (3, "r", "abc")
    assert config.model.vocab_size == VOCAB.size and config.model.dim == state.model.cfg.dim
    assert config.files == ["model.safetensors", "vocab.json", "tokenizers/"]


@pytest.fixture
def s3(monkeypatch):
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    from common import storage
    storage.filesystem("s3://ckpt").mkdir("ckpt")
    yield "s3://ckpt"
    server.stop()


def test_restore_and_export_on_s3(s3, tmp_path):
    from common import storage

    src = make_state(0)
    fs = storage.filesystem(s3)
    for step in (4, 8, 12):
        d = save(src, tmp_path, step)
        if step == 12:   # the newest: its .metadata poisoned, refused as on local disk
            poison_metadata(d, tmp_path / "pwned")
        fs.put(str(d), f"{s3}/run/{d.name}", recursive=True)
    assert [c.step for c in ckpt.list_checkpoints(f"{s3}/run")] == [12, 8, 4]
    dst, said = make_state(1), []
    assert ckpt.restore(dst, f"{s3}/run", say=said.append) == 8
    assert not (tmp_path / "pwned").exists()
    assert any(f"{s3}/run/{ckpt.checkpoint_dir_name(12)}/.metadata: refused" in s for s in said), said
    assert torch.equal(dst.model.output.weight, src.model.output.weight)
    tok = tmp_path / "tokenizers"
    tok.mkdir()
    (tok / "vocab.json").write_text(VOCAB.to_json())
    fs.put(str(tok), f"{s3}/set/tokenizers", recursive=True)
    ckpt.export(dst.model, f"{s3}/run/export", rank=0, model_cfg=dst.model.cfg, vocab=VOCAB,
                tokenizers_uri=f"{s3}/set/tokenizers", step=8)
    assert storage.exists(f"{s3}/run/export/tokenizers/vocab.json")
    assert export.read_config(f"{s3}/run/export").step == 8
