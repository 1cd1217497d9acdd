"""Pixel image tokenizer: exact per-pixel quantization for tiny images (the CPU demo's 8x8 digits).

Each pixel channel is one token: value v in 0..255 -> code round(v * (levels - 1) / 255), and back
code -> round(code * 255 / (levels - 1)). With levels <= 256 the two roundings invert each other on the level grid,
so decode(encode(x)) == x exactly for any image whose values lie on the grid; sklearn's digits (values 0..16)
rendered with levels=17 are such images. Codes are laid out in raster order, channels interleaved:
(H, W, C) -> (H*W*C,), so an RGB image reads r,g,b of pixel (0, 0), then pixel (0, 1), ...

`load` resizes to `size x size`: a non-square image is first center-cropped to a square (no distortion), then
resized with a box filter (each output pixel is the mean of the input pixels it covers: no aliasing when
shrinking photographs). An image already `size x size` is left untouched, as the demo's 8x8 digits are.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.tokenizers.base import BadInput

if TYPE_CHECKING:
    from model.tokenizers import ImageTokenizerConfig


class PixelTokenizer:
    """Implements `model.tokenizers.base.ImageTokenizer`."""

    def __init__(self, size: int = 8, channels: int = 1, levels: int = 17, max_pixels: int = 50_000_000):
        if size < 1:
            raise ValueError(f"image.size={size} must be >= 1")
        if channels not in (1, 3):
            raise ValueError(f"image.channels={channels} must be 1 (grayscale) or 3 (RGB)")
        if not 2 <= levels <= 256:
            raise ValueError(f"image.levels={levels} must be in [2, 256] (an 8-bit pixel has 256 values)")
        self.size, self.channels, self.levels, self.max_pixels = size, channels, levels, max_pixels
        self.codebook_size = levels
        self.name = f"pixel-{size}x{size}x{channels}-{levels}"

    @classmethod
    def from_config(cls, cfg: "ImageTokenizerConfig") -> "PixelTokenizer":
        return cls(size=cfg.size, channels=cfg.channels, levels=cfg.levels, max_pixels=cfg.max_pixels)

    @property
    def tokens_per_image(self) -> int:
        return self.size * self.size * self.channels

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.size, self.size, self.channels

    # ---- bytes -> pixels ----------------------------------------------------------------------------------
    def load(self, data: bytes, source: str = "") -> np.ndarray:
        """Image bytes (PNG, JPEG, ...) -> uint8 (size, size, channels). Raises BadInput."""
        where = f" ({source})" if source else ""
        if not data:
            raise BadInput("empty_file", f"image file is empty{where}")
        try:
            with warnings.catch_warnings():
                # PIL warns (and only errors above 2x its own limit) on huge images; our own check below decides.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as e:
            raise BadInput("image_too_large", f"{e}{where}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise BadInput("corrupt_image", f"cannot read image header: {e}{where}") from None
        w, h = img.size
        # Decompression-bomb guard: the header's size is checked before any pixel is decoded.
        if w * h > self.max_pixels:
            raise BadInput("image_too_large",
                           f"{w}x{h} = {w * h} pixels > image.max_pixels={self.max_pixels}{where}")
        if w < 1 or h < 1:
            raise BadInput("corrupt_image", f"image has size {w}x{h}{where}")
        try:
            img.load()
            img = img.convert("L" if self.channels == 1 else "RGB")
        except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt pixel data
            raise BadInput("corrupt_image", f"cannot decode image pixels: {e}{where}") from None
        if (w, h) != (self.size, self.size):
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((self.size, self.size), Image.Resampling.BOX)
        arr = np.asarray(img, dtype=np.uint8)
        return arr.reshape(self.size, self.size, self.channels)  # (H, W) -> (H, W, C) for grayscale

    # ---- pixels <-> codes ---------------------------------------------------------------------------------
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, size, size, channels) -> int64 codes (B, size*size*channels) in [0, levels)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != self.shape:
            raise ValueError(f"{self.name}: expected images of shape (B, {self.size}, {self.size}, {self.channels}), "
                             f"got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"{self.name}: expected uint8 images, got {images.dtype}")
        # Round half up (floor(x + 0.5)) in both directions, so encode/decode are exact inverses on the grid.
        codes = np.floor(images.astype(np.float64) * (self.levels - 1) / 255.0 + 0.5).astype(np.int64)
        return codes.reshape(images.shape[0], -1)  # (B, H, W, C) -> (B, H*W*C), raster order, channels inner

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes (B, size*size*channels) -> uint8 images (B, size, size, channels)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"{self.name}: expected codes of shape (B, {self.tokens_per_image}), got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.levels):
            raise ValueError(f"{self.name}: codes outside [0, {self.levels})")
        pixels = np.floor(codes.astype(np.float64) * 255.0 / (self.levels - 1) + 0.5).astype(np.uint8)
        return pixels.reshape(codes.shape[0], *self.shape)  # (B, H*W*C) -> (B, H, W, C)

    def fingerprint(self) -> str:
        spec = {"kind": "pixel", "size": self.size, "channels": self.channels, "levels": self.levels}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"PixelTokenizer({self.name})"
