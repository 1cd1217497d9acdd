"""The export as a registered MLflow pyfunc model (common/tracking/models.py, pipelines/infer/pyfunc.py): logged
on a run of a real sqlite store, registered, loaded back with `mlflow.pyfunc.load_model("models:/...")`, and
asked one request of every task; the evaluation table lands on the registered version."""
from __future__ import annotations

import base64
import io

import mlflow
import numpy as np
import pytest
import soundfile as sf
from mlflow import MlflowClient
from PIL import Image

from common import tracking
from model.tasks import TASKS
from model.tokenizers.base import BadInput
from pipelines.infer.pyfunc import OmniDiffusionModel, _records, media_item
from pipelines.train.config import TrainConfig
from tests.helpers.export import digit_png, wav_bytes, write_debug_export, write_media

NAME = "omni-diffusion-test"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("pyfunc")
    export = write_debug_export(root / "export")
    uri = f"sqlite:///{root}/mlflow.db"
    said = []
    t = tracking.Tracker(uri, "pyfunc", "run", say=said.append)
    run_id = t.start(None, TrainConfig())
    t.log_model(str(export), NAME, OmniDiffusionModel())
    t.end()
    assert any("registered as model" in s for s in said), said
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri, run_id, export, root
    mlflow.set_tracking_uri(previous)


def test_registered_version_carries_the_export_and_answers_every_task(registered):
    uri, run_id, _, root = registered
    client = MlflowClient(tracking_uri=uri)
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert str(version.version) == "1" and version.run_id == run_id
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1", model_config={"overrides": ["steps=2"], "device": "cpu"})
    assert {c.name for c in model.metadata.get_input_schema().inputs} == {"task", "text", "image", "audio"}

    media = write_media(root / "media")
    png_b64 = base64.b64encode(digit_png(3)).decode()
    wav_b64 = base64.b64encode(wav_bytes(0.3, 400.0)).decode()
    requests = [
        {"task": "t2i", "text": "a handwritten seven"},
        {"task": "i2t", "image": png_b64},
        {"task": "vqa", "image": str(media["seven.png"]), "text": "Which digit is this?"},
        {"task": "asr", "audio": str(media["seven.wav"])},
        {"task": "tts", "text": "seven"},
        {"task": "s2i", "audio": wav_b64},
        {"task": "svqa", "image": png_b64, "audio": str(media["question.wav"])},
        {"task": "text", "text": "Count to three."},
        {"task": "sqa", "audio": str(media["question.wav"])},
    ]
    assert {r["task"] for r in requests} == set(TASKS)          # one request of every task
    import pandas as pd

    out = model.predict(pd.DataFrame(requests))
    assert list(out["task"]) == [r["task"] for r in requests]
    rows = {r["task"]: r for r in out.to_dict(orient="records")}
    tokenizers_size = None
    for task in ("t2i", "s2i"):
        img = Image.open(io.BytesIO(base64.b64decode(rows[task]["image_png_base64"])))
        tokenizers_size = tokenizers_size or img.size
        assert img.format == "PNG" and img.size == tokenizers_size and img.size[0] > 1
    wav, sr = sf.read(io.BytesIO(base64.b64decode(rows["tts"]["audio_wav_base64"])))
    assert sr == rows["tts"]["sample_rate"] == 24_000 and wav.ndim == 1
    for task in ("i2t", "vqa", "asr", "text"):
        assert isinstance(rows[task]["text"], str), task
        assert pd.isna(rows[task]["image_png_base64"]) and pd.isna(rows[task]["audio_wav_base64"])
    for task in ("svqa", "sqa"):      # spoken answers: text, then speech after <boa>
        assert isinstance(rows[task]["text"], str) and pd.isna(rows[task]["image_png_base64"]), task

    # a single dict is one request, as is a one-row dict of columns
    one = model.predict({"task": "i2t", "image": png_b64})
    assert len(one) == 1 and isinstance(one["text"][0], str)


def test_eval_results_become_the_registered_versions_description(registered):
    uri, run_id, _, _ = registered
    results = {"step": 12, "tasks": {"t2i": {"accuracy": 0.9, "n": 10}, "asr": {"wer": 0.25, "n": 10}}}
    tracking.log_results(uri, run_id, results, step=12)
    client = MlflowClient(tracking_uri=uri)
    v = client.get_model_version(NAME, "1")
    assert "| task | accuracy | n | wer |" in v.description and "| asr |  | 10 | 0.25 |" in v.description
    assert v.tags["eval/t2i/accuracy"] == "0.9" and v.tags["eval/asr/wer"] == "0.25"


def test_bad_requests_name_the_fault(tmp_path):
    with pytest.raises(BadInput, match="needs a \"task\""):
        _records([{"text": "no task"}])
    with pytest.raises(BadInput, match="neither an existing file"):
        media_item("not base64 and not a file!", "request 0 image")
    png = tmp_path / "x.png"
    png.write_bytes(b"x")
    assert media_item(str(png), "image") == str(png)
    assert media_item("data:image/png;base64," + base64.b64encode(b"abc").decode(), "image") == b"abc"
    assert np.array_equal(_records({"task": ["t2i", "tts"], "text": ["a", "b"]})[1]["text"], "b")
