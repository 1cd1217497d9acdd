import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from model.tokenizers.base import BadInput, ImageTokenizer
from model.tokenizers.pixel import PixelTokenizer


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is patched to claim width x height (CRC fixed): a decompression bomb's header."""
    data = bytearray(png_bytes(np.zeros((2, 2), dtype=np.uint8)))
    assert data[12:16] == b"IHDR"
    data[16:20] = struct.pack(">I", width)
    data[20:24] = struct.pack(">I", height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over chunk type + 13 data bytes
    return bytes(data)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images[:50].astype(np.int64)  # (50, 8, 8) values 0..16


def test_protocol_and_names():
    tok = PixelTokenizer(size=8, channels=1, levels=17)
    assert isinstance(tok, ImageTokenizer)
    assert tok.name == "pixel-8x8x1-17" and tok.codebook_size == 17 and tok.tokens_per_image == 64
    assert tok.fingerprint() == PixelTokenizer(8, 1, 17).fingerprint() != PixelTokenizer(8, 1, 16).fingerprint()


def test_sklearn_digits_round_trip_exactly_through_png(digits):
    tok = PixelTokenizer(size=8, channels=1, levels=17)
    pixels = np.floor(digits * 255 / 16 + 0.5).astype(np.uint8)  # how a 0..16 digit is rendered to 8-bit
    loaded = np.stack([tok.load(png_bytes(p)) for p in pixels])  # (B, 8, 8, 1)
    codes = tok.encode(loaded)
    assert codes.shape == (50, 64) and codes.dtype == np.int64
    np.testing.assert_array_equal(codes, digits.reshape(50, 64))  # the code is the digit's own level
    np.testing.assert_array_equal(tok.decode(codes), loaded)


@pytest.mark.parametrize("levels", [2, 5, 17, 255, 256])
def test_exact_on_the_level_grid_for_any_levels(levels):
    tok = PixelTokenizer(size=4, channels=3, levels=levels)
    rng = np.random.default_rng(levels)
    codes = rng.integers(0, levels, size=(3, tok.tokens_per_image))
    images = tok.decode(codes)
    np.testing.assert_array_equal(tok.encode(images), codes)
    np.testing.assert_array_equal(tok.decode(tok.encode(images)), images)


def test_rgb_codes_are_raster_order_channel_interleaved():
    tok = PixelTokenizer(size=2, channels=3, levels=256)  # levels=256: code == pixel value
    img = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3) * 20  # (B, H, W, C)
    codes = tok.encode(img)[0]
    assert codes[:3].tolist() == img[0, 0, 0].tolist()   # r, g, b of pixel (0, 0)
    assert codes[3:6].tolist() == img[0, 0, 1].tolist()  # then pixel (0, 1) on the same row
    assert codes[6:9].tolist() == img[0, 1, 0].tolist()


def test_off_grid_values_round_to_nearest_level():
    tok = PixelTokenizer(size=1, channels=1, levels=17)  # levels every 255/16 = 15.94
    img = np.array([0, 7, 8, 100, 255], dtype=np.uint8).reshape(5, 1, 1, 1)
    assert tok.encode(img)[:, 0].tolist() == [0, 0, 1, 6, 16]


def test_load_converts_mode_and_resizes():
    gray = PixelTokenizer(size=8, channels=1, levels=17)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    out = gray.load(png_bytes(rgba, mode="RGBA"))
    assert out.shape == (8, 8, 1) and out.dtype == np.uint8 and int(out[0, 0, 0]) == 76  # luma of pure red
    rgb = PixelTokenizer(size=8, channels=3, levels=17)
    assert rgb.load(png_bytes(np.full((8, 8), 200, dtype=np.uint8))).shape == (8, 8, 3)
    # 16x16 -> 8x8 with a box filter: each output pixel is the mean of a 2x2 block
    big = np.kron(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, np.ones((2, 2), dtype=np.uint8))
    np.testing.assert_array_equal(gray.load(png_bytes(big))[..., 0], np.arange(64).reshape(8, 8) * 4)
    # non-square: center-cropped to a square first (the 2-pixel borders at both sides are cut)
    wide = np.zeros((8, 12), dtype=np.uint8)
    wide[:, :2] = 255
    wide[:, -2:] = 255
    assert gray.load(png_bytes(wide)).max() == 0


def test_bad_inputs_raise_bad_input_with_reason():
    tok = PixelTokenizer(size=8, channels=1, levels=17)
    # noise compresses poorly, so the cut below lands inside the pixel data
    good = png_bytes(np.random.default_rng(0).integers(0, 256, (8, 8)).astype(np.uint8))
    cases = {
        "empty_file": b"",
        "corrupt_image": b"this is not an image at all",
    }
    for reason, data in cases.items():
        with pytest.raises(BadInput) as e:
            tok.load(data, source="x.png")
        assert e.value.reason == reason and "x.png" in str(e.value)
    # Cut inside the header, then inside the pixel data. (A file missing only its trailing IEND/CRC bytes still
    # holds every pixel and is accepted, as PIL does.)
    for cut in (20, len(good) // 2):
        with pytest.raises(BadInput) as e:
            tok.load(good[:cut])
        assert e.value.reason == "corrupt_image", cut


def test_decompression_bomb_rejected_from_header():
    tok = PixelTokenizer(size=8, channels=1, levels=17)
    # Header claims 20000 x 20000 (400M pixels); the file has no pixel data for it, so reaching the decoder would
    # give corrupt_image: image_too_large proves the size was checked first.
    with pytest.raises(BadInput) as e:
        tok.load(png_claiming_size(20000, 20000))
    assert e.value.reason == "image_too_large"
    # below PIL's own limit, our configurable max_pixels decides
    small_limit = PixelTokenizer(size=8, channels=1, levels=17, max_pixels=1000)
    with pytest.raises(BadInput) as e:
        small_limit.load(png_claiming_size(40, 40))
    assert e.value.reason == "image_too_large" and "max_pixels=1000" in str(e.value)
    assert small_limit.load(png_bytes(np.zeros((30, 30), dtype=np.uint8))).shape == (8, 8, 1)


def test_shape_and_range_errors():
    tok = PixelTokenizer(size=8, channels=1, levels=17)
    with pytest.raises(ValueError, match=r"\(B, 8, 8, 1\)"):
        tok.encode(np.zeros((8, 8, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(np.zeros((1, 8, 8, 1), dtype=np.float32))
    with pytest.raises(ValueError, match=r"outside \[0, 17\)"):
        tok.decode(np.full((1, 64), 17))
    with pytest.raises(ValueError, match="levels"):
        PixelTokenizer(levels=300)
