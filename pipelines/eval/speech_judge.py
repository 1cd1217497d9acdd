"""A judge of generated speech that does not share the model: a classifier of speech codes fitted on real
labelled recordings only.

The demo's offline EnCodec has an untrained decoder, so generated speech cannot be judged as audio; it is
judged as codes, in the code space the tokenizer gives real recordings. Features: per clip, the code
histogram (square-rooted frequencies) of each of `segments` equal time slices, every codebook; a logistic
regression on them. Fitted on the training voices' clips, it names the digit of 95% of the demo's held-out
voices' clips (120 clips; a single slice, a bag of codes, also 95%; the mean codebook vector of 3 slices
97.5% but needs the tokenizer's weights). Its accuracy on real held-out clips is reported beside every score
it gives: the ceiling the generator is judged against.

Data (`speech_training_set`): a messages JSONL (lines of a speech-answer task, e.g. tts, with a "label": the
answer's recording, encoded by the export's speech tokenizer, each file once) or a tokenize output folder
(the answer's audio span of such samples, already codes: nothing to encode).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


SEGMENTS = 2   # 1, 2, 3, 4, 6 slices: 95.0, 95.0, 94.2, 95.8, 95.0% on the demo's held-out voices


def code_features(codes: np.ndarray, codebook_size: int, segments: int = SEGMENTS) -> np.ndarray:
    """Codes (n_q, T) -> (segments * n_q * codebook_size,) float32: sqrt of each slice's code frequencies per
    codebook. A clip shorter than `segments` frames repeats itself in every slice; an empty clip is all zeros."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"speech codes must be (n_q, T), got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"speech codes outside [0, {codebook_size})")
    n_q, T = codes.shape
    out = np.zeros((segments, n_q, codebook_size), dtype=np.float32)  # (S, n_q, K)
    for s in range(segments):
        part = codes[:, s * T // segments:(s + 1) * T // segments] if T >= segments else codes  # (n_q, T_s)
        for q in range(n_q):
            h = np.bincount(part[q], minlength=codebook_size).astype(np.float32)
            out[s, q] = np.sqrt(h / max(h.sum(), 1.0))
    return out.reshape(-1)  # (S * n_q * K,)


@dataclass
class SpeechClassifier:
    """Labels of speech-code clips (see the module docstring)."""
    model: Any
    codebook_size: int
    segments: int = SEGMENTS

    def features(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([code_features(c, self.codebook_size, self.segments) for c in clips])  # (B, F)

    def predict(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """A label per clip; -1 (no class) for an empty clip: a generator that wrote no speech said nothing."""
        clips = list(clips)
        if not clips:
            return np.zeros(0, dtype=np.int64)
        pred = np.asarray(self.model.predict(self.features(clips)), dtype=np.int64)
        return np.where([np.asarray(c).size > 0 for c in clips], pred, -1)

    def accuracy(self, clips: Sequence[np.ndarray], labels: Sequence[int]) -> float:
        if len(clips) == 0:
            raise ValueError("no speech clips to score")
        return float(np.mean(self.predict(clips) == np.asarray(labels)))


def fit_speech_classifier(clips: Sequence[np.ndarray], labels: Sequence[int], codebook_size: int, *,
                          segments: int = SEGMENTS, seed: int = 0) -> SpeechClassifier:
    """Fit on real clips (codes (n_q, T)) and their labels; deterministic (lbfgs, fixed seed)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    if len(clips) != len(labels):
        raise ValueError(f"{len(clips)} clips but {len(labels)} labels")
    if len(set(labels.tolist())) < 2:
        raise ValueError(f"the speech judge needs clips of at least 2 labels, got {len(clips)} clips of "
                         f"{len(set(labels.tolist()))}")
    judge = SpeechClassifier(None, codebook_size, segments)
    judge.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=seed))
    judge.model.fit(judge.features(clips), labels)
    return judge


def encode_clips(speech: Any, wavs: Sequence[np.ndarray], batch_size: int = 16) -> list[np.ndarray]:
    """Waveforms -> codes (n_q, T) each, in batches of similar length (a batch pads to its longest clip:
    sorted batches of 16 encode the demo's 600 clips in 12.5 s, unsorted ones of 32 in 19.5 s)."""
    out: list[np.ndarray | None] = [None] * len(wavs)
    order = np.argsort([len(w) for w in wavs], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, codes in zip(idx, speech.encode_batch([wavs[i] for i in idx])):
            out[i] = codes
    return out  # type: ignore[return-value]


def speech_training_set(data: str, tokenizers: Any, tasks: Sequence[str] = ("tts",)
                        ) -> tuple[list[np.ndarray], np.ndarray]:
    """Real labelled clips (codes (n_q, T)) of `data`: the answer recordings of `tasks` lines/samples that carry
    an integer "label" (the answer says its label), each recording once."""
    # evaluate imports this module: its helpers are imported at call time
    from pipelines.eval.evaluate import _label, is_shards, jsonl_objects

    clips: list[np.ndarray] = []
    labels: list[int] = []
    if is_shards(data):
        from tokenize_jobs.shards import iter_samples

        v = tokenizers.vocab
        seen: set[bytes] = set()
        for sample in iter_samples(data):
            label = _label(sample["meta"].get("label"))
            if sample["meta"].get("task") not in tasks or label is None:
                continue
            ids, mask = sample["input_ids"].astype(np.int64), sample["answer_mask"].astype(bool)
            answer = ids[mask]
            starts, ends = np.flatnonzero(answer == v.boa_id), np.flatnonzero(answer == v.eoa_id)
            if not starts.size or not ends.size or ends[-1] <= starts[0]:
                continue
            span = answer[starts[0] + 1: ends[ends > starts[0]][0]]
            if span.tobytes() not in seen:
                seen.add(span.tobytes())
                clips.append(v.audio_codes(span))   # (n_q, T)
                labels.append(label)
    else:
        from pipelines.infer.generate import input_base_dir
        from pipelines.infer.predictor import read_media

        base = input_base_dir(data)
        paths: dict[str, int] = {}
        for line in jsonl_objects(data, "speech judge data"):
            if line.get("task") not in tasks:
                continue
            label = _label(line.get("label"))
            audios = line.get("audios") or []
            if label is not None and audios:
                paths.setdefault(audios[-1], label)   # the answer's recording is the line's last audio
        speech = tokenizers.speech
        clips = encode_clips(speech, [speech.load(read_media(p, base, "audio"), source=p) for p in paths])
        labels = list(paths.values())
    if len(set(labels)) < 2:
        raise ValueError(f"speech judge data {data}: needs labelled {'/'.join(tasks)} recordings of at least 2 "
                         f"labels, found {len(clips)} of {len(set(labels))}")
    return clips, np.asarray(labels, dtype=np.int64)
