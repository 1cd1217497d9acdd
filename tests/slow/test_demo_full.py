"""The full `make demo` (about 10 minutes on 2 CPU cores), judged on held-out images and voices by judges
independent of the model (exact text; a digit classifier fitted on training images only; a speech-code classifier
fitted on the training voices' recordings only), and TTS also by the model's own ASR on the codes it generated
(`tts_asr`).

Two different numbers per direction. The measured floor is asserted: a few points under the worst full run of
the committed configuration, so a run below it is a regression. The quality bar (demo/run.py QUALITY_BAR) is
the target; image-to-text and TTS do not reach theirs within the demo's 10 minutes (docs/demo.md, "What limits
it"), so the bars are reported (printed and recorded as test properties), not asserted."""
from __future__ import annotations

import json

import pytest
import ray

from demo import run as demo

pytestmark = pytest.mark.slow

WALL_LIMIT_S = 600
# The worst of the committed configuration's full runs, all 2,050 steps, 120 items per task (training seeds 0
# and 1, seed 0 on AVX2 kernels, and sampler seeds 1 and 2 on seed 0's checkpoint; docs/demo.md "What to
# expect"): i2t 90.0%, ASR 93.3%, t2i 92.5%, s2i 82.5%, TTS by the speech judge 21.7%, by its own ASR 21.7%,
# svqa 57.5%. Each floor is 5-7 points under it (one item is 0.8 points; the sampler's randomness alone moves
# TTS by about +-6).
FLOORS = {"i2t": 0.85, "asr": 0.88, "t2i": 0.87, "s2i": 0.77, "tts": 0.15, "tts_asr": 0.16, "svqa": 0.50}


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    rc = demo.main(["--out", str(out)])
    assert not ray.is_initialized()   # the demo shut down the Ray it started
    return rc, json.loads((out / "results.json").read_text())


def test_full_demo_ran_every_direction(full_demo):
    rc, results = full_demo
    assert rc == 0
    assert set(results["tasks"]) == set(FLOORS)
    assert all(m["n"] == 120 and m["n_failed"] == 0 for m in results["tasks"].values()), results["tasks"]
    # the judges themselves are sound: near their accuracy on real held-out digits (95%) and clips (95%)
    assert results["classifier_accuracy_on_real_heldout"] >= 0.9
    assert results["tts_judge_real"] >= 0.9


@pytest.mark.parametrize("task", list(FLOORS))
def test_full_demo_holds_its_measured_floor(full_demo, task):
    _, results = full_demo
    train = results["train"]
    if train["steps"] < train["max_steps"]:
        pytest.skip(f"this host fitted {train['steps']} of {train['max_steps']} steps into the time target; the "
                    f"floors were measured with all of them (accuracy falls with the steps, docs/demo.md)")
    accuracy = {t: m["accuracy"] for t, m in results["tasks"].items()}
    assert accuracy[task] >= FLOORS[task], accuracy


def test_full_demo_reports_the_quality_bars(full_demo, record_property):
    """The bars are targets, not regression guards: the demo's own report of them must be right, and the test
    output shows where each direction stands."""
    _, results = full_demo
    assert set(results["quality_bar"]) == set(demo.QUALITY_BAR)
    for task, bar in demo.QUALITY_BAR.items():
        accuracy = results["tasks"][task]["accuracy"]
        assert results["quality_bar"][task] == {"bar": bar, "passed": accuracy >= bar}
        record_property(f"quality_bar.{task}", f"{accuracy:.3f} (bar {bar})")
        print(f"quality bar {task:<5} {100 * accuracy:5.1f}% of {100 * bar:.0f}%  "
              f"{'met' if accuracy >= bar else 'not met'}")


def test_full_demo_fits_the_time_target(full_demo):
    _, results = full_demo
    load = results["load_average"]
    if load["mean_1min"] > 1.5 * load["cpus"]:
        pytest.skip(f"machine busy (mean load {load['mean_1min']} on {load['cpus']} CPUs): wall time "
                    f"{results['wall_seconds']} s is not a measurement of the demo")
    assert results["wall_seconds"] <= WALL_LIMIT_S * max(1.0, 2 / load["cpus"]), results["stage_seconds"]
