"""What produced a run, in MLflow: provenance tags, shard sets as dataset inputs, tokenize jobs as runs.

    provenance(config)       tags of the code, image, Ray job and config behind a run; a source that is absent
                             leaves its tag unset (never a placeholder)
    manifest_digest(uri)     sha256 of a shard set's manifest.json: the identity of what a run trained on
    log_shard_sets(...)      each shard set as an MLflow dataset input (source URI, manifest digest, samples per
                             task) and the tokenize runs that wrote it as tags of the training run
    TokenizeRun              one tokenize job as an MLflow run of its own experiment: params, counts,
                             quarantine reasons as a table, throughput, the shard list; never fails the job

A tokenize run is tagged with its job's run id (`omnidiff.tokenize.job_id`, the id recorded in the manifest's
`runs`), its output and the digest of the manifest it left; training finds the runs of a shard set by its
output and the job ids its manifest lists.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import storage

TAG_GIT_COMMIT = "mlflow.source.git.commit"     # MLflow's own tag: the UI shows it as the run's source version
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_GIT_DIRTY = "omnidiff.git.dirty"
TAG_IMAGE = "omnidiff.container_image"
TAG_RAY_JOB = "omnidiff.ray.job_id"
TAG_RAY_SUBMISSION = "omnidiff.ray.submission_id"
TAG_RAY_WORKING_DIR = "omnidiff.ray.working_dir"
TAG_CONFIG = "omnidiff.config_sha256"
TAG_TOKENIZE_RUNS = "omnidiff.tokenize_runs"     # on a training run: MLflow run ids of its shard sets' jobs
TAG_JOB_ID = "omnidiff.tokenize.job_id"
TAG_OUTPUT = "omnidiff.tokenize.output"
TAG_MANIFEST = "omnidiff.manifest_sha256"
DATASET_CONTEXT = "mlflow.data.context"          # MLflow's dataset-input tag ("training", "evaluation")
MAX_QUARANTINE_LOG = 16 * 2**20                  # the output's quarantine.jsonl is copied to the run below this

# Set by the container image (infra/docker/Dockerfile build args) where no checkout is at hand.
ENV_IMAGE = "OMNIDIFF_IMAGE"
ENV_GIT_COMMIT = "OMNIDIFF_GIT_COMMIT"
# Set by Ray's job supervisor for a submitted job's entrypoint (`ray job submit`, KubeRay RayJobs).
ENV_RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"


# ---- provenance -------------------------------------------------------------------------------------------

def config_digest(config: Any) -> str:
    from common.configlib import to_dict

    data = config if isinstance(config, dict) else to_dict(config)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _git(args: list[str], cwd: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(cwd: str | None = None) -> tuple[str, bool] | None:
    """(commit, dirty) of the checkout holding `cwd`; None when it is not a checkout (e.g. a `ray job submit`
    working dir, which is uploaded without .git) or git is missing."""
    cwd = cwd or os.getcwd()
    head = _git(["rev-parse", "HEAD"], cwd)
    if head is None or head.returncode != 0 or len(head.stdout.strip()) != 40:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return head.stdout.strip(), bool(status is not None and status.stdout.strip())


def ray_job() -> dict[str, str]:
    """The Ray job this process belongs to (when Ray is initialized) and its submission id (under a submitted
    job: `ray job submit`, a KubeRay RayJob)."""
    out: dict[str, str] = {}
    with contextlib.suppress(Exception):   # provenance is best effort
        import ray

        if ray.is_initialized():
            out[TAG_RAY_JOB] = ray.get_runtime_context().get_job_id()
    try:
        job = json.loads(os.environ.get(ENV_RAY_JOB_CONFIG, "") or "{}")
        if job.get("metadata", {}).get("job_submission_id"):
            out[TAG_RAY_SUBMISSION] = str(job["metadata"]["job_submission_id"])
        if (job.get("runtime_env") or {}).get("working_dir"):
            # the uploaded code's package (gcs://_ray_pkg_<content hash>.zip): what runs, not the image's code
            out[TAG_RAY_WORKING_DIR] = str(job["runtime_env"]["working_dir"])
    except (ValueError, AttributeError):
        pass
    return out


def provenance(config: Any = None, cwd: str | None = None, source: str = "") -> dict[str, str]:
    """Tags of what produced a run: git commit (the checkout's, else $OMNIDIFF_GIT_COMMIT when the job runs the
    image's own code), container image ($OMNIDIFF_IMAGE), Ray job and submission ids and uploaded working dir, the sha256 of the resolved config, and `source` (the
    command; the UI shows it with the commit as the run's Source)."""
    tags: dict[str, str] = {}
    if source:
        tags[TAG_SOURCE_NAME], tags[TAG_SOURCE_TYPE] = source, "JOB"
    ray_tags = ray_job()
    found = git_commit(cwd)
    if found is not None:
        tags[TAG_GIT_COMMIT], dirty = found[0], found[1]
        tags[TAG_GIT_DIRTY] = str(dirty).lower()
    elif os.environ.get(ENV_GIT_COMMIT) and TAG_RAY_WORKING_DIR not in ray_tags:
        # the image's build commit names the code only when the job runs the image's code, not an upload
        tags[TAG_GIT_COMMIT] = os.environ[ENV_GIT_COMMIT]
    if os.environ.get(ENV_IMAGE):
        tags[TAG_IMAGE] = os.environ[ENV_IMAGE]
    tags.update(ray_tags)
    if config is not None:
        tags[TAG_CONFIG] = config_digest(config)
    return tags


# ---- shard sets as dataset inputs -------------------------------------------------------------------------

def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON: the same for the tokenize job that wrote it and every run that
    reads it (and different after any rerun commits)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _norm(uri: str) -> str:
    return uri.rstrip("/")


def tokenize_runs_of(client: Any, experiment: str, set_uri: str, manifest: dict[str, Any]) -> list[str]:
    """MLflow run ids of the tokenize jobs that wrote the shard set at `set_uri`: the runs of `experiment` whose
    job id the manifest lists under `runs`, else one whose manifest digest is this manifest's."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    job_ids = {r.get("run_id") for r in manifest.get("runs", []) if isinstance(r, dict)}
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_OUTPUT}` = '{_norm(set_uri)}'",
                               max_results=1000)
    ids = [r.info.run_id for r in sorted(found, key=lambda r: r.info.start_time)
           if r.data.tags.get(TAG_JOB_ID) in job_ids]
    if not ids:
        digest = manifest_digest(manifest)
        ids = [r.info.run_id for r in client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{TAG_MANIFEST}` = '{digest}'", max_results=10)]
    return ids


def shard_set_dataset(set_uri: str, manifest: dict[str, Any]):
    """An MLflow Dataset entity for a shard set: its output URI as the source, the manifest digest, and the
    counts (samples per task, shards, quarantined inputs) as its profile."""
    from mlflow.entities import Dataset

    counts = manifest.get("counts", {})
    profile = {"num_rows": counts.get("samples_written"), "samples_per_task": counts.get("samples_per_task", {}),
               "tokens_per_task": counts.get("tokens_per_task", {}), "shards": len(manifest.get("shards", [])),
               "inputs_quarantined": counts.get("inputs_quarantined"), "kind": manifest.get("job", {}).get("kind"),
               "manifest_sha256": manifest_digest(manifest)}
    uri = _norm(set_uri)
    source_type = "s3" if storage.is_s3(uri) else "local"
    return Dataset(name=Path(uri).name or uri, digest=manifest_digest(manifest)[:32], source_type=source_type,
                   source=json.dumps({"uri": uri}), profile=json.dumps(profile))


def log_shard_sets(client: Any, run_id: str, sets: Sequence[tuple[str, dict[str, Any]]],
                   tokenize_experiment: str) -> list[str]:
    """Every (uri, manifest) as a training dataset input of `run_id`; the tokenize runs that wrote them as the
    tag `omnidiff.tokenize_runs` (comma-separated run ids). Returns those run ids."""
    from mlflow.entities import DatasetInput, InputTag

    inputs, linked = [], []
    for uri, manifest in sets:
        runs = tokenize_runs_of(client, tokenize_experiment, uri, manifest) if tokenize_experiment else []
        linked += [r for r in runs if r not in linked]
        tags = [InputTag(DATASET_CONTEXT, "training")]
        if runs:
            tags.append(InputTag(TAG_TOKENIZE_RUNS, ",".join(runs)))
        inputs.append(DatasetInput(shard_set_dataset(uri, manifest), tags))
    client.log_inputs(run_id, datasets=inputs)
    if linked:
        client.set_tag(run_id, TAG_TOKENIZE_RUNS, ",".join(linked))
    return linked


# ---- tokenize jobs as runs --------------------------------------------------------------------------------

class TokenizeRun:
    """One tokenize job as an MLflow run in `experiment`. `tracking_uri` "" falls back to $MLFLOW_TRACKING_URI;
    with neither, tracking is off. No method raises: the first failure prints one line and turns tracking off
    for the rest of the job, which goes on."""

    def __init__(self, tracking_uri: str, experiment: str, *, job_id: str, kind: str, input_uri: str,
                 output: str, config: Any, say: Callable[[str], None] = print,
                 client_factory: Callable[[str], Any] | None = None) -> None:
        from common.tracking import flatten_params, redact

        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        self.say, self.run_id, self.client = say, None, None
        self._redact = redact
        if not self.uri:
            return
        # a down server must cost seconds, not MLflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

        def start() -> None:
            from mlflow.entities import Param

            from common.tracking import artifact_location, ensure_experiment

            if client_factory is None:
                from mlflow import MlflowClient

                self.client = MlflowClient(tracking_uri=self.uri)
            else:
                self.client = client_factory(self.uri)
            exp_id = ensure_experiment(self.client, experiment, artifact_location(self.uri))
            tags = {TAG_JOB_ID: job_id, TAG_OUTPUT: _norm(output), "omnidiff.tokenize.kind": kind,
                    **provenance(config, source="omnidiff tokenize")}
            run = self.client.create_run(exp_id, run_name=f"tokenize {kind} {job_id}", tags=tags)
            self.run_id = run.info.run_id
            params = {**flatten_params(config), "job.kind": kind, "job.input": redact(input_uri),
                      "job.output": redact(output)}
            items = [Param(k, v) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        self._safe("start run", start)

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def _safe(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - tracking never fails a tokenize job
            self.say(f"[mlflow] tokenize tracking at {self._redact(self.uri)} failed ({what}: {type(e).__name__}: "
                     f"{self._redact(str(e))[:200]}); the job goes on untracked")
            self.run_id = None

    def finish(self, summary: dict[str, Any], manifest: Callable[[], dict[str, Any]] | None = None,
               quarantine_jsonl: Callable[[], str] | None = None) -> None:
        """Counts, throughput, quarantine reasons (a table), the shard list, the summary and the output's
        quarantine.jsonl (below MAX_QUARANTINE_LOG), then FINISHED. `manifest` and `quarantine_jsonl` are read
        only when tracking is on (and a failure to read them is a tracking failure, not the job's)."""
        if not self.enabled:
            return

        def send() -> None:
            from mlflow.entities import Metric

            ts, run_id = int(time.time() * 1000), self.run_id
            wall = max(float(summary.get("wall_s", 0.0)), 1e-9)
            values = {k: summary[k] for k in ("inputs_seen", "inputs_tokenized", "inputs_quarantined",
                                              "samples_written", "tokens", "shards_written", "bytes_written",
                                              "units_listed", "units_skipped", "wall_s", "samples_per_s")}
            values["inputs_per_s"] = summary["inputs_seen"] / wall
            values["tokens_per_s"] = summary["tokens"] / wall
            values.update({f"samples/{t}": n for t, n in summary["samples_per_task"].items()})
            values.update({f"tokens/{t}": n for t, n in summary["tokens_per_task"].items()})
            values.update({f"quarantined/{r}": n for r, n in summary["quarantined_by_reason"].items()})
            totals = summary.get("totals", {})
            values.update({f"output/{k}": v for k, v in totals.items() if isinstance(v, (int, float))})
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in values.items()])
            reasons = summary["quarantined_by_reason"]
            self.client.log_table(run_id, {"reason": list(reasons), "inputs": list(reasons.values())},
                                  "quarantine_reasons.json")
            self.client.log_dict(run_id, summary, "summary.json")
            if manifest is not None:
                committed = manifest()
                self.client.log_dict(run_id, committed.get("shards", []), "shards.json")
                self.client.set_tag(run_id, TAG_MANIFEST, manifest_digest(committed))
            text = quarantine_jsonl() if quarantine_jsonl is not None else ""
            if text and len(text) <= MAX_QUARANTINE_LOG:
                self.client.log_text(run_id, text, "quarantine.jsonl")
            self.client.set_terminated(run_id, status="FINISHED")
        self._safe("log results", send)

    def fail(self, error: BaseException) -> None:
        if not self.enabled:
            return

        def send() -> None:
            self.client.set_tag(self.run_id, "omnidiff.error", self._redact(f"{type(error).__name__}: {error}")[:5000])
            self.client.set_terminated(self.run_id, status="KILLED" if isinstance(error, KeyboardInterrupt)
                                       else "FAILED")
        self._safe("mark failed", send)
