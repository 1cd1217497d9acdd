"""Local paths and `s3://` URIs behind one small API (fsspec/s3fs), used by every job that reads or writes.

S3 settings come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION) plus AWS_ENDPOINT_URL for S3-compatible stores (MinIO, moto in tests). Credentials are
never passed through configs, so they never reach manifests, logs or MLflow params.

Every call here is retried on transient faults (endpoint unreachable, timeouts, dropped connections, 5xx such
as 503 SlowDown) with doubling, jittered waits; when the retries run out it raises `StorageError` naming the
URI. `StorageError` is deliberately not an `OSError`: code that reads corpus files treats `OSError` from
*content* (PIL, pyarrow) as a bad input, and a storage fault must never become one. A missing object stays a
`FileNotFoundError` (that is a fact about the data, not a fault).

Writes are atomic: locally a temp file in the same folder + rename; on S3 a single PUT (an object appears whole
or not at all). Retrying either is safe: a repeated PUT or rename writes the same bytes.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import posixpath
import random
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import fsspec

from common.cli import STORAGE, CliError

T = TypeVar("T")


class StorageError(RuntimeError, CliError):
    """A storage call failed for a reason that is not the data's: retries exhausted, or access refused."""
    exit_code = STORAGE

    def __init__(self, message: str, uri: str) -> None:
        super().__init__(message)
        self.uri = uri

    def __reduce__(self):
        # Ray ships a task's exception to the driver by pickling it: keep the URI on the way
        return type(self), (str(self), self.uri)


@dataclass(frozen=True)
class RetryPolicy:
    """How every storage call of this process retries. A job sets it from its config (`set_policy`) on the
    driver and ships it to its tasks; the defaults ride out a throttled bucket for about two minutes."""
    attempts: int = 8             # tries per call, the first included
    backoff_s: float = 0.5        # first wait; doubles per retry, +-25% jitter
    max_backoff_s: float = 30.0   # cap on one wait
    timeout_s: float = 0.0        # S3 connect/read timeout per request; 0 = botocore's (60 s)

    def waits(self) -> list[float]:
        return [min(self.backoff_s * 2 ** i, self.max_backoff_s) for i in range(max(0, self.attempts - 1))]


_POLICY = RetryPolicy()


def set_policy(policy: RetryPolicy | dict[str, Any]) -> None:
    global _POLICY
    policy = RetryPolicy(**policy) if isinstance(policy, dict) else policy
    if policy.attempts < 1 or policy.backoff_s < 0 or policy.max_backoff_s < 0 or policy.timeout_s < 0:
        raise ValueError(f"storage retry policy out of range: {policy}")
    if policy != _POLICY:
        _FS.clear()   # the timeout is a client setting
    _POLICY = policy


def policy() -> RetryPolicy:
    return _POLICY


def policy_dict() -> dict[str, Any]:
    """The policy as plain data, for Ray tasks (`set_policy(d)` there)."""
    return asdict(_POLICY)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or ""


def filesystem(uri: str, *, s3fs_retries: int = 5) -> fsspec.AbstractFileSystem:
    """A fresh filesystem object for `uri` (callers that hold one across calls: the lock, tests)."""
    if is_s3(uri):
        kwargs: dict[str, Any] = {}
        if _endpoint():
            kwargs["client_kwargs"] = {"endpoint_url": _endpoint()}
        if _POLICY.timeout_s:
            kwargs["config_kwargs"] = {"connect_timeout": _POLICY.timeout_s, "read_timeout": _POLICY.timeout_s}
        # fresh instance: a cached one may hold a dead connection pool after a fault
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **kwargs)
        fs.retries = s3fs_retries   # a class attribute of S3FileSystem, not a constructor argument
        return fs
    return fsspec.filesystem("file")


_FS: dict[tuple[str, str, str], fsspec.AbstractFileSystem] = {}


def _fs(uri: str) -> fsspec.AbstractFileSystem:
    """One filesystem object per process and endpoint: building an S3 client costs ~0.2 s before its first
    request, far too slow per media file. A transient fault drops it (`_forget`), so the retry reconnects."""
    key = ("s3" if is_s3(uri) else "file", _endpoint(), os.environ.get("AWS_ACCESS_KEY_ID", ""))
    if key not in _FS:
        # s3fs's own retry loop off: `call` is the one retry layer, so its policy is the whole budget
        _FS[key] = filesystem(uri, s3fs_retries=1)
    return _FS[key]


def _forget(uri: str) -> None:
    _FS.pop(("s3" if is_s3(uri) else "file", _endpoint(), os.environ.get("AWS_ACCESS_KEY_ID", "")), None)


def is_transient(e: BaseException) -> bool:
    """A storage error worth retrying: the endpoint unreachable or timing out, a dropped connection, a 5xx.
    Not a missing object or a refused permission (retrying cannot fix those)."""
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, OSError) and e.errno == errno.EINVAL:
        return False  # s3fs's translation of a refused request (InvalidArgument, PreconditionFailed)
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):
        return True
    # botocore raises its connection errors (endpoint unreachable, read timeout, connection closed) as its own
    # exception types, not as OSError, and s3fs passes them through untranslated.
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return False
    return isinstance(e, (BotoConnectionError, HTTPClientError))


def _retried(uri: str) -> bool:
    """Local disks are not retried: their errors (disk full, I/O error) do not pass in seconds."""
    return is_s3(uri)


def call(fn: Callable[[fsspec.AbstractFileSystem], T], uri: str, what: str) -> T:
    """`fn(fs)` for `uri`'s filesystem, retried on transient faults; raises `StorageError` naming `uri` when
    the retries run out or access is refused. Missing objects raise `FileNotFoundError` at once."""
    waits = _POLICY.waits() if _retried(uri) else []
    t0 = time.monotonic()
    for attempt in range(len(waits) + 1):
        try:
            return fn(_fs(uri))
        except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError):
            raise
        except PermissionError as e:
            raise StorageError(f"{what} {uri}: access refused ({e}); check the credentials and the bucket policy",
                               uri) from e
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - sorted below
            if not is_transient(e):
                raise  # a bug or a client misconfiguration, not a storage fault
            _forget(uri)
            if attempt == len(waits):
                cause = ("The storage is unreachable or throttling" if waits else "The local disk refused it")
                raise StorageError(
                    f"{what} {uri} failed after {attempt + 1} attempt(s) over {time.monotonic() - t0:.1f} s: "
                    f"{type(e).__name__}: {e}. {cause}; nothing that depends on it was recorded as done: rerun "
                    f"once it answers.", uri) from e
            wait = waits[attempt] * random.uniform(0.75, 1.25)
            print(f"[storage] {what} {uri} failed ({type(e).__name__}: {str(e)[:200]}); retry "
                  f"{attempt + 1}/{len(waits)} in {wait:.1f} s", flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return posixpath.join(base, *parts)
    return str(Path(base, *parts))


# ---- reads --------------------------------------------------------------------------------------------------------

def exists(uri: str) -> bool:
    return call(lambda fs: fs.exists(uri), uri, "checking")


def isdir(uri: str) -> bool:
    return call(lambda fs: fs.isdir(uri), uri, "checking")


def isfile(uri: str) -> bool:
    return call(lambda fs: fs.isfile(uri), uri, "checking")


def info(uri: str) -> dict[str, Any]:
    return call(lambda fs: fs.info(uri), uri, "reading the size of")


def find(uri: str, detail: bool = False) -> Any:
    """Every file under `uri` (fsspec's protocol-less paths; with `detail`, path -> info)."""
    return call(lambda fs: fs.find(uri, detail=detail), uri, "listing")


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """The object's bytes (at most `limit` + 1 of them, so a caller can tell it was over `limit`)."""
    def read(fs):
        with fs.open(uri, "rb") as f:
            return f.read() if limit is None else f.read(limit + 1)
    try:
        return call(read, uri, "reading")
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None


def read_range(uri: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of the object (one ranged GET on S3); fewer when the object ends before `end`."""
    try:
        return call(lambda fs: fs.cat_file(uri, start=start, end=end), uri, f"reading bytes {start:,}..{end:,} of")
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None


def read_ranges(uri: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Several byte ranges [start, end) of one object: concurrent ranged GETs on S3 (one batch), in order."""
    if not ranges:
        return []
    try:
        return call(lambda fs: fs.cat_ranges([uri] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges]),
                    uri, f"reading {len(ranges)} byte ranges of")
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_many(uris: list[str]) -> dict[str, bytes]:
    """Several objects at once (one concurrent batch of GETs on S3), keyed by the URIs given."""
    if not uris:
        return {}
    if not is_s3(uris[0]):
        return {u: read_bytes(u) for u in uris}

    def cat(fs):
        blobs = fs.cat(uris)   # keyed by protocol-less path; a failed GET comes back as an exception value
        return {u: blobs[fs._strip_protocol(u)] for u in uris}
    got = call(cat, uris[0], f"reading {len(uris)} objects starting at")
    for u, b in got.items():
        if isinstance(b, BaseException):
            got[u] = read_bytes(u)   # retried alone (raises what it finds)
    return got


class RetryingReader(io.RawIOBase):
    """A read-only stream over `uri` that survives faults mid-read: a failed read reopens the object at the
    same offset (an S3 range GET) under the retry policy. For streaming large corpus files (JSONL, parquet)."""

    def __init__(self, uri: str) -> None:
        self.uri, self._pos, self._f = uri, 0, None
        self._size = int(info(uri).get("size") or 0)

    def _read(self, fs, n: int) -> bytes:
        if self._f is None:
            self._f = fs.open(self.uri, "rb")
            self._f.seek(self._pos)
        try:
            return self._f.read(n)
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a broken stream may fail to close; it is dropped either way
                pass

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        self._drop()
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = max(0, self._size - self._pos)
        data = call(lambda fs: self._read(fs, n), self.uri, f"reading (offset {self._pos:,})")
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


def open_read(uri: str) -> RetryingReader:
    try:
        return RetryingReader(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None


# ---- writes -------------------------------------------------------------------------------------------------------

def _write_local(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are 0600, and shards/manifests must stay readable by other users (0666 & ~umask,
    # as any file open() creates). "xb" fails rather than reuse a name (the uuid makes that practically never).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write the whole object or nothing: temp + rename locally, one PUT on S3."""
    if is_s3(uri):
        call(lambda fs: fs.pipe_file(uri, data), uri, "writing")
        return
    call(lambda fs: _write_local(Path(uri), lambda f: f.write(data)), uri, "writing")


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def upload_file_atomic(local_path: str | Path, uri: str) -> None:
    """Copy a finished local file to `uri` atomically (rename locally; one upload on S3)."""
    if is_s3(uri):
        call(lambda fs: fs.put_file(str(local_path), uri), uri, "uploading")
        return

    def copy(out) -> None:
        with open(local_path, "rb") as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    call(lambda fs: _write_local(Path(uri), copy), uri, "writing")


def download_to(uri: str, local_path: str | Path) -> Path:
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        call(lambda fs: fs.get_file(uri, str(local_path)), uri, "downloading")
    else:
        upload_file_atomic(uri, local_path)
    return local_path


# ---- conditional writes (optimistic concurrency) ----------------------------------------------------------------

class VersionConflict(RuntimeError):
    """A conditional write found the object changed (or created) since the version the writer holds."""


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_versioned(uri: str) -> tuple[bytes | None, str | None]:
    """The object's bytes and version, or (None, None) when it does not exist. The version is the S3 ETag, or
    locally a digest of the bytes; `write_if` takes it."""
    if not is_s3(uri):
        try:
            data = read_bytes(uri)
        except FileNotFoundError:
            return None, None
        return data, _sha(data)

    def read(fs):
        for _ in range(5):   # the ETag before and after the read agree: the bytes are that version's
            try:
                before = fs.info(uri, refresh=True)["ETag"]
                data = fs.cat_file(uri)
                if fs.info(uri, refresh=True)["ETag"] == before:
                    return data, before
            except FileNotFoundError:
                return None, None
        raise VersionConflict(f"{uri} kept changing while it was read")
    return call(read, uri, "reading")


def write_if(uri: str, data: bytes, expected: str | None) -> str:
    """Write `data` to `uri` only if its current version is `expected` (None: only if it does not exist); returns
    the new version. Raises VersionConflict when someone else wrote it since. On S3 one conditional PUT
    (If-Match / If-None-Match); locally a compare-and-replace under an flock. A retried write that had in fact
    succeeded (its answer lost) finds its own bytes and succeeds."""
    if not is_s3(uri):
        return call(lambda fs: _write_if_local(Path(uri), data, expected), uri, "writing")

    def put(fs):
        bucket, key, _ = fs.split_path(uri)
        cond = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}
        try:
            return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
        except (FileExistsError, FileNotFoundError, OSError) as e:
            if isinstance(e, OSError) and not isinstance(e, (FileExistsError, FileNotFoundError)) \
                    and e.errno != errno.EINVAL:
                raise   # not a precondition failure: transient, retried by `call`
        current, version = read_versioned(uri)
        if current == data and version is not None:
            return version
        raise VersionConflict(f"{uri} changed since version {expected} (now {version})")
    return call(put, uri, "writing")


def _write_if_local(path: Path, data: bytes, expected: str | None) -> str:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.guard"), "a+") as guard:
        fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
        try:
            current = path.read_bytes() if path.exists() else None
            version = None if current is None else _sha(current)
            if version != expected:
                if current == data:
                    return version
                raise VersionConflict(f"{path} changed since version {expected} (now {version})")
            _write_local(path, lambda f: f.write(data))
            return _sha(data)
        finally:
            fcntl.flock(guard.fileno(), fcntl.LOCK_UN)


def remove(uri: str) -> None:
    """Delete an object; one already gone counts as deleted (a retried delete may find it so)."""
    try:
        call(lambda fs: fs.rm_file(uri), uri, "deleting")
    except FileNotFoundError:
        pass
