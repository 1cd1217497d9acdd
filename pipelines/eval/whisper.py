"""The external speech recognizer that judges generated speech: a local Whisper model through `transformers`.

    judge = WhisperJudge("/models/whisper-large-v3")       # a save_pretrained folder: model + processor
    judge.transcribe([wav_24k, ...], sample_rate=24_000)    # -> ["the text it heard", ...]
    english_normalizer("/models/whisper-large-v3")("Mr. Smith's 2 cats")   # -> "mister smith is 2 cats"

The reference judges TTS with openai/whisper-large-v3 through the ASR pipeline (tools/evaluate_libritts.py).
Here the model and its processor load from a local folder only (`local_files_only`: nothing is fetched from a
hub at run time; on a cluster, bake the folder into the image or mount it). Waveforms are resampled to
Whisper's 16 kHz and transcribed in batches with greedy decoding; clips are cut at Whisper's 30 s window
(LibriTTS test-clean utterances are shorter).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from common import configlib

WHISPER_SAMPLE_RATE = 16_000


def _require_dir(model_dir: str) -> None:
    if not model_dir or not os.path.isdir(model_dir):
        raise configlib.ConfigError(f"--asr-model {model_dir!r}: not a local folder; give the folder a Whisper "
                                    f"model and its processor were saved to (save_pretrained), e.g. a copy of "
                                    f"openai/whisper-large-v3")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise configlib.ConfigError("judging speech with Whisper needs the `transformers` package: "
                                    "pip install 'omni-diffusion[eval]'") from None
    return transformers


class WhisperJudge:
    """Transcribes waveforms with a local Whisper model (WhisperForConditionalGeneration + WhisperProcessor)."""

    def __init__(self, model_dir: str, *, device: str = "cpu", batch_size: int = 8,
                 max_new_tokens: int | None = None, language: str = ""):
        """`max_new_tokens` None: the model's generation_config decides (448 tokens for whisper-large-v3);
        `language` "": Whisper detects it (as the reference's pipeline call does)."""
        import torch

        _require_dir(model_dir)
        tf = _transformers()
        self.processor = tf.WhisperProcessor.from_pretrained(model_dir, local_files_only=True)
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        self.model = tf.WhisperForConditionalGeneration.from_pretrained(
            model_dir, local_files_only=True, dtype=dtype).to(device).eval()
        self.device, self.dtype = device, dtype
        self.batch_size, self.max_new_tokens, self.language = batch_size, max_new_tokens, language

    def transcribe(self, wavs: Sequence[np.ndarray], sample_rate: int) -> list[str]:
        """float32 waveforms (N,) at `sample_rate` -> one transcript each (stripped; "" for an empty clip)."""
        import torch

        out = [""] * len(wavs)
        todo = [i for i, w in enumerate(wavs) if np.asarray(w).size]
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start:start + self.batch_size]
            clips = [resample(np.asarray(wavs[i], dtype=np.float32), sample_rate) for i in idx]
            feats = self.processor.feature_extractor(clips, sampling_rate=WHISPER_SAMPLE_RATE, return_tensors="pt")
            x = feats.input_features.to(self.device, self.dtype)   # (B, n_mels, 3000): 30 s of log-mel frames
            kwargs: dict[str, Any] = {"language": self.language} if self.language else {}
            if self.max_new_tokens:
                kwargs["max_new_tokens"] = self.max_new_tokens
            with torch.no_grad():
                ids = self.model.generate(x, **kwargs)
            texts = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
            for i, t in zip(idx, texts):
                out[i] = t.strip()
        return out

    def __call__(self, wav: np.ndarray, sample_rate: int) -> str:
        return self.transcribe([wav], sample_rate)[0]


def resample(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 (N,) at `sample_rate` -> (M,) at 16 kHz."""
    if sample_rate == WHISPER_SAMPLE_RATE:
        return wav
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(wav), sample_rate, WHISPER_SAMPLE_RATE).numpy()


def english_normalizer(model_dir: str) -> Any:
    """Whisper's English text normaliser (transformers' EnglishTextNormalizer) with the British-to-American
    spelling map the Whisper tokenizer ships as `normalizer.json` (an empty map when the folder has none)."""
    _require_dir(model_dir)
    from_tf = _transformers().models.whisper.english_normalizer.EnglishTextNormalizer
    path = os.path.join(model_dir, "normalizer.json")
    mapping = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    return from_tf(mapping)
