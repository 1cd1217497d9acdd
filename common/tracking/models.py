"""The training export as an MLflow model: logged on its run as a pyfunc model that carries the export folder
(weights, vocab.json, tokenizers/) as artifacts, registered as a new version of a named model, and given the
evaluation table once `omnidiff eval` has scored it.

    log_export(uri, run_id, export_dir, name, python_model) -> version   log + register
    describe_versions(client, run_id, results)                          eval table onto the run's versions

The python model (pipelines/infer/pyfunc.py) answers any-to-any requests; this module only logs it, so
common/ does not import the inference code. Loading it back needs this project importable (the container
image, or `pip install .`): the model's code is not copied into it, because MLflow's code_paths loading
replaces already-imported modules of the same names in the loading process.
"""
from __future__ import annotations

import importlib.metadata
from typing import Any

ARTIFACT_KEY = "export"          # context.artifacts[ARTIFACT_KEY]: the export folder, as pyfunc hands it back
MODEL_NAME = "model"             # the logged model's name within its run
# What the python model reads at load time; every key can be overridden by
# `mlflow.pyfunc.load_model(uri, model_config={...})` (MLflow accepts only keys logged with the model).
DEFAULT_MODEL_CONFIG = {"preset": "reference", "overrides": [], "device": "auto"}
# Distributions the python model imports at load and predict time (their installed versions are pinned).
RUNTIME_DISTRIBUTIONS = ("torch", "numpy", "pandas", "pillow", "soundfile", "safetensors", "tokenizers", "pyyaml",
                         "s3fs", "einops", "encodec")


def pip_requirements() -> list[str]:
    out = []
    for dist in RUNTIME_DISTRIBUTIONS:
        try:
            out.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def signature():
    """Request columns: task (required), text, image and audio (each a path / s3:// URI or base64 file bytes);
    answer columns: text, image as base64 PNG, audio as base64 WAV and its sample rate."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "task"), ColSpec("string", "text", required=False),
                     ColSpec("string", "image", required=False), ColSpec("string", "audio", required=False)])
    outputs = Schema([ColSpec("string", "task"), ColSpec("string", "text", required=False),
                      ColSpec("string", "image_png_base64", required=False),
                      ColSpec("string", "audio_wav_base64", required=False),
                      ColSpec("long", "sample_rate", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_export(tracking_uri: str, run_id: str, export_dir: str, registered_name: str, python_model: Any,
               model_config: dict[str, Any] | None = None) -> str:
    """Log `export_dir` (a local export folder) as the pyfunc model `python_model` of run `run_id` and register
    it as a new version of `registered_name`. Returns the version."""
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    # Model.log writes through the process-wide tracking and registry URIs: point both at this store for the
    # call only (the registry URI follows the tracking URI while it is unset).
    previous_registry = registry_utils._registry_uri
    mlflow.set_registry_uri(tracking_uri)
    try:
        with _use_tracking_uri(tracking_uri):
            # created here, in the run's experiment (Model.log alone files it under the process's active
            # experiment), with the run's params so logged models compare by config
            client = mlflow.MlflowClient(tracking_uri)
            run = client.get_run(run_id)
            model = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                               params=dict(run.data.params), model_type="omni-diffusion")
            info = Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                             model_id=model.model_id, python_model=python_model,
                             artifacts={ARTIFACT_KEY: str(export_dir)}, signature=signature(),
                             pip_requirements=pip_requirements(),
                             model_config={**DEFAULT_MODEL_CONFIG, **(model_config or {})},
                             registered_model_name=registered_name, await_registration_for=60)
    finally:
        registry_utils._registry_uri = previous_registry
    return str(info.registered_model_version)


def eval_table(results: dict[str, Any]) -> str:
    """The evaluation results ({"tasks": {task: {metric: value}}}) as a Markdown table: the registry shows a
    model version's description as Markdown."""
    tasks = results.get("tasks", {})
    metrics = sorted({k for m in tasks.values() for k, v in m.items() if isinstance(v, (int, float))})
    lines = ["| task | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for task, m in sorted(tasks.items()):
        cells = [f"{m[k]:.4g}" if isinstance(m.get(k), (int, float)) else "" for k in metrics]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_versions(client: Any, run_id: str, results: dict[str, Any]) -> list[str]:
    """Every registered version of `run_id`'s model gets the evaluation table as its description and each
    metric as a tag (`eval/<task>/<metric>`), so versions compare in the registry. Returns "name/version"s."""
    import math

    done = []
    for mv in client.search_model_versions(f"run_id = '{run_id}'"):
        step = results.get("step")
        head = f"Evaluation at step {step}" if step is not None else "Evaluation"
        client.update_model_version(mv.name, mv.version, description=f"{head}:\n\n{eval_table(results)}\n")
        for task, metrics in results.get("tasks", {}).items():
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    client.set_model_version_tag(mv.name, mv.version, f"eval/{task}/{k}", f"{v:.6g}")
        done.append(f"{mv.name}/{mv.version}")
    return done
