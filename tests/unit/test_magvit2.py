"""MAGVIT-v2 image tokenizer: published key layout, LFQ bit mapping, tiny-preset encode/decode, safe weight
loading (safetensors, weights_only .pt, s3://), image loading errors, benchmark helper."""
from __future__ import annotations

import io
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from moto.server import ThreadedMotoServer
from PIL import Image

from common.configlib import ConfigError
from model.tokenizers import ImageTokenizerConfig
from model.tokenizers.base import BadInput, ImageTokenizer
from model.tokenizers.magvit2 import (
    LFQuantizer,
    Magvit2,
    Magvit2Config,
    WeightsError,
    bench_encode,
    build_magvit2,
    build_model,
    check_state_dict,
)

# name dtype shape of every entry of showlab/magvitv2's state_dict, recorded from the public model code
# (showlab/Show-o models/modeling_magvitv2.py + models/common_modules.py); see the file's header.
KEYS_FILE = Path(__file__).parent / "data" / "magvit2_keys.txt"


def magvit2_cfg(**overrides) -> ImageTokenizerConfig:
    """The tokenizer set's image config as a magvit2 job sets it: the tiny preset at 32x32, random weights."""
    return ImageTokenizerConfig(**{"kind": "magvit2", "size": 32, "magvit2_preset": "tiny", "random_init": True,
                                   **overrides})


def recorded_keys() -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for line in KEYS_FILE.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, dtype, shape = line.split()
        out[name] = (dtype, tuple(int(s) for s in shape.split(",")))
    return out


def meta_state(keys: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, (dtype, shape) in keys.items()}


@pytest.fixture(scope="module")
def public_meta_model() -> Magvit2:
    with torch.device("meta"):
        return Magvit2(Magvit2Config.preset("public"))


@pytest.fixture(scope="module")
def tiny():
    return build_magvit2(magvit2_cfg(), device="cpu")


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- published layout

def test_public_config_builds_the_recorded_state_dict(public_meta_model):
    keys = recorded_keys()
    ours = {k: (str(v.dtype).replace("torch.", ""), tuple(v.shape)) for k, v in public_meta_model.state_dict().items()}
    assert sorted(set(keys) - set(ours)) == [] and sorted(set(ours) - set(keys)) == []
    assert ours == keys
    # the hub lists pytorch_model.safetensors at 382 MB: float32 parameters + the two LFQ buffers
    n_bytes = sum(v.numel() * v.element_size() for v in public_meta_model.state_dict().values())
    assert 381.5e6 < n_bytes < 382.5e6
    cfg = Magvit2Config.preset("public")
    assert (cfg.codebook_size, cfg.downsample, cfg.z_channels) == (8192, 16, 13)


def test_published_layout_loads_strictly_and_bad_keys_are_named(public_meta_model):
    state = meta_state(recorded_keys())
    check_state_dict(public_meta_model, state, "ckpt.safetensors", "public")
    public_meta_model.load_state_dict(state, strict=True)

    bad = dict(state)
    del bad["decoder.up.3.block.0.nin_shortcut.weight"]
    bad["encoder.down.0.attn.0.q.weight"] = torch.empty(128, 128, 1, 1, device="meta")
    bad["encoder.conv_in.weight"] = torch.empty(128, 4, 3, 3, device="meta")
    with pytest.raises(WeightsError) as e:
        check_state_dict(public_meta_model, bad, "ckpt.safetensors", "public")
    msg = str(e.value)
    assert "1 missing key(s): decoder.up.3.block.0.nin_shortcut.weight" in msg
    assert "1 unexpected key(s): encoder.down.0.attn.0.q.weight" in msg
    assert "encoder.conv_in.weight: file (128, 4, 3, 3) vs model (128, 3, 3, 3)" in msg
    assert "ckpt.safetensors" in msg and "image.weights" in msg


# ------------------------------------------------------------------------------------------------------- LFQ

def test_lfq_code_bits_round_trip_is_exact():
    q = LFQuantizer(13)
    codes = torch.arange(8192)
    bits = q.codes_to_bits(codes)  # (8192, 13)
    assert set(bits.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(q.bits_to_codes(bits), codes)
    assert torch.equal(bits, q.embedding)  # the checkpoint's table: MSB first
    assert q.codes_to_bits(torch.tensor(1))[-1] == 1 and q.codes_to_bits(torch.tensor(4096))[0] == 1
    # latents -> codes reads the sign of each channel (0 counts as off), the same bits as bits_to_codes
    z = torch.randn(2, 13, 3, 4)
    z[0, 0, 0, 0] = 0.0
    codes = q.latents_to_codes(z)  # (2, 3, 4)
    assert codes.shape == (2, 3, 4) and int(codes.max()) < 8192
    assert torch.equal(codes, q.bits_to_codes(torch.where(z > 0, 1.0, -1.0).permute(0, 2, 3, 1)))
    assert torch.equal(q.codes_to_bits(codes).permute(0, 3, 1, 2), torch.where(z > 0, 1.0, -1.0))


# ------------------------------------------------------------------------------------------- tiny encode/decode

def test_tiny_encode_decode_shapes_range_and_determinism(tiny):
    assert isinstance(tiny, ImageTokenizer)
    assert (tiny.name, tiny.codebook_size, tiny.tokens_per_image) == ("magvit2", 8192, 4)
    images = _images(3, 32)
    codes = tiny.encode(images)
    assert codes.shape == (3, 4) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 8192
    assert len(np.unique(codes)) > 1  # random weights still separate random images
    # batching does not change the result (per-image, eval mode)
    assert np.array_equal(np.concatenate([tiny.encode(images[i:i + 1]) for i in range(3)]), codes)
    out = tiny.decode(codes)
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(tiny.decode(tiny.encode(images)), out)
    assert tiny.encode(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 4)
    with pytest.raises(ValueError, match="codes outside"):
        tiny.decode(np.full((1, 4), 8192))
    with pytest.raises(ValueError, match=r"uint8 \(B, 32, 32, 3\)"):
        tiny.encode(images.astype(np.float32))


def test_encode_matches_the_network_and_value_range(tiny):
    images = _images(2, 32, seed=5)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - 0.5) / 0.5  # the reference ToTensor + Normalize(0.5, 0.5)
    z = tiny.model.encoder(x)  # (B, 13, 2, 2)
    expect = ((z > 0).long() * (2 ** torch.arange(12, -1, -1)).view(1, -1, 1, 1)).sum(1).reshape(2, -1)
    assert np.array_equal(tiny.encode(images), expect.numpy())


def test_random_init_is_the_same_in_every_process_and_fingerprinted(tiny):
    again = build_magvit2(magvit2_cfg(), device="cpu")
    images = _images(2, 32, seed=1)
    assert np.array_equal(again.encode(images), tiny.encode(images))
    assert again.fingerprint() == tiny.fingerprint()
    other_size = build_magvit2(magvit2_cfg(size=64), device="cpu")
    assert other_size.tokens_per_image == 16 and other_size.fingerprint() != tiny.fingerprint()


def test_device_is_cuda_when_available():
    tok = build_magvit2(magvit2_cfg())
    assert tok.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert next(tok.model.parameters()).device.type == tok.device.type


def test_build_errors_are_actionable():
    with pytest.raises(ConfigError, match="image.weights"):
        build_magvit2(magvit2_cfg(random_init=False))
    with pytest.raises(ConfigError, match="both set"):
        build_magvit2(magvit2_cfg(weights="/x.safetensors"))
    with pytest.raises(ConfigError, match="image.size=40"):
        build_magvit2(magvit2_cfg(size=40))
    with pytest.raises(ConfigError, match="unknown magvit2 preset"):
        build_magvit2(magvit2_cfg(magvit2_preset="huge"))


# --------------------------------------------------------------------------------------------------- weights

def _trained_like_state(seed: int) -> dict[str, torch.Tensor]:
    return build_model(Magvit2Config.preset("tiny"), preset="tiny", seed=seed).state_dict()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_load_weights_from_file(tmp_path, tiny, fmt):
    state = _trained_like_state(seed=7)
    path = tmp_path / f"magvit2.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save(state, path)
    tok = build_magvit2(magvit2_cfg(weights=str(path), random_init=False), device="cpu")
    ref = build_model(Magvit2Config.preset("tiny"), preset="tiny", seed=7)
    images = _images(2, 32, seed=3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert np.array_equal(tok.encode(images), ref.encode_pixels(x).numpy())
    assert tok.fingerprint() != tiny.fingerprint()  # the weights are part of the fingerprint


def test_file_with_wrong_keys_is_refused_with_names(tmp_path):
    state = _trained_like_state(seed=0)
    state["extra.weight"] = torch.zeros(1)
    del state["encoder.quant_conv.bias"]
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing key\(s\): encoder.quant_conv.bias.*unexpected key\(s\): "
                                           r"extra.weight"):
        build_magvit2(magvit2_cfg(weights=str(path), random_init=False))


def test_wrong_lfq_tables_are_refused(tmp_path):
    state = _trained_like_state(seed=0)
    state["quantize.embedding"] = -state["quantize.embedding"]
    path = tmp_path / "flipped.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="LFQ tables"):
        build_magvit2(magvit2_cfg(weights=str(path), random_init=False))


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"encoder.conv_in.weight": _Evil(str(marker))}, f)
    # the file really does run code when unpickled without weights_only
    with open(path, "rb") as f:
        data = f.read()
    assert not marker.exists()
    with pytest.raises(WeightsError, match="weights_only=True"):
        build_magvit2(magvit2_cfg(weights=str(path), random_init=False))
    assert not marker.exists()
    torch.load(io.BytesIO(data), weights_only=False)
    assert marker.exists()


def test_load_weights_from_s3(tmp_path, monkeypatch):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        from safetensors.torch import save
        state = _trained_like_state(seed=7)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="models")
        s3.put_object(Bucket="models", Key="magvitv2/model.safetensors", Body=save(state))
        tok = build_magvit2(magvit2_cfg(weights="s3://models/magvitv2/model.safetensors", random_init=False),
                            device="cpu")
        assert torch.equal(tok.model.state_dict()["decoder.conv_out.weight"], state["decoder.conv_out.weight"])
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ image bytes

def _encode_image(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("wide", [True, False])
def test_load_resizes_short_side_and_center_crops(tiny, wide):
    # 3 bands along the long side: red | blue (middle half) | red; after resize 32 x 64 and center crop only the
    # blue middle remains
    long_side, short_side = 96, 48
    arr = np.zeros((short_side, long_side, 3), np.uint8)
    arr[:, :24, 0] = 255
    arr[:, 24:72, 2] = 255
    arr[:, 72:, 0] = 255
    if not wide:
        arr = arr.transpose(1, 0, 2).copy()
    out = tiny.load(_encode_image(Image.fromarray(arr)), source="bands.png")
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    inner = out[3:-3, 3:-3]  # bicubic blends the band edges
    assert inner[..., 2].min() > 200 and inner[..., 0].max() < 60
    # grey and palette images come out RGB
    grey = tiny.load(_encode_image(Image.fromarray(np.full((40, 40), 128, np.uint8))))
    assert grey.shape == (32, 32, 3) and abs(int(grey[16, 16, 0]) - 128) <= 1


def test_load_bad_inputs(tiny):
    with pytest.raises(BadInput) as e:
        tiny.load(b"", source="a.png")
    assert e.value.reason == "empty_file" and "a.png" in str(e.value)
    with pytest.raises(BadInput) as e:
        tiny.load(b"definitely not an image")
    assert e.value.reason == "corrupt_image"
    good = _encode_image(Image.fromarray(_images(1, 64)[0]))
    with pytest.raises(BadInput) as e:
        tiny.load(good[: len(good) // 2])
    assert e.value.reason == "corrupt_image"


def test_too_large_is_refused_from_the_header(tiny):
    big = _encode_image(Image.new("RGB", (3000, 2000)), fmt="PNG")
    # truncated: decoding would fail, so image_too_large proves the header check came first
    truncated = big[:200]
    small_limit = build_magvit2(magvit2_cfg(max_pixels=1_000_000), device="cpu")
    for data in (big, truncated):
        with pytest.raises(BadInput) as e:
            small_limit.load(data, source="big.png")
        assert e.value.reason == "image_too_large" and "3000x2000" in str(e.value)


# ------------------------------------------------------------------------------------------------- benchmark

def test_bench_encode_smoke():
    result = bench_encode(size=32, batch_sizes=(1, 2), preset="tiny", repeats=1)
    assert sorted(result) == [1, 2] and all(v > 0 for v in result.values())

