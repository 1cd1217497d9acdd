"""Evaluation metrics as pure functions: WER, exact match, option accuracy, image classifier accuracy.

One text normaliser per protocol, each named:
    normalize_text         the demo's tasks (`wer`, `exact_match`): lower-case, punctuation stripped except
                           apostrophes inside words, whitespace collapsed; both sides alike.
    librispeech_words      LibriSpeech ASR WER as the reference scores it: hyphens dropped from the hypothesis
                           (tools/evaluate_asr.py), then both sides split into words as `compute-wer.py
                           --char=1` does (`compute_wer_words`).
    whisper_english_words  TTS WER judged by Whisper (LibriTTS protocol): Whisper's English text normaliser,
                           every run of non-word characters to one space, then `compute_wer_words`.
`corpus_wer` counts edits over word lists as compute-wer.py does (total edits / total reference words).
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import jiwer
import numpy as np

_NON_WORD = re.compile(r"\W+")
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


# ---- the reference's WER protocol (tools/compute-wer.py --char=1, case-insensitive) ----------------------

# compute-wer.py drops these only where a token would start; attached to a word they stay part of it
_CW_PUNCTS = frozenset("!,?、。！，；？：「」︰『』《》")
_CW_SPACES = frozenset(" \t\r\n")


def compute_wer_words(text: str) -> list[str]:
    """Words as `compute-wer.py --char=1` reads a line (case-insensitive, tags removed): a CJK letter
    (category Lo) is a word of its own; any other run ends at a space or a non-ASCII character; '<...>' is one
    tag, then removed; a token may not start with one of `_CW_PUNCTS` (dropped there, kept inside a word: 'hi,'
    stays 'HI,'); upper-cased. "Hi, <unk>there!" -> ['HI,', 'THERE!']."""
    words, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        cat = unicodedata.category(ch)
        if ch in _CW_PUNCTS or ch in _CW_SPACES or cat in ("Zs", "Cn"):
            i += 1
            continue
        if cat == "Lo":
            words.append(ch)
            i += 1
            continue
        stop = ">" if ch == "<" else " "
        j = i + 1
        while j < n and ord(text[j]) < 128 and text[j] not in _CW_SPACES and text[j] != stop:
            j += 1
        if j < n and text[j] == ">":
            j += 1
        words.append(text[i:j])
        i = j
    out = []
    for w in words:
        w = re.sub(r"<[^>]*(>|$)", "", w.upper())   # compute-wer's stripoff_tags (remove_tag on by default)
        if w:
            out.append(w)
    return out


def librispeech_words(text: str, *, hypothesis: bool) -> list[str]:
    """LibriSpeech test-clean: the reference drops '-' from the hypothesis only (its transcripts have none)."""
    return compute_wer_words(text.replace("-", "") if hypothesis else text)


def whisper_english_words(text: str, normalizer) -> list[str]:
    """LibriTTS judged by Whisper: `normalizer` (transformers' EnglishTextNormalizer), non-word runs to a
    space, compute-wer words."""
    return compute_wer_words(_NON_WORD.sub(" ", normalizer(text)))


def edit_counts(ref: Sequence[str], hyp: Sequence[str]) -> tuple[int, int, int]:
    """(substitutions, deletions, insertions) of a minimum edit alignment of `hyp` to `ref`. Ties resolve as in
    compute-wer.py (deletion, then insertion, then substitution), so the split matches it; the total is the
    Levenshtein distance either way."""
    # cost[j] / ops[j] hold row i of the DP: (distance, (sub, del, ins)) aligning ref[:i] with hyp[:j]
    prev = [(j, (0, 0, j)) for j in range(len(hyp) + 1)]
    for i in range(1, len(ref) + 1):
        row = [(i, (0, i, 0))]
        for j in range(1, len(hyp) + 1):
            d_cost, (s, d, n_ins) = prev[j]
            best = (d_cost + 1, (s, d + 1, n_ins))
            i_cost, (s, d, n_ins) = row[j - 1]
            if i_cost + 1 < best[0]:
                best = (i_cost + 1, (s, d, n_ins + 1))
            m_cost, (s, d, n_ins) = prev[j - 1]
            same = ref[i - 1] == hyp[j - 1]
            if m_cost + (not same) < best[0]:
                best = (m_cost + (not same), (s + (not same), d, n_ins))
            row.append(best)
        prev = row
    return prev[-1][1]


def corpus_wer(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus WER over word lists as compute-wer.py's "Overall" line: (S + D + I) / reference words, summed
    over every utterance (an utterance with no reference words adds its insertions). Returns {"wer", "words",
    "sub", "del", "ins"}."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    sub = dele = ins = words = 0
    for r, h in zip(references, hypotheses):
        s, d, i = edit_counts(r, h)
        sub, dele, ins, words = sub + s, dele + d, ins + i, words + len(r)
    if words == 0:
        raise ValueError("no reference words to score")
    return {"wer": (sub + dele + ins) / words, "words": words, "sub": sub, "del": dele, "ins": ins}
