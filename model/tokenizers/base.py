"""What every tokenizer provides. Tokenize jobs, sampling and evaluation only talk to these interfaces.

Media tokenizers turn raw bytes into *codes* (small non-negative integers in their own codebook); the
vocabulary (model/vocab.py) turns codes into token ids. So a tokenizer never knows token ids, and the
vocabulary never knows pixels or waveforms.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


class BadInput(ValueError):
    """An input that cannot be tokenized. `reason` is a short stable tag (e.g. "truncated_image",
    "audio_too_long"); the message says what was wrong. Tokenize jobs quarantine the input with the reason."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


@runtime_checkable
class TextTokenizer(Protocol):
    name: str

    @property
    def size(self) -> int:
        """Rows the text range of the vocabulary reserves (>= number of text ids)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def fingerprint(self) -> str: ...


@runtime_checkable
class ImageTokenizer(Protocol):
    name: str
    codebook_size: int

    @property
    def tokens_per_image(self) -> int: ...

    def load(self, data: bytes, source: str = "") -> np.ndarray:
        """Decode + preprocess image bytes -> uint8 (H, W, C) ready for `encode`. Raises BadInput."""

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, C) -> int64 codes (B, tokens_per_image) in [0, codebook_size)."""

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes (B, tokens_per_image) -> uint8 images (B, H, W, C)."""

    def fingerprint(self) -> str: ...


@runtime_checkable
class SpeechTokenizer(Protocol):
    name: str
    n_q: int
    codebook_size: int
    sample_rate: int
    frame_rate: int

    def load(self, data: bytes, source: str = "") -> np.ndarray:
        """Decode audio bytes, mix to mono, resample to `sample_rate` -> float32 (N,). Raises BadInput."""

    def encode(self, wav: np.ndarray) -> np.ndarray:
        """float32 (N,) at sample_rate -> int64 codes (n_q, T) in [0, codebook_size)."""

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes (n_q, T) -> float32 waveform (N,) at sample_rate."""

    def fingerprint(self) -> str: ...
