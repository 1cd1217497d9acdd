"""model/storage.py: atomic writes (whole file or nothing, usual permissions), transient-fault classification,
and the tokenize writer's bounded retry built on it."""
from __future__ import annotations

import os
import stat

import pytest

from model import storage


@pytest.fixture
def umask():
    """Set a umask for one test, restore the old one after."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask: int) -> None:
        os.umask(mask)
    yield set_
    os.umask(saved)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_write_creates_files_with_the_umask_mode(tmp_path, umask, mask, mode):
    umask(mask)
    storage.write_text_atomic(str(tmp_path / "sub" / "manifest.json"), "{}")
    storage.upload_file_atomic(tmp_path / "sub" / "manifest.json", str(tmp_path / "copy.json"))
    for name in ("sub/manifest.json", "copy.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["manifest.json"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    storage.write_text_atomic(str(target), "old")

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        storage.write_text_atomic(str(target), "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_transient_faults_are_told_from_permanent_ones():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    transient = [EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ReadTimeoutError(endpoint_url="x"),
                 ConnectionResetError(), TimeoutError(), OSError(5, "I/O error")]
    permanent = [FileNotFoundError("gone"), PermissionError("denied"), NoCredentialsError(), ValueError("bug")]
    assert all(storage.is_transient(e) for e in transient)
    assert not any(storage.is_transient(e) for e in permanent)


def test_writer_retry_backs_off_then_names_what_failed(capsys):
    from botocore.exceptions import EndpointConnectionError

    from tokenize_jobs.config import StorageConfig
    from tokenize_jobs.writer import retry

    cfg = StorageConfig(retries=4, backoff_s=0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k")
        return "ok"
    assert retry(flaky, "uploading shard s3://b/out/shards/x.tar", cfg) == "ok" and len(calls) == 3
    assert capsys.readouterr().out.count("retry ") == 2

    def down():
        calls.append(1)
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k")
    calls.clear()
    with pytest.raises(OSError, match=r"uploading shard s3://b/out/shards/x.tar failed after 4 attempt\(s\): "
                                      r"EndpointConnectionError"):
        retry(down, "uploading shard s3://b/out/shards/x.tar", cfg)
    assert len(calls) == 4   # bounded

    def missing():
        calls.append(1)
        raise PermissionError("denied")
    calls.clear()
    with pytest.raises(OSError, match="after 1 attempt"):
        retry(missing, "writing s3://b/out/manifest.json", cfg)
    assert len(calls) == 1   # retrying cannot fix a refused permission

    def bug():
        raise KeyError("not a storage fault")
    with pytest.raises(KeyError):
        retry(bug, "writing x", cfg)
