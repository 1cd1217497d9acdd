"""The bad-input matrix: one corpus holding every kind of bad input, tokenized in ONE run, reported as a table.

    python -m tokenize_jobs.reliability_report --out runs/reliability     # writes table.md + table.json there

Each case is one input of a `messages` corpus (Omni-Diffusion's SFT format, so every modality, media paths and
placeholders are exercised) with the outcome it must get: tokenized, or quarantined with a given reason. The
run's counts must add up: inputs seen = inputs tokenized + inputs quarantined, and nothing may crash (no
`unexpected_error`, no exception out of the job). tests/integration/test_reliability.py runs the same matrix and
asserts every row; docs/reliability.md shows the table.

Two cases need a hand on the run: a 100 MB JSONL line (written in 1 MB chunks; the reader streams past it
holding at most input.max_line_bytes, which `line_memory_peak` measures), and a file that vanishes between
listing and reading (the listing step is wrapped to delete it right after the corpus was listed).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import struct
import sys
import time
import tracemalloc
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from common import cli

MAX_SECONDS = 1.0                  # tokenizers.speech.max_seconds for the run: a 2 s clip is "over-long"
BIG_LINE_BYTES = 100 * 2**20       # the 100 MB JSONL line
OVERRIDES = ["ray.progress_bars=false", "shards.max_samples=4", f"tokenizers.speech.max_seconds={MAX_SECONDS}"]
TOKENIZED = "tokenized"


@dataclass
class Case:
    name: str
    what: str           # the bad input, in words
    source: str         # the quarantine/sample `source` of the input: "<file>:<line>"
    expected: str       # "tokenized" or the quarantine reason
    outcome: str = ""   # filled in from the run
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == self.expected


# ---- media bytes --------------------------------------------------------------------------------------------

def png(w: int = 8, h: int = 8, seed: int = 0) -> bytes:
    from PIL import Image

    img = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A valid PNG whose header claims w x h pixels with almost no pixel data (a decompression bomb's shape)."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def wav(seconds: float = 0.4, sr: int = 16000, seed: int = 0, value: float | None = None, fmt: str = "WAV") -> bytes:
    """A tone (or a constant `value`) as audio file bytes (WAV float32, or e.g. FLAC)."""
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * (150 + 60 * seed) * t)).astype(np.float32) if value is None \
        else np.full(t.size, value, np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype="FLOAT" if fmt == "WAV" else None)
    return buf.getvalue()


def wav_claiming_huge_length() -> bytes:
    """A short WAV whose data chunk header claims ~4 GB of samples."""
    data = bytearray(wav())
    i = data.find(b"data")
    data[i + 4:i + 8] = struct.pack("<I", 0xFFFFFF00)
    return bytes(data)


def _chat(user: str, answer: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


def _img(path: str) -> dict[str, Any]:
    return _chat("<|image|>\nWhat is shown?", "A pattern.", images=[path])


def _aud(path: str) -> dict[str, Any]:
    return _chat("<|audio|>\nTranscribe.", "a tone", audios=[path])


# ---- the corpus ---------------------------------------------------------------------------------------------

def build_corpus(root: Path, big_line_bytes: int = BIG_LINE_BYTES) -> tuple[Path, list[Case], Path]:
    """Write the matrix corpus under `root`. Returns (corpus folder, cases, the file that must vanish after
    listing). `root/outside.png` lies outside the corpus (the symlink's target)."""
    corpus = root / "corpus"
    media = corpus / "media"
    media.mkdir(parents=True)
    (root / "outside.png").write_bytes(png(seed=9))
    files = {
        "img0.png": png(seed=0), "img1.png": png(seed=1), "one_pixel.png": png(1, 1, seed=2),
        "trunc.png": png()[:40], "zero.png": b"", "bomb.png": png_header(20_000, 20_000),
        "a0.wav": wav(seed=0), "trunc.wav": wav()[:3000], "zero.wav": b"", "nan.wav": wav(value=float("nan")),
        "long.wav": wav(seconds=2 * MAX_SECONDS, sr=8000), "huge.wav": wav_claiming_huge_length(),
    }
    for name, data in files.items():
        (media / name).write_bytes(data)
    (media / "link.png").symlink_to(root / "outside.png")

    lines: list[tuple[str, str, str, Any]] = [  # (case, what, expected, line)
        ("good image", "image + question, answer in text", TOKENIZED, _img("media/img0.png")),
        ("good audio", "audio + transcription request", TOKENIZED, _aud("media/a0.wav")),
        ("good text", "text-only chat", TOKENIZED, _chat("Hello there", "General Kenobi", task="text")),
        ("1-pixel image", "a 1x1 PNG (valid: resized to the tokenizer's size)", TOKENIZED,
         _img("media/one_pixel.png")),
        ("truncated image", "PNG cut after 40 bytes", "corrupt_image", _img("media/trunc.png")),
        ("zero-byte image", "empty .png file", "empty_file", _img("media/zero.png")),
        ("20k x 20k image header", "PNG header claiming 400 Mpixel, checked before decoding", "image_too_large",
         _img("media/bomb.png")),
        ("truncated audio", "WAV cut after 3,000 bytes", "truncated_audio", _aud("media/trunc.wav")),
        ("zero-byte audio", "empty .wav file", "empty_file", _aud("media/zero.wav")),
        ("NaN audio", "WAV of NaN samples", "audio_nan", _aud("media/nan.wav")),
        ("over-long audio", f"2 s clip > speech.max_seconds={MAX_SECONDS:g}", "audio_too_long",
         _aud("media/long.wav")),
        ("WAV claiming a huge length", "data chunk header says ~4 GB", "truncated_audio", _aud("media/huge.wav")),
        ("non-UTF-8 text", "line with bytes 0xff 0xfe", "not_utf8", b'{"messages": "\xff\xfe"}'),
        ("empty text", "assistant answer is blank, no media", "empty_text", _chat("Say nothing.", "  ")),
        ("malformed JSONL line", "truncated JSON object", "bad_json", b'{"messages": ['),
        ("placeholder mismatch", "two <|image|> placeholders, one image", "placeholder_mismatch",
         _chat("<|image|> and <|image|>", "two?", images=["media/img1.png"])),
        ("missing media file", "image path that does not exist", "missing_media", _img("media/missing.png")),
        ("../ media path", "relative path leaving the corpus", "path_escape", _img("../outside.png")),
        ("absolute media path", "/etc/hostname", "path_escape", _img("/etc/hostname")),
        ("symlink outside the root", "media/link.png -> a file outside the corpus", "path_escape",
         _img("media/link.png")),
    ]
    cases = []
    with open(corpus / "sft.jsonl", "wb") as f:
        for i, (name, what, expected, line) in enumerate(lines, start=1):
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
            cases.append(Case(name, what, f"sft.jsonl:{i}", expected))
    # The 100 MB line, written in 1 MB chunks (never built in memory), then a good line after it.
    with open(corpus / "big.jsonl", "wb") as f:
        f.write(b'{"messages": [{"role": "user", "content": "')
        chunk = b"x" * 2**20
        for _ in range(big_line_bytes // len(chunk)):
            f.write(chunk)
        f.write(b'"}, {"role": "assistant", "content": "ok"}]}\n')
        f.write(json.dumps(_chat("After the long line.", "still read")).encode() + b"\n")
    cases.append(Case("100 MB JSONL line", f"{big_line_bytes / 2**20:.0f} MB on one line > input.max_line_bytes",
                      "big.jsonl:1", "line_too_long"))
    cases.append(Case("line after the 100 MB line", "the file goes on after the long line", "big.jsonl:2",
                      TOKENIZED))
    gone = corpus / "gone.jsonl"
    gone.write_text(json.dumps(_chat("I will vanish.", "before reading")) + "\n")
    cases.append(Case("file vanishing after listing", "deleted between the listing and the read", "gone.jsonl",
                      "file_vanished"))
    return corpus, cases, gone


@contextlib.contextmanager
def vanish_after_listing(path: Path) -> Iterator[None]:
    """Fault hook: the corpus listing step deletes `path` right after listing it."""
    from tokenize_jobs import sources

    original = sources.list_units

    def listing_then_delete(*args: Any, **kwargs: Any):
        units = original(*args, **kwargs)
        path.unlink()
        return units

    sources.list_units = listing_then_delete
    try:
        yield
    finally:
        sources.list_units = original


def line_memory_peak(corpus: Path, rel: str = "big.jsonl") -> float:
    """MiB of Python memory at peak while the job's reader expands `rel` (the 100 MB line streams past)."""
    from common import configlib
    from tokenize_jobs import sources
    from tokenize_jobs.config import InputConfig

    ctx = sources.corpus_context("messages", str(corpus))
    unit = next(u for u in sources.list_units(ctx, InputConfig()) if u["files"][0]["rel"] == rel)
    tracemalloc.start()
    try:
        rows = list(sources.expand_unit(ctx, unit, configlib.from_dict(InputConfig, {}), set()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows, rel
    return peak / 2**20


# ---- the run ------------------------------------------------------------------------------------------------

def run_matrix(root: Path, *, extra_overrides: tuple[str, ...] = (), big_line_bytes: int = BIG_LINE_BYTES
               ) -> dict[str, Any]:
    """Build the corpus under `root`, measure the long line's memory, tokenize it all in one run into
    `root/out`, and return {"cases": [...], "totals": {...}, "summary": run summary, ...}."""
    from common import configlib
    from tokenize_jobs.config import TokenizeJobConfig
    from tokenize_jobs.run import run_job

    corpus, cases, gone = build_corpus(root, big_line_bytes)
    peak_mib = line_memory_peak(corpus)
    cfg = configlib.load(TokenizeJobConfig, None, [*OVERRIDES, *extra_overrides])
    out = root / "out"
    t0 = time.time()
    crashed_job = ""
    summary: dict[str, Any] = {}
    try:
        with vanish_after_listing(gone):
            summary = run_job(cfg, "messages", str(corpus), str(out), print_summary=False)
    except Exception as e:  # noqa: BLE001 - the report says so instead of dying
        crashed_job = f"{type(e).__name__}: {e}"
    wall = time.time() - t0
    quarantine = {}
    if (out / "quarantine.jsonl").exists():
        for line in (out / "quarantine.jsonl").read_text().splitlines():
            q = json.loads(line)
            quarantine[q["source"]] = q
    tokenized = set()
    if (out / "manifest.json").exists():
        from tokenize_jobs import shards

        tokenized = {s["meta"]["source"] for s in shards.iter_samples(str(out))}
    for c in cases:
        if c.source in quarantine:
            c.outcome, c.detail = quarantine[c.source]["reason"], quarantine[c.source]["detail"][:160]
        elif c.source in tokenized:
            c.outcome = TOKENIZED
        else:
            c.outcome = "missing from the output"
    reasons = summary.get("quarantined_by_reason", {})
    totals = {
        "cases": len(cases), "as_expected": sum(c.ok for c in cases),
        "inputs_seen": summary.get("inputs_seen", 0), "inputs_tokenized": summary.get("inputs_tokenized", 0),
        "inputs_quarantined": summary.get("inputs_quarantined", 0),
        "samples_written": summary.get("samples_written", 0),
        "crashed": int(bool(crashed_job)) + reasons.get("unexpected_error", 0),
        "crash_detail": crashed_job,
        "long_line_peak_mib": round(peak_mib, 1), "wall_s": round(wall, 1),
    }
    return {"cases": [asdict(c) | {"ok": c.ok} for c in cases], "totals": totals, "summary": summary}


def to_markdown(report: dict[str, Any]) -> str:
    t = report["totals"]
    rows = ["| # | case | input | expected | outcome | ok |", "|---|---|---|---|---|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|")   # placeholders such as <|image|> hold the column separator

    for i, c in enumerate(report["cases"], start=1):
        rows.append(f"| {i} | {cell(c['name'])} | {cell(c['what'])} | {c['expected']} | {c['outcome']} | "
                    f"{'yes' if c['ok'] else '**NO**'} |")
    rows += [
        "",
        f"One tokenize run over {t['cases']} cases: {t['as_expected']} as expected; inputs seen "
        f"{t['inputs_seen']} = {t['inputs_tokenized']} tokenized + {t['inputs_quarantined']} quarantined; "
        f"samples written {t['samples_written']}; crashed {t['crashed']}. The 100 MB line streamed through the "
        f"reader with a Python memory peak of {t['long_line_peak_mib']} MiB (input.max_line_bytes = 8 MiB). "
        f"Wall time {t['wall_s']} s.",
    ]
    return "\n".join(rows) + "\n"


@cli.command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tokenize_jobs.reliability_report",
        description="Tokenize a corpus holding every kind of bad input in one run and write the outcome table "
                    "(table.md, table.json) to --out. Needs ~110 MB of disk for the corpus (deleted afterwards "
                    "unless --keep-corpus).",
        epilog=f"exit status {cli.OK} when every case ended as expected, {cli.NOT_MET} when one did not. "
               + cli.EXIT_STATUS_HELP)
    p.add_argument("--out", default="runs/reliability", help="folder for the corpus, output and tables")
    p.add_argument("--keep-corpus", action="store_true", help="keep the generated corpus and shards")
    args = p.parse_args(argv)
    root = Path(args.out).resolve()
    work = root / "matrix"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    report = run_matrix(work)
    (root / "table.json").write_text(json.dumps(report, indent=1, default=str))
    md = to_markdown(report)
    (root / "table.md").write_text(md)
    print(md)
    if not args.keep_corpus:
        import shutil

        shutil.rmtree(work)
    t = report["totals"]
    return cli.OK if t["as_expected"] == t["cases"] and t["crashed"] == 0 else cli.NOT_MET


if __name__ == "__main__":
    sys.exit(main())
