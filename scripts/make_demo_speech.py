"""Generate the demo corpus's speech clips with espeak-ng and write data/demo_speech/.

The clips are real speech synthesis (formant synthesis, several accents and voice variants), not random noise,
so the demo's ASR, TTS and speech-to-image directions have something learnable and checkable. The output is
committed: training and CI never need espeak-ng, only this script does.

    apt-get update && apt-get install -y espeak-ng     # once
    python scripts/make_demo_speech.py [--out data/demo_speech]

What it writes (16 kHz mono, Ogg Opus in `.ogg` files, which soundfile reads and writes):
    digit/<voice>_s<speed>_p<pitch>_<word>.ogg   the ten digit words, every voice x speed x pitch
    question/<voice>_s<speed>_q<k>.ogg           spoken questions for spoken VQA
    index.jsonl                                  one line per clip: path (relative to the folder), text,
                                                 digit (int, or null for questions), voice, speed, pitch,
                                                 kind ("digit" | "question"), held_out (bool)

Held-out voices (`held_out: true`) are for test lines only: the corpus builder (demo/corpus.py) keeps
them out of training. They are unseen combinations of an accent and a variant that training does see apart, so
the held-out test asks the model to generalise to a new voice, not to a new kind of sound.

Ogg Opus rather than Vorbis or FLAC: a Vorbis stream carries ~4 KB of codebook headers per file, which for
clips of half a second doubles the size; Opus at libsndfile's default bitrate is ~2.5 KB a clip at ~17 dB SNR,
far more fidelity than a 1.5 kbps EnCodec tokenizer keeps.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTIONS = (
    "what digit is this",
    "which number is shown",
    "what number is this",
    "which digit do you see",
    "what is this digit",
    "tell me the number",
)
# espeak-ng voice arguments: an English accent, optionally with a voice variant (+f3 = female 3, +m3 = male 3).
TRAIN_VOICES = (
    "en-us", "en-gb", "en-gb-scotland", "en-029",
    "en-us+f3", "en-gb-x-rp+f2", "en-us-nyc+m3", "en-gb-x-gbclan+f4",
)
HELD_OUT_VOICES = ("en-gb+f3", "en-us+m3")
DIGIT_SPEEDS = (140, 175, 210)        # words per minute (espeak-ng default 175)
DIGIT_PITCHES = (35, 65)              # 0..99 (default 50)
QUESTION_SPEEDS = (150, 200)
QUESTION_PITCH = 50

SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050                  # espeak-ng's fixed output rate
TRIM_DB = -40.0                       # below peak: what counts as silence when trimming the ends
PAD_S = 0.03                          # keep a little silence so word onsets are not clipped
PEAK = 0.9                            # voices differ in loudness; normalise so level is not a voice cue


def synthesize(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng -> float32 mono waveform at ESPEAK_RATE."""
    try:
        proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                              check=True, capture_output=True)
    except FileNotFoundError:
        sys.exit("espeak-ng not found: install it with `apt-get update && apt-get install -y espeak-ng`")
    wav, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    if rate != ESPEAK_RATE or wav.ndim != 1 or len(wav) == 0:
        raise RuntimeError(f"espeak-ng gave unexpected audio for voice {voice!r} text {text!r}: "
                           f"rate {rate}, shape {wav.shape}")
    return wav


def trim_and_resample(wav: np.ndarray) -> np.ndarray:
    """Cut leading/trailing silence, resample 22.05 kHz -> 16 kHz, normalise the peak."""
    level = np.abs(wav)
    loud = np.nonzero(level > level.max() * 10 ** (TRIM_DB / 20))[0]
    pad = int(PAD_S * ESPEAK_RATE)
    wav = wav[max(loud[0] - pad, 0): loud[-1] + pad + 1]
    wav = resample_poly(wav, SAMPLE_RATE // 50, ESPEAK_RATE // 50).astype(np.float32)  # 320/441
    return wav * (PEAK / np.abs(wav).max())


def voice_slug(voice: str) -> str:
    return voice.replace("+", "_")


def clip_specs() -> list[dict]:
    specs = []
    for voice in TRAIN_VOICES + HELD_OUT_VOICES:
        held_out = voice in HELD_OUT_VOICES
        for speed in DIGIT_SPEEDS:
            for pitch in DIGIT_PITCHES:
                for digit, word in enumerate(DIGIT_WORDS):
                    specs.append({"path": f"digit/{voice_slug(voice)}_s{speed}_p{pitch}_{word}.ogg",
                                  "text": word, "digit": digit, "voice": voice, "speed": speed,
                                  "pitch": pitch, "kind": "digit", "held_out": held_out})
        for speed in QUESTION_SPEEDS:
            for k, question in enumerate(QUESTIONS):
                specs.append({"path": f"question/{voice_slug(voice)}_s{speed}_q{k}.ogg",
                              "text": question, "digit": None, "voice": voice, "speed": speed,
                              "pitch": QUESTION_PITCH, "kind": "question", "held_out": held_out})
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "demo_speech"),
                        help="output folder (replaced: its digit/, question/ and index.jsonl are rewritten)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    for sub in ("digit", "question"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    specs = clip_specs()
    total_s = 0.0
    for i, spec in enumerate(specs):
        wav = trim_and_resample(synthesize(spec["text"], spec["voice"], spec["speed"], spec["pitch"]))
        sf.write(out / spec["path"], wav, SAMPLE_RATE, format="OGG", subtype="OPUS")
        total_s += len(wav) / SAMPLE_RATE
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{len(specs)} clips", flush=True)
    with open(out / "index.jsonl", "w") as f:
        for spec in specs:
            f.write(json.dumps(spec) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {len(specs)} clips ({total_s:.0f} s of speech) to {out}: {size / 1e6:.2f} MB in total")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
