"""common/tracking: params without credentials, outage tolerance, embedded store layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common import tracking
from common.configlib import from_dict
from pipelines.train.config import TrainConfig


class FlakyClient:
    """An MlflowClient stand-in whose server is down for the first `down` calls."""

    def __init__(self, down: int) -> None:
        self.down, self.calls, self.batches, self.params = down, 0, [], {}

    def _hit(self) -> None:
        self.calls += 1
        if self.calls <= self.down:
            raise ConnectionError("connection refused")

    def get_experiment_by_name(self, name):
        self._hit()
        return None

    def create_experiment(self, name, artifact_location=None, tags=None):
        self._hit()
        return "1"

    def create_run(self, exp_id, run_name=None):
        self._hit()
        return type("R", (), {"info": type("I", (), {"run_id": "run-1"})})()

    def log_batch(self, run_id, metrics=(), params=()):
        self._hit()
        self.batches += list(metrics)
        self.params.update({p.key: p.value for p in params})

    def set_terminated(self, run_id, status=None):
        self._hit()


def test_tracking_outage_warns_once_keeps_training_and_resends_later():
    said = []
    client = FlakyClient(down=3)
    t = tracking.Tracker("http://127.0.0.1:1", "exp", "run", say=said.append, retry_s=0.0,
                        client_factory=lambda uri: client)
    assert t.start(None, TrainConfig()) is None           # server down at start: no run yet, no exception
    t.log_metrics({"loss": 3.0}, step=1)                   # still down
    t.log_metrics({"loss": 2.0}, step=2)                   # down for the 3rd call, then ...
    t.log_metrics({"loss": 1.0}, step=3)                   # ... back: run created, params + buffered metrics sent
    assert sum("failed" in s for s in said) == 1 and any("answers again" in s for s in said)
    assert t.run_id == "run-1"
    assert sorted((m.step, m.value) for m in client.batches) == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert client.params["optim.lr"] == str(TrainConfig().optim.lr)


def test_retries_are_spaced_so_a_dead_server_costs_nothing_per_step():
    client = FlakyClient(down=10**9)
    t = tracking.Tracker("http://x", "exp", "run", say=lambda s: None, retry_s=3600, client_factory=lambda u: client)
    t.start(None, TrainConfig())
    for step in range(50):
        t.log_metrics({"loss": 1.0}, step)
    assert client.calls == 1 and len(t._buffer) == 50


def test_unreachable_real_server_does_not_raise():
    t = tracking.Tracker("http://127.0.0.1:9", "exp", "run", say=lambda s: None)
    t.start(None, TrainConfig())
    t.log_metrics({"loss": 1.0}, 1)
    t.log_image(np.zeros((4, 4), dtype=np.uint8), "x", 1)
    t.end()


def test_params_hold_the_config_but_no_credentials():
    cfg = from_dict(TrainConfig, {"mlflow": {"tracking_uri": "https://alice:s3cr3t@mlflow.example.com"},
                                  "data": {"shards": ["s3://bucket/tok"]}})
    params = tracking.flatten_params(cfg)
    assert params["data.shards"] == "['s3://bucket/tok']" and params["model.dim"] == "64"
    assert "s3cr3t" not in "".join(params.values())
    assert params["mlflow.tracking_uri"] == "https://***@mlflow.example.com"


def test_embedded_store_lives_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri("", str(tmp_path))
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.artifact_location(uri) == (tmp_path / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri("", str(tmp_path)) == "http://127.0.0.1:5000"
    assert tracking.artifact_location("http://127.0.0.1:5000") is None


def test_sqlite_run_with_image_and_text(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = tracking.Tracker(uri, "exp", "run", say=pytest.fail)
    run_id = t.start(None, TrainConfig())
    t.log_metrics({"loss": 1.5}, 2)
    t.log_image(np.full((4, 4), 200, dtype=np.uint8), "samples/t2i_0", 2)
    t.log_text("hello\n", "samples/step_00000002/generations.txt")
    t.end()
    files = {p.name for p in Path(tmp_path, "mlartifacts").rglob("*")}
    assert "generations.txt" in files and any(f.endswith(".png") for f in files)
    again = tracking.Tracker(uri, "exp", "run", say=pytest.fail)
    assert again.start(run_id, TrainConfig()) == run_id          # a resumed run keeps its MLflow run
    said = []
    other = tracking.Tracker(uri, "exp", "run", say=said.append)
    new_id = other.start("0123456789abcdef0123456789abcdef", TrainConfig())   # an id this store never had
    assert new_id not in (None, run_id) and "does not exist" in said[0]


def test_progress_line_reads_well():
    line = tracking.progress_line(12, 100, 1, 3, "speech", 2.3456, 12345.6, 125)
    assert line == "step 12/100 | stage 2/3 speech | loss 2.3456 | 12,346 tok/s | ETA 2m05s"
