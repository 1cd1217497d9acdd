"""The demo corpus: real handwritten digits and real synthesized speech as Omni-Diffusion messages JSONL.

Images are scikit-learn's 1,797 handwritten digits (8x8, values 0..16, shipped inside the package, so nothing
is downloaded), written as 8x8 grayscale PNGs with value round(v * 255 / 16): the pixel tokenizer's 17 levels
(code = round(p * 16 / 255)) recover them exactly. Speech is the committed espeak-ng clips in data/demo_speech/
(scripts/make_demo_speech.py): the ten digit words in several voices, speeds and pitches, and a few spoken
questions for spoken VQA.

Six tasks, one line each per image slot, so every direction gets the same number of training lines and the
same label distribution:

    t2i   "Generate an image of a handwritten seven."            -> <|image|>
    i2t   "<|image|>\\nDescribe the image."                        -> "seven"
    asr   "<|audio|>\\nTranscribe the speech."                     -> "seven"
    tts   "Read this aloud: seven"                               -> <|audio|>
    s2i   "<|audio|>\\nGenerate an image of what is said."         -> <|image|>
    svqa  "<|image|>\\n<|audio|>"  (audio: a spoken question)       -> "seven"

With `s2i_transcript`, speech-to-image answers with the transcript first, then the image (a chain of
modalities: `-> "seven<|image|>"`), which the sampler decodes in that order (`sampler.s2i.transcript=1`).

Held out for test.jsonl only: a stratified 20% of the images (fixed by the seed, whatever subset is written)
and the voices marked `held_out` in data/demo_speech/index.jsonl. Speech tasks reuse each digit's clips in
turn (a training clip appears in about three asr, three tts and three s2i lines); test lines use each held-out
clip once when n_test_images is 120 (12 held-out clips per digit).

    python -m demo.corpus --out runs/demo/corpus [--small]

Writes <out>/train.jsonl, <out>/test.jsonl, <out>/images/*.png, <out>/audio/... (copied clips) and
<out>/corpus.json (what was built: counts, held-out voices, image indices). Media paths in the JSONL files are
relative to <out>.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from common import cli
from model.prompts import TaskTemplates, task_messages
from model.tasks import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_TASKS = ("t2i", "i2t", "asr", "tts", "s2i", "svqa")
SPEECH_DIR = Path(__file__).resolve().parents[1] / "data" / "demo_speech"
TEST_FRACTION = 0.2
DEFAULT_TEST_IMAGES = 120   # = held-out digit clips (2 voices x 3 speeds x 2 pitches x 10 digits): each once
SMALL_IMAGES = 10           # --small: one image per digit in each split, 60 lines per file
PIXEL_MAX = 16              # sklearn digits' value range is 0..16


def caption(digit: int) -> str:
    return f"a handwritten {DIGIT_WORDS[digit]}"


@dataclass(frozen=True)
class Clip:
    """One line of data/demo_speech/index.jsonl."""
    path: str
    text: str
    digit: int | None
    voice: str
    speed: int
    pitch: int
    kind: str          # "digit" | "question"
    held_out: bool


def load_speech_index(speech_dir: str | os.PathLike = SPEECH_DIR) -> list[Clip]:
    """Read and check the clip index; every clip file must exist beside it."""
    speech_dir = Path(speech_dir)
    index = speech_dir / "index.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: the demo speech clips are committed under data/demo_speech/; "
                                f"regenerate them with `python scripts/make_demo_speech.py` (needs espeak-ng)")
    clips = []
    with open(index) as f:
        for n, line in enumerate(f, 1):
            try:
                clip = Clip(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"{index}:{n}: not a clip record ({e}); expected keys "
                                 f"{list(Clip.__dataclass_fields__)}") from e
            if clip.kind not in ("digit", "question") or (clip.kind == "digit") != (clip.digit is not None):
                raise ValueError(f"{index}:{n}: kind {clip.kind!r} with digit {clip.digit!r}; a 'digit' clip "
                                 f"needs an int digit, a 'question' clip digit null")
            if not (speech_dir / clip.path).is_file():
                raise FileNotFoundError(f"{index}:{n}: clip {clip.path} missing under {speech_dir}")
            clips.append(clip)
    return clips


def split_image_indices(labels: np.ndarray, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Stratified split of the sklearn indices: per digit, a seeded shuffle, the first 20% held out for test.
    Returns (train, test), each a per-digit list of indices in shuffled order. The split depends only on the
    seed, so writing fewer images never moves an image between splits."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in range(len(DIGIT_WORDS)):
        idx = rng.permutation(np.nonzero(labels == digit)[0]).tolist()
        n_test = round(TEST_FRACTION * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return train, test


def take_stratified(per_digit: list[list[int]], n: int | None) -> list[int]:
    """Round-robin over digits (0, 1, ..., 9, 0, ...) until n indices are taken (all when n is None), so any
    prefix is as balanced as the pools allow."""
    total = sum(len(p) for p in per_digit)
    n = total if n is None else n
    if not 0 < n <= total:
        raise ValueError(f"asked for {n} images but this split has {total} (1..{total} allowed)")
    taken = [i for row in itertools.zip_longest(*per_digit) for i in row if i is not None]
    return taken[:n]


def _cycle_shuffled(items: list[Clip], rng: np.random.Generator) -> Iterator[Clip]:
    """Every item once in a random order, then again in a fresh order, ...: balanced reuse."""
    while True:
        yield from (items[i] for i in rng.permutation(len(items)))


class ClipPicker:
    """Hands out clips of a digit (or questions) in turn, so a split's clips are used evenly."""

    def __init__(self, clips: list[Clip], rng: np.random.Generator, what: str):
        by_digit: dict[int | None, list[Clip]] = {}
        for clip in clips:
            by_digit.setdefault(clip.digit, []).append(clip)
        self._cycles = {d: _cycle_shuffled(c, rng) for d, c in by_digit.items()}
        self._what = what

    def next(self, digit: int | None = None) -> Clip:
        if digit not in self._cycles:
            raise ValueError(f"no {self._what} clip for digit {digit!r} in the speech index")
        return next(self._cycles[digit])


def task_line(task: str, templates: TaskTemplates, *, text: str, answer: str, label: int,
              images: Sequence[str] = (), audios: Sequence[str] = ()) -> dict:
    messages = task_messages(templates.get(task), text=text, answer=answer)
    return {"messages": messages, "images": list(images), "audios": list(audios), "task": task, "label": label}


def build_lines(slots: list[tuple[int, int]], digit_clips: list[Clip], question_clips: list[Clip],
                rng: np.random.Generator, s2i_transcript: bool = False) -> list[dict]:
    """All six tasks for each (sklearn index, digit) slot. Each speech task draws from its own picker, so an
    image is paired with different clips in s2i than the clips asr and tts see. `s2i_transcript`: speech-to-image
    answers are the spoken word, then the image."""
    templates = TaskTemplates()
    pickers = {task: ClipPicker(digit_clips, rng, f"{task} digit") for task in ("asr", "tts", "s2i")}
    questions = ClipPicker(question_clips, rng, "question")
    lines = []
    for index, digit in slots:
        word, image = DIGIT_WORDS[digit], f"images/{index:04d}.png"
        lines += [
            task_line("t2i", templates, text=caption(digit), answer=IMAGE_PLACEHOLDER, label=digit,
                      images=[image]),
            task_line("i2t", templates, text="", answer=word, label=digit, images=[image]),
            task_line("asr", templates, text="", answer=word, label=digit,
                      audios=[_audio_path(pickers["asr"].next(digit))]),
            task_line("tts", templates, text=word, answer=AUDIO_PLACEHOLDER, label=digit,
                      audios=[_audio_path(pickers["tts"].next(digit))]),
            task_line("s2i", templates, text="", answer=(word if s2i_transcript else "") + IMAGE_PLACEHOLDER,
                      label=digit, images=[image],
                      audios=[_audio_path(pickers["s2i"].next(digit))]),
            task_line("svqa", templates, text="", answer=word, label=digit, images=[image],
                      audios=[_audio_path(questions.next())]),
        ]
    return lines


def _audio_path(clip: Clip) -> str:
    return f"audio/{clip.path}"


def _write_jsonl(path: Path, lines: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, path)   # a crashed build leaves no half-written JSONL behind


def build_demo_corpus(out_dir: str | os.PathLike, *, n_train_images: int | None = None,
                      n_test_images: int | None = None, seed: int = 0, small: bool = False,
                      speech_dir: str | os.PathLike = SPEECH_DIR, s2i_transcript: bool = False) -> dict:
    """Write the demo corpus under `out_dir` (see the module docstring) and return what was written:
    {"root", "train", "test", "summary" (corpus.json path), "counts": {"train": {task: n}, "test": {task: n},
    "images", "audio"}, "held_out_voices"}.

    n_train_images: training image slots (default all ~1,437 of the train split; 10 with small); each slot
        gives one line per task. n_test_images: test image slots (default 120; 10 with small).
    seed: fixes the image split, which clips go with which slot, and the training line order.
    s2i_transcript: speech-to-image answers are the transcript, then the image (module docstring).
    """
    from sklearn.datasets import load_digits  # ships its data; imported here to keep module import light

    if small:
        n_train_images = SMALL_IMAGES if n_train_images is None else n_train_images
        n_test_images = SMALL_IMAGES if n_test_images is None else n_test_images
    n_test_images = DEFAULT_TEST_IMAGES if n_test_images is None else n_test_images
    out, speech_dir = Path(out_dir), Path(speech_dir)

    clips = load_speech_index(speech_dir)
    held_out_voices = sorted({c.voice for c in clips if c.held_out})
    if small:
        # One speed and pitch (the first digit clip's) per voice: every digit and voice, few files to copy.
        first = next(c for c in clips if c.kind == "digit")
        clips = [c for c in clips if c.kind == "question" or (c.speed, c.pitch) == (first.speed, first.pitch)]
    for held_out in (False, True):
        for kind in ("digit", "question"):
            if not any(c.held_out == held_out and c.kind == kind for c in clips):
                raise ValueError(f"{speech_dir}/index.jsonl has no {kind} clip with held_out={held_out}: "
                                 f"both splits need digit and question clips")

    digits = load_digits()
    labels = digits.target
    train_pool, test_pool = split_image_indices(labels, seed)
    train_idx = take_stratified(train_pool, n_train_images)
    test_idx = take_stratified(test_pool, n_test_images)

    rng = np.random.default_rng(seed)
    train_lines = build_lines([(i, int(labels[i])) for i in train_idx],
                              [c for c in clips if not c.held_out and c.kind == "digit"],
                              [c for c in clips if not c.held_out and c.kind == "question"], rng, s2i_transcript)
    rng.shuffle(train_lines)   # tasks interleaved: a streaming trainer sees every direction from the start
    test_lines = build_lines([(i, int(labels[i])) for i in test_idx],
                             [c for c in clips if c.held_out and c.kind == "digit"],
                             [c for c in clips if c.held_out and c.kind == "question"], rng, s2i_transcript)
    test_lines.sort(key=lambda line: DEMO_TASKS.index(line["task"]))   # stable: grouped by task for reading

    (out / "images").mkdir(parents=True, exist_ok=True)
    for i in train_idx + test_idx:
        # (8, 8) values 0..16 -> 0..255 so the 17-level pixel tokenizer inverts it exactly; uint8 (H, W) is mode L
        pixels = np.rint(digits.images[i] * 255 / PIXEL_MAX).astype(np.uint8)
        Image.fromarray(pixels).save(out / "images" / f"{i:04d}.png")
    audio = sorted({a for line in train_lines + test_lines for a in line["audios"]})
    for rel in audio:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(speech_dir / rel.removeprefix("audio/"), dst)

    counts = {"train": dict(Counter(line["task"] for line in train_lines)),
              "test": dict(Counter(line["task"] for line in test_lines)),
              "images": len(train_idx) + len(test_idx), "audio": len(audio)}
    summary = {"seed": seed, "small": small, "s2i_transcript": s2i_transcript, "counts": counts,
               "held_out_voices": held_out_voices, "train_image_indices": sorted(train_idx),
               "test_image_indices": sorted(test_idx), "speech_dir": str(speech_dir)}
    (out / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n")
    _write_jsonl(out / "test.jsonl", test_lines)
    _write_jsonl(out / "train.jsonl", train_lines)
    return {"root": str(out), "train": str(out / "train.jsonl"), "test": str(out / "test.jsonl"),
            "summary": str(out / "corpus.json"), "counts": counts, "held_out_voices": held_out_voices}


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.corpus",
        description="Build the demo corpus (sklearn handwritten digits + espeak-ng digit words) as "
                    "Omni-Diffusion messages JSONL: <out>/train.jsonl, <out>/test.jsonl, images/, audio/.",
        epilog=cli.EXIT_STATUS_HELP)
    parser.add_argument("--out", required=True, help="output folder (created; existing files are overwritten)")
    parser.add_argument("--small", action="store_true", help="tiny corpus for CI: 10 image slots per split")
    parser.add_argument("--n-train-images", type=int, default=None,
                        help="training image slots, one line per task each (default: the whole train split)")
    parser.add_argument("--n-test-images", type=int, default=None,
                        help=f"test image slots (default {DEFAULT_TEST_IMAGES}; {SMALL_IMAGES} with --small)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the split, clip pairing and line order")
    parser.add_argument("--speech-dir", default=str(SPEECH_DIR), help="folder with the clips and index.jsonl")
    parser.add_argument("--s2i-transcript", action="store_true",
                        help="speech-to-image answers are the transcript, then the image (chain of modalities)")
    args = parser.parse_args(argv)
    result = build_demo_corpus(args.out, n_train_images=args.n_train_images, n_test_images=args.n_test_images,
                               seed=args.seed, small=args.small, speech_dir=args.speech_dir,
                               s2i_transcript=args.s2i_transcript)
    c = result["counts"]
    print(f"demo corpus in {result['root']}: train {sum(c['train'].values())} lines {c['train']}, "
          f"test {sum(c['test'].values())} lines {c['test']}; {c['images']} images, {c['audio']} clips; "
          f"held-out voices {result['held_out_voices']}")
    return cli.OK


if __name__ == "__main__":
    raise SystemExit(main())
