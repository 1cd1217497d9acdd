"""Listing and expanding raw corpora (tokenize_jobs/sources.py), without Ray: fingerprints that decide what a
rerun skips, the streaming JSONL reader, and inputs that vanish or escape the corpus root."""
from __future__ import annotations

import io
import json

import pytest

from tokenize_jobs import sources
from tokenize_jobs.config import InputConfig
from tokenize_jobs.sources import _iter_lines


def _units(root, kind="text"):
    ctx = sources.corpus_context(kind, str(root))
    return ctx, sources.list_units(ctx, InputConfig())


def _expand(ctx, unit, done=()):
    return list(sources.expand_unit(ctx, unit, InputConfig(max_line_bytes=64), set(done)))


@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
def test_long_lines_are_skipped_in_pieces_with_stable_hashes(chunk):
    data = b'{"a": 1}\n' + b"x" * 200 + b'\n\n{"b": 2}\r\nlast'
    got = [(n, line, length) for n, line, _, length in _iter_lines(io.BytesIO(data), 64, chunk)]
    assert got == [(1, b'{"a": 1}', 8), (2, None, 200), (3, b"", 0), (4, b'{"b": 2}', 8), (5, b"last", 4)]
    whole = [h for *_, h, _ in _iter_lines(io.BytesIO(data), 64, 1 << 20)]
    assert [h for *_, h, _ in _iter_lines(io.BytesIO(data), 64, chunk)] == whole


def test_appended_lines_are_the_only_new_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "one"}\n')
    ctx, (unit,) = _units(tmp_path)
    rows = _expand(ctx, unit)
    fps = [r["fp"] for r in rows if r["status"] == "pending"]
    assert len(fps) == len(set(fps)) == 3  # a repeated line is a second input, not a duplicate
    assert rows[-1] == sources.unit_row(unit["unit"], 3, unit["files"][0]["rel"])
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write('{"text": "three"}\n')
    ctx, (changed,) = _units(tmp_path)
    assert changed["unit"] != unit["unit"]  # size/mtime changed: the unit is listed as new
    new = _expand(ctx, changed, done=fps)
    assert [json.loads(r["spec"])["line"] for r in new if r["status"] == "pending"] == ['{"text": "three"}']
    assert new[-1]["unit_new"] == 1


def test_unchanged_units_keep_their_fingerprint(tmp_path):
    (tmp_path / "p.png").write_bytes(b"png")
    (tmp_path / "p.txt").write_text("caption")
    (tmp_path / "lonely.png").write_bytes(b"png")
    _, first = _units(tmp_path, "image-text")
    _, again = _units(tmp_path, "image-text")
    assert [u["unit"] for u in first] == [u["unit"] for u in again]
    assert sorted((u["type"], u.get("reason")) for u in first) == [("orphan", "missing_caption"), ("pair", None)]


def test_file_vanishing_after_listing_is_quarantined(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    ctx, (unit,) = _units(tmp_path)
    (tmp_path / "a.jsonl").unlink()
    rows = _expand(ctx, unit)
    assert [(r["status"], r["reason"]) for r in rows] == [("quarantined", "file_vanished"), ("unit", "")]


def test_long_line_is_quarantined_not_loaded(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "' + b"y" * 500 + b'"}\n{"text": "ok"}\n')
    ctx, (unit,) = _units(tmp_path)
    rows = _expand(ctx, unit)
    assert [(r["status"], r["reason"]) for r in rows[:2]] == [("quarantined", "line_too_long"), ("pending", "")]
    assert "512 bytes" in rows[0]["detail"]


@pytest.mark.parametrize("path,reason", [("../outside.png", "path_escape"), ("/etc/hostname", "path_escape"),
                                         ("media/link.png", "path_escape"), ("media/none.png", "missing_media"),
                                         (7, "bad_media_path")])
def test_media_references_stay_inside_the_corpus(tmp_path, path, reason):
    root = tmp_path / "corpus"
    (root / "media").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(b"secret")
    (root / "media" / "link.png").symlink_to(tmp_path / "outside.png")
    ctx = sources.corpus_context("messages", str(root))
    with pytest.raises(sources.BadInput) as e:
        sources.read_media(ctx, "", path, InputConfig())
    assert e.value.reason == reason


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(sources.InputError, match="does not exist"):
        sources.corpus_context("text", str(tmp_path / "nope"))


def test_truncated_wav_is_detected():
    import struct

    header = b"RIFF" + struct.pack("<I", 36 + 1000) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000, 2, 16)
    sources.check_wav_complete(header + b"data" + struct.pack("<I", 8) + b"\0" * 8, "ok.wav")
    with pytest.raises(sources.BadInput, match="declares 1,000 bytes") as e:
        sources.check_wav_complete(header + b"data" + struct.pack("<I", 1000) + b"\0" * 8, "cut.wav")
    assert e.value.reason == "truncated_audio"


def test_storage_outage_while_reading_fails_the_job_instead_of_quarantining(monkeypatch):
    """An input whose storage is unreachable is not bad input: quarantining it would mark it done and lose it."""
    from common import storage
    from tokenize_jobs import pipeline

    cfg = type("C", (), {"templates": None, "tasks": None, "input": None})()
    rows = [{"source": "s3://b/x.jsonl#1", "status": "pending"}]
    ctx = {"storage": storage.policy_dict()}

    def down(*a, **k):
        raise storage.StorageError("reading s3://b/a.png failed after 8 attempt(s)", "s3://b/a.png")

    monkeypatch.setattr(pipeline.sources, "decode_input", down)
    with pytest.raises(storage.StorageError, match="s3://b/a.png"):
        pipeline.decode_inputs(rows, ctx, cfg, None)

    def broken(*a, **k):
        raise OSError("image file is truncated")   # a bad file, not an outage: quarantined as before

    monkeypatch.setattr(pipeline.sources, "decode_input", broken)
    assert pipeline.decode_inputs(rows, ctx, cfg, None) == []
    assert rows[0]["status"] == "quarantined"


def test_a_storage_fault_while_expanding_a_file_is_not_a_quarantine(tmp_path, monkeypatch):
    """The unit's own file failing past the retries fails the task; the unit is not recorded as unreadable."""
    from common import storage

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    ctx = sources.corpus_context("text", str(tmp_path))
    cfg = InputConfig()
    unit = sources.list_units(ctx, cfg)[0]

    def down(uri):
        raise storage.StorageError(f"reading {uri} failed after 8 attempt(s)", uri)
    monkeypatch.setattr(sources.storage, "open_read", down)
    with pytest.raises(storage.StorageError, match="a.jsonl"):
        list(sources.expand_unit(ctx, unit, cfg, set()))


def test_reference_spoken_lines_tokenize_as_svqa_and_sqa(tmp_path):
    """The reference's spoken VQA and spoken QA SFT lines (no "task"): the messages source names their tasks
    (model.tasks.infer_task) and their answers (text, then the answer speech) are what training learns."""
    from model.prompts import TaskTemplates, encode_messages
    from model.tokenizers import TokenizerSet
    from tests.helpers.export import write_debug_export, write_jsonl, write_media
    from tokenize_jobs.config import TasksConfig

    tokenizers = TokenizerSet.load(str(write_debug_export(tmp_path / "export") / "tokenizers"))
    root = tmp_path / "corpus"
    write_media(root)
    svqa = {"messages": [{"role": "system", "content": "Please response the input audio based on the given image."},
                         {"role": "user", "content": "<|audio|>\n<|image|>"},
                         {"role": "assistant", "content": "seven\n<|audio|>"}],
            "audios": ["audio/question.wav", "audio/seven.wav"], "images": ["images/seven.png"]}
    sqa = {"messages": [{"role": "system", "content": "Please response the input audio."},
                        {"role": "user", "content": "<|audio|>"}, {"role": "assistant", "content": "seven\n<|audio|>"}],
           "audios": ["audio/question.wav", "audio/seven.wav"]}
    write_jsonl(root / "sft.jsonl", [svqa, sqa])
    ctx, units = _units(root, "messages")
    assert len(units) == 1
    cfg = InputConfig(max_line_bytes=1 << 20)
    rows = [r for r in sources.expand_unit(ctx, units[0], cfg, set()) if "line" in json.loads(r["spec"])]
    vocab = tokenizers.vocab
    got = []
    for row in rows:
        record, media = sources.decode_input(ctx, row, tokenizers, TaskTemplates(), TasksConfig(), cfg)
        (sample,) = record["samples"]
        audios = [tokenizers.speech.encode(media[k]) for k in sorted(media) if k.startswith("audio")]
        images = [tokenizers.image.encode(media[k][None])[0] for k in sorted(media) if k.startswith("image")]
        enc = encode_messages(sample["messages"], vocab, tokenizers.text, images=images, audios=audios)
        answer = enc.input_ids[enc.answer_mask]
        assert vocab.boa_id in answer.tolist() and answer[-1] == vocab.im_end_id   # text, <boa> speech <eoa>
        got.append(sample["task"])
    assert got == ["svqa", "sqa"]
