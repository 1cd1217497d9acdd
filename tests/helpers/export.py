"""A training export without training: a debug Transformer with random weights and a fitted demo tokenizer set,
written by pipelines/export.py. Sampling, generate and eval tests run on it instead of training one.

Also writes small media files (an 8x8 digit PNG, a short WAV) and a messages JSONL in the demo corpus format.
"""
from __future__ import annotations

import io
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from model.config import ModelConfig
from model.prompts import TaskTemplates, task_messages
from model.tasks import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER
from model.tokenizers import TokenizerSet, default_tokenizer_config
from model.transformer import Transformer
from pipelines import export

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE = 24_000


def tone(seconds: float, freq: float, seed: int = 0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A noisy tone: varied enough for EnCodec's k-means to give distinct codes."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    noise = np.random.default_rng(seed).normal(0, 0.05, t.size)
    return (0.3 * np.sin(2 * np.pi * freq * t) * np.sin(2 * np.pi * 3 * t) + noise).astype(np.float32)


def corpus_texts() -> list[str]:
    templates = TaskTemplates()
    texts = [f"a handwritten {w}" for w in WORDS] + list(WORDS)
    texts += [templates.get(t).user.replace("{text}", "seven") for t in ("t2i", "i2t", "asr", "tts", "s2i")]
    return texts


def write_debug_export(out: str | Path, *, seed: int = 0, mlflow_run_id: str | None = None,
                       tokenizers_from: str | Path | None = None) -> Path:
    """A debug Transformer with random weights, exported to `out` by pipelines/export.py (as the trainer does),
    with a demo tokenizer set fitted on `corpus_texts` and tones. `tokenizers_from`: use this saved tokenizer
    set instead of fitting one (saves the EnCodec fit)."""
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="debug-tokenizers-") as scratch:
        if tokenizers_from is None:
            tokenizers_from = Path(scratch) / "tokenizers"
            TokenizerSet.prepare(default_tokenizer_config(), str(tokenizers_from), texts=corpus_texts(),
                                 wavs=[tone(0.6, 220.0 + 40 * i, seed=i) for i in range(4)])
        vocab = TokenizerSet.load(str(tokenizers_from)).vocab
        torch.manual_seed(seed)
        model = Transformer(ModelConfig.preset("debug"), vocab_size=vocab.size, media_markers=vocab.media_markers)
        export.write(str(out), model.state_dict(), model_config=replace(model.cfg, vocab_size=model.vocab_size),
                     vocab=vocab, tokenizers_uri=str(tokenizers_from), step=0, run_name="debug",
                     mlflow_run_id=mlflow_run_id)
    return out


def digit_png(digit: int = 7) -> bytes:
    """An 8x8 grayscale digit (sklearn's, on the 17-level grid) as PNG bytes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    i = int(np.flatnonzero(d.target == digit)[0])
    pixels = np.rint(d.images[i] * 255 / 16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 0.4, freq: float = 300.0, seed: int = 0, sample_rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, freq, seed, sample_rate), sample_rate, format="WAV")
    return buf.getvalue()


def write_media(folder: str | Path) -> dict[str, Path]:
    """images/seven.png, images/three.png, audio/seven.wav, audio/question.wav under `folder`."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    files = {"seven.png": folder / "images" / "seven.png", "three.png": folder / "images" / "three.png",
             "seven.wav": folder / "audio" / "seven.wav", "question.wav": folder / "audio" / "question.wav"}
    files["seven.png"].write_bytes(digit_png(7))
    files["three.png"].write_bytes(digit_png(3))
    files["seven.wav"].write_bytes(wav_bytes(0.4, 300.0, 1))
    files["question.wav"].write_bytes(wav_bytes(0.5, 500.0, 2))
    return files


def demo_lines() -> list[dict]:
    """One line per demo task in the demo corpus format (media relative to the JSONL folder; see write_media)."""
    t = TaskTemplates()

    def line(task: str, text: str, answer: str, label: int, images=(), audios=()) -> dict:
        return {"messages": task_messages(t.get(task), text=text, answer=answer), "images": list(images),
                "audios": list(audios), "task": task, "label": label}

    return [
        line("t2i", "a handwritten seven", IMAGE_PLACEHOLDER, 7, images=["images/seven.png"]),
        line("t2i", "a handwritten three", IMAGE_PLACEHOLDER, 3, images=["images/three.png"]),
        line("i2t", "", "seven", 7, images=["images/seven.png"]),
        line("asr", "", "seven", 7, audios=["audio/seven.wav"]),
        line("tts", "seven", AUDIO_PLACEHOLDER, 7, audios=["audio/seven.wav"]),
        line("s2i", "", IMAGE_PLACEHOLDER, 7, images=["images/seven.png"], audios=["audio/seven.wav"]),
        line("svqa", "", "seven", 7, images=["images/seven.png"], audios=["audio/question.wav"]),
        # the reference's spoken QA line: no "task" (inferred: sqa), the answer text then its speech
        {"messages": [{"role": "user", "content": AUDIO_PLACEHOLDER},
                      {"role": "assistant", "content": f"seven\n{AUDIO_PLACEHOLDER}"}],
         "images": [], "audios": ["audio/question.wav", "audio/seven.wav"], "label": 7},
    ]


def write_jsonl(path: str | Path, lines: list) -> Path:
    """Dicts are written as JSON; strings are written verbatim (to plant malformed lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path
