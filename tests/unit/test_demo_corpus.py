import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from sklearn.datasets import load_digits

from demo import corpus as dc
from model.prompts import count_placeholders
from model.tasks import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, infer_task


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def clips():
    return {f"audio/{c.path}": c for c in dc.load_speech_index()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_corpus")
    result = dc.build_demo_corpus(out, small=True, seed=0)
    lines = {split: [json.loads(line) for line in open(result[split])] for split in ("train", "test")}
    return out, result, lines


def test_every_line_is_a_well_formed_task_sample(corpus):
    _, result, lines = corpus
    for split, rows in lines.items():
        assert rows, split
        assert {r["task"] for r in rows} == set(dc.DEMO_TASKS), split
        counts = {t: sum(r["task"] == t for r in rows) for t in dc.DEMO_TASKS}
        assert len(set(counts.values())) == 1, f"{split} tasks unbalanced: {counts}"
        assert counts == result["counts"][split]
        for r in rows:
            assert set(r) == {"messages", "images", "audios", "task", "label"}
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            assert r["label"] in range(10)
            # The task a line claims is the one its shape implies (what the tokenize job infers without "task").
            assert infer_task(r["messages"]) == r["task"]
            assert count_placeholders(r["messages"]) == (len(r["images"]), len(r["audios"]))
            user, answer = (m["content"] for m in r["messages"])
            word = dc.DIGIT_WORDS[r["label"]]
            if r["task"] in ("i2t", "asr", "svqa"):
                assert answer == word
            elif r["task"] == "t2i":
                assert (user, answer) == (f"Generate an image of a handwritten {word}.", IMAGE_PLACEHOLDER)
            elif r["task"] == "tts":
                assert (user, answer) == (f"Read this aloud: {word}", AUDIO_PLACEHOLDER)


def test_media_exist_inside_the_root_and_match_the_label(corpus, clips, digits):
    out, _, lines = corpus
    for r in lines["train"] + lines["test"]:
        for rel in r["images"] + r["audios"]:
            assert not Path(rel).is_absolute() and ".." not in Path(rel).parts, rel
            assert (out / rel).is_file(), rel
        for rel in r["images"]:
            assert digits.target[int(Path(rel).stem)] == r["label"], rel
        for rel in r["audios"]:
            clip = clips[rel]
            if r["task"] == "svqa":
                assert clip.kind == "question"
            else:
                assert clip.kind == "digit" and clip.digit == r["label"], rel


def test_nothing_held_out_leaks_into_train(corpus, clips, digits):
    out, result, lines = corpus
    summary = json.loads((out / "corpus.json").read_text())
    held_voices = set(result["held_out_voices"])
    assert held_voices and held_voices == {c.voice for c in clips.values() if c.held_out}
    # The whole test pool of the split, not only the images written, must stay out of train.
    _, test_pool = dc.split_image_indices(digits.target, seed=0)
    test_pool = {i for per_digit in test_pool for i in per_digit}
    train_images = {int(Path(p).stem) for r in lines["train"] for p in r["images"]}
    test_images = {int(Path(p).stem) for r in lines["test"] for p in r["images"]}
    assert train_images and not train_images & test_pool
    assert test_images <= test_pool and test_images == set(summary["test_image_indices"])
    assert all(clips[a].voice not in held_voices for r in lines["train"] for a in r["audios"])
    # Test speech lines are held-out voices only: asr/tts/s2i measure generalisation to unseen speakers.
    assert all(clips[a].voice in held_voices for r in lines["test"] for a in r["audios"])


def test_pngs_invert_exactly_with_17_pixel_levels(corpus, digits):
    out, _, _ = corpus
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 20
    for png in pngs:
        pixels = np.asarray(Image.open(png))
        assert pixels.shape == (8, 8) and pixels.dtype == np.uint8
        codes = np.rint(pixels.astype(np.float64) * 16 / 255)    # the pixel tokenizer's quantisation
        np.testing.assert_array_equal(codes, digits.images[int(png.stem)])


def test_split_is_stratified_and_fixed_by_the_seed(digits):
    train, test = dc.split_image_indices(digits.target, seed=0)
    for digit in range(10):
        n = int((digits.target == digit).sum())
        assert len(test[digit]) == round(0.2 * n) and len(train[digit]) + len(test[digit]) == n
        assert not set(train[digit]) & set(test[digit])
    assert dc.split_image_indices(digits.target, seed=0) == (train, test)
    assert dc.split_image_indices(digits.target, seed=1)[1] != test
    taken = dc.take_stratified(test, 25)
    assert len(taken) == 25 and sorted(np.bincount(digits.target[taken], minlength=10)) == [2] * 5 + [3] * 5
    with pytest.raises(ValueError, match="split has"):
        dc.take_stratified(test, 10_000)


def test_cli_rebuild_is_deterministic(corpus, tmp_path):
    out, _, _ = corpus
    assert dc.main(["--out", str(tmp_path), "--small", "--seed", "0"]) == 0
    for name in ("train.jsonl", "test.jsonl", "corpus.json"):
        assert (tmp_path / name).read_text() == (out / name).read_text(), name


def test_committed_speech_clips_are_small_and_readable(clips):
    root = dc.SPEECH_DIR
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 3_000_000, f"data/demo_speech is {total / 1e6:.2f} MB; keep it <= 3 MB"
    held = [c for c in clips.values() if c.held_out]
    train = [c for c in clips.values() if not c.held_out]
    for pool in (held, train):
        assert {c.digit for c in pool if c.kind == "digit"} == set(range(10))
        assert any(c.kind == "question" for c in pool)
    assert not {c.voice for c in held} & {c.voice for c in train}
    # Decode one clip per voice: 16 kHz mono, trimmed (starts near the speech, not in a long silence).
    for voice in sorted({c.voice for c in clips.values()}):
        clip = next(c for c in clips.values() if c.voice == voice and c.kind == "digit")
        wav, rate = sf.read(root / clip.path, dtype="float32")
        assert rate == 16_000 and wav.ndim == 1 and 0.15 < len(wav) / rate < 1.5, clip.path
        assert np.abs(wav[: rate // 10]).max() > 0.05, f"{clip.path} starts with 100 ms of silence"


def test_missing_speech_index_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_demo_speech"):
        dc.build_demo_corpus(tmp_path / "out", small=True, speech_dir=tmp_path)


def test_s2i_transcript_answers_with_the_word_then_the_image(tmp_path):
    result = dc.build_demo_corpus(tmp_path / "chain", small=True, seed=0, s2i_transcript=True)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in open(result[split])]
        s2i = [r for r in rows if r["task"] == "s2i"]
        assert s2i and all(r["messages"][-1]["content"] == dc.DIGIT_WORDS[r["label"]] + IMAGE_PLACEHOLDER
                           for r in s2i)
        assert all(infer_task(r["messages"]) == "s2i" for r in s2i)
        t2i = [r for r in rows if r["task"] == "t2i"]
        assert all(r["messages"][-1]["content"] == IMAGE_PLACEHOLDER for r in t2i)   # only s2i changes
    assert json.loads(open(result["summary"]).read())["s2i_transcript"] is True
