"""Tokenize jobs end to end on a local Ray (started once for this module) and a moto S3 server on 127.0.0.1.

One generated corpus holds every input kind with good inputs and one of each kind of bad input; the module's
`tokenized` fixture runs the four kinds into one output, and the tests check what came out: counts, quarantine
reasons, the samples read back three ways (our reader, ray.data.read_webdataset, the webdataset package),
reruns, new inputs, interrupted runs, S3, and a MAGVIT-v2 image tokenizer.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.moto_s3 import moto_s3
from tokenize_jobs.reliability_report import png, png_header, wav, wav_claiming_huge_length

pytestmark = pytest.mark.timeout(600)

MAX_LINE = 4096
BASE_OVERRIDES = ["ray.progress_bars=false", f"input.max_line_bytes={MAX_LINE}", "shards.max_samples=6",
                  "tokenizers.speech.max_seconds=1.0"]


# ---- corpus ---------------------------------------------------------------------------------------------------

def _png(size: int = 8, seed: int = 0) -> bytes:
    return png(size, size, seed)


def _audio(seconds: float = 0.4, sr: int = 16000, seed: int = 0, fmt: str = "WAV", value: float | None = None):
    return wav(seconds, sr, seed, value, fmt)


_huge_wav = wav_claiming_huge_length


def _jsonl(path: Path, lines: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")


def _chat(user: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


# What each kind must give: good inputs -> samples per task; bad inputs -> reasons.
EXPECTED = {
    "messages": {
        "tasks": {"i2t": 2, "asr": 1, "t2i": 1, "tts": 1, "text": 1},
        "reasons": ["bad_json", "not_utf8", "placeholder_mismatch", "missing_media", "path_escape", "path_escape",
                    "path_escape", "corrupt_image", "empty_file", "image_too_large", "truncated_audio", "empty_file",
                    "audio_nan", "truncated_audio", "line_too_long", "bad_role", "bad_messages"],
    },
    "image-text": {
        "tasks": {"t2i": 4, "i2t": 4},
        "reasons": ["corrupt_image", "empty_file", "missing_caption", "missing_image", "not_utf8", "empty_text",
                    "corrupt_image"],
    },
    "speech-text": {
        "tasks": {"asr": 4, "tts": 4},
        "reasons": ["missing_audio", "missing_transcript", "audio_nan", "empty_text", "audio_too_long"],
    },
    "text": {
        "tasks": {"text": 4},
        "reasons": ["empty_text", "empty_text", "not_utf8", "bad_json"],
    },
}


def make_corpus(root: Path) -> dict[str, Path]:
    # messages: the Omni-Diffusion SFT format, media relative to the JSONL folder
    m = root / "messages"
    (m / "media").mkdir(parents=True)
    for i in range(3):
        (m / "media" / f"img{i}.png").write_bytes(_png(seed=i))
        (m / "media" / f"a{i}.wav").write_bytes(_audio(seed=i))
    (root / "outside.png").write_bytes(_png(seed=9))
    (m / "media" / "link.png").symlink_to(root / "outside.png")
    (m / "media" / "trunc.png").write_bytes(_png()[:40])
    (m / "media" / "zero.png").write_bytes(b"")
    (m / "media" / "bomb.png").write_bytes(png_header(20000, 20000))
    (m / "media" / "trunc.wav").write_bytes(_audio()[:3000])
    (m / "media" / "zero.wav").write_bytes(b"")
    (m / "media" / "nan.wav").write_bytes(_audio(value=float("nan")))
    (m / "media" / "huge.wav").write_bytes(_huge_wav())
    img = lambda p, **kw: _chat("<|image|>\nWhat is shown?", "A pattern.", images=[p], **kw)  # noqa: E731
    aud = lambda p: _chat("<|audio|>\nTranscribe.", "a tone", audios=[p])  # noqa: E731
    _jsonl(m / "sft.jsonl", [
        img("media/img0.png", label=3, split="train"),
        img("media/img1.png"),
        aud("media/a0.wav"),
        _chat("Draw a pattern.", "<|image|>", images=["media/img2.png"]),
        _chat("Say a tone.", "<|audio|>", audios=["media/a1.wav"]),
        _chat("Hello there", "General Kenobi", task="text"),
        b"",  # blank lines are not inputs
        b'{"messages": [',
        b'{"messages": "\xff\xfe"}',
        _chat("<|image|> and <|image|>", "two?", images=["media/img0.png"]),
        img("media/missing.png"),
        img("../outside.png"),
        img("/etc/hostname"),
        img("media/link.png"),
        img("media/trunc.png"),
        img("media/zero.png"),
        img("media/bomb.png"),
        aud("media/trunc.wav"),
        aud("media/zero.wav"),
        aud("media/nan.wav"),
        aud("media/huge.wav"),
        _chat("x" * (MAX_LINE + 10), "too long a line"),
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": []},
    ])
    # image-text: NAME.png + NAME.txt pairs, and a parquet file
    it = root / "image-text"
    it.mkdir()
    for i in range(3):
        (it / f"pair{i}.png").write_bytes(_png(seed=10 + i))
        (it / f"pair{i}.txt").write_text(f"pattern number {i}")
    (it / "trunc.png").write_bytes(_png()[:40])
    (it / "trunc.txt").write_text("truncated")
    (it / "zero.png").write_bytes(b"")
    (it / "zero.txt").write_text("zero bytes")
    (it / "lonely.png").write_bytes(_png())
    (it / "orphan.txt").write_text("no image")
    (it / "latin1.png").write_bytes(_png())
    (it / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (it / "blank.png").write_bytes(_png())
    (it / "blank.txt").write_text("   \n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [_png(seed=20), b"not an image"], "caption": ["from parquet", "bad bytes"]}),
                   it / "rows.parquet")
    # speech-text: a LibriSpeech chapter and a JSONL file
    ch = root / "speech" / "19" / "198"
    ch.mkdir(parents=True)
    for i in range(2):
        (ch / f"19-198-{i:04d}.flac").write_bytes(_audio(seed=i, fmt="FLAC"))
    (ch / "19-198-0007.flac").write_bytes(_audio(fmt="FLAC"))  # not in the transcript
    (ch / "19-198.trans.txt").write_text("19-198-0000 A FIRST TONE\n19-198-0001 A SECOND TONE\n"
                                         "19-198-0009 NO SUCH FILE\n")
    (root / "speech" / "wavs").mkdir()
    for i in range(2):
        (root / "speech" / "wavs" / f"s{i}.wav").write_bytes(_audio(seed=3 + i))
    (root / "speech" / "wavs" / "nan.wav").write_bytes(_audio(value=float("nan")))
    (root / "speech" / "wavs" / "long.wav").write_bytes(_audio(seconds=2.0, sr=8000))
    _jsonl(root / "speech" / "more.jsonl", [
        {"audio": "wavs/s0.wav", "text": "tone three", "speaker": "x"},
        {"audio": "wavs/s1.wav", "text": "tone four"},
        {"audio": "wavs/nan.wav", "text": "nan"},
        {"audio": "wavs/s0.wav", "text": ""},
        {"audio": "wavs/long.wav", "text": "too long for speech.max_seconds"},
    ])
    # text: JSONL and .txt files
    t = root / "text"
    _jsonl(t / "a.jsonl", [{"text": "the first sentence"}, {"text": "a second one", "prompt": "Continue:"},
                           {"text": "the third"}, {"text": ""}, {"other": 1}, b"[1, 2"])
    (t / "b.txt").write_text("a text file is one sample")
    (t / "bad.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    return {"messages": m, "image-text": it, "speech-text": root / "speech", "text": t}


# ---- fixtures ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """moto S3 on 127.0.0.1, then a local Ray whose workers inherit the S3 settings (set before ray.init)."""
    import ray

    with moto_s3() as endpoint:
        started = not ray.is_initialized()
        if started:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield {"endpoint": endpoint}
        if started:
            ray.shutdown()


def _cfg(*overrides: str):
    from common import configlib
    from tokenize_jobs.config import TokenizeJobConfig

    return configlib.load(TokenizeJobConfig, None, [*BASE_OVERRIDES, *overrides])


def _run(kind: str, inp, out, *overrides: str) -> dict:
    from tokenize_jobs.run import run_job

    return run_job(_cfg(*overrides), kind, str(inp), str(out), print_summary=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """A sqlite MLflow store the `tokenized` jobs are tracked in."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def tokenized(cluster, corpus, tmp_path_factory, tracking_uri):
    """All four kinds into one output (messages first: its audio fits the EnCodec codebooks), each job an
    MLflow run in `tracking_uri`."""
    out = tmp_path_factory.mktemp("out")
    summaries = {kind: _run(kind, corpus[kind], out, f"mlflow.tracking_uri={tracking_uri}") for kind in EXPECTED}
    return out, summaries


def _samples(out) -> list[dict]:
    from tokenize_jobs import shards

    return list(shards.iter_samples(str(out)))


def _sample_set(out) -> Counter:
    return Counter((s["meta"]["source"], s["meta"]["task"], s["input_ids"].tobytes()) for s in _samples(out))


def _seed_tokenizers(src_out: Path, dst_out: Path) -> None:
    """Reuse the fitted tokenizers (the first run's job) so a test's fresh output skips the fit."""
    shutil.copytree(src_out / "tokenizers", dst_out / "tokenizers")


# ---- round trip, counts, quarantine -----------------------------------------------------------------------------

def test_counts_and_quarantine_reasons_per_kind(tokenized):
    out, summaries = tokenized
    for kind, want in EXPECTED.items():
        s = summaries[kind]
        assert s["samples_per_task"] == want["tasks"], kind
        assert s["quarantined_by_reason"] == dict(Counter(want["reasons"])), kind
        n_good = sum(want["tasks"].values()) // (2 if kind in ("image-text", "speech-text") else 1)
        assert s["inputs_tokenized"] == n_good and s["inputs_quarantined"] == len(want["reasons"]), kind
        assert s["inputs_seen"] == s["inputs_tokenized"] + s["inputs_quarantined"]
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["inputs_seen"] == c["inputs_tokenized"] + c["inputs_quarantined"] == sum(
        s["inputs_seen"] for s in summaries.values())
    assert c["samples_written"] == sum(sh["samples"] for sh in manifest["shards"]) == len(_samples(out))
    assert c["samples_per_task"] == dict(sum((Counter(w["tasks"]) for w in EXPECTED.values()), Counter()))
    assert set(c["tokens_per_task"]) == set(c["samples_per_task"]) and all(v > 0 for v in c["tokens_per_task"].values())
    assert all(sh["samples"] <= 6 for sh in manifest["shards"]) and len(manifest["shards"]) >= 5
    assert manifest["vocab"] == json.loads((out / "tokenizers" / "vocab.json").read_text())
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantine) == c["inputs_quarantined"]
    assert all(set(q) == {"source", "reason", "detail"} and q["detail"] for q in quarantine)
    by_source = {q["source"]: q["reason"] for q in quarantine}
    assert by_source["sft.jsonl:14"] == "path_escape"  # the symlink pointing outside the corpus
    assert by_source["sft.jsonl:22"] == "line_too_long"


def test_each_job_is_an_mlflow_run_with_its_counts_reasons_and_shards(tokenized, tracking_uri, tmp_path):
    from mlflow import MlflowClient

    from common.tracking import lineage
    from tokenize_jobs import shards

    out, summaries = tokenized
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("omni-diffusion-tokenize")
    runs = sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)
    manifest = shards.read_manifest(str(out))
    assert [r.data.tags[lineage.TAG_JOB_ID] for r in runs] == [r["run_id"] for r in manifest["runs"]] == [
        summaries[k]["run_id"] for k in EXPECTED]
    for run, kind in zip(runs, EXPECTED):
        s, m = summaries[kind], run.data.metrics
        assert run.info.status == "FINISHED" and run.data.params["job.kind"] == kind
        assert run.data.tags[lineage.TAG_OUTPUT] == str(out)
        assert {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("samples/")} == s["samples_per_task"]
        assert {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("quarantined/")} == \
            s["quarantined_by_reason"]
        assert m["inputs_seen"] == s["inputs_seen"] and m["samples_per_s"] > 0 and m["tokens_per_s"] > 0
        table = json.loads(Path(client.download_artifacts(run.info.run_id, "quarantine_reasons.json",
                                                          str(tmp_path / kind))).read_text())
        assert {row[0]: row[1] for row in table["data"]} == s["quarantined_by_reason"]
    # the last job left the manifest as it is now; its shard list is the output's
    assert runs[-1].data.tags[lineage.TAG_MANIFEST] == lineage.manifest_digest(manifest)
    listed = json.loads(Path(client.download_artifacts(runs[-1].info.run_id, "shards.json",
                                                       str(tmp_path / "last"))).read_text())
    assert [sh["path"] for sh in listed] == [sh["path"] for sh in manifest["shards"]]
    # what a training run on this output is linked to
    assert lineage.tokenize_runs_of(client, "omni-diffusion-tokenize", str(out), manifest) == [
        r.info.run_id for r in runs]


def test_a_down_tracking_server_costs_a_warning_not_the_job(tokenized, corpus, capsys):
    out, _ = tokenized
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"   # nothing listens once the socket closes
    summary = _run("text", corpus["text"], out, f"mlflow.tracking_uri={dead}")   # a rerun: nothing new to do
    assert summary["inputs_seen"] == 0 and summary["totals"]["inputs_seen"] > 0
    assert "the job goes on untracked" in capsys.readouterr().out


def test_samples_are_well_formed_and_in_their_vocabulary_ranges(tokenized):
    from tokenize_jobs import shards

    out, _ = tokenized
    vocab = shards.manifest_vocab(str(out))
    samples = _samples(out)
    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys))
    lo_img, hi_img = vocab.image_range()
    lo_aud, hi_aud = vocab.audio_range()
    for s in samples:
        ids, mask, meta = s["input_ids"], s["answer_mask"], s["meta"]
        assert meta["n_tokens"] == len(ids) and meta["n_answer"] == int(mask.sum()) > 0
        assert ids.min() >= 0 and ids.max() < vocab.size
        assert ids[0] == vocab.im_start_id and ids[-1] == vocab.im_end_id
        answer = ids[mask]
        if meta["task"] == "t2i":
            assert ((answer >= lo_img) & (answer < hi_img)).sum() == 64  # 8x8 pixels, all in the answer
        if meta["task"] == "tts":
            assert ((answer >= lo_aud) & (answer < hi_aud)).sum() > 0
        if meta["task"] in ("i2t", "asr", "text"):  # text answers: no media ids
            assert not ((answer >= vocab.audio_offset) & (answer < vocab.size)).any()
    meta0 = next(s["meta"] for s in samples if s["meta"]["source"] == "sft.jsonl:1")
    assert meta0["label"] == 3 and meta0["split"] == "train" and meta0["task"] == "i2t"


def test_read_back_with_ray_data_and_webdataset(tokenized):
    import ray
    import webdataset as wds

    from tokenize_jobs import shards

    out, _ = tokenized
    urls = shards.shard_urls(str(out))
    ours = {s["key"]: s for s in _samples(out)}
    rows = ray.data.read_webdataset(urls).take_all()
    assert len(rows) == len(ours)
    for row in rows:
        mine = ours[row["__key__"]]
        assert np.array_equal(np.asarray(row["input_ids.npy"]), mine["input_ids"])
        assert np.array_equal(np.asarray(row["answer_mask.npy"]).astype(bool), mine["answer_mask"])
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert sorted(g["__key__"] for g in got) == sorted(ours)
    for g in got:
        assert g["input_ids.npy"].dtype == np.int32
        assert np.array_equal(g["input_ids.npy"], ours[g["__key__"]]["input_ids"])
        assert g["meta.json"]["fingerprint"] == ours[g["__key__"]]["meta"]["fingerprint"]


def test_rerun_adds_nothing_and_new_inputs_only_are_processed(tokenized, corpus, tmp_path):
    out, _ = tokenized
    before = json.loads((out / "manifest.json").read_text())
    for kind in EXPECTED:
        s = _run(kind, corpus[kind], out)
        assert s["inputs_seen"] == 0 and s["shards_written"] == 0, kind
    after = json.loads((out / "manifest.json").read_text())
    assert after["shards"] == before["shards"] and after["counts"] == before["counts"]
    # new inputs: a new pair, and lines appended to an existing JSONL file (only they are tokenized)
    inp = tmp_path / "text"
    shutil.copytree(corpus["text"], inp)
    src = tmp_path / "out"
    src.mkdir()
    _seed_tokenizers(out, src)
    first = _run("text", inp, src)
    with open(inp / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": "an appended line"}) + "\n")
    (inp / "c.txt").write_text("a new file")
    s = _run("text", inp, src)
    assert (s["inputs_tokenized"], s["inputs_quarantined"], s["units_skipped"]) == (2, 0, 2)
    texts = Counter(s["meta"]["source"] for s in _samples(src))
    assert texts["c.txt"] == 1 and texts["a.jsonl:7"] == 1 and sum(texts.values()) == first["samples_written"] + 2


# ---- interruption ---------------------------------------------------------------------------------------------

def test_interrupted_runs_resume_to_exactly_the_full_sample_set(tokenized, corpus, tmp_path, monkeypatch):
    out, _ = tokenized
    want = Counter(k for k in _sample_set(out) if not k[0].startswith(("sft", "19/", "more", "a.jsonl", "b.txt")))
    assert sum(want.values()) == 8  # the image-text samples
    dst = tmp_path / "out"
    dst.mkdir()
    _seed_tokenizers(out, dst)
    few = "shards.max_samples=2"  # one input (t2i + i2t) per shard
    # killed in the middle of its 2nd commit: shard 1 is committed; shard 2 and its index are uploaded but the
    # manifest never lists them (orphans), nor the shards other workers wrote meanwhile
    monkeypatch.setenv("OMNIDIFF_FAIL_AFTER_SHARDS", "1:mid")
    with pytest.raises(RuntimeError, match="injected failure after 1"):
        _run("image-text", corpus["image-text"], dst, few)
    assert len(json.loads((dst / "manifest.json").read_text())["shards"]) == 1
    assert len(list((dst / "shards").iterdir())) >= 2
    monkeypatch.delenv("OMNIDIFF_FAIL_AFTER_SHARDS")
    s = _run("image-text", corpus["image-text"], dst, few)
    assert s["orphans_removed"] and all(p.startswith(("shards/", "index/")) for p in s["orphans_removed"])
    assert _sample_set(dst) == want
    m = json.loads((dst / "manifest.json").read_text())
    listed = {sh["path"] for sh in m["shards"]}
    assert {f"shards/{p.name}" for p in (dst / "shards").iterdir()} == listed  # orphans are gone
    c = m["counts"]
    assert c["inputs_seen"] == 4 + len(EXPECTED["image-text"]["reasons"]) and c["samples_written"] == 8
    assert [r["status"] for r in m["runs"]] == ["running", "done"]  # the killed run never finished


def test_a_shard_writer_that_dies_is_retried_and_its_files_are_orphans(tokenized, corpus, tmp_path, monkeypatch):
    """The tokenizer actor that writes the shards dies right after uploading a shard and its index (as on a lost
    node): Ray restarts it and retries its task, the new attempt writes under new names and is committed, and the
    run deletes the dead attempt's files at its end. Exactly the full sample set, and nothing unlisted left."""
    out, _ = tokenized
    want = Counter(k for k in _sample_set(out) if k[0].startswith(("a.jsonl", "b.txt")))
    dst = tmp_path / "out"
    dst.mkdir()
    _seed_tokenizers(out, dst)
    marker = tmp_path / "crashed"
    monkeypatch.setenv("OMNIDIFF_CRASH_SHARD_WRITER_ONCE", str(marker))
    s = _run("text", corpus["text"], dst, "shards.max_samples=2")
    assert marker.exists()
    assert s["orphans_removed"] and all(p.split("/")[1].startswith(s["run_id"]) for p in s["orphans_removed"])
    assert _sample_set(dst) == want
    m = json.loads((dst / "manifest.json").read_text())
    assert {f"shards/{p.name}" for p in (dst / "shards").iterdir()} == {e["path"] for e in m["shards"]}
    assert {f"index/{p.name}" for p in (dst / "index").iterdir()} == (
        {e["path"] for e in m["indexes"]} | {e["samples_index"]["path"] for e in m["shards"]})
    assert m["counts"]["inputs_seen"] == 8 == m["counts"]["inputs_tokenized"] + m["counts"]["inputs_quarantined"]


@pytest.mark.slow
def test_kill_9_of_the_driver_then_rerun(tokenized, corpus, tmp_path, cluster):
    """A real SIGKILL of a driver process joined to the test's Ray; the stale lock of the dead pid is taken over."""
    import ray

    out, _ = tokenized
    want = Counter(k for k in _sample_set(out) if k[0].startswith(("19/", "more")))
    dst = tmp_path / "out"
    dst.mkdir()
    _seed_tokenizers(out, dst)
    env = {**os.environ, "OMNIDIFF_FAIL_AFTER_SHARDS": "1:kill", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "tokenize_jobs.run", "--kind", "speech-text", "--input", str(corpus["speech-text"]),
           "--output", str(dst), *BASE_OVERRIDES, "shards.max_samples=2"]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (dst / "_lock.json").exists()
    s = _run("speech-text", corpus["speech-text"], dst, "shards.max_samples=2")
    assert s["took_over_lock_of"] and _sample_set(dst) == want


def _frozen(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_writer_frozen_past_its_lease_cannot_commit_after_the_takeover(tokenized, corpus, tmp_path, cluster):
    """Writer A, a real process joined to the test's Ray, freezes (SIGSTOP) in the middle of its second commit,
    after uploading that shard and before the manifest. Its 3 s lease lapses; run B takes the output over,
    fences it, deletes A's uncommitted shard and finishes. Resumed (SIGCONT), A's commit is refused: it exits 3
    and the output holds exactly the full sample set, once."""
    import ray

    out, _ = tokenized
    want = Counter(k for k in _sample_set(out) if k[0].startswith(("a.jsonl", "b.txt")))
    dst = tmp_path / "out"
    dst.mkdir()
    _seed_tokenizers(out, dst)
    lease = ("shards.max_samples=2", "lock.ttl_s=3", "lock.heartbeat_s=1")
    env = {**os.environ, "OMNIDIFF_FAIL_AFTER_SHARDS": "1:stop", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "tokenize_jobs.run", "--kind", "text", "--input", str(corpus["text"]),
           "--output", str(dst), *BASE_OVERRIDES, *lease]
    a = subprocess.Popen(cmd, env=env, cwd=Path(__file__).parents[2], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not _frozen(a.pid):
            assert a.poll() is None and time.monotonic() < deadline, "writer A never reached its second commit"
            time.sleep(0.2)
        time.sleep(4)                                    # A's lease lapses while it is frozen
        s = _run("text", corpus["text"], dst, *lease)    # B
        assert s["took_over_lock_of"] and s["orphans_removed"]
    finally:
        os.kill(a.pid, signal.SIGCONT)
        printed = a.communicate(timeout=120)[0]
    assert a.returncode == 3, printed[-3000:]
    assert "another run took the output over" in printed or "lost its lock" in printed, printed[-3000:]
    assert _sample_set(dst) == want
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["counts"]["inputs_seen"] == 8 and manifest["writer"]["run_id"] == manifest["runs"][-1]["run_id"]
    # A's Ray workers may still have uploaded shards while its driver was frozen: never listed, and the next
    # run deletes them
    listed = {e["path"].split("/")[-1] for e in manifest["shards"]}
    assert listed <= {p.name for p in (dst / "shards").iterdir()}
    again = _run("text", corpus["text"], dst, *lease)
    assert again["inputs_seen"] == 0 and {p.name for p in (dst / "shards").iterdir()} == listed


def test_two_writers_racing_on_one_output_commit_each_input_once(tokenized, corpus, tmp_path, cluster):
    """Two tokenize processes started together on the same output: one writes; the other is refused the lock
    (exit 3) or, if it starts after the first finished, finds nothing left to do. Every input is in exactly once."""
    import ray

    out, _ = tokenized
    want = Counter(k for k in _sample_set(out) if k[0].startswith(("a.jsonl", "b.txt")))
    dst = tmp_path / "out"
    dst.mkdir()
    _seed_tokenizers(out, dst)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    env.pop("OMNIDIFF_FAIL_AFTER_SHARDS", None)
    cmd = [sys.executable, "-m", "tokenize_jobs.run", "--kind", "text", "--input", str(corpus["text"]),
           "--output", str(dst), *BASE_OVERRIDES, "shards.max_samples=1"]
    procs = [subprocess.Popen(cmd, env=env, cwd=Path(__file__).parents[2], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[0]) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 3]), [text[-2000:] for _, text in results]
    if codes == [0, 3]:
        assert any("locked by run" in text for rc, text in results if rc == 3)
    assert _sample_set(dst) == want
    assert json.loads((dst / "manifest.json").read_text())["counts"]["inputs_seen"] == 8


# ---- S3 ---------------------------------------------------------------------------------------------------------

def test_s3_input_and_output_round_trip(cluster, corpus, tokenized):
    import ray
    import webdataset as wds

    from common import storage
    from tokenize_jobs import shards

    fs = storage.filesystem("s3://corpus")
    fs.mkdir("corpus")
    fs.mkdir("shards")
    src = corpus["messages"]
    fs.put_file(str(src / "sft.jsonl"), "s3://corpus/sft/sft.jsonl")
    for name in ("img0.png", "img1.png", "img2.png", "a0.wav", "a1.wav", "trunc.png"):
        fs.put_file(str(src / "media" / name), f"s3://corpus/sft/media/{name}")
    # seed the fitted tokenizers (a fit reads the corpus and writes a 90 MB codec: the local runs cover it)
    fs.put(str(tokenized[0] / "tokenizers"), "s3://shards/sft/tokenizers", recursive=True)
    s = _run("messages", "s3://corpus/sft", "s3://shards/sft")
    # the bad media files were not uploaded: those lines are quarantined as missing_media instead
    local = tokenized[1]["messages"]
    assert s["samples_per_task"] == local["samples_per_task"]
    assert s["inputs_quarantined"] == local["inputs_quarantined"]
    assert fs.exists("s3://shards/sft/tokenizers/tokenizers.json") and not fs.exists("s3://shards/sft/_lock.json")
    samples = list(shards.iter_samples("s3://shards/sft"))
    assert len(samples) == s["samples_written"] == 6
    urls = shards.shard_urls("s3://shards/sft")
    assert len(ray.data.read_webdataset(urls).take_all()) == 6

    def s3_open(url, mode="rb", bufsize=8192, **kw):  # webdataset has no s3 scheme of its own
        return storage.filesystem(url).open(url, mode)

    wds.gopen_schemes["s3"] = s3_open
    assert len(list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())) == 6
    again = _run("messages", "s3://corpus/sft", "s3://shards/sft")
    assert again["inputs_seen"] == 0 and again["units_skipped"] == 1


def test_unreachable_input_or_output_fails_before_any_work(tmp_path, cluster, capsys):
    from tokenize_jobs import run

    rc = run.main(["--kind", "text", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert rc == 2 and "input" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "c").mkdir()
    rc = run.main(["--kind", "text", "--input", str(tmp_path / "c"), "--output", "s3://no-such-bucket/x"])
    assert rc == 2 and "bucket s3://no-such-bucket does not exist" in capsys.readouterr().err


def test_passes_run_each_kind_on_its_own(tmp_path, cluster, corpus, capsys):
    """tokenize_jobs.passes over a root: text is tokenized, the kinds with no raw prefix are skipped, and a
    speech-text pass whose output is locked by another run fails alone; the exit status names it (16 + 4)."""
    from tokenize_jobs import passes
    from tokenize_jobs.lock import OutputLock

    root = tmp_path / "data"
    shutil.copytree(corpus["text"], root / "raw" / "text")
    shutil.copytree(corpus["speech-text"], root / "raw" / "speech-text")
    (root / "raw" / "messages").mkdir(parents=True)   # present but empty: skipped like a missing prefix
    held = OutputLock(str(root / "tokens" / "speech-text"), "another-run", ttl_s=600, heartbeat_s=60).acquire()
    try:
        rc = passes.main(["--root", str(root), *BASE_OVERRIDES])
    finally:
        held.release()
    out = capsys.readouterr().out
    assert rc == passes.FAILED_BASE + passes.KIND_BITS["speech-text"] == 20
    assert out.strip().splitlines()[-1] == "failed: speech-text (exit 3)"
    status = {line.split()[0]: line.split()[1] for line in out.strip().splitlines()[-5:-1]}
    assert status == {"text": "done", "image-text": "skipped", "speech-text": "failed", "messages": "skipped"}
    assert _sample_set(root / "tokens" / "text") and not (root / "tokens" / "speech-text" / "manifest.json").exists()


# ---- MAGVIT-v2 --------------------------------------------------------------------------------------------------

def test_magvit2_image_tokenizer_job(cluster, tmp_path):
    from tokenize_jobs import shards

    inp = tmp_path / "pairs"
    inp.mkdir()
    for i in range(2):
        (inp / f"p{i}.png").write_bytes(_png(size=40, seed=i))
        (inp / f"p{i}.txt").write_text(f"picture {i}")
    s = _run("image-text", inp, tmp_path / "out", "tokenizers.image.kind=magvit2", "tokenizers.image.size=32",
             "tokenizers.image.magvit2_preset=tiny", "tokenizers.image.random_init=true")
    assert s["samples_per_task"] == {"i2t": 2, "t2i": 2}
    vocab = shards.manifest_vocab(str(tmp_path / "out"))
    assert vocab.image_tokenizer == "magvit2" and vocab.image_codebook_size == 2 ** 13
    lo, hi = vocab.image_range()
    for sample in shards.iter_samples(str(tmp_path / "out")):
        ids = sample["input_ids"]
        span = ids[(ids >= lo) & (ids < hi)]
        assert len(span) == 4  # (32 / 16)^2 codes, between boi and eoi
        start = int(np.flatnonzero(ids == vocab.boi_id)[0])
        assert ids[start + 5] == vocab.eoi_id
