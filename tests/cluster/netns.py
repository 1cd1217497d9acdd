"""A multi-host Ray cluster on one Linux machine: one network namespace per host, as pods on Kubernetes.

Layout (a /24 picked at random under 10.0.0.0/8, so parallel runs do not meet):

    root namespace   bridge <br> at .254   moto S3 server, MLflow server (the only shared storage and tracking)
    <ns>-h           eth0 at .1            Ray head (0 CPUs: drivers and the Train controller only, as on KubeRay)
    <ns>-w1, -w2     eth0 at .2, .3        Ray workers, 1 CPU each: one training worker per host

Every host names its interface `eth0`, as a pod does, so the same GLOO_SOCKET_IFNAME=eth0 works everywhere:
all namespaces share the machine's hostname, which resolves to 127.0.0.1, and without it gloo would connect
to loopback ("Gloo connectFullMesh failed ... remote=[127.0.0.1]").

Jobs see no shared local path: their inputs, shards, checkpoints and exports are on S3, their code comes with
`ray job submit --working-dir`. Each Ray node has its own temp dir. Teardown stops exactly the processes inside
the namespaces created here (`ip netns pids`) and deletes the namespaces and the bridge.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY_BIN = VENV_BIN / "ray"
GCS_PORT, DASHBOARD_PORT = 6379, 8265
IFNAME = "eth0"
BUCKET = "omnidiff"


class ClusterUnavailable(RuntimeError):
    """This machine cannot build namespaced hosts (not root, no `ip`, no netns support); the reason says which."""


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """None when namespaced hosts can be built here, else why not (for pytest.skip)."""
    if os.name != "posix" or sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (ip netns, veth pairs and a bridge)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command"
    probe = f"odprobe{secrets.token_hex(2)}"
    made = _sh("ip", "netns", "add", probe, check=False)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _sh("ip", "netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    name: str              # namespace name
    ip: str
    num_cpus: int
    temp_dir: Path
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def is_head(self) -> bool:
        return self.name.endswith("-h")


@dataclass
class Cluster:
    prefix: str
    subnet: str                      # e.g. "10.77.3" (the /24 without its last byte)
    bridge: str
    env: dict[str, str]              # the environment of every Ray node and of `ray job submit`
    hosts: dict[str, Host] = field(default_factory=dict)
    s3_endpoint: str = ""
    mlflow_uri: str = ""

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.254"

    @property
    def head(self) -> Host:
        return self.hosts["h"]

    @property
    def address(self) -> str:
        """The job API, as `ray job submit --address` takes it."""
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    # ---- network ------------------------------------------------------------------------------------------
    def _add_host(self, key: str, index: int, num_cpus: int, root: Path) -> Host:
        ns = f"{self.prefix}-{key}"
        veth = f"{self.prefix}v{index}"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", IFNAME, "netns", ns)
        _sh("ip", "link", "set", veth, "master", self.bridge, "up")
        ip = f"{self.subnet}.{index}"
        for cmd in (("ip", "addr", "add", f"{ip}/24", "dev", IFNAME), ("ip", "link", "set", IFNAME, "up"),
                    ("ip", "link", "set", "lo", "up")):
            _sh("ip", "netns", "exec", ns, *cmd)
        # Ray's unix sockets live under the temp dir and must stay under 108 characters: keep it short.
        temp = root / key
        temp.mkdir()
        host = Host(ns, ip, num_cpus, temp, root / f"{key}.log")
        self.hosts[key] = host
        return host

    # ---- Ray nodes ----------------------------------------------------------------------------------------
    def start(self, key: str, *, timeout: float = 90) -> None:
        """Start (or restart) the Ray node of host `key` and wait until the cluster sees it."""
        host = self.hosts[key]
        cmd = [str(RAY_BIN), "start", f"--node-ip-address={host.ip}", f"--num-cpus={host.num_cpus}",
               f"--temp-dir={host.temp_dir}", "--disable-usage-stats", "--block"]
        if host.is_head:
            cmd += ["--head", f"--port={GCS_PORT}", "--dashboard-host=0.0.0.0", f"--dashboard-port={DASHBOARD_PORT}"]
        else:
            cmd += [f"--address={self.head.ip}:{GCS_PORT}"]
        out = host.log.open("ab")
        host.proc = subprocess.Popen(["ip", "netns", "exec", host.name, *cmd], cwd=host.temp_dir, env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        if host.is_head:
            self._wait_for_jobs_api(timeout)
        else:
            self.wait_for_nodes(timeout=timeout)

    def kill(self, key: str) -> None:
        """Lose a host at once: SIGKILL every process in its namespace (its raylet, workers, training ranks)."""
        host = self.hosts[key]
        for pid in self._pids(host.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if host.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                host.proc.wait(timeout=10)
            host.proc = None
        # a restarted node gets a fresh session dir; the old one is dead weight
        for child in host.temp_dir.iterdir():
            shutil.rmtree(child, ignore_errors=True)

    @staticmethod
    def _pids(ns: str) -> list[int]:
        result = _sh("ip", "netns", "pids", ns, check=False)
        return [int(p) for p in result.stdout.split()]

    def alive_nodes(self) -> set[str]:
        """Node IPs the head's GCS reports alive."""
        data = self._get("/nodes?view=summary")
        summaries = data.get("data", {}).get("summary", [])
        return {n["raylet"]["nodeManagerAddress"] for n in summaries if n["raylet"].get("state") == "ALIVE"}

    def train_worker_nodes(self) -> set[str]:
        """IPs of the nodes that hosted Ray Train workers (alive or finished), from the head's state API."""
        data = self._get("/api/v0/actors?detail=true&limit=10000")
        actors = data.get("data", {}).get("result", {}).get("result", [])
        nodes = {n["raylet"]["nodeId"]: n["raylet"]["nodeManagerAddress"]
                 for n in self._get("/nodes?view=summary")["data"]["summary"]}
        return {nodes.get(a["node_id"], a["node_id"]) for a in actors if a.get("class_name") == "RayTrainWorker"}

    def wait_for_nodes(self, timeout: float = 90) -> None:
        want = {h.ip for h in self.hosts.values() if h.proc is not None}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, KeyError, ValueError):
                if want <= self.alive_nodes():
                    return
            time.sleep(0.5)
        raise RuntimeError(f"Ray nodes {sorted(want)} not all alive after {timeout} s; logs:\n{self.tail_logs()}")

    def _get(self, path: str) -> dict:
        request = urllib.request.Request(f"{self.address}{path}",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.loads(r.read())

    def _wait_for_jobs_api(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.head.proc is not None and self.head.proc.poll() is not None:
                raise RuntimeError(f"ray head exited with {self.head.proc.returncode}:\n{self.tail_logs()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                self._get("/api/jobs/")
                return
            time.sleep(0.5)
        raise RuntimeError(f"Ray job API on {self.address} not up after {timeout} s:\n{self.tail_logs()}")

    def tail_logs(self, n: int = 2000) -> str:
        return "\n".join(f"--- {h.name}\n{h.log.read_text(errors='replace')[-n:]}" for h in self.hosts.values()
                         if h.log.exists())

    # ---- jobs ---------------------------------------------------------------------------------------------
    def submit(self, *entrypoint: str, timeout: float, no_wait: bool = False,
               submission_id: str | None = None) -> subprocess.CompletedProcess:
        """`ray job submit` of the repo as working dir, from the root namespace (a laptop outside the cluster)."""
        cmd = [str(RAY_BIN), "job", "submit", "--address", self.address, "--working-dir", str(REPO)]
        cmd += ["--no-wait"] if no_wait else []
        cmd += ["--submission-id", submission_id] if submission_id else []
        return subprocess.run([*cmd, "--", *entrypoint], cwd=REPO, env=self.env, capture_output=True, text=True, check=False,
                              timeout=timeout)

    def job(self, submission_id: str) -> dict:
        return self._get(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        return self._get(f"/api/jobs/{submission_id}/logs").get("logs", "")

    def wait_job(self, submission_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(submission_id)
            if info.get("status") in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            time.sleep(1)
        raise TimeoutError(f"job {submission_id} still {info.get('status')} after {timeout} s:\n"
                           f"{self.job_logs(submission_id)[-4000:]}")

    # ---- teardown -----------------------------------------------------------------------------------------
    def close(self) -> None:
        # workers first, then the head: a worker outliving its head only retries the GCS until killed
        for key in sorted(self.hosts, key=lambda k: k == "h"):
            host = self.hosts[key]
            if host.proc is not None:
                host.proc.send_signal(signal.SIGTERM)
        for host in self.hosts.values():
            if host.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.proc.wait(timeout=10)
        for host in self.hosts.values():
            for pid in self._pids(host.name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        for host in self.hosts.values():
            _sh("ip", "netns", "del", host.name, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)   # the host ends of the veths went with the namespaces


def _free_port(ip: str) -> int:
    import socket
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _start_services(cluster: Cluster, root: Path, stack: contextlib.ExitStack) -> None:
    """moto S3 and an MLflow server on the bridge address: the shared storage and tracking every host reaches,
    as S3 and the MLflow Service are on Kubernetes."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port(cluster.gateway)
    moto = ThreadedMotoServer(ip_address=cluster.gateway, port=port, verbose=False)
    moto.start()
    stack.callback(moto.stop)
    cluster.s3_endpoint = f"http://{cluster.gateway}:{port}"
    cluster.env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                       AWS_ENDPOINT_URL=cluster.s3_endpoint)
    import boto3
    boto3.client("s3", endpoint_url=cluster.s3_endpoint, aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)

    port = _free_port(cluster.gateway)
    log = (root / "mlflow.log").open("wb")
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", cluster.gateway, "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", f"s3://{BUCKET}/mlflow"],
        env={**cluster.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    log.close()

    def stop_mlflow() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    stack.callback(stop_mlflow)
    cluster.mlflow_uri = f"http://{cluster.gateway}:{port}"
    deadline = time.monotonic() + 90
    while True:
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError), \
                urllib.request.urlopen(f"{cluster.mlflow_uri}/health", timeout=2):
            break
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server not healthy: {(root / 'mlflow.log').read_text()[-3000:]}")
        time.sleep(0.5)
    cluster.env["MLFLOW_TRACKING_URI"] = cluster.mlflow_uri


@contextlib.contextmanager
def netns_cluster(workers: int = 2):
    """Build the bridge, start moto S3 and MLflow on it, then a Ray head and `workers` worker hosts; yield the
    Cluster. Everything is stopped and removed on exit."""
    reason = unavailable_reason()
    if reason:
        raise ClusterUnavailable(reason)
    prefix = f"od{secrets.token_hex(2)}"       # interface names are capped at 15 characters
    subnet = f"10.{random.randint(64, 250)}.{random.randint(0, 250)}"
    root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "MLFLOW_"))}
    env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),   # as KubeRay's authOptions.mode: token
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",      # job entrypoints say plain `python`
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        # a lost host's replacement group waits this long for its resources before the attempt counts as failed
        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="30",
        GLOO_SOCKET_IFNAME=IFNAME,                                       # see the module docstring
        HOME=str(root),                                                  # no ~/.ray state shared with others
    )
    cluster = Cluster(prefix, subnet, f"{prefix}br", env)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        stack.callback(cluster.close)
        _sh("ip", "link", "add", cluster.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{cluster.gateway}/24", "dev", cluster.bridge)
        _sh("ip", "link", "set", cluster.bridge, "up")
        cluster._add_host("h", 1, 0, root)
        for i in range(workers):
            cluster._add_host(f"w{i + 1}", i + 2, 1, root)
        _start_services(cluster, root, stack)
        cluster.start("h")
        for i in range(workers):
            cluster.start(f"w{i + 1}")
        yield cluster
