"""Local paths and `s3://` URIs behind one small API (fsspec/s3fs), used by every job that reads or writes.

S3 settings come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION) plus AWS_ENDPOINT_URL for S3-compatible stores (MinIO, moto in tests). Credentials are
never passed through configs, so they never reach manifests, logs or MLflow params.

Writes are atomic: locally a temp file in the same folder + rename; on S3 a single PUT (an object appears whole
or not at all).
"""
from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path

import fsspec


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def filesystem(uri: str) -> fsspec.AbstractFileSystem:
    if is_s3(uri):
        kwargs = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        # fresh instance: a cached one may hold a dead connection pool after a fault
        return fsspec.filesystem("s3", skip_instance_cache=True, **kwargs)
    return fsspec.filesystem("file")


def is_transient(e: BaseException) -> bool:
    """A storage error worth retrying: the endpoint unreachable or timing out, a dropped connection, a 5xx.
    Not a missing object or a refused permission (retrying cannot fix those)."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
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


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return posixpath.join(base, *parts)
    return str(Path(base, *parts))


def exists(uri: str) -> bool:
    return filesystem(uri).exists(uri)


def read_bytes(uri: str) -> bytes:
    try:
        with filesystem(uri).open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write the whole object or nothing: temp + rename locally, one PUT on S3."""
    if is_s3(uri):
        fs = filesystem(uri)
        fs.pipe_file(uri, data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are 0600, and shards/manifests must stay readable by other users (0666 & ~umask,
    # as any file open() creates). "xb" fails rather than reuse a name (the uuid makes that practically never).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def upload_file_atomic(local_path: str | Path, uri: str) -> None:
    """Copy a finished local file to `uri` atomically (rename locally; one upload on S3)."""
    if is_s3(uri):
        filesystem(uri).put_file(str(local_path), uri)
        return
    dest = Path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(local_path, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def download_to(uri: str, local_path: str | Path) -> Path:
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        filesystem(uri).get_file(uri, str(local_path))
    else:
        upload_file_atomic(uri, local_path)
    return local_path
