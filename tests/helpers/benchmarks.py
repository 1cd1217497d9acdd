"""Small benchmark trees in the public layouts (POPE, MME, LibriSpeech, LibriTTS) for tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from tests.helpers.export import digit_png


def write_pope(root: Path) -> Path:
    (root / "val2014").mkdir(parents=True)
    lines = {"random": [(1, "a.png", "Is there a dog in the image?", "yes"),
                        (2, "a.png", "Is there a cat in the image?", "no"),
                        (3, "b.png", "Is there a car in the image?", "no")],
             "adversarial": [(7, "b.png", "Is there a bus in the image?", "yes"),
                             (8, "a.png", "Is there a bird in the image?", "no")]}
    for split, rows in lines.items():
        (root / f"coco_pope_{split}.json").write_text("".join(
            json.dumps({"question_id": q, "image": im, "text": t, "label": lab}) + "\n" for q, im, t, lab in rows))
    for name in ("a.png", "b.png"):
        (root / "val2014" / name).write_bytes(digit_png(3))
    return root


def write_mme(root: Path) -> Path:
    """Two subtasks: `existence` with the reference's image layout (images/<subtask>/), `count` with the
    release layout (MME_Benchmark_release_version/<subtask>/)."""
    results = root / "eval_tool" / "Your_Results"
    results.mkdir(parents=True)
    (results / "existence.txt").write_text(
        "e1.png\tIs there a dog in this image? Please answer yes or no.\tYes\n"
        "e1.png\tIs there a cat in this image? Please answer yes or no.\tNo\n"
        "e2.png\tIs there a car in this image? Please answer yes or no.\tYes\n"
        "e2.png\tIs there a bus in this image? Please answer yes or no.\tNo\n")
    (results / "count.txt").write_text(
        "c1.png\tAre there two dogs in the image? Please answer yes or no.\tYes\n"
        "c1.png\tAre there three dogs in the image? Please answer yes or no.\tNo\n")
    (root / "images" / "existence").mkdir(parents=True)
    (root / "MME_Benchmark_release_version" / "count").mkdir(parents=True)
    for rel in ("images/existence/e1.png", "images/existence/e2.png", "MME_Benchmark_release_version/count/c1.png"):
        (root / rel).write_bytes(digit_png(5))
    return root


def write_librispeech(root: Path) -> Path:
    chapter = root / "1089" / "134686"
    chapter.mkdir(parents=True)
    (chapter / "1089-134686.trans.txt").write_text("1089-134686-0000 HE HOPED THERE WOULD BE STEW\n"
                                                    "1089-134686-0001 STUFF IT INTO YOU\n")
    t = np.arange(8000) / 16000
    for utt in ("1089-134686-0000", "1089-134686-0001"):
        sf.write(chapter / f"{utt}.flac", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    return root


def write_libritts(root: Path, texts: dict[str, str]) -> Path:
    """<spk>/<chapter>/<utt>.normalized.txt for each utt -> text."""
    for utt, text in texts.items():
        spk, chapter = utt.split("_")[:2]
        d = root / spk / chapter
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{utt}.normalized.txt").write_text(text + "\n")
    return root
