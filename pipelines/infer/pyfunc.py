"""The training export as an MLflow pyfunc model: what `mlflow.pyfunc.load_model("models:/<name>/<version>")`
returns for a registered omni-diffusion model (logged by common/tracking/models.py at the end of training).

    model = mlflow.pyfunc.load_model("models:/omni-diffusion-demo/1")
    model.predict([{"task": "t2i", "text": "a handwritten seven"},
                   {"task": "asr", "audio": "<base64 WAV bytes, or a path / s3:// URI>"}])
    -> DataFrame with columns task, text, image_png_base64, audio_wav_base64, sample_rate (one row per request)

Requests are rows of a DataFrame, dicts or a list of dicts: `task` (any task of model/tasks.py), `text` (fills
the task's template), `image` and `audio` (a path / URI, or the file's bytes in base64). Sampling follows a
sampler preset (pipelines/infer/presets.py): `model_config={"preset": "demo", "overrides": ["steps=8"],
"device": "cpu"}` at log or load time.
"""
from __future__ import annotations

import base64
import binascii
import math
import os
from typing import Any

import mlflow.pyfunc

from common import storage
from model.tokenizers.base import BadInput

COLUMNS = ("task", "text", "image_png_base64", "audio_wav_base64", "sample_rate")


def _records(model_input: Any) -> list[dict[str, Any]]:
    """A DataFrame, one dict, or a list of dicts -> a list of request dicts (missing values dropped)."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        # {"task": "t2i", ...} is one request; {"task": [...], ...} (columns) is several
        rows = ([dict(zip(model_input, vals)) for vals in zip(*model_input.values())]
                if all(isinstance(v, list) for v in model_input.values()) else [model_input])
    elif isinstance(model_input, list):
        rows = list(model_input)
    else:
        raise BadInput("bad_request", f"expected a DataFrame, a dict or a list of dicts, got "
                                      f"{type(model_input).__name__}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("task"):
            raise BadInput("bad_request", f"request {i}: needs a \"task\" (and optionally text, image, audio)")
        out.append({k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and math.isnan(v))})
    return out


def media_item(value: str, what: str) -> str | bytes:
    """A media field: a path or URI that exists stays a path; otherwise it must be base64 file bytes."""
    if storage.is_s3(value) or os.path.isfile(value):
        return value
    text = value.split(",", 1)[1] if value.startswith("data:") else value   # a data: URL's payload
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("bad_request", f"{what} is neither an existing file, an s3:// URI nor base64 bytes "
                                      f"({value[:40]!r}...)") from None


class OmniDiffusionModel(mlflow.pyfunc.PythonModel):
    """Any-to-any inference on the export held in the model's artifacts (pipelines/infer/predictor.py)."""

    def load_context(self, context) -> None:
        from common.tracking.models import ARTIFACT_KEY
        from pipelines.infer.predictor import Predictor
        from pipelines.infer.presets import load_presets

        cfg = dict(context.model_config or {})
        presets = load_presets(cfg.get("preset", "reference"), None, list(cfg.get("overrides", [])))
        self.predictor = Predictor.from_export(context.artifacts[ARTIFACT_KEY], device=cfg.get("device"),
                                               presets=presets)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from pipelines.infer.predictor import Request, png_bytes, wav_bytes

        requests = []
        for i, row in enumerate(_records(model_input)):
            requests.append(Request(
                task=str(row["task"]), text=str(row.get("text", "")), id=i,
                images=[media_item(str(row["image"]), f"request {i} image")] if row.get("image") else [],
                audios=[media_item(str(row["audio"]), f"request {i} audio")] if row.get("audio") else []))
        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode("ascii")

        answers = []
        for out in self.predictor.predict(requests):
            answers.append({
                "task": out.task, "text": out.text,
                "image_png_base64": b64(png_bytes(out.image)) if out.image is not None else None,
                "audio_wav_base64": b64(wav_bytes(out.wav, out.sample_rate)) if out.wav is not None else None,
                "sample_rate": int(out.sample_rate) if out.wav is not None else None})
        return pd.DataFrame(answers, columns=list(COLUMNS))
