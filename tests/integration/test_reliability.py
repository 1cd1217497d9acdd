"""Reliability and security promises, proved with counts (docs/reliability.md shows the results).

The whole module runs with SENTINEL credentials in the environment (AWS keys, an MLflow token, a Ray auth
token), against a moto S3 server on 127.0.0.1 that tests stop and restart, and with one local Ray started by
common/rayutil.py (the helper every entry point uses). The last test greps every output of the module for
the sentinels.

- Local Ray listens on 127.0.0.1 only.
- The bad-input matrix: every kind of bad input in ONE tokenize run (tokenize_jobs/reliability_report.py).
- S3 faults mid-run: an outage shorter than the retry window is ridden out; a longer one fails with a clear
  error naming the URI; the rerun then completes with exactly the full sample set.
- A flaky store (a proxy in front of moto answering a fraction of requests with 503 SlowDown, resets and
  timeouts) loses nothing: counts reconcile exactly. A bucket that throttles one input file past the retries
  fails the job naming that file, quarantines nothing, and the rerun tokenizes every input of it.
- A real `mlflow server` unreachable at start and killed mid-run: the tracker warns once, the run goes on,
  and every metric is in the store once the server is back.
- Malicious pickles are refused by every loader that reads a file.
"""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
SENTINELS = {
    "AWS_ACCESS_KEY_ID": "AKIASENTINEL7Q2XK4ZP",
    "AWS_SECRET_ACCESS_KEY": "sentinel-secret-5b0c2e7d9a41f3e8b6c0d2a4",
    "MLFLOW_TRACKING_TOKEN": "sentinel-mlflow-0f9e8d7c6b5a4f3e",
    "RAY_AUTH_TOKEN": "sentinel-ray-3c1d5e7f9a0b2c4d6e8f0a1b2c3d4e5f",
}
OUTPUTS: list[Path] = []   # every local folder a test of this module wrote; grepped by the last test
CAPTURED: list[str] = []   # everything the module's runs printed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """A moto S3 server on a fixed 127.0.0.1 port that can be stopped and started again (moto keeps its data
    in this process, so objects survive the outage, as they would on a real store)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="module")
def env():
    """Sentinel credentials + moto behind a fault-injecting proxy (passing everything through until a test sets
    its faults) + a local Ray started by rayutil.init_ray (all set before Ray starts, so its workers inherit
    them)."""
    import ray

    from common import rayutil
    from tests.helpers.faulty_s3 import FaultyS3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto = Moto()
    moto.start()
    proxy = FaultyS3(moto.endpoint, stall_s=3.0)
    proxy.start()
    values = {**SENTINELS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": proxy.endpoint,
              # one botocore attempt per storage attempt: the job's own retry policy is what is under test
              "AWS_MAX_ATTEMPTS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    keys = [*values, rayutil.SINGLE_MACHINE_ENV]
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(values)
    from ray._private import ray_constants

    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    _reload_ray_token()   # a Ray started earlier in this process cached the token from ~/.ray/auth_token
    started = rayutil.init_ray(num_cpus=2, log_to_driver=False)
    session = Path(ray._private.worker._global_node.get_session_dir_path()) if started else None
    yield {"moto": moto, "proxy": proxy, "started_ray": started, "session": session}
    if started:
        ray.shutdown()
    proxy.stop()
    moto.stop()
    ray_constants.ENABLE_RAY_CLUSTER = saved_constant
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _reload_ray_token()   # later modules' Ray uses the usual token again


def _reload_ray_token() -> None:
    """Ray caches its auth token per process (C++ loader); make it read RAY_AUTH_TOKEN / the file again."""
    from ray._private.authentication.authentication_token_setup import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()


# ---- local Ray is loopback-only -----------------------------------------------------------------------------------

def test_local_ray_started_by_the_jobs_listens_on_127_0_0_1_only(env):
    import psutil
    import ray

    from common import rayutil

    if not env["started_ray"]:
        pytest.skip("Ray was already initialized by another test module")
    assert rayutil.node_ip() == "127.0.0.1"
    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    # without the dashboard, Ray Train's placement-group cleaner would warn once a second (rayutil.QUIET_LOGGERS)
    assert ray.get_runtime_context().runtime_env.get("worker_process_setup_hook") == \
        "common.rayutil.quiet_worker_logs"
    rayutil.quiet_worker_logs()
    assert all(logging.getLogger(n).getEffectiveLevel() == logging.ERROR for n in rayutil.QUIET_LOGGERS)
    # every listening socket of this Ray session's processes is bound to the loopback address
    name = env["session"].name
    pids = {os.getpid()}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(name in part for part in p.info["cmdline"] or []):
                pids.add(p.pid)
        except psutil.Error:
            continue
    listening = [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(listening) >= 3, listening          # GCS, raylet, object manager at least
    exposed = [(pid, ip, port, " ".join(psutil.Process(pid).cmdline())[:120]) for pid, ip, port in listening
               if ip not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert not exposed, exposed


# ---- the bad-input matrix -----------------------------------------------------------------------------------------

def test_bad_input_matrix_in_one_run(env, tmp_path, capfd):
    from tokenize_jobs import reliability_report as rr

    report = rr.run_matrix(tmp_path)
    CAPTURED.append("".join(capfd.readouterr()))
    OUTPUTS.append(tmp_path / "out")
    t = report["totals"]
    wrong = [(c["name"], c["expected"], c["outcome"]) for c in report["cases"] if not c["ok"]]
    assert not wrong, wrong
    assert t["crashed"] == 0 and not t["crash_detail"]
    n_tokenized = sum(c["expected"] == rr.TOKENIZED for c in report["cases"])
    assert (t["inputs_tokenized"], t["inputs_quarantined"]) == (n_tokenized, len(report["cases"]) - n_tokenized)
    assert t["inputs_seen"] == t["inputs_tokenized"] + t["inputs_quarantined"] == t["cases"] == 23
    assert t["samples_written"] == n_tokenized            # one sample per messages line
    assert t["long_line_peak_mib"] < 32                   # the 100 MB line was streamed, never held whole
    quarantine = (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantine) == t["inputs_quarantined"]
    md = rr.to_markdown(report)
    assert md.count("| yes |") == 23 and "crashed 0" in md


# ---- S3 faults mid-run --------------------------------------------------------------------------------------------

def _pairs(folder: Path, names: list[str]) -> None:
    from tokenize_jobs.reliability_report import png

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / f"{name}.png").write_bytes(png(seed=100 + hash(name) % 100))
        (folder / f"{name}.txt").write_text(f"pattern {name}")


def _stop_s3_after_first_commit(monkeypatch, endpoint, restart_after: float | None) -> dict:
    """Fault hook: once the run has committed one shard, the S3 endpoint stops as the next commit begins (and,
    with `restart_after`, comes back that many seconds later)."""
    from tokenize_jobs import writer

    original = writer.ShardWriter.add_commit
    state = {"stopped_at": None}

    def add_commit(self, row):
        if self.run["shards"] == 1 and row["shard"] and state["stopped_at"] is None:
            endpoint.stop()
            state["stopped_at"] = time.monotonic()
            if restart_after is not None:
                threading.Timer(restart_after, endpoint.start).start()
        original(self, row)
    monkeypatch.setattr(writer.ShardWriter, "add_commit", add_commit)
    return state


S3_OVERRIDES = ("ray.progress_bars=false", "shards.max_samples=2", "storage.retries=4", "storage.backoff_s=0.5",
                "storage.max_backoff_s=2", "lock.ttl_s=3", "lock.heartbeat_s=1")


def _tokenize(inp: Path, out: str) -> dict:
    from common import configlib
    from tokenize_jobs.config import TokenizeJobConfig
    from tokenize_jobs.run import run_job

    cfg = configlib.load(TokenizeJobConfig, None, list(S3_OVERRIDES))
    return run_job(cfg, "image-text", str(inp), out, print_summary=False)


def test_s3_outage_mid_run_fails_clearly_then_the_rerun_rides_out_a_short_one(env, tmp_path, monkeypatch, capfd):
    from common import storage
    from tokenize_jobs import shards

    endpoint = env["proxy"]
    storage.filesystem("s3://reliability").mkdir("reliability")
    out = "s3://reliability/tok"
    inp = tmp_path / "pairs"
    _pairs(inp, ["a", "b", "c", "d"])

    # 1. the endpoint goes away after the first shard and stays away: bounded retries (4 attempts, waits of
    #    0.5 + 1 + 2 s), then a clear error naming the object and the fault
    long = _stop_s3_after_first_commit(monkeypatch, endpoint, restart_after=None)
    with pytest.raises(storage.StorageError) as err:
        _tokenize(inp, out)
    failed_after = time.monotonic() - long["stopped_at"]
    printed = "".join(capfd.readouterr())
    CAPTURED.append(printed)
    msg = str(err.value)
    assert f"{out}/" in msg and "failed after 4 attempt(s)" in msg and "EndpointConnectionError" in msg, msg
    assert "rerun" in msg and 2.5 < failed_after < 30   # waits of 0.5 + 1 + 2 s, +-25% jitter
    assert [line for line in printed.splitlines() if "retry 3/3" in line]

    # 2. the endpoint is back; the rerun (once the dead run's lock expired, lock.ttl_s=3) loses the endpoint
    #    again after its first shard, for 1.5 s, inside the retry window: it rides the outage out
    endpoint.start()
    monkeypatch.undo()
    time.sleep(3)
    short = _stop_s3_after_first_commit(monkeypatch, endpoint, restart_after=1.5)
    s = _tokenize(inp, out)
    printed = "".join(capfd.readouterr())
    CAPTURED.append(printed)
    assert short["stopped_at"] is not None and s["shards_written"] == 3
    # the writer's retry lines ("retry k/3"); the lock heartbeat may also warn ("retrying"), in any order
    retries = [line for line in printed.splitlines() if "failed (" in line and re.search(r"retry \d+/\d+", line)]
    assert retries and "EndpointConnectionError" in retries[0] and "retry 1/3" in retries[0], printed[-3000:]
    assert s["inputs_tokenized"] == 3            # a was committed before the first outage; b, c, d once each

    # exactly the full sample set, and no orphan left
    got = Counter((x["meta"]["source"], x["meta"]["task"]) for x in shards.iter_samples(out))
    assert got == Counter({(f"{n}.png", task): 1 for n in "abcd" for task in ("t2i", "i2t")})
    manifest = shards.read_manifest(out)
    c = manifest["counts"]
    assert c["inputs_seen"] == c["inputs_tokenized"] == 4 and c["samples_written"] == 8
    fs = storage.filesystem(out)
    assert {p.rsplit("/", 1)[1] for p in fs.find(f"{out}/shards")} == \
        {e["path"].rsplit("/", 1)[1] for e in manifest["shards"]}
    assert [r["status"] for r in manifest["runs"]] == ["running", "done"]


# ---- a flaky and a throttling bucket ----------------------------------------------------------------------------

FLAKY_OVERRIDES = ("ray.progress_bars=false", "shards.max_samples=4", "storage.retries=6", "storage.backoff_s=0.05",
                   "storage.max_backoff_s=0.4", "storage.timeout_s=2", "lock.ttl_s=3", "lock.heartbeat_s=1")


def _messages_corpus_on_s3(bucket: str, n_good: int) -> tuple[str, set[str]]:
    """s3://<bucket>/msgs: one JSONL of `n_good` image-to-text lines (each with its own PNG) plus a line of bad
    JSON and one naming a missing image. Returns the input URI and the good lines' answers."""
    from common import storage
    from tokenize_jobs.reliability_report import png

    fs = storage.filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    lines, answers = [], set()
    for i in range(n_good):
        fs.pipe_file(f"{bucket}/msgs/img/{i}.png", png(seed=i))
        answers.add(f"pattern {i}")
        lines.append(json.dumps({"messages": [{"role": "user", "content": "<|image|> what is this?"},
                                              {"role": "assistant", "content": f"pattern {i}"}],
                                 "images": [f"img/{i}.png"]}))
    lines += ["{not json", json.dumps({"messages": [{"role": "user", "content": "<|image|> and this?"},
                                                    {"role": "assistant", "content": "nothing"}],
                                       "images": ["img/missing.png"]})]
    fs.pipe_file(f"{bucket}/msgs/a.jsonl", ("\n".join(lines) + "\n").encode())
    return f"s3://{bucket}/msgs", answers


def _answers(out: str) -> Counter:
    from tokenize_jobs import shards

    return Counter(x["meta"]["source"] for x in shards.iter_samples(out))


def test_a_flaky_store_loses_nothing_and_the_counts_reconcile(env, tmp_path, capfd):
    """A fifth of all S3 requests (listing, input reads, media reads, lock, shard and manifest writes) fail
    with 503 SlowDown, a connection reset or a read timeout. The job either finishes or fails naming a URI;
    reruns finish it; at the end every input is in exactly once and only the two bad lines are quarantined."""
    from common import configlib, storage
    from tests.helpers.faulty_s3 import Fault
    from tokenize_jobs import shards
    from tokenize_jobs.config import TokenizeJobConfig
    from tokenize_jobs.run import run_job

    proxy = env["proxy"]
    inp, answers = _messages_corpus_on_s3("flaky-corpus", n_good=12)
    out = "s3://flaky-out/tok"
    storage.filesystem(out).mkdir("flaky-out")
    cfg = configlib.load(TokenizeJobConfig, None, list(FLAKY_OVERRIDES))
    proxy.faults = [Fault("503", rate=0.12), Fault("reset", rate=0.05), Fault("timeout", rate=0.02)]
    failures = []
    try:
        for attempt in range(4):
            try:
                run_job(cfg, "messages", inp, out, print_summary=False)
                break
            except storage.StorageError as e:   # a clean failure names the URI; the rerun goes on from there
                assert e.uri.startswith("s3://") and e.uri in str(e), str(e)
                failures.append(str(e))
                time.sleep(3)   # the failed run's lock may outlive it by lock.ttl_s
        else:
            pytest.fail(f"4 runs did not finish: {failures}")
    finally:
        proxy.faults = []
    printed = "".join(capfd.readouterr())
    CAPTURED.append(printed)
    with capfd.disabled():
        print(f"\nflaky store: {dict(proxy.injected)} faults in {proxy.requests} requests; "
              f"{len(failures)} run(s) failed cleanly before one finished")
    assert min(proxy.injected[k] for k in ("503", "reset", "timeout")) >= 1, proxy.injected
    assert "[storage] " in printed and " retry " in printed   # the retry layer, not luck, carried it

    m = shards.read_manifest(out)
    c = m["counts"]
    assert c["inputs_seen"] == 14 and c["inputs_tokenized"] == 12 and c["inputs_quarantined"] == 2, c
    assert c["quarantined_by_reason"] == {"bad_json": 1, "missing_media": 1}, c
    got = _answers(out)
    assert len(got) == 12 and set(got.values()) == {1}   # every good line exactly once
    assert sum(e["samples"] for e in m["shards"]) == c["samples_written"] == 12


def test_a_throttled_input_file_fails_the_job_and_the_rerun_tokenizes_all_of_it(env, tmp_path, capfd):
    """The bucket lets the first reads of the input JSONL through, then answers every read of it with 503
    SlowDown for longer than the retries last: the job exits 4 naming that file, marks nothing done and
    quarantines nothing; once the throttling ends, a rerun tokenizes all 21 lines."""
    from common import storage
    from tests.helpers.faulty_s3 import Fault
    from tokenize_jobs import shards
    from tokenize_jobs.run import main

    proxy = env["proxy"]
    inp, _ = _messages_corpus_on_s3("throttled-corpus", n_good=21)
    out = "s3://throttled-out/tok"
    storage.filesystem(out).mkdir("throttled-out")
    args = ["--kind", "messages", "--input", inp, "--output", out, *FLAKY_OVERRIDES, "storage.retries=3"]
    proxy.faults = [Fault("503", method="GET", path=r"/throttled-corpus/msgs/a\.jsonl$", after=1)]
    try:
        assert main(args) == 4
    finally:
        proxy.faults = []
    printed = "".join(capfd.readouterr())
    CAPTURED.append(printed)
    err = [line for line in printed.splitlines() if line.startswith("error: ")]
    assert err, printed[-3000:]
    assert f"{inp}/a.jsonl" in err[0] and ("SlowDown" in err[0] or "reduce your request rate" in err[0]), err[0]
    assert proxy.injected_on["503", "GET"] >= 3
    with pytest.raises(FileNotFoundError, match="no committed shard yet"):   # nothing of the file is done
        shards.read_manifest(out)

    time.sleep(3)   # lock.ttl_s of the failed run
    assert main(args) == 0
    CAPTURED.append("".join(capfd.readouterr()))
    c = shards.read_manifest(out)["counts"]
    assert c["inputs_tokenized"] == 21 and c["quarantined_by_reason"] == {"bad_json": 1, "missing_media": 1}, c
    assert len(_answers(out)) == 21


# ---- MLflow: a real server, down at start and killed mid-run ------------------------------------------------------

class MlflowServer:
    """`mlflow server` (sqlite store, one worker, no job runner) on 127.0.0.1:port, in its own process group so
    that stopping it (by its pid) also stops its worker."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
               f"sqlite:///{self.root}/mlflow.db", "--artifacts-destination", str(self.root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not become healthy: {(self.root / 'server.log').read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)   # its own group: the server and its worker only
            self.proc.wait()
            self.proc = None
            self.log.close()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    yield server
    server.kill()


def test_tracker_against_a_real_server_down_at_start_and_killed_mid_run(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from common import tracking
    from pipelines.train.config import TrainConfig

    said: list[str] = []
    t = tracking.Tracker(mlflow_server.uri, "reliability", "outage", say=said.append, retry_s=0.0)
    assert t.start(None, TrainConfig()) is None           # not started yet: no run, no exception
    t.log_metrics({"loss": 4.0}, step=1)
    mlflow_server.start()
    t.log_metrics({"loss": 3.0}, step=2)                   # the run is created now; steps 1 and 2 are sent
    run_id = t.run_id
    assert run_id is not None
    mlflow_server.kill()                                   # mid-run
    t.log_metrics({"loss": 2.5}, step=3)
    t.log_metrics({"loss": 2.0}, step=4)
    mlflow_server.start()                                  # same port, same store
    t.log_metrics({"loss": 1.0}, step=5)
    t.end()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert loss == {1: 4.0, 2: 3.0, 3: 2.5, 4: 2.0, 5: 1.0}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == str(TrainConfig().optim.lr)
    assert sum("failed" in s for s in said) == 1, said     # one warning for both outages
    assert sum("answers again after" in s for s in said) == 2, said
    OUTPUTS.append(tmp_path)


# ---- malicious pickles --------------------------------------------------------------------------------------------

class Evil:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _evil_torch_file(path: Path, marker: Path) -> Path:
    torch.save({"encoder.conv_in.weight": Evil(marker)}, path)
    return path


def _evil_npy(marker: Path) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([Evil(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _load_magvit2(tmp: Path, marker: Path) -> None:
    from model.tokenizers import ImageTokenizerConfig
    from model.tokenizers.magvit2 import build_magvit2

    build_magvit2(ImageTokenizerConfig(kind="magvit2", size=32, magvit2_preset="tiny",
                                       weights=str(_evil_torch_file(tmp / "magvit2.pt", marker))))


def _load_encodec(tmp: Path, marker: Path) -> None:
    from model.tokenizers.speech import CHECKPOINT, EncodecTokenizer

    EncodecTokenizer.from_path(str(_evil_torch_file(tmp / CHECKPOINT, marker)))


def _load_safetensors(tmp: Path, marker: Path) -> None:
    from model.weights import load_native

    load_native(_evil_torch_file(tmp / "model.safetensors", marker))


def _load_checkpoint(tmp: Path, marker: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from pipelines.train import checkpoint as ckpt
    from tests.unit.test_train_checkpoint import make_state

    state = make_state(0)
    d = tmp / "run" / ckpt.checkpoint_dir_name(4)
    sd = state.state_dict()
    sd["extra"] = Evil(marker)
    dcp.save({"train": sd}, checkpoint_id=str(d))
    files = {p.name: {"bytes": p.stat().st_size, "crc32": ckpt._crc32(p)} for p in d.iterdir()}
    (d / "complete.rank0.json").write_text(json.dumps({"step": 4, "rank": 0, "world_size": 1, "files": files}))
    ckpt.restore(make_state(1), str(tmp / "run"), say=lambda s: None)


def _load_checkpoint_metadata(tmp: Path, marker: Path) -> None:
    from pipelines.train import checkpoint as ckpt
    from tests.unit.test_train_checkpoint import make_state

    state = make_state(0)
    state.extra = {"step": 4}
    d = ckpt.save_local(state, tmp / "run" / ckpt.checkpoint_dir_name(4), rank=0, world_size=1)
    meta = d / ".metadata"
    meta.write_bytes(pickle.dumps(Evil(marker)))   # DCP's own reader would pickle.load this
    m = json.loads((d / "complete.rank0.json").read_text())
    m["files"][".metadata"] = {"bytes": meta.stat().st_size, "crc32": ckpt._crc32(meta)}
    (d / "complete.rank0.json").write_text(json.dumps(m))
    said = []
    try:
        ckpt.restore(make_state(1), str(tmp / "run"), say=said.append)
    finally:
        assert any(f"{meta}: refused" in s for s in said), said


def _load_shard(tmp: Path, marker: Path) -> None:
    from tokenize_jobs import shards
    from tokenize_jobs.writer import shard_bytes

    evil = {"__key__": "k", "input_ids.npy": _evil_npy(marker), "answer_mask.npy": _evil_npy(marker),
            "meta.json": b"{}"}
    (tmp / "evil.tar").write_bytes(shard_bytes([evil]))
    list(shards.iter_samples([str(tmp / "evil.tar")]))


def _load_media_blob(tmp: Path, marker: Path) -> None:
    from tokenize_jobs import sources

    buf = io.BytesIO()
    np.savez(buf, image_0=np.array([Evil(marker)], dtype=object))
    sources.unpack_media(buf.getvalue())


LOADERS = {
    "magvit2 .pt (weights_only)": _load_magvit2,
    "EnCodec .th path (checksum + weights_only)": _load_encodec,
    "model.safetensors (no pickle at all)": _load_safetensors,
    "DCP checkpoint (SafeLoadPlanner)": _load_checkpoint,
    "DCP .metadata (restricted unpickler)": _load_checkpoint_metadata,
    "shard .npy (allow_pickle=False)": _load_shard,
    "media blob between stages (allow_pickle=False)": _load_media_blob,
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_malicious_pickle_is_refused_by_every_loader(loader, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))   # EnCodec stages copies in the hub cache
    marker = tmp_path / "pwned"
    with pytest.raises(Exception):  # noqa: B017 - each loader has its own error type; refusal is what counts
        LOADERS[loader](tmp_path, marker)
    assert not marker.exists()
    # the payload is live: a plain unpickle would have run it
    pickle_bytes = io.BytesIO()
    torch.save(Evil(marker), pickle_bytes)
    torch.load(io.BytesIO(pickle_bytes.getvalue()), weights_only=False)
    assert marker.exists()


# ---- no credential in any output ----------------------------------------------------------------------------------

def _grep(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += [f"{p}: {n.decode()}" for n in needles if n in data]
    return hits


def test_sentinel_credentials_appear_in_no_output(env, tmp_path, capfd):
    """Everything this module wrote (tokenize outputs, quarantine, indexes, manifests on disk and in S3, the
    MLflow server store and artifacts, the Ray session's logs, what the runs printed), plus an MLflow run,
    a checkpoint and an export made here, hold none of the sentinel credentials."""
    from common import storage, tracking
    from pipelines.train import checkpoint as ckpt
    from pipelines.train.config import TrainConfig
    from tests.unit.test_train_checkpoint import VOCAB, make_state

    # an MLflow run whose config holds a credential-bearing URI, a checkpoint and an export, all made with the
    # sentinels in the environment
    cfg = TrainConfig()
    cfg.mlflow.tracking_uri = f"https://user:{SENTINELS['MLFLOW_TRACKING_TOKEN']}@mlflow.example.com"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = tracking.Tracker(uri, "sentinel", "run", say=print)
    t.start(None, cfg)
    t.log_metrics({"loss": 1.0}, 1)
    t.log_text("generations\n", "samples/step_00000001/generations.txt")
    t.end()
    state = make_state(0)
    state.extra = {"step": 1, "mlflow_run_id": t.run_id}
    ckpt.save_local(state, tmp_path / "ckpt" / ckpt.checkpoint_dir_name(1), rank=0, world_size=1)
    ckpt.export(state.model, str(tmp_path / "export"), rank=0, model_cfg=state.model.cfg, vocab=VOCAB,
                tokenizers_uri=None, step=1)
    CAPTURED.append("".join(capfd.readouterr()))
    needles = [v.encode() for v in SENTINELS.values()]
    assert all(n in os.environ.get(k, "").encode() for k, n in zip(SENTINELS, needles))  # they were set
    roots = [tmp_path, *OUTPUTS] + ([env["session"] / "logs"] if env["session"] else [])
    hits = [h for root in roots if root.exists() for h in _grep(root, needles)]
    fs = storage.filesystem("s3://reliability")
    objects = fs.find("reliability") if fs.exists("reliability") else []
    for key in objects:
        data = fs.cat_file(key)
        hits += [f"s3://{key}: {n.decode()}" for n in needles if n in data]
    hits += [f"printed: {n.decode()}" for n in needles for text in CAPTURED if n.decode() in text]
    assert not hits, hits
    assert OUTPUTS and objects, "run the whole module: the grep covers the other tests' outputs"
