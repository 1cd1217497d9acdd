"""Raw corpora: listing them (driver), expanding listed units into inputs, and reading/decoding each input (tasks).

Vocabulary used throughout the job:
- a *unit* is what the driver lists without opening anything: a JSONL/.txt/parquet file, an image+caption pair,
  a LibriSpeech chapter (its `*.trans.txt` and the `.flac` files beside it).
- an *input* is what is tokenized or quarantined as a whole: a JSONL line, a .txt file, a parquet row, a pair,
  an utterance. One input gives one sample (messages, text) or one per task (t2i + i2t, asr + tts).

Fingerprints (32 hex digits of sha256) decide what a rerun skips:
- unit: the job kind, the corpus root, and every listed file's relative path, size and version (mtime locally,
  ETag on S3). A unit whose fingerprint is recorded as complete is skipped without being opened.
- input: kind, root, file, and the input's own content (a line's bytes plus which repetition of that exact line
  it is; a pair's or an utterance's file versions and text). So appending lines to a JSONL file makes its unit
  new, but only the appended lines are tokenized. A media file referenced from a messages line is not part of
  that line's fingerprint: replacing an image in place is not detected (write a new file name instead).

Every reason an input is quarantined is a short stable tag (the `reason` column of quarantine.jsonl):
bad_json, not_utf8, empty_text, line_too_long, file_too_large, bad_messages, bad_task, bad_media_path,
path_escape, missing_media, file_vanished, placeholder_in_text, missing_caption, missing_image,
missing_audio, missing_transcript, bad_speech_codes, bad_parquet, unreadable_file, truncated_audio, plus
those the tokenizers raise (model/tokenizers: corrupt_image, image_too_large, empty_file, corrupt_audio,
audio_too_long, audio_nan, needs_speech_codes, empty_audio, placeholder_mismatch, bad_role, ...) and the
tokenize stage (encode_error, no_answer, too_many_tokens, unexpected_error). A storage fault is never a reason: it fails the job (common/storage.py).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from collections import Counter
from typing import Any, Iterator

import numpy as np

from common import storage
from common.cli import BAD_INPUT, CliError
from model.prompts import TaskTemplates, answer_content, task_messages
from model.tasks import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, TASKS, infer_task
from model.tokenizers.base import BadInput
from model.vocab import PromptFormat
from tokenize_jobs.config import InputConfig, TasksConfig

TRANSCRIPT_SUFFIX = ".trans.txt"


class InputError(RuntimeError, CliError):
    """The input location is missing or unreachable (reported before any work starts)."""
    exit_code = BAD_INPUT


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()[:32]


# ---- the corpus and its listing (driver) -------------------------------------------------------------------------

def corpus_context(kind: str, input_uri: str) -> dict[str, Any]:
    """Plain-data description of a corpus that Ray tasks receive: kind, root folder, the listed path."""
    s3 = storage.is_s3(input_uri)
    path = input_uri.rstrip("/") if s3 else os.path.abspath(input_uri)
    try:
        is_dir = storage.isdir(path)
        if not is_dir and not storage.isfile(path):
            raise InputError(f"input {input_uri} does not exist: give a folder or file of the corpus "
                             f"(local path or s3://bucket/prefix)")
    except InputError:
        raise
    except Exception as e:  # unreachable endpoint after the retries, bad credentials, ...
        raise InputError(f"input {input_uri} is not reachable ({type(e).__name__}: {e}); check the path, "
                         f"AWS_ENDPOINT_URL and credentials") from None
    root = path if is_dir else posixpath.dirname(path) if s3 else os.path.dirname(path)
    # the driver's storage retry policy travels with the corpus to every task
    return {"kind": kind, "input": path, "root": root, "s3": s3, "is_dir": is_dir, "storage": storage.policy_dict()}


def full_path(ctx: dict[str, Any], rel: str) -> str:
    return storage.join(ctx["root"], rel)


def _list_files(ctx: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """rel path -> {size, version} of every file under the input (hidden/underscore names skipped).
    A storage fault that outlasts the retries raises storage.StorageError: a partial listing would let the
    job record a shortened corpus as complete."""
    try:
        found = (storage.find(ctx["input"], detail=True) if ctx["is_dir"]
                 else {ctx["input"]: storage.info(ctx["input"])})
    except FileNotFoundError as e:
        raise InputError(f"cannot list input {ctx['input']} ({e})") from None
    root = ctx["root"].split("://", 1)[-1].rstrip("/")
    out = {}
    for path, info in found.items():
        path = path.split("://", 1)[-1]
        rel = path[len(root) + 1:] if path.startswith(root + "/") else posixpath.basename(path)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if info.get("type") not in ("file", None):
            continue
        version = str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")
        out[rel] = {"rel": rel, "size": int(info.get("size") or 0), "version": version}
    return out


def list_units(ctx: dict[str, Any], cfg: InputConfig) -> list[dict[str, Any]]:
    """The corpus as listing units, sorted by first file (stable across reruns)."""
    files = _list_files(ctx)
    kind = ctx["kind"]
    units: list[dict[str, Any]] = []

    def add(utype: str, refs: list[dict[str, Any]], **extra: Any) -> None:
        fp = fingerprint("unit", kind, ctx["root"], utype, [[r["rel"], r["size"], r["version"]] for r in refs])
        units.append({"type": utype, "files": refs, "unit": fp, **extra})

    taken: set[str] = set()
    if kind == "image-text":
        exts = tuple(e.lower() for e in cfg.image_exts)
        for rel, ref in sorted(files.items()):
            if rel.endswith(".parquet"):
                add("parquet", [ref])
                taken.add(rel)
            elif rel.lower().endswith(exts):
                caption = posixpath.splitext(rel)[0] + ".txt"
                taken.add(rel)
                if caption in files:
                    taken.add(caption)
                    add("pair", [ref, files[caption]])
                else:
                    add("orphan", [ref], reason="missing_caption",
                        detail=f"no caption file {posixpath.basename(caption)} beside the image")
        for rel, ref in sorted(files.items()):
            if rel not in taken and rel.endswith(".txt"):
                add("orphan", [ref], reason="missing_image", detail="caption file with no image of the same name")
    elif kind == "speech-text":
        by_dir: dict[str, list[str]] = {}
        for rel in files:
            by_dir.setdefault(posixpath.dirname(rel), []).append(rel)
        for rel, ref in sorted(files.items()):
            if rel.endswith(TRANSCRIPT_SUFFIX):
                # A LibriSpeech chapter: <dir>/<spk>-<chap>.trans.txt and <dir>/<spk>-<chap>-<utt>.flac
                prefix = posixpath.basename(rel)[: -len(TRANSCRIPT_SUFFIX)] + "-"
                audio = sorted(r for r in by_dir[posixpath.dirname(rel)]
                               if r.endswith(".flac") and posixpath.basename(r).startswith(prefix))
                taken.update(audio)
                add("chapter", [ref] + [files[a] for a in audio])
            elif rel.endswith(".jsonl"):
                add("jsonl", [ref])
        for rel, ref in sorted(files.items()):
            if rel.endswith(".flac") and rel not in taken:
                add("orphan", [ref], reason="missing_transcript", detail="no chapter *.trans.txt lists this file")
    elif kind in ("messages", "text"):
        for rel, ref in sorted(files.items()):
            if rel.endswith(".jsonl"):
                add("jsonl", [ref])
            elif kind == "text" and rel.endswith(".txt"):
                add("txt", [ref])
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return units


# ---- expanding a unit into inputs (Ray tasks) ---------------------------------------------------------------------

def _row(ctx: dict[str, Any], unit: str, file: str, fp: str, source: str, spec: dict[str, Any] | None = None,
         data: bytes = b"", reason: str = "", detail: str = "") -> dict[str, Any]:
    return {"fp": fp, "file": file, "unit": unit, "source": source, "unit_new": 0,
            "status": "quarantined" if reason else "pending", "reason": reason, "detail": detail[:2000],
            "spec": json.dumps(spec or {}, ensure_ascii=False), "data": data}


def unit_row(unit: str, n_new: int, file: str) -> dict[str, Any]:
    """Marks a unit complete once `n_new` inputs of it are committed; `file` is its first file (under which
    its inputs are recorded)."""
    return {"fp": "", "file": file, "unit": unit, "source": "", "unit_new": n_new, "status": "unit", "reason": "",
            "detail": "", "spec": "{}", "data": b""}


def _iter_lines(f, max_bytes: int, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes | None, str, int]]:
    """(line number, line bytes or None if too long, sha256 of the line, length), reading `chunk` bytes at a
    time (fsspec's S3 files have no bounded readline). A too-long line is hashed while it streams past and is
    never held in memory whole."""
    lineno, buf = 0, b""
    long_hash, long_len = None, 0  # set while skipping through a too-long line
    while True:
        data = f.read(chunk)
        buf += data
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1:]
            lineno += 1
            if long_hash is not None:
                long_hash.update(line)
                yield lineno, None, long_hash.hexdigest(), long_len + len(line)
                long_hash, long_len = None, 0
                continue
            body = line.rstrip(b"\r")
            if len(body) > max_bytes:
                yield lineno, None, hashlib.sha256(body).hexdigest(), len(body)
            else:
                yield lineno, body, hashlib.sha256(body).hexdigest(), len(body)
        if long_hash is None and len(buf) > max_bytes:
            long_hash, long_len = hashlib.sha256(buf), len(buf)
            buf = b""
        elif long_hash is not None:
            long_hash.update(buf)
            long_len += len(buf)
            buf = b""
        if not data:
            break
    if long_hash is not None:
        yield lineno + 1, None, long_hash.hexdigest(), long_len
    elif buf:
        body = buf.rstrip(b"\r")
        if len(body) > max_bytes:
            yield lineno + 1, None, hashlib.sha256(body).hexdigest(), len(body)
        else:
            yield lineno + 1, body, hashlib.sha256(body).hexdigest(), len(body)


def _check_local_inside(ctx: dict[str, Any], full: str) -> None:
    """A symlink may point outside the corpus even when its own path does not."""
    if ctx["s3"]:
        return
    root = os.path.realpath(ctx["root"])
    real = os.path.realpath(full)
    if real != root and not real.startswith(root + os.sep):
        raise BadInput("path_escape", f"resolves outside the corpus root {ctx['root']} (symlink?)")


def expand_unit(ctx: dict[str, Any], unit: dict[str, Any], cfg: InputConfig, done: set[str]) -> Iterator[dict]:
    """Input rows of one unit (skipping fingerprints in `done`), then a `unit` row with how many it yielded."""
    kind, uid, refs = ctx["kind"], unit["unit"], unit["files"]
    first = refs[0]["rel"]
    n = 0

    def fresh(fp: str) -> bool:
        return fp not in done

    if unit["type"] == "orphan":
        fp = fingerprint("input", kind, ctx["root"], first, refs[0]["size"], refs[0]["version"])
        if fresh(fp):
            n += 1
            yield _row(ctx, uid, first, fp, first, reason=unit["reason"], detail=unit["detail"])
    elif unit["type"] == "pair":
        img, cap = refs
        fp = fingerprint("input", kind, ctx["root"], [[r["rel"], r["size"], r["version"]] for r in refs])
        if fresh(fp):
            n += 1
            yield _row(ctx, uid, first, fp, first, {"image": img["rel"], "caption": cap["rel"]})
    elif unit["type"] == "txt":
        fp = fingerprint("input", kind, ctx["root"], first, refs[0]["size"], refs[0]["version"])
        if fresh(fp):
            n += 1
            yield _row(ctx, uid, first, fp, first, {"text_file": first})
    else:
        try:
            _check_local_inside(ctx, full_path(ctx, first))
            rows = {"jsonl": _expand_jsonl, "chapter": _expand_chapter, "parquet": _expand_parquet}[unit["type"]](
                ctx, unit, cfg)
            for row in rows:
                if fresh(row["fp"]):
                    n += 1
                    yield row
        except (FileNotFoundError, BadInput, OSError, ValueError) as e:
            # The unit's own file is unreadable (vanished since listing, escapes the root, not a parquet file):
            # the unit becomes one quarantined input, so it is accounted for and not retried until it changes.
            reason = e.reason if isinstance(e, BadInput) else "file_vanished" if isinstance(
                e, FileNotFoundError) else "bad_parquet" if unit["type"] == "parquet" else "unreadable_file"
            fp = fingerprint("unit-error", uid)
            if fresh(fp):
                n += 1
                yield _row(ctx, uid, first, fp, first, reason=reason, detail=f"{type(e).__name__}: {e}")
    yield unit_row(uid, n, first)


def _expand_jsonl(ctx: dict[str, Any], unit: dict[str, Any], cfg: InputConfig) -> Iterator[dict]:
    kind, uid, rel = ctx["kind"], unit["unit"], unit["files"][0]["rel"]
    seen: Counter = Counter()
    with storage.open_read(full_path(ctx, rel)) as f:
        for lineno, body, digest, length in _iter_lines(f, cfg.max_line_bytes):
            if body is not None and not body.strip():
                continue  # blank lines are not inputs
            seen[digest] += 1
            fp = fingerprint("input", kind, ctx["root"], rel, digest, seen[digest])
            source = f"{rel}:{lineno}"
            if body is None:
                yield _row(ctx, uid, rel, fp, source, reason="line_too_long",
                           detail=f"line is {length:,} bytes > input.max_line_bytes={cfg.max_line_bytes:,}")
                continue
            try:
                line = body.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _row(ctx, uid, rel, fp, source, reason="not_utf8", detail=str(e))
                continue
            yield _row(ctx, uid, rel, fp, source, {"line": line, "dir": posixpath.dirname(rel)})


def _expand_chapter(ctx: dict[str, Any], unit: dict[str, Any], cfg: InputConfig) -> Iterator[dict]:
    kind, uid = ctx["kind"], unit["unit"]
    trans, audio = unit["files"][0], {r["rel"]: r for r in unit["files"][1:]}
    raw = storage.read_bytes(full_path(ctx, trans["rel"]))
    folder = posixpath.dirname(trans["rel"])
    listed = set()
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        source = f"{trans['rel']}:{lineno}"
        try:
            utt, _, text = line.decode("utf-8").strip().partition(" ")
        except UnicodeDecodeError as e:
            yield _row(ctx, uid, trans["rel"], fingerprint("input", kind, ctx["root"], source, line.hex()), source,
                       reason="not_utf8", detail=str(e))
            continue
        rel = posixpath.join(folder, utt + ".flac")
        listed.add(rel)
        ref = audio.get(rel)
        fp = fingerprint("input", kind, ctx["root"], rel, ref and [ref["size"], ref["version"]], text)
        if ref is None:
            yield _row(ctx, uid, trans["rel"], fp, source, reason="missing_audio",
                       detail=f"{rel} is listed in the transcript but does not exist")
        else:
            yield _row(ctx, uid, trans["rel"], fp, rel, {"audio": rel, "text": text})
    for rel, ref in sorted(audio.items()):
        if rel not in listed:
            fp = fingerprint("input", kind, ctx["root"], rel, ref["size"], ref["version"])
            yield _row(ctx, uid, trans["rel"], fp, rel, reason="missing_transcript",
                       detail=f"{trans['rel']} has no line for this file")


def _expand_parquet(ctx: dict[str, Any], unit: dict[str, Any], cfg: InputConfig) -> Iterator[dict]:
    import pyarrow.parquet as pq

    kind, uid, rel = ctx["kind"], unit["unit"], unit["files"][0]["rel"]
    with storage.open_read(full_path(ctx, rel)) as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        for col in (cfg.parquet_image_column, cfg.parquet_caption_column):
            if col not in names:
                raise ValueError(f"{rel} has no column {col!r} (columns: {sorted(names)}); set "
                                 f"input.parquet_image_column / input.parquet_caption_column")
        row_no = 0
        seen: Counter = Counter()
        for batch in pf.iter_batches(batch_size=256, columns=[cfg.parquet_image_column, cfg.parquet_caption_column]):
            for image, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                source = f"{rel}#{row_no}"
                row_no += 1
                if isinstance(image, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
                    image = image.get("bytes")
                data = image if isinstance(image, bytes) else b""
                key = hashlib.sha256(data + b"\0" + str(caption).encode("utf-8", "replace")).hexdigest()
                seen[key] += 1
                fp = fingerprint("input", kind, ctx["root"], rel, key, seen[key])
                if not isinstance(caption, str):
                    yield _row(ctx, uid, rel, fp, source, reason="empty_text", detail="caption is not a string")
                else:
                    yield _row(ctx, uid, rel, fp, source, {"caption_text": caption}, data=data)


# ---- reading and decoding one input (Ray tasks) --------------------------------------------------------------------

def read_media(ctx: dict[str, Any], base_dir: str, path: Any, cfg: InputConfig) -> bytes:
    """Bytes of a media file referenced from a corpus file; the reference must stay inside the corpus root."""
    if not isinstance(path, str) or not path:
        raise BadInput("bad_media_path", f"media path {path!r} is not a non-empty string")
    if path.startswith(("/", "\\")) or "://" in path or os.path.isabs(path) or (len(path) > 1 and path[1] == ":"):
        raise BadInput("path_escape", f"media path {path!r} is absolute; paths are relative to the JSONL folder")
    rel = posixpath.normpath(posixpath.join(base_dir, path))
    if rel == ".." or rel.startswith("../"):
        raise BadInput("path_escape", f"media path {path!r} leaves the corpus root")
    full = full_path(ctx, rel)
    _check_local_inside(ctx, full)
    return _read_file(ctx, full, rel, cfg.max_media_bytes, missing="missing_media")


def _read_file(ctx: dict[str, Any], full: str, rel: str, limit: int, missing: str) -> bytes:
    """The file's bytes, or BadInput for a missing or oversized file; storage faults raise StorageError."""
    try:
        size = storage.info(full).get("size")
        if size is not None and size > limit:
            raise BadInput("file_too_large", f"{rel} is {size:,} bytes > limit {limit:,}")
        data = storage.read_bytes(full, limit=limit)
    except FileNotFoundError:
        raise BadInput(missing, f"{rel} does not exist") from None
    except IsADirectoryError:
        raise BadInput(missing, f"{rel} is a folder") from None
    if len(data) > limit:
        raise BadInput("file_too_large", f"{rel} is over the limit of {limit:,} bytes")
    return data


def check_wav_complete(data: bytes, source: str) -> None:
    """libsndfile reads a WAV whose data chunk is cut short (or claims a huge length) as a shorter clip without
    complaint; a truncated recording must be quarantined, not trained on. Other containers (FLAC, OGG) fail
    to decode when truncated, which the speech tokenizer reports itself."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    off = 12
    while off + 8 <= len(data):
        cid, size = data[off:off + 4], int.from_bytes(data[off + 4:off + 8], "little")
        if cid == b"data":
            if size > len(data) - off - 8:
                raise BadInput("truncated_audio", f"{source}: WAV data chunk declares {size:,} bytes but the file "
                                                  f"holds {len(data) - off - 8:,}")
            return
        off += 8 + size + (size & 1)
    raise BadInput("truncated_audio", f"{source}: WAV file ends before its data chunk")


def _check_text(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise BadInput("empty_text", f"{what} is not a string")
    if not text.strip():
        raise BadInput("empty_text", f"{what} is empty")
    if IMAGE_PLACEHOLDER in text or AUDIO_PLACEHOLDER in text:
        # Corpus text pasted into a template must not smuggle in a media slot.
        raise BadInput("placeholder_in_text", f"{what} contains a media placeholder")
    return text


def _decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput("not_utf8", f"{what} is not UTF-8 ({e})") from None


def _parse_json_line(line: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except ValueError as e:
        raise BadInput("bad_json", f"not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise BadInput("bad_json", f"a line must be a JSON object, got {type(rec).__name__}")
    return rec


def _meta_extra(rec: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    """Keys of a corpus record the job does not interpret (label, split, id, ...) travel into meta.json."""
    return {k: v for k, v in rec.items() if k not in used}


def _paired(task_names: list[str], templates: TaskTemplates, text: str, fmt: PromptFormat) -> list[dict[str, Any]]:
    """Samples of a paired input (caption or transcript `text` + one image or audio): one per task, the text
    in the prompt or as the answer as the task says (t2i: prompt; i2t: answer), worded for the prompt format."""
    return [{"task": task, "messages": task_messages(templates.get(task, fmt), text=text,
                                                     answer=answer_content(task, text))}
            for task in task_names]


def speech_codes(value: Any, n_audio: int, speech_tok) -> list[np.ndarray]:
    """The `speech_codes` of a messages line (one list of ints per audio placeholder, codes of the reference's
    GLM-4-Voice speech tokenizer) -> codes (1, T) int64 each; they replace the line's audio files. Raises
    BadInput("bad_speech_codes") for a wrong shape, a non-integer or an out-of-range code, or a speech
    tokenizer that does not read such codes (precomputed codes are one codebook)."""
    if getattr(speech_tok, "n_q", 0) != 1 or not getattr(speech_tok, "precomputed_codes", False):
        raise BadInput("bad_speech_codes", f"the line has speech_codes but the speech tokenizer is "
                                           f"{getattr(speech_tok, 'name', '?')}: use speech.kind=glm4voice to train on "
                                           f"the reference's precomputed codes, or give audio files instead")
    if not isinstance(value, list) or len(value) != n_audio:
        raise BadInput("bad_speech_codes", f"speech_codes must be a list of {n_audio} code lists (one per "
                                           f"{AUDIO_PLACEHOLDER}), got {type(value).__name__} of "
                                           f"{len(value) if isinstance(value, list) else '-'}")
    out = []
    for i, codes in enumerate(value):
        if not isinstance(codes, list) or not codes or not all(type(c) is int for c in codes):
            raise BadInput("bad_speech_codes", f"speech_codes[{i}] must be a non-empty list of integers")
        arr = np.asarray(codes, dtype=np.int64)
        bad = np.flatnonzero((arr < 0) | (arr >= speech_tok.codebook_size))
        if bad.size:
            raise BadInput("bad_speech_codes", f"speech_codes[{i}][{int(bad[0])}] = {int(arr[bad[0]])} is outside "
                                               f"[0, {speech_tok.codebook_size})")
        out.append(arr[None, :])  # (T,) -> (1, T)
    return out


def decode_input(ctx: dict[str, Any], row: dict[str, Any], tokenizers, templates: TaskTemplates,
                 tasks: TasksConfig, cfg: InputConfig) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(record, media) of one pending input: record = {"samples": [{task, messages}], "meta": {...}}, media =
    {"image_<i>": uint8 (H, W, C), "audio_<i>": float32 (N,)} in placeholder order. Raises BadInput."""
    kind, spec = ctx["kind"], json.loads(row["spec"])
    fmt = tokenizers.vocab.prompt_format
    media: dict[str, np.ndarray] = {}

    def image(data: bytes, source: str) -> None:
        media[f"image_{sum(k.startswith('image') for k in media)}"] = tokenizers.image.load(data, source)

    def audio(data: bytes, source: str) -> None:
        check_wav_complete(data, source)
        media[f"audio_{sum(k.startswith('audio') for k in media)}"] = tokenizers.speech.load(data, source)

    meta: dict[str, Any] = {}
    if "line" in spec:
        rec = _parse_json_line(spec["line"])
        base = spec["dir"]
        if kind == "messages":
            msgs = rec.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise BadInput("bad_messages", "\"messages\" must be a non-empty list of {role, content} objects")
            images, audios = rec.get("images", []) or [], rec.get("audios", []) or []
            if not isinstance(images, list) or not isinstance(audios, list):
                raise BadInput("bad_messages", "\"images\" and \"audios\" must be lists of paths")
            n_img = sum(str(m.get("content", "")).count(IMAGE_PLACEHOLDER) for m in msgs)
            n_aud = sum(str(m.get("content", "")).count(AUDIO_PLACEHOLDER) for m in msgs)
            codes = rec.get("speech_codes")
            if codes is not None:   # precomputed: they stand in for the audio files
                audios = speech_codes(codes, n_aud, tokenizers.speech)
            if n_img != len(images) or n_aud != len(audios):
                raise BadInput("placeholder_mismatch", f"{n_img} {IMAGE_PLACEHOLDER} / {n_aud} {AUDIO_PLACEHOLDER} "
                                                       f"placeholders but {len(images)} images / {len(audios)} audios")
            answers = [m.get("content") for m in msgs if m.get("role") == "assistant"]
            if answers and all(isinstance(a, str) and not a.strip() for a in answers):
                raise BadInput("empty_text", "every assistant message is blank: there is nothing to learn")
            task = rec.get("task") or infer_task(msgs)
            if task not in TASKS:
                raise BadInput("bad_task", f"task {task!r} is not one of {list(TASKS)}")
            for p in images:
                image(read_media(ctx, base, p, cfg), p)
            for i, p in enumerate(audios):
                if isinstance(p, np.ndarray):
                    media[f"audio_{i}"] = p
                else:
                    audio(read_media(ctx, base, p, cfg), p)
            samples = [{"task": task, "messages": msgs}]
            meta = _meta_extra(rec, ("messages", "images", "audios", "task", "speech_codes"))
        elif kind == "speech-text":
            text = _check_text(rec.get("text"), "\"text\"")
            audio(read_media(ctx, base, rec.get("audio"), cfg), str(rec.get("audio")))
            samples = _paired(tasks.speech_text, templates, text, fmt)
            meta = _meta_extra(rec, ("audio", "text"))
        elif kind == "text":
            text = _check_text(rec.get("text"), "\"text\"")
            prompt = rec.get("prompt", "")
            if not isinstance(prompt, str):
                raise BadInput("bad_json", "\"prompt\" must be a string")
            samples = [{"task": "text",
                        "messages": task_messages(templates.get("text", fmt), text=prompt, answer=text)}]
            meta = _meta_extra(rec, ("text", "prompt"))
        else:
            raise BadInput("bad_json", f"JSONL lines are not an input of kind {kind}")
    elif "text_file" in spec:
        raw = _read_file(ctx, full_path(ctx, spec["text_file"]), spec["text_file"], cfg.max_text_file_bytes,
                         missing="file_vanished")
        text = _check_text(_decode_utf8(raw, spec["text_file"]), spec["text_file"])
        samples = [{"task": "text", "messages": task_messages(templates.get("text", fmt), text="", answer=text)}]
    elif "image" in spec:  # folder pair
        _check_local_inside(ctx, full_path(ctx, spec["caption"]))
        raw = _read_file(ctx, full_path(ctx, spec["caption"]), spec["caption"], cfg.max_text_file_bytes,
                         missing="file_vanished")
        caption = _check_text(_decode_utf8(raw, spec["caption"]).strip(), spec["caption"])
        _check_local_inside(ctx, full_path(ctx, spec["image"]))
        image(_read_file(ctx, full_path(ctx, spec["image"]), spec["image"], cfg.max_media_bytes, "file_vanished"),
              spec["image"])
        samples = _paired(tasks.image_text, templates, caption, fmt)
    elif "caption_text" in spec:  # parquet row
        caption = _check_text(spec["caption_text"].strip(), "caption")
        image(row["data"], row["source"])
        samples = _paired(tasks.image_text, templates, caption, fmt)
    elif "audio" in spec:  # LibriSpeech utterance
        text = _check_text(spec["text"], "transcript")
        _check_local_inside(ctx, full_path(ctx, spec["audio"]))
        audio(_read_file(ctx, full_path(ctx, spec["audio"]), spec["audio"], cfg.max_media_bytes, "file_vanished"),
              spec["audio"])
        samples = _paired(tasks.speech_text, templates, text, fmt)
    else:
        raise ValueError(f"unknown input spec {sorted(spec)}")
    return {"samples": samples, "meta": meta}, media


def pack_media(media: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **media)
    return buf.getvalue()


def unpack_media(data: bytes) -> dict[str, np.ndarray]:
    if not data:
        return {}
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
