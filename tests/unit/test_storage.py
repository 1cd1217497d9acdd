"""common/storage.py: atomic writes (whole file or nothing, usual permissions), transient-fault classification,
and the bounded retry every storage call goes through."""
from __future__ import annotations

import os
import pickle
import stat

import pytest

from common import storage


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
    with pytest.raises(storage.StorageError, match="disk full"):
        storage.write_text_atomic(str(target), "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_transient_faults_are_told_from_permanent_ones():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    transient = [EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ReadTimeoutError(endpoint_url="x"),
                 ConnectionResetError(), TimeoutError(), OSError(5, "I/O error")]
    permanent = [FileNotFoundError("gone"), PermissionError("denied"), NoCredentialsError(), ValueError("bug")]
    assert all(storage.is_transient(e) for e in transient)
    assert not any(storage.is_transient(e) for e in permanent)


@pytest.fixture
def fast_policy():
    saved = storage.policy()
    storage.set_policy(storage.RetryPolicy(attempts=4, backoff_s=0.0))
    yield
    storage.set_policy(saved)


def test_call_retries_transient_faults_then_names_the_uri(capsys, fast_policy):
    from botocore.exceptions import EndpointConnectionError

    uri = "s3://b/out/shards/x.tar"
    calls = []

    def flaky(fs):
        calls.append(1)
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k")
        return "ok"
    assert storage.call(flaky, uri, "uploading") == "ok" and len(calls) == 3
    assert capsys.readouterr().out.count("retry ") == 2

    def down(fs):
        calls.append(1)
        raise OSError(16, "Please reduce your request rate.")   # s3fs's 503 SlowDown
    calls.clear()
    with pytest.raises(storage.StorageError, match=r"uploading s3://b/out/shards/x.tar failed after 4 "
                                                   r"attempt\(s\).*OSError.*reduce your request rate") as e:
        storage.call(down, uri, "uploading")
    assert len(calls) == 4 and e.value.uri == uri   # bounded
    assert not isinstance(e.value, OSError)           # never read as a bad input by content handlers
    again = pickle.loads(pickle.dumps(e.value))       # as Ray ships it from a task to the driver
    assert (type(again), str(again), again.uri) == (storage.StorageError, str(e.value), uri)

    def refused(fs):
        calls.append(1)
        raise PermissionError("denied")
    calls.clear()
    with pytest.raises(storage.StorageError, match="access refused"):
        storage.call(refused, uri, "writing")
    assert len(calls) == 1   # retrying cannot fix a refused permission

    def missing(fs):
        calls.append(1)
        raise FileNotFoundError(uri)
    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.call(missing, uri, "reading")
    assert len(calls) == 1   # a fact about the data, not a fault

    def bug(fs):
        raise KeyError("not a storage fault")
    with pytest.raises(KeyError):
        storage.call(bug, uri, "writing")


def test_local_disk_errors_are_storage_errors_without_retries(tmp_path, monkeypatch, fast_policy):
    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(storage.StorageError, match=r"after 1 attempt\(s\).*No space left") as e:
        storage.write_text_atomic(str(tmp_path / "m.json"), "x")
    assert e.value.uri == str(tmp_path / "m.json")


def test_retrying_reader_resumes_at_its_offset_after_a_fault(tmp_path, monkeypatch, fast_policy):
    """A stream that breaks mid-file is reopened at the same offset: the bytes read are the file's bytes."""
    data = bytes(range(256)) * 400
    (tmp_path / "big.bin").write_bytes(data)
    fs = storage._fs(str(tmp_path))
    real_open = type(fs).open
    opened = []

    def breaking_open(self, path, mode="rb", **kw):
        f = real_open(self, path, mode, **kw)
        opened.append(1)
        if len(opened) == 2:      # the second stream fails on its first read
            def broken(n=-1):
                raise ConnectionResetError("connection reset by peer")
            f.read = broken
        return f
    monkeypatch.setattr(type(fs), "open", breaking_open)
    monkeypatch.setattr(storage, "_retried", lambda uri: True)   # retry as on S3 (local disks are not retried)
    with storage.open_read(str(tmp_path / "big.bin")) as r:
        got = r.read(1000)
        r.seek(5000)
        got += r.read(50_000)
        got += r.read()
    assert got == data[:1000] + data[5000:]
    assert len(opened) == 3
