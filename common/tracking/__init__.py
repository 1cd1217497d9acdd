"""Every MLflow call of the product: a training run's tracker (rank 0 only: Train V2 rejects Tune's MLflow
callbacks), and the reads and writes that evaluation, the demo and the benchmarks make on a finished run.
Two submodules hold the rest: `lineage` (what produced a run: provenance tags, shard sets as MLflow dataset
inputs, tokenize jobs as runs of their own) and `models` (the export as a registered pyfunc model).

Where runs go: `mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI (a server), else an embedded store
`sqlite:///<run_dir>/mlflow.db` with artifacts in `<run_dir>/mlartifacts` — both paths absolute and explicit,
because Ray changes a worker's working directory.

An outage never stops training: a failed call prints one warning, metrics are buffered (bounded) and sent when
the server answers again; retries are spaced `retry_s` apart so a dead server does not slow steps down. The
run id is saved in every checkpoint, so a restarted or resumed run keeps writing to the same MLflow run.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common import storage
from common.configlib import to_dict

# A credential must never reach MLflow params: such keys are redacted, and so is userinfo in URIs.
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key)", re.I)
_URI_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")

# The experiment kind MLflow's UI reads to choose its view: without it a new experiment opens in the GenAI view
# ("Evaluation runs"); this value is the model-training view ("Machine learning" in the UI's kind selector).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"

# Dense bf16 peak FLOP/s of common accelerators, for the MFU estimate (vendor datasheets, no sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def resolve_tracking_uri(configured: str, run_dir: str) -> str:
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if storage.is_s3(run_dir):
        # sqlite needs a local file; keep the store beside where the driver runs
        local = Path("runs", "mlflow").resolve()
        local.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{local}/mlflow.db"
    return f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


def artifact_location(tracking_uri: str) -> str | None:
    """Explicit artifacts folder beside an embedded sqlite store; a server decides its own."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).parent.joinpath("mlartifacts").resolve().as_uri()
    return None


def redact(text: str) -> str:
    return _URI_USERINFO.sub(r"\1***@", text)


def flatten_params(cfg: Any) -> dict[str, str]:
    """Config tree -> {"optim.lr": "0.0003", ...} with credentials redacted and values cut to MLflow's limit."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
            return
        value = "***" if _SECRET_KEY.search(prefix) else redact(str(node))
        out[prefix] = value[:6000]

    walk(to_dict(cfg), "")
    return out


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_FLOPS.items():
        if key in device_name:
            return flops
    return None


class Tracker:
    """Rank 0's MLflow connection. On other ranks (enabled=False) every method does nothing. No method raises
    because of the tracking server."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, *, enabled: bool = True,
                 say: Callable[[str], None] = print, retry_s: float = 30.0, max_buffer: int = 100_000,
                 client_factory: Callable[[str], Any] | None = None, system_metrics_s: float = 0.0) -> None:
        self.enabled = enabled
        self.system_metrics_s = system_metrics_s
        self._monitor = None
        self._tags: dict[str, str] = {}
        self.uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.say, self.retry_s, self.max_buffer = say, retry_s, max_buffer
        self.run_id: str | None = None
        self._params: dict[str, str] = {}
        self._buffer: list[Any] = []
        self._down_since: float | None = None
        self._last_try = 0.0
        self._warned = False
        self._dropped = 0
        if not enabled:
            return
        # Fail fast instead of MLflow's default minutes of HTTP retries: training must not wait on tracking.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        if client_factory is None:
            from mlflow.tracking import MlflowClient

            client_factory = lambda uri: MlflowClient(tracking_uri=uri)  # noqa: E731
        self._client_factory = client_factory
        self.client = None

    # ---- connection handling ------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], Any]) -> bool:
        if not self.enabled:
            return False
        now = time.monotonic()
        if self._down_since is not None and now - self._last_try < self.retry_s:
            return False
        self._last_try = now
        try:
            if self.client is None:
                self.client = self._client_factory(self.uri)
            if self.run_id is None or self._params or self._tags:
                self._open_run()
            fn()
        except Exception as e:  # noqa: BLE001 - any tracking failure is survivable
            if self._down_since is None:
                self._down_since = now
            if not self._warned:
                self._warned = True
                self.say(f"[mlflow] tracking at {redact(self.uri)} failed ({what}: {type(e).__name__}: "
                         f"{redact(str(e))[:200]}); training continues, metrics are kept and sent when it "
                         f"answers again (retrying every {self.retry_s:.0f} s)")
            return False
        if self._down_since is not None:
            self.say(f"[mlflow] tracking at {redact(self.uri)} answers again after "
                     f"{now - self._down_since:.0f} s; buffered metrics sent")
            self._down_since = None
        return True

    def _open_run(self) -> None:
        from mlflow.entities import Param

        if self.run_id is None:
            exp_id = ensure_experiment(self.client, self.experiment, artifact_location(self.uri))
            self.run_id = self.client.create_run(exp_id, run_name=self.run_name).info.run_id
        if self._tags:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in sorted(self._tags.items())])
            self._tags = {}
        if self._params:
            items = [Param(k, v) for k, v in sorted(self._params.items())]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
            self._params = {}

    # ---- API ----------------------------------------------------------------------------------------------
    def start(self, run_id: str | None, config: Any, tags: dict[str, str] | None = None) -> str | None:
        """Open (or, with `run_id` from a checkpoint, continue) the run and record the resolved config and
        `tags` (what produced the run: lineage.provenance). Returns the run id, or None while the server is
        unreachable. With `system_metrics_s` > 0, MLflow's own system metrics monitor samples CPU, memory,
        disk, network and (with pynvml) GPU utilisation and memory into the run every that many seconds."""
        if not self.enabled:
            return None
        self.run_id = run_id
        if run_id is None:
            self._tags = dict(tags or {})
            self._params = flatten_params(config)
            self._call("start run", lambda: None)
            self._start_monitor(resume=False)
            return self.run_id

        def resume() -> None:
            from mlflow.exceptions import MlflowException

            try:
                self.client.get_run(run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                # e.g. the tracking URI changed between attempts: a new run beats writing into the void
                self.say(f"[mlflow] run {run_id} does not exist at {redact(self.uri)}; starting a new run")
                self.run_id, self._params, self._tags = None, flatten_params(config), dict(tags or {})
                self._open_run()
                return
            # a resumed run: mark it running again; params were logged by the first attempt
            self.client.update_run(run_id, status="RUNNING")
            self._tags = dict(tags or {})
            self._open_run()   # this attempt's tags (e.g. a new Ray job id)
        self._call("resume run", resume)
        self._start_monitor(resume=True)
        return self.run_id

    def _start_monitor(self, resume: bool) -> None:
        if self.system_metrics_s <= 0 or self.run_id is None or self._monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.system_metrics_s,
                                                 resume_logging=resume, tracking_uri=self.uri)
            self._monitor.start()
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available() and importlib.util.find_spec("pynvml") is None:
                self.say("[mlflow] system metrics without GPU utilisation: install nvidia-ml-py "
                         "(pip install '.[gpu]')")
        except Exception as e:  # noqa: BLE001 - e.g. psutil missing: the run goes on without them
            self._monitor = None
            self.say(f"[mlflow] system metrics are off ({type(e).__name__}: {e})")

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:8000]) for k, v in sorted(tags.items())]
        if items:
            self._call("set tags", lambda: self.client.log_batch(self.run_id, tags=items))

    def log_shard_sets(self, sets: Sequence[tuple[str, dict[str, Any]]], tokenize_experiment: str) -> None:
        """Each (uri, manifest) shard set as a dataset input of the run, and the tokenize runs that wrote them
        as tags (lineage.log_shard_sets)."""
        from common.tracking import lineage

        self._call("log datasets", lambda: lineage.log_shard_sets(self.client, self.run_id, sets,
                                                                   tokenize_experiment))

    def log_model(self, export_dir: str, registered_name: str, python_model: Any) -> None:
        """The export as an MLflow pyfunc model of this run, registered as a new version of
        `registered_name` (models.log_export). A failure is one warning: the export on disk is the product."""
        from common.tracking import models

        def send() -> None:
            version = models.log_export(self.uri, self.run_id, export_dir, registered_name, python_model)
            self.say(f"[mlflow] export registered as model {registered_name!r} version {version}")
        self._call("log model", send)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None
                         and np.isfinite(v)]
        if len(self._buffer) > self.max_buffer:
            self._dropped += len(self._buffer) - self.max_buffer
            self._buffer = self._buffer[-self.max_buffer:]
        self.flush()

    def flush(self) -> None:
        def send() -> None:
            while self._buffer:
                self.client.log_batch(self.run_id, metrics=self._buffer[:1000])
                self._buffer = self._buffer[1000:]
        if self._buffer:
            self._call("log metrics", send)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self._call("log image", lambda: self.client.log_image(self.run_id, image, key=key, step=step))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log text", lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_wav(self, wav: np.ndarray, sample_rate: int, artifact_file: str) -> None:
        import soundfile as sf

        def send() -> None:
            with tempfile.TemporaryDirectory() as d:
                path = Path(d, Path(artifact_file).name)
                sf.write(path, np.asarray(wav, dtype=np.float32), sample_rate)
                self.client.log_artifact(self.run_id, str(path), str(Path(artifact_file).parent))
        self._call("log audio", send)

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self._down_since = None  # one last try, whatever the retry spacing
        if self._monitor is not None:
            # its last sample is logged before the run ends; metrics of a dying server are not worth a failure
            with contextlib.suppress(Exception):
                self._monitor.finish()
            self._monitor = None
        self.flush()
        if self._dropped:
            self.say(f"[mlflow] {self._dropped} metric points were dropped while tracking was unreachable")
        if self.run_id is not None:
            self._call("end run", lambda: self.client.set_terminated(self.run_id, status=status))


# ---- eval samples as artifacts ------------------------------------------------------------------------------

# ---- a run after the fact: evaluation results onto it, metrics out of it --------------------------------------

def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client: Any, name: str, artifacts: str | None, kind: str = TRAINING_KIND) -> str:
    """The id of experiment `name`, created (with `artifacts` as its artifact location) when missing, and tagged
    with its kind so the UI opens the model-training view rather than the GenAI one."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifacts, tags={EXPERIMENT_KIND_TAG: kind})
    if exp.tags.get(EXPERIMENT_KIND_TAG) != kind:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, kind)
    return exp.experiment_id


def log_results(tracking_uri: str, run_id: str, results: dict, step: int | None) -> None:
    """Evaluation results onto a (possibly finished) run: eval/<task>/<metric>, eval/results.json, the same as
    a table (eval/results_table.json, comparable across runs in the UI's evaluation tab), and onto the run's
    registered model versions as their description and tags (models.describe_versions)."""
    import math

    client = _client(tracking_uri)
    for task, metrics in results["tasks"].items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                client.log_metric(run_id, f"eval/{task}/{k}", float(v), step=step or 0)
    client.log_dict(run_id, results, "eval/results.json")
    rows = [{"task": task, **{k: v for k, v in m.items() if isinstance(v, (int, float, str))}}
            for task, m in sorted(results["tasks"].items())]
    if rows:
        client.log_table(run_id, {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)},
                         "eval/results_table.json")
    from common.tracking import models

    models.describe_versions(client, run_id, results)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float, float]]:
    """(step, value, timestamp in s) of every logged value of `key`, by step."""
    hist = _client(tracking_uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value, m.timestamp / 1000) for m in hist)


def latest_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    return dict(_client(tracking_uri).get_run(run_id).data.metrics)


def find_run(tracking_uri: str, experiment: str, run_name: str) -> str:
    """The id of the run named `run_name` in `experiment` (else the experiment's newest run)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
    return (found[0] if found else client.search_runs([exp.experiment_id])[0]).info.run_id


def log_generations(tracker: Tracker, generations: Sequence[dict[str, Any]], tokenizers: Any, step: int) -> None:
    """`generations`: dicts {task, key, modality ("text"|"image"|"audio"), prompt (ids), output (ids)}.
    Images go in as PNG (`log_image`, browsable per step), speech as WAV, text (and the prompts) as one file."""
    if not tracker.enabled:
        return
    vocab = tokenizers.vocab if tokenizers is not None else None
    lines = []
    for i, g in enumerate(generations):
        name = f"{g['task']}_{i}"
        out = np.asarray(g["output"])
        decoded = None
        try:
            if tokenizers is not None and g["modality"] == "image":
                codes = vocab.image_codes(out)[: tokenizers.image.tokens_per_image]
                codes = np.pad(codes, (0, tokenizers.image.tokens_per_image - codes.size))
                img = tokenizers.image.decode(codes[None])[0]                   # (H, W, C) uint8
                tracker.log_image(img if img.shape[-1] != 1 else img[..., 0], key=f"samples/{name}", step=step)
                decoded = f"<image {img.shape[1]}x{img.shape[0]}: logged as samples/{name}>"
            elif tokenizers is not None and g["modality"] == "audio":
                wav = tokenizers.speech.decode(vocab.audio_codes(out))
                tracker.log_wav(wav, tokenizers.speech.sample_rate, f"samples/step_{step:08d}/{name}.wav")
                decoded = f"<audio {wav.size / tokenizers.speech.sample_rate:.2f} s: {name}.wav>"
            elif tokenizers is not None:
                text_ids = [int(t) for t in out if 0 <= t < vocab.text_size]
                decoded = tokenizers.text.decode(text_ids)
        except Exception as e:  # noqa: BLE001 - a decoding failure must not stop training
            decoded = f"<could not decode: {type(e).__name__}: {e}>"
        lines.append(f"[{name}] key={g['key']}\n  prompt ids: {list(map(int, g['prompt']))[-32:]}\n"
                     f"  output ids: {list(map(int, out))[:64]}\n  decoded: {decoded}")
    tracker.log_text("\n\n".join(lines) + "\n", f"samples/step_{step:08d}/generations.txt")


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, stage: int, n_stages: int, stage_name: str, loss: float,
                  tokens_per_s: float, eta_s: float) -> str:
    return (f"step {step}/{total} | stage {stage + 1}/{n_stages} {stage_name} | loss {loss:.4f} | "
            f"{tokens_per_s:,.0f} tok/s | ETA {format_duration(eta_s)}")


# The submodules' entry points, importable from here (below: they import this module's helpers).
from common.tracking.lineage import TokenizeRun, manifest_digest, provenance  # noqa: F401
