"""Published benchmark protocols: answer parsing and metrics on hand-computed cases, the public layouts read
into eval items, and the Whisper judge end to end (a tiny random Whisper: audio in -> text out -> WER)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common import configlib
from pipelines.eval import benchmarks as B
from pipelines.eval import scoring
from tests.helpers.benchmarks import (
    write_librispeech,
    write_libritts,
    write_mme,
    write_pope,
)

# ---- POPE ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No.", "no"),
    ("no, it is not", "no"),
    ("There is not a cat. Yes.", "no"),      # only the first sentence counts
    ("I don't know. No.", "yes"),            # "don't" is not "not"; the "No" is in the second sentence
    ("NO", "yes"),                           # POPE matches "No", "no", "not" exactly
    ("Nope", "yes"),
    ("", "yes"),                             # an empty answer reads as yes
])
def test_pope_answer(text, parsed):
    assert B.pope_answer(text) == parsed


def test_pope_metrics_by_hand():
    # TP: 0, 4   FP: 1   TN: 2   FN: 3
    m = B.pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert m == pytest.approx({"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                               "yes_ratio": 3 / 5})
    none_yes = B.pope_metrics(["no", "no"], ["yes", "no"])
    assert none_yes == pytest.approx({"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                      "yes_ratio": 0.0})


def test_pope_layout_and_scores(tmp_path, monkeypatch):
    root = write_pope(tmp_path / "pope")
    items = B.load_pope(str(root), prompt=B.BENCHMARKS["pope"].prompt)
    assert [(it["split"], it["id"], it["ref_text"]) for it in items] == [
        ("random", 1, "yes"), ("random", 2, "no"), ("random", 3, "no"), ("adversarial", 7, "yes"),
        ("adversarial", 8, "no")]
    req = items[0]["request"]
    assert req["messages"] == [{"role": "user", "content": "Is there a dog in the image?\n<|image|>"}]
    assert req["images"] == [str(root / "val2014" / "a.png")] and req["task"] == "vqa"
    assert len(B.load_pope(str(root), prompt="{text}", limit=1)) == 2        # one per split
    monkeypatch.chdir(tmp_path)   # a relative --data still gives absolute media paths (actors run elsewhere)
    assert B.load_pope("pope", prompt="{text}")[0]["request"]["images"] == [str(root / "val2014" / "a.png")]
    templ = B.load_pope(str(root), prompt="template")[0]["request"]
    assert "messages" not in templ and templ["text"] == "Is there a dog in the image?"

    hyps = ["Yes.", "Yes, a cat.", "No", "There is no bus.", "no"]
    preds = [{"ok": True, "hyp": h} for h in hyps]
    table = B.score_pope(items, preds)
    # random: answers yes yes no vs labels yes no no -> TP 1, FP 1, TN 1
    assert table["pope/random"] == pytest.approx({"accuracy": 2 / 3, "precision": 0.5, "recall": 1.0,
                                                  "f1": 2 / 3, "yes_ratio": 2 / 3, "n": 3, "n_failed": 0})
    # adversarial: no no vs yes no -> FN 1, TN 1
    assert table["pope/adversarial"]["accuracy"] == 0.5 and table["pope/adversarial"]["recall"] == 0.0
    assert "pope/popular" not in table


def test_pope_bad_label(tmp_path):
    (tmp_path / "coco_pope_random.json").write_text(json.dumps({"question_id": 1, "image": "a.png",
                                                                "text": "Is there a dog?", "label": "maybe"}))
    with pytest.raises(configlib.ConfigError, match="line 1: label 'maybe'"):
        B.load_pope(str(tmp_path), prompt="{text}")


# ---- MME ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [("Yes", "yes"), ("no", "no"), ("yes it is", "yes"), ("Nope", "no"),
                                          ("  yes", "other"), ("maybe", "other"), ("", "other")])
def test_mme_answer(text, parsed):
    assert B.mme_answer(text) == parsed


def test_mme_subtask_metrics_by_hand():
    # image 1: both right; image 2: first right, second wrong -> acc 3/4, acc+ 1/2
    m = B.mme_subtask_metrics(["Yes", "no", "yes it is", "Yes"], ["Yes", "No", "Yes", "No"])
    assert m == pytest.approx({"acc": 0.75, "acc_plus": 0.5, "score": 125.0})
    with pytest.raises(ValueError, match="even"):
        B.mme_subtask_metrics(["yes"], ["yes"])


def test_mme_layout_and_scores(tmp_path):
    root = write_mme(tmp_path / "MME")
    items = B.load_mme(str(root), prompt=B.BENCHMARKS["mme"].prompt)
    assert [(it["subtask"], it["id"], it["ref_text"]) for it in items] == [
        ("count", "c1.png", "Yes"), ("count", "c1.png", "No"), ("existence", "e1.png", "Yes"),
        ("existence", "e1.png", "No"), ("existence", "e2.png", "Yes"), ("existence", "e2.png", "No")]
    assert items[0]["request"]["images"] == [str(root / "MME_Benchmark_release_version/count/c1.png")]
    assert items[2]["request"]["images"] == [str(root / "images/existence/e1.png")]
    assert len(B.load_mme(str(root), prompt="{text}", limit=1)) == 4   # one image (two questions) per subtask

    hyps = ["Yes", "Yes",                 # count: 1 of 2 right, no image fully right -> 50 + 0
            "yes", "No", "Yes", "yes"]    # existence: 3 of 4, one image of two -> 75 + 50
    table = B.score_mme(items, [{"ok": True, "hyp": h} for h in hyps])
    assert table["mme/count"] == pytest.approx({"acc": 0.5, "acc_plus": 0.0, "score": 50.0, "n": 2,
                                               "n_failed": 0})
    assert table["mme/existence"]["score"] == pytest.approx(125.0)
    assert table["mme/perception"] == pytest.approx({"score": 175.0, "subtasks": 2, "n": 6})
    assert "mme/cognition" not in table


def test_mme_missing_image_is_named(tmp_path):
    root = write_mme(tmp_path / "MME")
    (root / "images/existence/e2.png").unlink()
    with pytest.raises(configlib.ConfigError, match="e2.png of existence not found"):
        B.load_mme(str(root), prompt="{text}")


# ---- LibriSpeech WER (the reference's compute-wer) -----------------------------------------------------------

def test_compute_wer_words():
    assert scoring.compute_wer_words("Hi, <unk>there!") == ["HI,", "THERE!"]   # '!' and ',' kept inside a word
    assert scoring.compute_wer_words(", hello ! world") == ["HELLO", "WORLD"]  # dropped where a word would start
    assert scoring.compute_wer_words("a<b>c") == ["AC"]                       # tags removed inside a word
    assert scoring.compute_wer_words("你好 world") == ["你", "好", "WORLD"]      # a CJK letter is a word
    assert scoring.compute_wer_words("naïve café.") == ["NA", "ÏVE", "CAF", "É."]  # non-ASCII ends an ASCII run
    assert scoring.compute_wer_words("  \t ") == []


def test_edit_counts_tie_break_as_compute_wer():
    assert scoring.edit_counts(["A", "B", "C"], ["A", "X", "C", "D"]) == (1, 0, 1)
    assert scoring.edit_counts(["A", "B"], ["B", "A"]) == (0, 1, 1)   # not two substitutions: deletion first
    assert scoring.edit_counts([], ["A"]) == (0, 0, 1)
    assert scoring.edit_counts(["A", "B"], []) == (0, 2, 0)


def test_librispeech_wer_by_hand():
    refs = ["HE HOPED THERE WOULD BE STEW", "STUFF IT INTO YOU"]
    hyps = ["he hoped there would be stew.", "stuff it in-to you his"]
    # 'STEW.' keeps its period (compute-wer drops only ! , ? and CJK marks): 1 substitution; the hyphen goes
    # from the hypothesis (evaluate_asr.py): 'INTO' matches, 'HIS' is inserted. 2 errors / 10 words.
    refs_w = [scoring.librispeech_words(r, hypothesis=False) for r in refs]
    hyps_w = [scoring.librispeech_words(h, hypothesis=True) for h in hyps]
    assert scoring.corpus_wer(refs_w, hyps_w) == {"wer": 0.2, "words": 10, "sub": 1, "del": 0, "ins": 1}
    with pytest.raises(ValueError, match="no reference words"):
        scoring.corpus_wer([[]], [["A"]])


def test_librispeech_layout_and_scores(tmp_path):
    root = write_librispeech(tmp_path / "test-clean")
    items = B.load_librispeech(str(root), prompt=B.BENCHMARKS["librispeech"].prompt)
    assert [(it["id"], it["ref_text"]) for it in items] == [("1089-134686-0000", "HE HOPED THERE WOULD BE STEW"),
                                                           ("1089-134686-0001", "STUFF IT INTO YOU")]
    assert items[0]["request"]["messages"][0]["content"] == "Convert the speech to text.\n<|audio|>"
    assert items[1]["request"]["audios"] == [str(root / "1089/134686/1089-134686-0001.flac")]
    preds = [{"ok": True, "hyp": "he hoped there would be stew."}, {"ok": False}]   # a failed one: all deleted
    row = B.score_librispeech(items, preds)["librispeech"]
    assert row == {"wer": 0.5, "words": 10, "sub": 1, "del": 4, "ins": 0, "n": 2, "n_failed": 1}
    (root / "1089/134686/1089-134686-0001.flac").unlink()
    with pytest.raises(configlib.ConfigError, match="1089-134686-0001.flac is not beside it"):
        B.load_librispeech(str(root), prompt="x")


# ---- LibriTTS: Whisper's English normaliser and the Whisper judge -------------------------------------------

@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    from tests.helpers.whisper import write_tiny_whisper

    return write_tiny_whisper(tmp_path_factory.mktemp("whisper"), only_word="hello", max_new_tokens=2)


def test_whisper_english_words(whisper_dir):
    from pipelines.eval.whisper import english_normalizer

    norm = english_normalizer(str(whisper_dir))   # its normalizer.json maps colour -> color
    assert scoring.whisper_english_words("The colour of Mr. Smith's 2 cats, twenty-one!", norm) == [
        "THE", "COLOR", "OF", "MISTER", "SMITH", "IS", "2", "CATS", "21"]
    assert scoring.whisper_english_words("Um, hello [noise] (laughs) world...", norm) == ["HELLO", "WORLD"]


def test_whisper_judge_audio_to_wer(whisper_dir, tmp_path):
    """Audio in -> the tiny Whisper (which can only say 'hello', twice) -> text out -> LibriTTS WER."""
    from pipelines.eval.whisper import WhisperJudge

    judge = WhisperJudge(str(whisper_dir))
    rng = np.random.default_rng(0)
    wavs = [0.1 * rng.standard_normal(24_000).astype(np.float32), np.zeros(0, np.float32),
            0.1 * rng.standard_normal(36_000).astype(np.float32)]
    heard = judge.transcribe(wavs, sample_rate=24_000)
    assert heard == ["hello hello", "", "hello hello"]

    root = write_libritts(tmp_path / "tts", {"1_1_1_1": "Hello, hello!", "1_1_1_2": "Hello world.",
                                             "1_1_1_3": "Hello world."})
    items = B.load_libritts(str(root), prompt=B.BENCHMARKS["libritts"].prompt)
    assert [it["spoken"] for it in items] == ["Hello, hello!", "Hello world.", "Hello world."]
    assert items[1]["request"]["messages"][0]["content"] == "Convert the text to speech.\nHello world."
    preds = [{"ok": True, "transcript": t, "speech_frames": 0 if not t else 75} for t in heard]
    row = B.score_libritts(items, preds, asr_model=str(whisper_dir))["libritts"]
    # words 2 + 2 + 2; item 2 produced no speech: 2 deletions; item 3: 'world' -> 'hello': 1 substitution
    assert row["wer"] == pytest.approx(3 / 6) and row["wer_spoken"] == pytest.approx(1 / 4)
    assert (row["n"], row["n_no_speech"], row["sub"], row["del"], row["ins"]) == (3, 1, 1, 2, 0)


def test_whisper_judge_needs_a_local_folder(tmp_path):
    from pipelines.eval.whisper import WhisperJudge

    with pytest.raises(configlib.ConfigError, match="not a local folder"):
        WhisperJudge(str(tmp_path / "nowhere"))


def test_benchmark_names_and_prompts():
    with pytest.raises(configlib.ConfigError, match="benchmarks: \\['pope', 'mme', 'librispeech', 'libritts'\\]"):
        B.get("vqav2")
    pope = B.get("pope")
    assert B.prompt_for(pope, "reference") == "{text}\n<|image|>" and B.prompt_for(pope, "template") == "template"
    with pytest.raises(configlib.ConfigError, match="must contain \\{text\\}"):
        B.prompt_for(pope, "<|image|> Answer.")
