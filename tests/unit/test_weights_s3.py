"""model/weights.py from s3:// on a real S3 API (moto over HTTP): a bf16 checkpoint in the released layout (sharded,
speech modules skipped) and a single-file one with vocabulary extension load exactly as from local disk, reading
only the shard headers and the tensors used; a missing shard and a storage outage fail naming the URI. The ranged
reader is also checked against safe_open on a local file for every dtype."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common import storage
from common.storage import RetryPolicy, StorageError
from model.transformer import Transformer
from model.weights import (CheckpointError, RangedSafetensors, load_pretrained, native_to_hf, read_pretrained)
from tests.helpers.moto_s3 import moto_s3
from tests.unit.test_weights import (RVOCAB, SKIP, V, cfg_for, make_model, released_cfg, speech_modules,
                                     write_checkpoint)


@pytest.fixture(scope="module")
def s3():
    with moto_s3():
        # moto keeps buckets per process, across servers: a name of this module's own
        storage.filesystem("s3://weights-s3").mkdir("weights-s3")
        yield "s3://weights-s3"


def upload(local_dir, uri: str) -> None:
    fs = storage.filesystem(uri)
    for f in sorted(local_dir.iterdir()):
        fs.put_file(str(f), f"{uri}/{f.name}")


@pytest.fixture(scope="module")
def released_bf16(s3, tmp_path_factory):
    """The released layout in bf16 (as Dream and Omni-Diffusion ship), 3 shards, speech modules included."""
    local = tmp_path_factory.mktemp("released")
    cfg = released_cfg()
    hf = native_to_hf(make_model(cfg, seed=0).state_dict(), cfg, "dream")
    hf = {k: v.to(torch.bfloat16) for k, v in {**hf, **speech_modules(cfg.dim)}.items()}
    write_checkpoint(local, hf, shards=3)
    upload(local, f"{s3}/released")
    return cfg, hf, local, f"{s3}/released"


class ByteCounter:
    """Counts the bytes and GETs that come back from storage (every read of model/weights.py goes through
    storage.read_range or storage.read_bytes; listing and HEAD requests carry no body)."""

    def __init__(self, monkeypatch) -> None:
        self.bytes, self.gets = 0, 0
        for name in ("read_range", "read_bytes"):
            real = getattr(storage, name)
            monkeypatch.setattr(storage, name, self._counted(real))

    def _counted(self, real):
        def wrapper(*args, **kwargs):
            data = real(*args, **kwargs)
            self.bytes += len(data)
            self.gets += 1
            return data
        return wrapper


def test_s3_load_equals_local_and_reads_only_headers_and_used_tensors(released_bf16, monkeypatch):
    cfg, hf, local, uri = released_bf16
    want = read_pretrained(local, cfg, "dream", RVOCAB.size, vocab_extension="error", skip_modules=SKIP)
    counter = ByteCounter(monkeypatch)
    got = read_pretrained(uri, cfg, "dream", RVOCAB.size, vocab_extension="error", skip_modules=SKIP)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]), k

    shards = sorted(local.glob("*.safetensors"))
    headers = sum(8 + int.from_bytes((f.read_bytes()[:8]), "little") for f in shards)
    index = len((local / "model.safetensors.index.json").read_bytes())
    used = sum(t.numel() * t.element_size() for t in want.values())
    skipped = sum(t.numel() * t.element_size() for k, t in hf.items() if k.startswith("model.audio"))
    needed = headers + index + used
    print(f"read {counter.bytes:,} bytes in {counter.gets} GETs; headers {headers:,} + index {index:,} + "
          f"tensors {used:,} = {needed:,}; shard files {sum(f.stat().st_size for f in shards):,}")
    assert needed <= counter.bytes <= 1.1 * needed
    assert counter.bytes < sum(f.stat().st_size for f in shards) - skipped // 2   # skipped modules never read
    assert counter.gets == 1 + 2 * len(shards) + len(want)   # index, 2 header reads a shard, one GET a tensor


def test_s3_model_load_gives_the_local_logits(released_bf16):
    cfg, _, local, uri = released_bf16
    a, b = Transformer(cfg, vocab_size=RVOCAB.size), Transformer(cfg, vocab_size=RVOCAB.size)
    load_pretrained(a, local, "dream", vocab_extension="error", skip_modules=SKIP)
    load_pretrained(b, uri + "/", "dream", vocab_extension="error", skip_modules=SKIP)   # a trailing / is fine
    ids = torch.tensor([[RVOCAB.im_start_id, 5, RVOCAB.boa_id, RVOCAB.audio_offset, RVOCAB.eoa_id]])
    with torch.no_grad():
        torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=0)


def test_s3_single_file_with_vocab_extension_equals_local(s3, tmp_path, monkeypatch):
    small = cfg_for("dream", vocab_size=100)
    write_checkpoint(tmp_path, native_to_hf(make_model(small, 0).state_dict(), small, "dream"), 1)
    upload(tmp_path, f"{s3}/single")
    big = cfg_for("dream")
    want = read_pretrained(tmp_path, big, "dream", vocab_rows=V, seed=3)
    for path in (f"{s3}/single", f"{s3}/single/model.safetensors"):
        got = read_pretrained(path, big, "dream", vocab_rows=V, seed=3)
        assert got["tok_embeddings.weight"].shape[0] == V
        assert all(torch.equal(got[k], want[k]) for k in want)
    # large tensors come in chunks, read concurrently: the same tensors, the same bytes
    counter = ByteCounter(monkeypatch)
    read_pretrained(f"{s3}/single", big, "dream", vocab_rows=V, seed=3)
    whole = (counter.bytes, counter.gets)
    monkeypatch.setattr("model.weights.READ_CHUNK", 1000)
    got = read_pretrained(f"{s3}/single", big, "dream", vocab_rows=V, seed=3)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert counter.bytes - whole[0] == whole[0] and counter.gets - whole[1] > 2 * whole[1]


def test_s3_missing_checkpoint_or_shard_names_the_uri(s3, released_bf16):
    cfg = released_bf16[0]
    with pytest.raises(CheckpointError, match=f"{s3}/nothing-here: no model.safetensors"):
        read_pretrained(f"{s3}/nothing-here", cfg, "dream", RVOCAB.size, skip_modules=SKIP)
    upload(released_bf16[2], f"{s3}/broken")
    index = json.loads((released_bf16[2] / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"   # a shard that is not there
    storage.write_text_atomic(f"{s3}/broken/model.safetensors.index.json", json.dumps(index))
    with pytest.raises(CheckpointError, match=f"lists shard model-00009-of-00009.safetensors, which is not at "
                                              f"{s3}/broken/model-00009-of-00009.safetensors"):
        read_pretrained(f"{s3}/broken", cfg, "dream", RVOCAB.size, skip_modules=SKIP)


def test_storage_outage_mid_load_fails_naming_the_shard(released_bf16, monkeypatch):
    cfg, _, _, uri = released_bf16
    from model.weights import iter_pretrained

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg, vocab_size=RVOCAB.size).state_dict().items()}
    tensors = iter_pretrained(uri, cfg, "dream", shapes, skip_modules=SKIP)
    next(tensors)   # headers read, first tensor read
    saved = storage.policy()
    storage.set_policy(RetryPolicy(attempts=2, backoff_s=0.01, max_backoff_s=0.01, timeout_s=2))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")   # nothing listens: the store is gone
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")   # botocore's own retries off: storage's policy is the one tried
    try:
        with pytest.raises(StorageError) as e:
            list(tensors)
    finally:
        storage.set_policy(saved)
    assert e.value.uri.startswith(f"{uri}/model-0000") and e.value.uri in str(e.value)
    assert "failed after 2 attempt(s)" in str(e.value)


def test_ranged_reader_equals_safe_open_for_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16), "f16": torch.randn(3, generator=g).half(),
        "f32": torch.randn(2, 3, 4, generator=g), "f64": torch.randn(4, generator=g).double(),
        "i64": torch.arange(-5, 5), "i8": torch.arange(-3, 3, dtype=torch.int8), "u8": torch.arange(9).byte(),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    ranged = RangedSafetensors(str(path))   # ranged reads work on local paths as on s3://
    assert sorted(ranged.keys()) == sorted(tensors)
    with safe_open(str(path), framework="pt") as f:
        for k in tensors:
            got, want = ranged.get(k), f.get_tensor(k)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), k


def test_ranged_reader_refuses_a_bad_file_naming_it(tmp_path, monkeypatch):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=f"{bad}: header length"):
        RangedSafetensors(str(bad))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"w spans bytes 0\.\.12 but F32\[4\] needs 16"):
        RangedSafetensors(str(bad))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 10)   # cut short
    with pytest.raises(CheckpointError, match="truncated"):
        RangedSafetensors(str(bad)).get("w")
    monkeypatch.setattr("model.weights.READ_CHUNK", 8)   # a tensor larger than one read comes in chunks
    t = torch.randn(37)
    save_file({"t": t}, str(bad))
    assert torch.equal(RangedSafetensors(str(bad)).get("t"), t)
