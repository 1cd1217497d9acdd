import numpy as np
import pytest

from pipelines.eval.scoring import exact_match, fit_image_classifier, normalize_text, option_accuracy, pick_option, wer


def test_normalize():
    assert normalize_text("  Seven!! ") == "seven"
    assert normalize_text("It's  a 'seven'.") == "it's a seven"


def test_wer_known_values():
    assert wer(["the cat sat"], ["the cat sat"]) == 0.0
    assert wer(["the cat sat"], ["the dog sat"]) == pytest.approx(1 / 3)
    assert wer(["the cat sat"], ["the cat"]) == pytest.approx(1 / 3)          # one deletion
    assert wer(["a b", "c d e f"], ["a b", "c x e f g"]) == pytest.approx(2 / 6)  # corpus-level: sub + ins
    assert wer(["seven"], [""]) == 1.0                                         # empty hypothesis
    assert wer(["Seven."], ["seven"]) == 0.0                                   # normalized
    with pytest.raises(ValueError):
        wer(["a"], ["a", "b"])


def test_exact_match_and_options():
    assert exact_match(["seven", "two"], ["Seven", "three"]) == 0.5
    opts = ["red", "green", "blue"]
    assert pick_option("B", opts) == "green"
    assert pick_option("blue.", opts) == "blue"
    assert pick_option("purple", opts) is None
    assert option_accuracy(["green", "red"], ["b", "green"], [opts, opts]) == 0.5


def test_image_classifier_on_real_digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    imgs = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
    clf = fit_image_classifier(imgs[:1400], d.target[:1400])
    assert clf.accuracy(imgs[1400:], d.target[1400:]) > 0.9
    noise = np.random.default_rng(0).integers(0, 256, size=(100, 8, 8, 1), dtype=np.uint8)
    assert clf.accuracy(noise, np.zeros(100, int)) < 0.5
