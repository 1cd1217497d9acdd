"""Three Ray hosts (a head and two workers, each in its own network namespace), S3 and MLflow as the only shared
services, jobs sent with `ray job submit`: the product's jobs as they run on a KubeRay cluster.

`make test-cluster` runs this file (root needed; elsewhere every case skips with the reason). The cases share one
cluster and run in order: the uninterrupted pipeline first, whose loss curve the interrupted run must reproduce.
"""
from __future__ import annotations

import json
import re
import time

import boto3
import pytest

from tests.cluster.netns import (
    BUCKET,
    ClusterUnavailable,
    netns_cluster,
    unavailable_reason,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

STEPS, CHECKPOINT_EVERY = 120, 20
# The debug model on a text-only shard set, one training worker per worker host (1 CPU each: Ray can only place
# them one per host), a loss logged every step so two runs compare step for step.
TRAIN_ARGS = ("--config", "configs/train/debug.yaml", f"train.steps={STEPS}", "data.stages=[]",
              "scaling.num_workers=2", "scaling.cpus_per_worker=1", "train.log_every=1",
              f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.keep_last=3", "run.max_failures=2",
              "mlflow.experiment=multihost")
TEXT = ["The cat sat on the mat.", "Masked diffusion unmasks tokens in parallel.", "Ray runs the jobs.",
        "Three hosts share one bucket.", "A checkpoint survives the loss of a host.", "Gloo talks over eth0.",
        "The head schedules, the workers train.", "Every rank reads its rows from S3."]


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"multi-host cluster tests: {reason}")
    try:
        with netns_cluster(workers=2) as c:
            s3 = boto3.client("s3", endpoint_url=c.s3_endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
            corpus = "".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i in range(6) for t in TEXT)
            s3.put_object(Bucket=BUCKET, Key="raw/text/corpus.jsonl", Body=corpus.encode())
            prompts = "".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": t}]}) + "\n"
                              for i, t in enumerate(TEXT[:3]))
            s3.put_object(Bucket=BUCKET, Key="prompts/text.jsonl", Body=prompts.encode())
            c.s3 = s3
            yield c
    except ClusterUnavailable as e:
        pytest.skip(f"multi-host cluster tests: {e}")


def _ok(result) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    return out


def _losses(cluster, run_name: str) -> dict[int, float]:
    """The run's loss per step as MLflow holds it; a step logged twice (before a failure and again after the
    resume) keeps its last value."""
    from common import tracking

    run_id = tracking.find_run(cluster.mlflow_uri, "multihost", run_name)
    return {step: value for step, value, _ in sorted(tracking.metric_history(cluster.mlflow_uri, run_id, "loss"),
                                                      key=lambda h: h[2])}


def _keys(cluster, prefix: str) -> list[str]:
    pages = cluster.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _wait_for(cluster, job: str, condition, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        status = cluster.job(job)["status"]
        assert status in ("PENDING", "RUNNING"), f"job {job} {status}:\n{cluster.job_logs(job)[-4000:]}"
        assert time.monotonic() < deadline, cluster.job_logs(job)[-4000:]
        time.sleep(0.1)


def test_tokenize_train_generate_across_hosts_through_s3(cluster):
    _ok(cluster.submit("python", "-m", "tokenize_jobs.run", "--kind", "text", "--input",
                       f"s3://{BUCKET}/raw/text/corpus.jsonl", "--output", f"s3://{BUCKET}/tokens/text",
                       "--config", "configs/tokenize/default.yaml", timeout=300))
    assert "tokens/text/manifest.json" in _keys(cluster, "tokens/text/")

    out = _ok(cluster.submit("python", "-m", "pipelines.train", *TRAIN_ARGS, "--shards", f"s3://{BUCKET}/tokens/text",
                             "--run-dir", f"s3://{BUCKET}/runs/steady", "run.name=steady", timeout=600))
    assert "on 2 worker(s)" in out or "2 worker(s)" in out, out[-4000:]
    # each training rank ran on its own worker host (the head has no CPUs; each worker host has one)
    nodes = cluster.train_worker_nodes()
    assert nodes == {cluster.hosts["w1"].ip, cluster.hosts["w2"].ip}, nodes
    losses = _losses(cluster, "steady")
    assert sorted(losses) == list(range(1, STEPS + 1)), sorted(losses)
    assert _keys(cluster, "runs/steady/export/"), "no export on S3"

    _ok(cluster.submit("python", "-m", "pipelines.infer.generate", "--checkpoint", f"s3://{BUCKET}/runs/steady/export",
                       "--input", f"s3://{BUCKET}/prompts/text.jsonl", "--output", f"s3://{BUCKET}/generated/text",
                       "--preset", "demo", "steps=4", timeout=300))
    body = cluster.s3.get_object(Bucket=BUCKET, Key="generated/text/results.jsonl")["Body"].read().decode()
    results = [json.loads(line) for line in body.splitlines()]
    assert [r["id"] for r in results] == ["p0", "p1", "p2"], results


def test_worker_host_killed_mid_training_resumes_to_the_same_losses(cluster):
    job = "train-interrupted"
    _ok(cluster.submit("python", "-m", "pipelines.train", *TRAIN_ARGS, "--shards", f"s3://{BUCKET}/tokens/text",
                       "--run-dir", f"s3://{BUCKET}/runs/interrupted", "run.name=interrupted", timeout=120,
                       no_wait=True, submission_id=job))
    # lose worker host 2 (its raylet and its training rank) as soon as the first checkpoint is on S3
    _wait_for(cluster, job, lambda: any("checkpoint" in k for k in _keys(cluster, "runs/interrupted/interrupted/")))
    cluster.kill("w2")
    time.sleep(5)
    cluster.start("w2")     # the host comes back, as a rescheduled pod does

    info = cluster.wait_job(job, timeout=600)
    logs = cluster.job_logs(job)
    assert info["status"] == "SUCCEEDED", logs[-6000:]
    resumed = [int(m) for m in re.findall(r"resumed from step (\d+)", logs)]
    assert resumed and all(0 < r < STEPS and r % CHECKPOINT_EVERY == 0 for r in resumed), logs[-6000:]
    steady, interrupted = _losses(cluster, "steady"), _losses(cluster, "interrupted")
    assert sorted(interrupted) == sorted(steady)
    assert interrupted == pytest.approx(steady, rel=1e-5, abs=1e-6), (steady, interrupted)


def test_worker_host_lost_for_good_fails_after_max_start_failures_naming_the_cause(cluster):
    job = "train-host-lost"
    _ok(cluster.submit("python", "-m", "pipelines.train", *TRAIN_ARGS, "--shards", f"s3://{BUCKET}/tokens/text",
                       "--run-dir", f"s3://{BUCKET}/runs/lost", "run.name=lost", "run.max_start_failures=1", timeout=120,
                       no_wait=True, submission_id=job))
    _wait_for(cluster, job, lambda: any("checkpoint" in k for k in _keys(cluster, "runs/lost/lost/")))
    cluster.kill("w2")      # and it never comes back
    info = cluster.wait_job(job, timeout=600)
    logs = cluster.job_logs(job)
    assert info["status"] == "FAILED", logs[-6000:]
    assert "training failed" in logs and "startup timed out" in logs, logs[-6000:]
