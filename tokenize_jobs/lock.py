"""One writer per output: a lock object `<out>/_lock.json` with an owner and an expiry.

Scheduled tokenization (a RayCronJob; KubeRay has no concurrency policy) may start a run while the previous
one is still writing. Two writers would both append shards and rewrite the manifest, losing one's commits.
So a run first creates the lock object; a second run sees a live lock and exits non-zero with a message naming
the owner; a lock whose owner stopped refreshing it (expiry passed, or a dead process on this same host) is
stale and is taken over.

Atomicity, per backend:
- Local: `O_CREAT | O_EXCL` creates the file only if absent. The read-check-replace of a stale lock and each
  heartbeat run under an `fcntl.flock` on a guard file beside it, so two takers cannot both win.
- S3: conditional PUTs, one request each. Create: `If-None-Match: *` (fails if the object exists). Take over a
  stale lock, heartbeat: `If-Match: <ETag we read or wrote>` (fails if anyone wrote the object since). AWS S3
  supports both since 2024; so do MinIO and moto. Release: `DeleteObject` with `If-Match` of our last ETag.

Expiry is wall-clock time written by the owner: hosts must agree on the time within a small fraction of
`ttl_s` (NTP gives milliseconds; the default lease is a minute). The owner is a run (its id, host, pid and a
random lease token); a retried job or the next scheduled run on another pod takes a crashed run's lock over
once its lease lapses.

The lock alone cannot stop a writer that stalled past its lease (a frozen process, a long GC pause) from
committing once it wakes: a check before the commit races with the takeover. Fencing does: the new owner
rewrites the manifest conditionally right after taking the lock (tokenize_jobs/writer.fence), and every commit
is a conditional write on the manifest version its writer last wrote, so the stalled writer's next commit fails
(`FencedOut`). Heartbeats still run in a daemon thread; one that finds the lock no longer ours makes `check()`
raise `LockLost`, which stops a run early.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from common import storage
from common.cli import LOCKED, CliError

LOCK_NAME = "_lock.json"


class LockHeld(RuntimeError, CliError):
    """Another run holds a live lock on the output."""
    exit_code = LOCKED


class LockLost(RuntimeError, CliError):
    """This run's lock was taken over (its heartbeat stalled past the ttl); it must stop writing."""
    exit_code = LOCKED


@dataclass
class LockRecord:
    host: str
    pid: int
    run_id: str
    token: str
    acquired: float
    expires: float

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LockRecord | None":
        """None for an unreadable record (a half-written local file from a crash): treated as stale."""
        try:
            d = json.loads(text)
            return cls(host=str(d["host"]), pid=int(d["pid"]), run_id=str(d["run_id"]), token=str(d["token"]),
                       acquired=float(d["acquired"]), expires=float(d["expires"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        left = self.expires - time.time()
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}), lock expires in {left:.0f} s "
                f"unless refreshed")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(rec: LockRecord | None, now: float | None = None) -> bool:
    if rec is None:
        return True
    if (now or time.time()) >= rec.expires:
        return True
    # A crashed run on this very host (kill -9, OOM) need not block the next one until the ttl passes.
    return rec.host == socket.gethostname() and not _pid_alive(rec.pid)


class OutputLock:
    """`with OutputLock(out, run_id, ttl_s=..., heartbeat_s=...) as lock: ... lock.check() ...`"""

    def __init__(self, out: str, run_id: str, *, ttl_s: float = 600.0, heartbeat_s: float = 60.0):
        self.out = out
        self.uri = storage.join(out, LOCK_NAME)
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.took_over: LockRecord | None = None   # the stale lock replaced, if any (for the run summary)
        self._record: LockRecord | None = None
        self._etag: str | None = None              # S3: ETag of our last write
        self._lost: str | None = None
        self._fs = None                            # S3 filesystem, made on first use
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- public -----------------------------------------------------------------------------------------
    def acquire(self) -> "OutputLock":
        self._record = self._new_record()
        if storage.is_s3(self.uri):
            self._retrying(self._acquire_s3, "taking the lock")
        else:
            self._acquire_local()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="tokenize-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    @property
    def token(self) -> str:
        """This run's lease: the random token of its lock record."""
        assert self._record is not None, "acquire() first"
        return self._record.token

    def check(self) -> None:
        if self._lost:
            raise LockLost(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._record is None or self._lost:
            return
        try:
            if storage.is_s3(self.uri):
                self._retrying(self._release_s3, "releasing the lock")
            else:
                self._release_local()
        except Exception as e:  # noqa: BLE001 - release runs in `finally`: it must not hide the run's own error
            print(f"[tokenize] warning: could not release the lock {self.uri} ({type(e).__name__}: {e}); it "
                  f"expires within lock.ttl_s={self.ttl_s:.0f} s, then the next run takes it over", flush=True)
        finally:
            self._record = None

    def refresh(self) -> None:
        """Extend the expiry now (the heartbeat thread calls this)."""
        assert self._record is not None
        rec = LockRecord(**{**self._record.__dict__, "expires": time.time() + self.ttl_s})
        if storage.is_s3(self.uri):
            self._refresh_s3(rec)
        else:
            self._refresh_local(rec)
        self._record = rec

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- shared -----------------------------------------------------------------------------------------
    def _new_record(self) -> LockRecord:
        now = time.time()
        return LockRecord(host=socket.gethostname(), pid=os.getpid(), run_id=self.run_id,
                          token=uuid.uuid4().hex, acquired=now, expires=now + self.ttl_s)

    def _held_error(self, rec: LockRecord | None, extra: str = "") -> LockHeld:
        who = rec.describe() if rec else "another run"
        return LockHeld(
            f"output {self.out} is locked by {who}{extra}. Only one tokenize run may write an output at a time: "
            f"wait for it to finish, or, if that run is dead, wait for the lock to expire (lock.ttl_s) or delete "
            f"{self.uri} by hand.")

    def _retrying(self, fn, what: str) -> None:
        """`fn()` under the storage retry policy (common/storage.call), with a fresh client after a fault. Safe
        for the conditional requests: a retried create or take-over that had in fact succeeded finds its own
        token in the lock (`_acquire_s3`)."""
        def attempt(_fs) -> None:
            try:
                return fn()
            except Exception:
                self._fs = None
                raise
        return storage.call(attempt, self.uri, what)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except LockLost as e:
                self._lost = str(e)
                return
            except Exception as e:  # storage hiccup: try again next beat; the ttl leaves room for a few misses
                self._fs = None  # and with a fresh connection pool
                print(f"[tokenize] warning: lock heartbeat on {self.uri} failed ({type(e).__name__}: {e}); "
                      f"retrying in {self.heartbeat_s:.0f} s", flush=True)

    # ---- local ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self):
        import fcntl

        path = Path(self.uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(LOCK_NAME + ".guard"), "a+") as g:
            fcntl.flock(g.fileno(), fcntl.LOCK_EX)
            try:
                yield path
            finally:
                fcntl.flock(g.fileno(), fcntl.LOCK_UN)

    def _acquire_local(self) -> None:
        assert self._record is not None
        with self._guard() as path:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                current = LockRecord.from_json(path.read_text(errors="replace"))
                if not is_stale(current):
                    raise self._held_error(current) from None
                self.took_over = current
                storage.write_text_atomic(str(path), self._record.to_json())
                return
            with os.fdopen(fd, "w") as f:
                f.write(self._record.to_json())
                f.flush()
                os.fsync(f.fileno())

    def _read_local(self, path: Path) -> LockRecord | None:
        try:
            return LockRecord.from_json(path.read_text(errors="replace"))
        except FileNotFoundError:
            return None

    def _refresh_local(self, rec: LockRecord) -> None:
        with self._guard() as path:
            current = self._read_local(path)
            if current is None or current.token != rec.token:
                raise LockLost(self._lost_message(current))
            storage.write_text_atomic(str(path), rec.to_json())

    def _release_local(self) -> None:
        assert self._record is not None
        with self._guard() as path:
            current = self._read_local(path)
            if current is not None and current.token == self._record.token:
                path.unlink()

    def _lost_message(self, current: LockRecord | None) -> str:
        now = f"now held by {current.describe()}" if current else "the lock object is gone"
        return (f"run {self.run_id} lost its lock on {self.out} ({now}); its heartbeat must have stalled for "
                f"over lock.ttl_s={self.ttl_s:.0f} s. Stopped before committing more shards; rerun to continue.")

    # ---- S3 ---------------------------------------------------------------------------------------------
    def _s3(self):
        if self._fs is None:  # one client per lock: building one costs ~0.2 s before its first request
            self._fs = storage.filesystem(self.uri)
        bucket, key, _ = self._fs.split_path(self.uri)
        return self._fs, bucket, key

    def _read_s3(self, fs) -> LockRecord | None:
        """The current record. s3fs refuses a read during which the object changed (FileExpired: the owner's
        heartbeat rewrote it); read again, the newest version is what we want."""
        from s3fs.utils import FileExpired

        for attempt in range(5):
            try:
                return LockRecord.from_json(fs.cat_file(self.uri).decode(errors="replace"))
            except FileExpired:
                time.sleep(0.05 * (attempt + 1))
        return LockRecord.from_json(fs.cat_file(self.uri).decode(errors="replace"))

    def _acquire_s3(self) -> None:
        assert self._record is not None
        fs, bucket, key = self._s3()
        body = self._record.to_json().encode()
        try:
            out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            self._etag = out["ETag"]
            return
        except FileExistsError:
            pass
        # Read the ETag before the body: if the object changes in between, our If-Match below fails (safe).
        try:
            etag = fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
            current = self._read_s3(fs)
        except FileNotFoundError:  # released between our create and our read: try once more
            out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            self._etag = out["ETag"]
            return
        if current is not None and current.token == self._record.token:
            self._etag = etag   # our own earlier attempt succeeded; only its answer was lost
            return
        if not is_stale(current):
            raise self._held_error(current)
        try:
            out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfMatch=etag)
        except OSError as e:
            # FileNotFoundError: released meanwhile; EINVAL: a precondition failure (someone wrote it first)
            if not isinstance(e, FileNotFoundError) and e.errno != errno.EINVAL:
                raise
            raise self._held_error(None, " (it took over the same stale lock a moment before this run)") from None
        self.took_over = current
        self._etag = out["ETag"]

    def _refresh_s3(self, rec: LockRecord) -> None:
        fs, bucket, key = self._s3()
        try:
            out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=rec.to_json().encode(), IfMatch=self._etag)
        except FileNotFoundError:
            raise LockLost(self._lost_message(None)) from None
        except OSError as e:
            if e.errno != errno.EINVAL:  # not a precondition failure: a transient fault, retried next beat
                raise
            try:
                current = self._read_s3(fs)
            except FileNotFoundError:
                current = None
            raise LockLost(self._lost_message(current)) from None
        self._etag = out["ETag"]

    def _release_s3(self) -> None:
        fs, bucket, key = self._s3()
        try:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self._etag)
        except FileNotFoundError:
            pass  # already gone
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise  # a transient fault: retried
            # a precondition failure: the lock is not ours any more, and not ours to delete
