"""The full `make demo` (about 10 minutes on 2 CPU cores) and its quality bar (issue 6): every direction learned,
judged on held-out images and voices by judges independent of the model (exact text; a digit classifier fitted
on training images only; the model's own ASR on the speech tokens it generated)."""
from __future__ import annotations

import json
import os

import pytest

from pipelines import demo

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

WALL_LIMIT_S = 600


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    rc = demo.main(["--out", str(out)])
    assert not ray.is_initialized()   # the demo shut down the Ray it started
    return rc, json.loads((out / "results.json").read_text())


def test_full_demo_meets_the_quality_bar(full_demo):
    rc, results = full_demo
    assert rc == 0
    acc = {task: m["accuracy"] for task, m in results["tasks"].items()}
    assert acc["i2t"] >= 0.95, acc
    assert acc["asr"] >= 0.90, acc
    assert acc["t2i"] >= 0.85, acc
    assert acc["s2i"] >= 0.85, acc
    assert acc["tts"] >= 0.80, acc
    assert results["tasks"]["i2t"]["n"] == 120 and results["tasks"]["asr"]["n"] == 120   # the whole held-out split
    # the image judge itself is sound: near logistic regression's ~96% on real held-out digits
    assert results["classifier_accuracy_on_real_heldout"] >= 0.9


def test_full_demo_fits_the_time_target(full_demo):
    _, results = full_demo
    load = results["load_average"]
    if load["mean_1min"] > 1.5 * load["cpus"]:
        pytest.skip(f"machine busy (mean load {load['mean_1min']} on {load['cpus']} CPUs): wall time "
                    f"{results['wall_seconds']} s is not a measurement of the demo")
    assert results["wall_seconds"] <= WALL_LIMIT_S * max(1.0, 2 / load["cpus"]), results["stage_seconds"]
