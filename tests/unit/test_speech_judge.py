"""The TTS judge (pipelines/eval/speech_judge.py) on the committed espeak-ng clips: fitted on the training voices,
it names the digit of the held-out voices' clips; with shuffled labels, or on noise, it is at chance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from demo.corpus import SPEECH_DIR, load_speech_index
from model.tokenizers.speech import EncodecTokenizer
from pipelines.eval.speech_judge import (
    SEGMENTS,
    code_features,
    encode_clips,
    fit_speech_classifier,
    speech_training_set,
)

CODEBOOK = 256   # the demo's speech tokenizer: one codebook of 256 codes (configs/demo/demo.yaml)
# Measured with this file's tokenizer: 95.8% of the 120 held-out clips (the demo's own tokenizer: 95.0%).
HELD_OUT_FLOOR = 0.88


@pytest.fixture(scope="module")
def clips():
    """Every digit clip as codes of an offline EnCodec like the demo's (fitted on 64 training clips)."""
    torch.set_num_threads(1)
    index = [c for c in load_speech_index() if c.kind == "digit"]
    tok = None
    wavs = []
    for c in index:
        data = (SPEECH_DIR / c.path).read_bytes()
        if tok is None:   # `load` (read + resample to 24 kHz) does not use the codebooks: any instance reads
            tok = EncodecTokenizer.fit_offline([np.random.default_rng(0).normal(size=24_000).astype(np.float32)],
                                               bandwidth=1.5, codebooks=1, codebook_size=CODEBOOK)
        wavs.append(tok.load(data, source=c.path))
    train = [i for i, c in enumerate(index) if not c.held_out]
    fit = [wavs[i] for i in train[::7][:64]]   # every voice, speed and pitch
    tok = EncodecTokenizer.fit_offline(fit, bandwidth=1.5, codebooks=1, codebook_size=CODEBOOK, kmeans_iters=10,
                                       fit_samples=64)
    codes = encode_clips(tok, wavs)
    held = [i for i, c in enumerate(index) if c.held_out]
    labels = np.array([c.digit for c in index])
    return {"tok": tok, "train": ([codes[i] for i in train], labels[train]),
            "held": ([codes[i] for i in held], labels[held])}


def test_judge_names_the_digit_of_held_out_voices(clips):
    (x, y), (hx, hy) = clips["train"], clips["held"]
    assert len(x) == 480 and len(hx) == 120
    judge = fit_speech_classifier(x, y, CODEBOOK)
    assert judge.accuracy(hx, hy) >= HELD_OUT_FLOOR
    again = fit_speech_classifier(x, y, CODEBOOK)   # deterministic: the same fit, the same predictions
    assert (again.predict(hx) == judge.predict(hx)).all()


def test_judge_is_at_chance_with_shuffled_labels(clips):
    (x, y), (hx, hy) = clips["train"], clips["held"]
    accs = [fit_speech_classifier(x, np.random.default_rng(s).permutation(y), CODEBOOK).accuracy(hx, hy)
            for s in range(3)]
    assert np.mean(accs) <= 0.2, accs   # chance is 0.1


def test_judge_is_at_chance_on_noise(clips):
    (x, y) = clips["train"]
    judge = fit_speech_classifier(x, y, CODEBOOK)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, CODEBOOK, size=(1, int(rng.integers(18, 66)))) for _ in range(200)]  # random codes
    labels = np.arange(200) % 10
    assert judge.accuracy(noise, labels) <= 0.2
    # white noise through the tokenizer: one class (or a few) for everything, not the digit
    wavs = [rng.normal(scale=0.1, size=int(rng.integers(6_000, 16_000))).astype(np.float32) for _ in range(40)]
    assert judge.accuracy(encode_clips(clips["tok"], wavs), np.arange(40) % 10) <= 0.25


def test_empty_clip_names_no_label(clips):
    judge = fit_speech_classifier(*clips["train"], CODEBOOK)
    assert judge.predict([np.zeros((1, 0), dtype=np.int64), clips["held"][0][0]])[0] == -1


def test_code_features():
    codes = np.array([[0, 0, 1, 3]])
    f = code_features(codes, 4, segments=2).reshape(2, 1, 4)   # (S, n_q, K)
    assert np.allclose(f[0, 0], [1, 0, 0, 0]) and np.allclose(f[1, 0], np.sqrt([0, 0.5, 0, 0.5]))
    assert code_features(np.array([[2]]), 4).reshape(SEGMENTS, 4)[:, 2].tolist() == [1.0] * SEGMENTS   # short
    assert not code_features(np.zeros((1, 0), dtype=np.int64), 4).any()
    with pytest.raises(ValueError, match="outside"):
        code_features(np.array([[4]]), 4)
    with pytest.raises(ValueError, match="n_q, T"):
        code_features(np.array([1, 2]), 4)


def test_training_set_from_jsonl_reads_each_answer_recording_once(clips, tmp_path):
    """Only lines of a speech-answer task with a label count; a recording used by two lines is encoded once."""
    index = [c for c in load_speech_index() if c.kind == "digit" and not c.held_out][:3]
    lines = [{"task": "tts", "label": c.digit, "audios": [str(SPEECH_DIR / c.path)],
              "messages": [{"role": "user", "content": f"Read this aloud: {c.text}"},
                           {"role": "assistant", "content": "<|audio|>"}]} for c in index]
    lines += [lines[0], {**lines[1], "task": "asr"}, {**lines[2], "label": None}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")

    class Tokenizers:
        speech = clips["tok"]
    codes, labels = speech_training_set(str(path), Tokenizers())
    assert labels.tolist() == [c.digit for c in index]
    assert all(c.shape[0] == 1 and c.shape[1] > 10 for c in codes)


def test_eval_scores_tts_by_the_judge_beside_its_real_ceiling():
    """`omnidiff eval`'s tts row: judge_accuracy over every labelled item (a failed generation is wrong),
    judge_real_accuracy on the reference recordings, and the own-ASR metrics unchanged."""
    from pipelines.eval.evaluate import task_metrics

    rng = np.random.default_rng(0)
    clip = lambda d: (d * 3 + rng.integers(0, 3, size=(1, 20))).astype(np.int64)  # digit d: codes 3d..3d+2
    judge = fit_speech_classifier([clip(d) for d in range(4) for _ in range(5)], np.repeat(np.arange(4), 5), 12)
    items = [{"idx": i, "task": "tts", "label": d, "spoken": ["zero", "one", "two", "three"][d]}
             for i, d in enumerate([0, 1, 2, 3])]
    preds = [{"ok": True, "audio_codes": clip(0).tolist(), "transcript": "zero"},
             {"ok": True, "audio_codes": clip(2).tolist(), "transcript": "one"},    # says two: wrong
             {"ok": True, "audio_codes": clip(2).tolist(), "transcript": "two"},
             {"ok": False}]                                                       # failed: wrong
    real = {0: clip(0), 1: clip(1), 2: clip(2), 3: clip(1)}                     # one real clip misheard
    m = task_metrics("tts", items, preds, speech_judge=judge, real_speech=real)
    assert m["judge_accuracy"] == 0.5 and m["judge_real_accuracy"] == 0.75
    assert m["exact_match"] == 0.75 and m["n"] == 4 and m["n_failed"] == 1
    assert "judge_accuracy" not in task_metrics("tts", items, preds)            # no judge given: own ASR only
