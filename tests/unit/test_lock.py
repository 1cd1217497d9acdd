"""The output lock (tokenize_jobs/lock.py), locally and on S3 (moto server on 127.0.0.1): one live owner, a clear
refusal for the second run, takeover of stale locks, heartbeats, and a run that lost its lock stops committing."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from tokenize_jobs.lock import LOCK_NAME, LockHeld, LockLost, LockRecord, OutputLock


def _record(**kw) -> str:
    base = dict(host="other-host", pid=1, run_id="old-run", token="t0", acquired=time.time(),
                expires=time.time() + 600)
    return json.dumps({**base, **kw})


@pytest.fixture(scope="module")
def s3_out():
    """A moto S3 server; yields a function giving a fresh s3:// output prefix."""
    from common import storage
    from tests.helpers.moto_s3 import moto_s3

    with moto_s3():
        storage.filesystem("s3://lock-tests").mkdir("lock-tests")
        counter = iter(range(1000))
        yield lambda: f"s3://lock-tests/out{next(counter)}"


def _read(out: str) -> LockRecord | None:
    from common import storage

    for _ in range(5):  # s3fs refuses a read during which a heartbeat rewrote the object (FileExpired)
        try:
            return LockRecord.from_json(storage.read_text(storage.join(out, LOCK_NAME)))
        except OSError as e:
            if type(e).__name__ != "FileExpired":
                raise
            time.sleep(0.05)
    return LockRecord.from_json(storage.read_text(storage.join(out, LOCK_NAME)))


def _write(out: str, text: str) -> None:
    from common import storage

    storage.write_text_atomic(storage.join(out, LOCK_NAME), text)


def _exists(out: str) -> bool:
    from common import storage

    return storage.exists(storage.join(out, LOCK_NAME))


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_out")()


def test_second_run_is_refused_while_the_lock_is_live(out):
    with OutputLock(out, "run-a", ttl_s=60, heartbeat_s=20):
        rec = _read(out)
        assert rec.run_id == "run-a" and rec.host == socket.gethostname() and rec.expires > time.time() + 50
        with pytest.raises(LockHeld, match=r"locked by run run-a \(host .*pid \d+\).*Only one tokenize run"):
            OutputLock(out, "run-b").acquire()
    assert not _exists(out)  # released
    with OutputLock(out, "run-c"):  # free again
        assert _read(out).run_id == "run-c"


@pytest.mark.parametrize("stale", ["expired", "dead_pid", "garbage"])
def test_stale_lock_is_taken_over(out, stale):
    if stale == "expired":
        _write(out, _record(expires=time.time() - 1))
    elif stale == "dead_pid":  # a crashed run on this host: no need to wait for the expiry
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        _write(out, _record(host=socket.gethostname(), pid=dead.pid))
    else:  # half-written record
        _write(out, '{"host": "x", "pid"')
    lock = OutputLock(out, "new-run", ttl_s=60, heartbeat_s=20).acquire()
    try:
        assert _read(out).run_id == "new-run"
        assert (lock.took_over is None) == (stale == "garbage")
    finally:
        lock.release()


def test_live_lock_of_another_host_is_respected(out):
    _write(out, _record())
    with pytest.raises(LockHeld, match="old-run .*other-host"):
        OutputLock(out, "new-run").acquire()
    assert _read(out).run_id == "old-run"


def test_heartbeat_extends_expiry(out):
    with OutputLock(out, "beating", ttl_s=3, heartbeat_s=0.2) as lock:
        first = _read(out).expires
        time.sleep(1.0)
        assert _read(out).expires > first
        lock.check()


def test_run_that_lost_its_lock_stops_and_leaves_the_new_owner_alone(out):
    lock = OutputLock(out, "slow-run", ttl_s=60, heartbeat_s=0.2).acquire()
    _write(out, _record(run_id="usurper", token="t1"))  # as a takeover after a stalled heartbeat would
    deadline = time.time() + 10
    while time.time() < deadline and not lock._lost:
        time.sleep(0.1)
    with pytest.raises(LockLost, match="slow-run lost its lock .*now held by run usurper"):
        lock.check()
    lock.release()
    assert _read(out).run_id == "usurper"  # release never deletes another run's lock


def test_tokenize_cli_exits_3_with_the_owner_when_locked(tmp_path, capsys):
    from tokenize_jobs import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "hello"}\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(_record(run_id="nightly-run"))
    rc = run.main(["--kind", "text", "--input", str(corpus), "--output", str(out)])
    assert rc == 3
    err = capsys.readouterr().err
    assert "locked by run nightly-run" in err and "lock.ttl_s" in err
    assert not (out / "manifest.json").exists() and not (out / "shards").exists()


def test_conditional_write_is_a_compare_and_swap(out):
    """storage.write_if, the primitive behind fencing: create-if-absent, replace-if-unchanged, refuse otherwise;
    a retried write whose first try had succeeded finds its own bytes and succeeds."""
    from common import storage

    uri = storage.join(out, "m.json")
    assert storage.read_versioned(uri) == (None, None)
    v1 = storage.write_if(uri, b"one", None)
    with pytest.raises(storage.VersionConflict):
        storage.write_if(uri, b"other", None)              # it exists now
    v2 = storage.write_if(uri, b"two", v1)
    with pytest.raises(storage.VersionConflict):
        storage.write_if(uri, b"three", v1)               # a writer holding the old version is refused
    assert storage.write_if(uri, b"two", v1) == v2         # ... unless it is writing what is already there
    assert storage.read_versioned(uri) == (b"two", v2)


def test_a_stalled_writer_is_fenced_out_by_the_new_owner(out):
    """Writer A holds the manifest's version; its lease lapses and B takes the output over (fence). A's next
    commit fails with FencedOut (exit status 3) and B's manifest stands."""
    from common import cli, storage
    from tokenize_jobs.writer import FencedOut, ShardWriter, fence

    header = {"vocab": {}, "job": {"kind": "text", "input": "x"}}
    a = ShardWriter(out, "run-a", header, fence(out, "run-a", "lease-a"))
    a._write_manifest()                                  # A commits once while it owns the output
    b_state = fence(out, "run-b", "lease-b")             # A stalls past its lease; B takes over
    b = ShardWriter(out, "run-b", header, b_state)
    b._write_manifest()
    with pytest.raises(FencedOut, match="another run took the output over") as e:
        a._write_manifest()                               # A wakes up and tries to commit
    assert cli.exit_code(e.value) == cli.LOCKED
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["runs"][-1]["run_id"] == "run-b" and manifest["writer"]["run_id"] == "run-b"
