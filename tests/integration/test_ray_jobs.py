"""Job submission to a real local Ray cluster, as the RayJob and RayCronJob manifests do it on Kubernetes.

The tests start `ray start --head` with token authentication in a private temp dir and its own process group,
submit with `ray job submit`, and stop the head by its process id (then kill what is left of that group);
other Ray instances on the machine are never touched.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY_BIN = Path(sys.executable).parent / "ray"  # the venv's CLI, matching the venv's Ray


# Overrides that turn configs/train/debug.yaml into a few-step run on a text-only shard set (the trainer
# owns these names). debug.yaml's curriculum stages must add up to train.steps, so they are dropped; one worker
# because this tests job submission, not FSDP (the trainer's own tests cover that), and saves ~15 s.
TRAIN_OVERRIDES = ("train.steps=2", "data.stages=[]", "scaling.num_workers=1")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Head:
    address: str
    env: dict[str, str]
    log: Path


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    # Short path: Ray's unix sockets live under the temp dir and must stay under 108 characters.
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    gcs, dashboard, client, agent = _free_ports(4)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        # Token auth as on the Kubernetes clusters (authOptions.mode: token); head and clients share the token.
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
        # Job entrypoints say plain `python`: make it the venv's, as the image's is on the pods.
        PATH=f"{RAY_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1",  # Train V2 reports poll this; the default 2 s slows few-step runs
    )
    log = temp / "head.log"
    cmd = [str(RAY_BIN), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", f"--temp-dir={temp}",
           "--disable-usage-stats", "--block"]
    with log.open("wb") as out:
        # Own process group: teardown stops exactly this head and its children, never other Ray instances.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dashboard}", env, log)
    try:
        _wait_for_jobs_api(head, proc, timeout=60)
        yield head
    finally:
        # `ray start --block` stops the head's processes itself on SIGTERM (~5 s; signalling the whole group
        # at once instead makes it wait ~35 s on already-dead children). After a Ray Train job it can take
        # 20 s and more, so whatever of our group is still there after a short grace period is killed.
        proc.terminate()
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_jobs_api(head: Head, proc: subprocess.Popen, timeout: float) -> None:
    request = urllib.request.Request(f"{head.address}/api/jobs/",
                                     headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{head.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    pytest.fail(f"Ray job API not up after {timeout} s:\n{head.log.read_text()[-3000:]}")


def submit(head: Head, *entrypoint: str, timeout: float) -> subprocess.CompletedProcess:
    """`ray job submit` of the repo as working dir, as docs/kubernetes.md does against a cluster."""
    cmd = [str(RAY_BIN), "job", "submit", "--address", head.address, "--working-dir", str(REPO), "--", *entrypoint]
    return subprocess.run(cmd, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_with_token_runs_in_uploaded_working_dir(ray_head):
    probe = ("import os, ray; ray.init(); "
             "print('PROBE', int(ray.cluster_resources()['CPU']), os.path.isfile('infra/docker/Dockerfile'))")
    result = submit(ray_head, "python", "-c", probe, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "PROBE 2 True" in out, out[-4000:]


def test_ray_job_api_rejects_clients_without_the_token(ray_head, tmp_path):
    env = {k: v for k, v in ray_head.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    result = subprocess.run([str(RAY_BIN), "job", "list", "--address", ray_head.address],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "authentication token" in (result.stdout + result.stderr).lower()


def test_tokenize_then_train_jobs_succeed(ray_head):
    # Not tmp_path: pytest prunes old numbered temp dirs, and a concurrent pytest run could prune this one
    # while the jobs (a minute or more) still write to it.
    with tempfile.TemporaryDirectory(prefix="infra-jobs-") as tmp:
        _tokenize_then_train(ray_head, Path(tmp))


def _tokenize_then_train(ray_head: Head, tmp: Path) -> None:
    corpus = tmp / "raw" / "text.jsonl"
    corpus.parent.mkdir()
    lines = ["The cat sat on the mat.", "Masked diffusion unmasks tokens in parallel.",
             "Ray runs the jobs.", "A short corpus is enough for a smoke test."]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    tokens, run_dir = tmp / "tokens" / "text", tmp / "run"

    result = submit(ray_head, "python", "-m", "tokenize_jobs.run", "--kind", "text", "--input", str(corpus),
                    "--output", str(tokens), "--config", "configs/tokenize/default.yaml", timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    # manifest.json is what the trainer opens (pipelines.train --shards: "tokenize output(s) holding manifest.json").
    assert (tokens / "manifest.json").is_file(), f"tokenize wrote no manifest.json under {tokens}"

    result = submit(ray_head, "python", "-m", "pipelines.train", "--config", "configs/train/debug.yaml",
                    "--shards", str(tokens), "--run-dir", str(run_dir), *TRAIN_OVERRIDES, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert any(p.is_file() for p in run_dir.rglob("*")), f"train wrote nothing under {run_dir}"
