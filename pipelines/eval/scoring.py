"""Evaluation metrics as pure functions: WER, exact match, option accuracy, image classifier accuracy.

Text normalization follows the usual ASR scoring recipe (the reference's `compute-wer` step is a
Kaldi-style WER over normalized words): lower-case, strip punctuation except apostrophes inside words,
collapse whitespace. Both references and hypotheses go through the same function.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import jiwer
import numpy as np

_PUNCT = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """'Seven!' -> 'seven'; "It's  a  7." -> "it's a 7"."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (total edits / total reference words) on normalized text. An empty hypothesis counts every
    reference word as deleted; an empty reference is skipped (WER is undefined for it)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        raise ValueError("no non-empty reference to score")
    refs = [r for r, _ in pairs]
    hyps = [h if h else "<empty>" for _, h in pairs]  # jiwer rejects empty strings; a non-word counts as edits
    out = jiwer.process_words(refs, hyps)
    errors = out.substitutions + out.deletions + out.insertions
    # an "<empty>" placeholder adds one substitution instead of a deletion: same count
    return errors / sum(len(r.split()) for r in refs)


def exact_match(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference after normalization."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("nothing to score")
    return float(np.mean([normalize_text(r) == normalize_text(h) for r, h in zip(references, hypotheses)]))


def option_accuracy(answers: Sequence[str], hypotheses: Sequence[str], options: Sequence[Sequence[str]]) -> float:
    """Multiple choice: the hypothesis picks the option it names (a letter 'B', or the option's text); accuracy
    is the fraction of picks equal to the correct answer. A hypothesis naming no option is wrong."""
    correct = 0
    for ans, hyp, opts in zip(answers, hypotheses, options):
        correct += pick_option(hyp, opts) == normalize_text(ans)
    return correct / max(len(answers), 1)


def pick_option(hypothesis: str, options: Sequence[str]) -> str | None:
    h = normalize_text(hypothesis)
    norm = [normalize_text(o) for o in options]
    letters = [chr(ord("a") + i) for i in range(len(options))]
    first = h.split(" ")[0] if h else ""
    if first in letters:
        return norm[letters.index(first)]
    for o in norm:
        if o and (h == o or h.startswith(o + " ")):
            return o
    return None


@dataclass
class ImageClassifier:
    """A classifier fitted on real training images only, used to judge generated images (for the demo digits:
    logistic regression on the raw pixels, ~96% on real held-out digits)."""
    model: object
    shape: tuple[int, ...]

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32).reshape(len(images), -1) / 255.0  # (B, H*W*C)
        return self.model.predict(x)

    def accuracy(self, images: np.ndarray, labels: Sequence[int]) -> float:
        if len(images) == 0:
            raise ValueError("no images to score")
        return float(np.mean(self.predict(images) == np.asarray(labels)))


def fit_image_classifier(images: np.ndarray, labels: Sequence[int], *, seed: int = 0) -> ImageClassifier:
    from sklearn.linear_model import LogisticRegression

    images = np.asarray(images)
    x = images.astype(np.float32).reshape(len(images), -1) / 255.0  # (B, H*W*C)
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(x, np.asarray(labels))
    return ImageClassifier(clf, tuple(images.shape[1:]))
