"""`make demo`'s CI variant: the same code path as the full demo (corpus -> Ray Data tokenize -> Ray Train FSDP2
on 2 gloo workers with MLflow -> held-out eval -> gallery), on the 10-image corpus with a few training steps.
It cannot show that the model learned (tests/slow/test_demo_full.py does); it shows that every stage runs, that
results.json has the keys other tools read, and that the training loss falls."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import ray

from demo import run as demo

TASKS = {"i2t", "asr", "t2i", "s2i", "tts", "tts_asr", "svqa"}   # tts_asr: TTS by its own ASR


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """One --small run, in a Ray this test starts (the demo reuses an initialized Ray and leaves it running)."""
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    out = tmp_path_factory.mktemp("demo") / "run"
    try:
        # A 40-step run under a budget it cannot meet: the trainer times steps 2-24 and stops at 24, the end
        # of its probe (deterministic on any host).
        rc = demo.main(["--small", "--out", str(out), "--steps", "40", "train.log_every=4",
                        "--set", "time.budget_s=0.01", "--set", "time.probe_steps=23"])
        assert ray.is_initialized()   # the demo did not shut down a Ray it did not start
    finally:
        ray.shutdown()
    return rc, out


def test_small_demo_runs_end_to_end(small_demo):
    rc, out = small_demo
    assert rc == 0
    for stage_output in ("corpus/train.jsonl", "tok/manifest.json", "train/mlflow.db",
                         "train/export/model.safetensors", "eval/results.json", "eval/predictions.jsonl"):
        assert (out / stage_output).is_file(), stage_output


def test_results_json_has_the_agreed_keys(small_demo):
    _, out = small_demo
    results = json.loads((out / "results.json").read_text())
    assert {"wall_seconds", "tasks", "classifier_accuracy_on_real_heldout"} <= set(results)
    assert results["wall_seconds"] > 0
    assert set(results["tasks"]) == TASKS
    for task, metrics in results["tasks"].items():
        assert 0.0 <= metrics["accuracy"] <= 1.0, task
        assert metrics["n"] == 10, task            # small.eval_limit items of each task were judged
    assert 0.0 <= results["classifier_accuracy_on_real_heldout"] <= 1.0
    assert 0.0 <= results["tts_judge_real"] <= 1.0   # the speech judge on the real held-out clips
    assert "judge_accuracy" in results["tasks"]["tts"] and "exact_match" in results["tasks"]["tts_asr"]
    # speech-to-image writes the transcript first (corpus.s2i_transcript); the eval scores it beside the image
    assert 0.0 <= results["tasks"]["s2i"]["transcript_exact_match"] <= 1.0
    assert results["train"]["steps"] == 24 and results["train"]["max_steps"] == 40
    assert results["train"]["time_budget_s"] == 0.01   # a set budget wins over the one derived from the target
    assert results["mlflow"]["ui"].startswith("mlflow ui --backend-store-uri sqlite:///")


def test_training_loss_falls_and_mlflow_has_the_run(small_demo):
    from mlflow import MlflowClient

    _, out = small_demo
    results = json.loads((out / "results.json").read_text())
    loss = results["train"]["loss"]
    assert loss["logged"] == 6                     # train.log_every=4 over 24 steps
    assert loss["last"] < loss["first"] - 0.5
    client = MlflowClient(tracking_uri=results["mlflow"]["tracking_uri"])
    run = client.get_run(results["mlflow"]["run_id"])
    assert run.data.params["model.dim"] == str(results["train"]["model"]["dim"])
    assert "eval/i2t/exact_match" in run.data.metrics   # the eval logged onto the training run
    assert run.data.metrics["budget/steps"] == 24


def test_demo_gives_training_the_time_the_other_stages_leave():
    t = demo.TimeSection(target_s=600, train_overhead_s=45, after_train_steps=450, min_train_s=60)
    fitted = demo.time_budget(t, 95.0)
    assert (fitted.seconds, fitted.reserve_steps, fitted.probe_steps) == (460.0, 450, 20)
    assert demo.time_budget(t, 550.0).seconds == 60.0                        # the floor
    assert demo.time_budget(demo.TimeSection(), 95.0) is None                # no target: no budget
    set_budget = demo.TimeSection(target_s=600, budget_s=30.0)
    assert demo.time_budget(set_budget, 95.0).seconds == 30.0                # a set budget wins


def test_gallery_has_a_row_per_digit(small_demo):
    from PIL import Image

    _, out = small_demo
    for name in ("t2i.png", "s2i.png", "real_heldout.png"):
        grid = np.asarray(Image.open(out / "gallery" / name))
        assert grid.ndim == 2 and grid.shape[0] >= 10 * 8, name   # ten rows of upscaled 8x8 digits
    wavs = sorted(p.name for p in (out / "gallery" / "tts").glob("*.wav"))
    assert len(wavs) == 10 and wavs[0] == "0_zero.wav"
    heard = json.loads((out / "gallery" / "tts" / "heard.json").read_text())
    assert set(heard) == {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    # a digit the eval covered shows the eval's own clip and transcript (generated again only for the gaps)
    preds = [json.loads(x) for x in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    first = {}
    for p in preds:
        if p["task"] == "tts" and p["ok"]:
            first.setdefault(p["ref"], p)
    assert first
    for word, p in first.items():
        assert heard[word] == {"frames": p["speech_frames"], "asr_hears": p["transcript"]}
        assert len(p["audio_codes"][0]) == p["speech_frames"]


def test_compare_evaluates_the_run_with_the_plain_and_the_fast_sampler(small_demo, capsys):
    from demo import compare

    _, out = small_demo
    assert compare.main([str(out)]) == 0
    got = json.loads((out / "compare.json").read_text())
    assert set(got["plain"]) == set(got["fast"]) == {"i2t", "asr", "t2i", "s2i", "tts", "svqa"}
    for task, metrics in got["plain"].items():
        assert metrics["n"] == got["fast"][task]["n"] == 10 and metrics["n_failed"] == 0, task
    printed = capsys.readouterr().out
    assert all(f"\n{task} " in printed for task in got["plain"]) and "seconds: plain" in printed
    assert (out / "eval-fast" / "results.json").is_file()
