"""common/tracking/lineage.py and the Tracker's run metadata, against a real MLflow sqlite store: provenance
tags from where they really are, the experiment kind, shard sets as dataset inputs, tokenize jobs as runs and
the training run's link to them, MLflow's system metrics."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from common import tracking
from common.tracking import lineage
from pipelines.train.config import TrainConfig
from tokenize_jobs.config import TokenizeJobConfig


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating one costs seconds); each test uses experiments of its own."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    return uri, MlflowClient(tracking_uri=uri)


def manifest(job_ids: list[str], samples: dict[str, int], updated: float = 1.0) -> dict:
    return {"format_version": 1, "vocab": {"size": 10}, "job": {"kind": "messages"},
            "shards": [{"path": "shards/a.tar", "samples": sum(samples.values()), "bytes": 10, "sha256": "ab"}],
            "counts": {"samples_written": sum(samples.values()), "samples_per_task": samples,
                       "tokens_per_task": {t: 10 * n for t, n in samples.items()}, "inputs_quarantined": 2},
            "runs": [{"run_id": j, "status": "done"} for j in job_ids], "updated": updated}


def summary(samples: dict[str, int], reasons: dict[str, int]) -> dict:
    n = sum(samples.values())
    return {"inputs_seen": n + sum(reasons.values()), "inputs_tokenized": n,
            "inputs_quarantined": sum(reasons.values()), "samples_written": n, "tokens": 10 * n,
            "shards_written": 1, "bytes_written": 100, "units_listed": 9, "units_skipped": 0, "wall_s": 2.0,
            "samples_per_s": n / 2.0, "samples_per_task": samples, "tokens_per_task": {t: 10 * v for t, v in
                                                                                       samples.items()},
            "quarantined_by_reason": reasons, "totals": {"inputs_seen": 9, "samples_written": n}}


# ---- provenance -------------------------------------------------------------------------------------------

def test_provenance_reads_git_env_and_config_and_sets_nothing_it_cannot_find(tmp_path, monkeypatch):
    for var in (lineage.ENV_IMAGE, lineage.ENV_GIT_COMMIT, lineage.ENV_RAY_JOB_CONFIG):
        monkeypatch.delenv(var, raising=False)
    plain = tmp_path / "plain"
    plain.mkdir()
    tags = lineage.provenance(TrainConfig(), cwd=str(plain))     # no checkout, no image, no Ray: only the config
    assert set(tags) == {lineage.TAG_CONFIG}
    assert tags[lineage.TAG_CONFIG] == lineage.config_digest(TrainConfig())
    other = TrainConfig()
    other.optim.lr = 1e-5
    assert lineage.config_digest(other) != tags[lineage.TAG_CONFIG]

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    tags = lineage.provenance(None, cwd=str(repo))
    assert tags == {lineage.TAG_GIT_COMMIT: head, lineage.TAG_GIT_DIRTY: "false"}
    (repo / "f.txt").write_text("b")
    assert lineage.provenance(None, cwd=str(repo))[lineage.TAG_GIT_DIRTY] == "true"

    # in a container without a checkout: what the image and Ray's job supervisor set
    monkeypatch.setenv(lineage.ENV_GIT_COMMIT, "c0ffee")
    monkeypatch.setenv(lineage.ENV_IMAGE, "registry.example.com/omni-diffusion:0.1.0")
    monkeypatch.setenv(lineage.ENV_RAY_JOB_CONFIG, json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}}))
    tags = lineage.provenance(None, cwd=str(plain))
    assert tags == {lineage.TAG_GIT_COMMIT: "c0ffee", lineage.TAG_IMAGE: "registry.example.com/omni-diffusion:0.1.0",
                    lineage.TAG_RAY_SUBMISSION: "raysubmit_1"}
    # a job that uploaded its code (`--working-dir .`) runs that package, not the image's commit
    monkeypatch.setenv(lineage.ENV_RAY_JOB_CONFIG, json.dumps({"metadata": {"job_submission_id": "raysubmit_2"},
                                                               "runtime_env": {"working_dir": "gcs://_ray_pkg_ab.zip"}}))
    tags = lineage.provenance(None, cwd=str(plain), source="omnidiff train")
    assert lineage.TAG_GIT_COMMIT not in tags and tags[lineage.TAG_RAY_WORKING_DIR] == "gcs://_ray_pkg_ab.zip"
    assert tags[lineage.TAG_SOURCE_NAME] == "omnidiff train" and tags[lineage.TAG_RAY_SUBMISSION] == "raysubmit_2"


# ---- the training run -------------------------------------------------------------------------------------

def test_training_run_is_tagged_opens_in_the_training_view_and_lists_its_shard_sets(store, tmp_path):
    uri, client = store
    # two tokenize jobs wrote set A (a first run, then a rerun that added inputs); one wrote set B
    set_a, set_b = str(tmp_path / "tok" / "a"), str(tmp_path / "tok" / "b")
    tok_runs = {}
    for job, out, samples in (("job-1", set_a, {"t2i": 3}), ("job-2", set_a, {"t2i": 2, "asr": 4}),
                              ("job-3", set_b, {"i2t": 5})):
        t = lineage.TokenizeRun(uri, "tok-a", job_id=job, kind="messages", input_uri="/corpus", output=out + "/",
                                config=TokenizeJobConfig(), say=pytest.fail)
        t.finish(summary(samples, {}))
        tok_runs[job] = t.run_id
    man_a = manifest(["job-1", "job-2"], {"t2i": 5, "asr": 4})
    man_b = manifest(["job-3"], {"i2t": 5})
    # a tokenize job of another output with the same job id is not linked
    lineage.TokenizeRun(uri, "tok-a", job_id="job-3", kind="text", input_uri="/c", output=str(tmp_path / "x"),
                        config=TokenizeJobConfig(), say=pytest.fail).finish(summary({"text": 1}, {}))

    t = tracking.Tracker(uri, "train-a", "run", say=pytest.fail)
    run_id = t.start(None, TrainConfig(), tags={lineage.TAG_GIT_COMMIT: "abc123", lineage.TAG_RAY_JOB: "01000000"})
    t.log_shard_sets([(set_a, man_a), (set_b, man_b)], "tok-a")
    t.end()

    exp = client.get_experiment_by_name("train-a")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_KIND
    run = client.get_run(run_id)
    assert run.data.tags[lineage.TAG_GIT_COMMIT] == "abc123" and run.data.tags[lineage.TAG_RAY_JOB] == "01000000"
    assert run.data.tags[lineage.TAG_TOKENIZE_RUNS].split(",") == [tok_runs["job-1"], tok_runs["job-2"],
                                                                   tok_runs["job-3"]]
    inputs = {d.dataset.source: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {json.dumps({"uri": set_a}), json.dumps({"uri": set_b})}
    a = inputs[json.dumps({"uri": set_a})]
    assert a.dataset.name == "a" and a.dataset.source_type == "local"
    assert a.dataset.digest == lineage.manifest_digest(man_a)[:32]
    profile = json.loads(a.dataset.profile)
    assert profile["samples_per_task"] == {"t2i": 5, "asr": 4} and profile["num_rows"] == 9
    assert profile["manifest_sha256"] == lineage.manifest_digest(man_a)
    assert {tag.key: tag.value for tag in a.tags} == {lineage.DATASET_CONTEXT: "training",
                                                      lineage.TAG_TOKENIZE_RUNS: f"{tok_runs['job-1']},"
                                                                                 f"{tok_runs['job-2']}"}
    # a resumed attempt records its own Ray job, and the experiment keeps its kind
    again = tracking.Tracker(uri, "train-a", "run", say=pytest.fail)
    again.start(run_id, TrainConfig(), tags={lineage.TAG_RAY_JOB: "02000000"})
    assert client.get_run(run_id).data.tags[lineage.TAG_RAY_JOB] == "02000000"


def test_an_existing_experiment_without_a_kind_gets_the_training_kind(store):
    uri, client = store
    exp_id = client.create_experiment("old")
    tracking.Tracker(uri, "old", "run", say=pytest.fail).start(None, TrainConfig())
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_KIND


def test_lineage_falls_back_to_the_manifest_digest(store, tmp_path):
    """A set copied elsewhere (another output URI) is still linked by the digest of the manifest it carries."""
    uri, client = store
    man = manifest(["job-9"], {"t2i": 1})
    t = lineage.TokenizeRun(uri, "tok-b", job_id="job-9", kind="messages", input_uri="/c",
                            output=str(tmp_path / "orig"), config=TokenizeJobConfig(), say=pytest.fail)
    t.finish(summary({"t2i": 1}, {}), lambda: man)
    assert lineage.tokenize_runs_of(client, "tok-b", str(tmp_path / "copy"), man) == [t.run_id]
    assert lineage.tokenize_runs_of(client, "tok-b", str(tmp_path / "copy"), manifest(["x"], {"t2i": 2})) == []
    assert lineage.tokenize_runs_of(client, "no-such-exp", str(tmp_path / "orig"), man) == []


# ---- tokenize runs ----------------------------------------------------------------------------------------

def test_tokenize_run_records_params_counts_reasons_throughput_and_shards(store, tmp_path):
    uri, client = store
    cfg = TokenizeJobConfig()
    cfg.mlflow.tracking_uri = "https://bob:hunter2@mlflow.example.com"
    t = lineage.TokenizeRun(uri, "tok-c", job_id="20261206T000000Z-abc123", kind="image-text",
                            input_uri="s3://corpus/pairs", output=str(tmp_path / "out"), config=cfg, say=pytest.fail)
    man = manifest(["20261206T000000Z-abc123"], {"t2i": 4, "i2t": 4})
    t.finish(summary({"t2i": 4, "i2t": 4}, {"corrupt_image": 2, "empty_text": 1}), lambda: man,
             lambda: '{"source": "x.png", "reason": "corrupt_image", "detail": "d"}\n')
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tokenize image-text 20261206T000000Z-abc123"
    assert client.get_experiment(run.info.experiment_id).name == "tok-c"
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert p["job.kind"] == "image-text" and p["job.input"] == "s3://corpus/pairs" and p["shards.max_samples"]
    assert "hunter2" not in json.dumps(p)
    assert m["samples/t2i"] == 4 and m["quarantined/corrupt_image"] == 2 and m["inputs_quarantined"] == 3
    assert m["samples_per_s"] == 4.0 and m["inputs_per_s"] == 11 / 2.0 and m["tokens_per_s"] == 40.0
    assert tags[lineage.TAG_MANIFEST] == lineage.manifest_digest(man)
    assert tags[lineage.TAG_OUTPUT] == str(tmp_path / "out")
    art = tmp_path / "art"
    table = json.loads(Path(client.download_artifacts(t.run_id, "quarantine_reasons.json", str(art))).read_text())
    assert dict(zip(*[[row[i] for row in table["data"]] for i in range(2)])) == {"corrupt_image": 2, "empty_text": 1}
    shards = json.loads(Path(client.download_artifacts(t.run_id, "shards.json", str(art))).read_text())
    assert shards == man["shards"]
    assert "corrupt_image" in Path(client.download_artifacts(t.run_id, "quarantine.jsonl", str(art))).read_text()

    failed = lineage.TokenizeRun(uri, "tok-c", job_id="j2", kind="text", input_uri="/c", output="/o",
                                 config=cfg, say=pytest.fail)
    failed.fail(RuntimeError("storage gave up on s3://b/k"))
    run = client.get_run(failed.run_id)
    assert run.info.status == "FAILED" and "storage gave up" in run.data.tags["omnidiff.error"]


def test_tokenize_tracking_is_off_without_a_uri_and_never_raises_on_a_dead_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    off = lineage.TokenizeRun("", "tok", job_id="j", kind="text", input_uri="/c", output="/o",
                              config=TokenizeJobConfig(), say=pytest.fail)
    assert not off.enabled
    off.finish(summary({"text": 1}, {}), lambda: pytest.fail("not read when off"))
    said = []
    dead = lineage.TokenizeRun("http://127.0.0.1:1", "tok", job_id="j", kind="text", input_uri="/c", output="/o",
                               config=TokenizeJobConfig(), say=said.append)
    assert not dead.enabled and len(said) == 1 and "the job goes on untracked" in said[0]
    dead.finish(summary({"text": 1}, {}))
    dead.fail(RuntimeError("x"))
    assert len(said) == 1


# ---- system metrics ---------------------------------------------------------------------------------------

def test_mlflow_system_metrics_are_sampled_into_the_run(store):
    uri, client = store
    t = tracking.Tracker(uri, "sysm", "run", say=pytest.fail, system_metrics_s=0.2)
    run_id = t.start(None, TrainConfig())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "system/cpu_utilization_percentage" not in client.get_run(run_id).data.metrics:
        time.sleep(0.1)
    t.end()
    metrics = client.get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert client.get_run(run_id).info.status == "FINISHED"
