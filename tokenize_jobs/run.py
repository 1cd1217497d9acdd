"""`python -m tokenize_jobs.run` / `omnidiff tokenize`: tokenize a raw corpus into WebDataset shards.

    python -m tokenize_jobs.run --kind image-text --input data/pairs --output runs/tok
    python -m tokenize_jobs.run --kind messages --input s3://corpus/sft --output s3://shards/sft \\
        --config configs/tokenize/dream-magvit2.yaml shards.max_samples=5000

Steps (driver): check the input and output are reachable -> take the output lock -> load what earlier runs
committed and delete their orphans -> list the corpus -> load the saved tokenizers (or, on the first run, fit
them on a sample of this corpus and save them) -> run the Ray Data plan (tokenize_jobs/pipeline.py) over the
inputs not done yet, committing shards as they fill (tokenize_jobs/writer.py) -> summary.

Without RAY_ADDRESS a local Ray is started for the job; with it (e.g. under `ray job submit`) the job joins that
cluster. Every storage call retries transient faults (storage.retries, .backoff_s; common/storage.py): a fault
that outlasts them fails the job naming the URI (exit 4), and never quarantines an input. Exit status: the
table in common/cli.py. Bad inputs are quarantined, not failures (exit 0); an unreachable input or output is
bad input (2); after any failure the committed shards are kept: rerun to continue.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from common import cli, configlib, storage, tracking
from common.configlib import ConfigError
from model.tokenizers import SET_FILE, TokenizerMismatch, TokenizerSet, config_diff
from model.vocab import Vocab
from tokenize_jobs import fit_corpus, sources, summary
from tokenize_jobs.config import KINDS, TokenizeJobConfig
from tokenize_jobs.lock import OutputLock
from tokenize_jobs.pipeline import _rows, build_dataset
from tokenize_jobs.shards import read_manifest
from tokenize_jobs.writer import ShardWriter, clean_orphans, fence

TOKENIZERS_DIR = "tokenizers"
COMMIT_FETCH_ROWS = 16   # shard metadata rows the driver takes from Ray Data per fetch


class OutputError(RuntimeError, cli.CliError):
    """The output location cannot be written (reported before any work starts)."""
    exit_code = cli.BAD_INPUT


def new_run_id() -> str:
    """Sortable by start time; the random tail keeps two runs started in the same second apart."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def normalize_output(output: str) -> str:
    if storage.is_s3(output):
        out = output.rstrip("/")
        bucket = out[len("s3://"):].split("/", 1)[0]
        try:
            ok = storage.exists(f"s3://{bucket}")
        except Exception as e:
            raise OutputError(f"output {output} is not reachable ({type(e).__name__}: {e}); check "
                              f"AWS_ENDPOINT_URL and credentials") from None
        if not ok:
            raise OutputError(f"output bucket s3://{bucket} does not exist (or these credentials cannot see it): "
                              f"create it first")
        return out
    out = os.path.abspath(output)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {out}: {e}") from None
    if not os.access(out, os.W_OK):
        raise OutputError(f"output folder {out} is not writable")
    return out


# ---- tokenizer fitting sample ------------------------------------------------------------------------------------

def _wav_24k(data: bytes, max_seconds: float) -> np.ndarray:
    """Audio bytes -> mono float32 at EnCodec's 24 kHz (only for fitting; actors use the tokenizer's `load`)."""
    import soundfile as sf
    import torch

    from model.tokenizers.encodec_spec import SAMPLE_RATE

    wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True, frames=int(max_seconds * 48_000))
    mono = wav.mean(axis=1)  # (N, C) -> (N,)
    if not mono.size or not np.isfinite(mono).all():
        raise ValueError("empty or non-finite audio")
    if sr != SAMPLE_RATE:
        import torchaudio.functional as AF

        mono = AF.resample(torch.from_numpy(mono), sr, SAMPLE_RATE).numpy()
    return mono[: int(max_seconds * SAMPLE_RATE)]


def _synthetic_wavs(n: int = 8) -> Iterator[np.ndarray]:
    """Seeded tones + noise: codebooks fitted on these make a valid but weak codec."""
    from model.tokenizers.encodec_spec import SAMPLE_RATE

    rng = np.random.default_rng(0)
    t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
    for i in range(n):
        f0 = 110.0 * 2 ** (i / 4)
        yield (0.3 * np.sin(2 * np.pi * f0 * t * (1 + t)) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _fit_wavs(ctx: dict[str, Any], units: list[dict[str, Any]], cfg: TokenizeJobConfig) -> Iterator[np.ndarray]:
    n = 0
    for data in fit_corpus.fit_audio_refs(ctx, units, cfg.input):
        try:
            wav = _wav_24k(data, cfg.tokenizers.speech.max_seconds)
        except Exception:  # noqa: BLE001 - a bad file is quarantined later; it just does not join the fit
            continue
        n += 1
        yield wav
    if n == 0:
        print("[tokenize] warning: this corpus has no readable audio, so EnCodec's codebooks (speech.weights="
              "offline) are fitted on synthetic tones. Speech tokenized into this output later will use that weak "
              "codec: tokenize a speech corpus first, or use speech.weights=pretrained.", flush=True)
        yield from _synthetic_wavs()


@dataclass
class PreparedTokenizers:
    """What the driver needs of the tokenizer set: the vocabulary and the recorded names and fingerprints (the
    actors build the tokenizers themselves and check the fingerprints)."""
    vocab: Vocab
    names: dict[str, str]
    fingerprints: dict[str, str]


def prepare_tokenizers(cfg: TokenizeJobConfig, artifacts_dir: str, ctx: dict[str, Any],
                       units: list[dict[str, Any]]) -> PreparedTokenizers:
    """The output's saved tokenizers (checked against this job's config, without building any model), or, on
    the first run, a set fitted on a sample of this corpus and saved."""
    if storage.exists(storage.join(artifacts_dir, SET_FILE)):
        diff = config_diff(TokenizerSet.read_config(artifacts_dir), cfg.tokenizers)
        if diff:
            raise TokenizerMismatch(
                f"{storage.join(artifacts_dir, SET_FILE)} holds the tokenizers this output's shards were made with, "
                f"and this job asks for others (" + "; ".join(diff) + "): write to a new output, or set these keys "
                "back to the saved values.")
        record = TokenizerSet.read_record(artifacts_dir)
        return PreparedTokenizers(TokenizerSet.read_vocab(artifacts_dir), record["names"], record["fingerprints"])
    scan = units[: cfg.fit.max_scan_units]
    texts = fit_corpus.fit_texts(ctx, scan, cfg.input, cfg.fit.max_texts, cfg.templates)
    tok = TokenizerSet.prepare(cfg.tokenizers, artifacts_dir, texts=texts, wavs=_fit_wavs(ctx, scan, cfg))
    return PreparedTokenizers(tok.vocab, tok.names(), tok.fingerprints())


# ---- the job -------------------------------------------------------------------------------------------------------

def _ensure_ray(cfg: TokenizeJobConfig) -> bool:
    """Join RAY_ADDRESS's cluster, reuse an initialized Ray (tests), or start a local one. True if we started it."""
    from common.rayutil import init_ray

    return init_ray(num_cpus=cfg.ray.num_cpus or None)


def storage_fault(e: BaseException) -> storage.StorageError | None:
    """The StorageError behind `e`, if any: Ray wraps a task's exception (RayTaskError.cause, __cause__)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, storage.StorageError):
            return cause
        if isinstance(e, storage.StorageError) and hasattr(e, "uri"):
            return e
        e = e.__cause__ or e.__context__
    return None


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), max(1, n)):
        yield items[i:i + n]


def run_job(cfg: TokenizeJobConfig, kind: str, input_uri: str, output: str, *, print_summary: bool = True
            ) -> dict[str, Any]:
    """Tokenize `input_uri` (a corpus of `kind`) into `output`; returns the run summary (summary.build)."""
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: choose one of {list(KINDS)}")
    t0 = time.time()
    storage.set_policy(cfg.storage.policy())
    ctx = sources.corpus_context(kind, input_uri)
    out = normalize_output(output)
    run_id = new_run_id()
    lock = OutputLock(out, run_id, ttl_s=cfg.lock.ttl_s, heartbeat_s=cfg.lock.heartbeat_s)
    lock.acquire()
    tracked = tracking.TokenizeRun(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, job_id=run_id, kind=kind,
                                   input_uri=ctx["input"], output=out, config=cfg)
    started_ray = False
    try:
        state = fence(out, run_id, lock.token)   # from here on, no earlier writer can commit
        orphans = clean_orphans(out, state.manifest)
        units = sources.list_units(ctx, cfg.input)
        artifacts = storage.join(out, TOKENIZERS_DIR)
        tok = prepare_tokenizers(cfg, artifacts, ctx, units)
        if state.manifest:
            Vocab.from_dict(state.manifest["vocab"]).check_same(
                tok.vocab, what=f"existing shards in {out}", expected="tokenizers of this run")
        todo = []
        state.load_done_inputs({u["files"][0]["rel"] for u in units if u["unit"] not in state.done_units})
        for u in units:
            if u["unit"] in state.done_units:
                continue
            done = set()
            for ref in u["files"][:1]:  # inputs are recorded under their unit's first file
                done |= state.done_by_file.get(ref["rel"], set())
            todo.append({**u, "done": sorted(done)})
        header = {
            "vocab": tok.vocab.to_dict(),
            "tokenizers": {"dir": TOKENIZERS_DIR, "names": tok.names, "fingerprints": tok.fingerprints},
            "job": {"kind": kind, "input": ctx["input"], "config": configlib.to_dict(cfg)},
        }
        header["job"]["config"]["mlflow"]["tracking_uri"] = tracking.redact(cfg.mlflow.tracking_uri)
        writer = ShardWriter(out, run_id, header, state, check_lock=lock.check)
        if todo:
            import ray

            started_ray = _ensure_ray(cfg)
            ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
            for wave in _chunks(todo, cfg.ray.units_per_wave):
                ds = build_dataset(wave, ctx, cfg, artifacts, out, run_id, tok.vocab.eos_id)
                try:
                    # A row per shard the workers wrote (metadata, never samples or fingerprints), fetched
                    # COMMIT_FETCH_ROWS at a time: a run killed mid-wave loses at most that many written but
                    # unlisted shards (orphans, redone by the next run), and an output of few shards is
                    # committed once its Ray Data execution has ended, no task left in flight.
                    for batch in ds.iter_batches(batch_size=COMMIT_FETCH_ROWS, batch_format="numpy"):
                        for row in _rows(batch):
                            writer.add_commit(row)
                except Exception as e:
                    fault = storage_fault(e)
                    if fault is None or fault is e:
                        raise
                    # a task's storage fault, wrapped by Ray: surface the URI and message, not Ray's frames
                    raise storage.StorageError(str(fault).splitlines()[0], fault.uri) from None
        orphans += writer.finish()
    except BaseException as e:
        tracked.fail(e)
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        lock.release()
    totals = {k: dict(v) if isinstance(v, dict) else v for k, v in writer.totals.items()}
    totals["shards"] = len(writer.shards)
    result = summary.build(
        run_id=run_id, output=out, kind=kind, input_uri=ctx["input"], units_listed=len(units),
        units_skipped=len(units) - len(todo), run=writer.run, totals=totals, wall_s=time.time() - t0,
        orphans_removed=orphans, took_over=lock.took_over.describe() if lock.took_over else None)
    tracked.finish(result, lambda: read_manifest(out),
                   lambda: "".join(line + "\n" for line in writer.quarantine_lines))
    if print_summary:
        print(summary.format_table(result), flush=True)
    return result


# ---- CLI -----------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omnidiff tokenize",
        description="Tokenize a raw corpus into WebDataset shards + manifest.json (local folder or s3://). "
                    "Reruns process only inputs not yet in the manifest.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""input kinds:
  messages     JSONL lines {"messages": [{"role", "content"}], "images": [...], "audios": [...]}; media paths
               relative to the JSONL file's folder; optional "task"; other keys (label, split) go to meta.json
  image-text   NAME.jpg|png + NAME.txt pairs, or parquet files (input.parquet_image_column / _caption_column)
               -> t2i and i2t samples (tasks.image_text)
  speech-text  LibriSpeech layout (*/*/*.flac + *.trans.txt) or JSONL {"audio": path, "text": ...}
               -> asr and tts samples (tasks.speech_text)
  text         JSONL {"text": ..., optional "prompt"} or .txt files (one sample each) -> text samples

examples:
  python -m tokenize_jobs.run --kind image-text --input data/pairs --output runs/tok
  python -m tokenize_jobs.run --kind messages --input s3://corpus/sft --output s3://shards/sft \\
      --config configs/tokenize/dream-magvit2.yaml shards.max_samples=5000 ray.actors=8

Without --config the embedded demo tokenizers are used (in-process BPE, 8x8 pixel images, EnCodec with
codebooks fitted on the corpus). Set RAY_ADDRESS (or use `ray job submit`) to run on a cluster.
""" + cli.EXIT_STATUS_HELP + "\nbad inputs are quarantined, not failures (exit 0)")
    p.add_argument("--kind", required=True, choices=KINDS, help="what the input holds (see below)")
    p.add_argument("--input", required=True, help="corpus folder or file: local path or s3://bucket/prefix")
    p.add_argument("--output", required=True, help="output folder: local path or s3://bucket/prefix")
    p.add_argument("--config", default=None, help="YAML job config (e.g. configs/tokenize/default.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. shards.max_samples=1000 tokenizers.image.kind=magvit2")
    return p


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = configlib.load(TokenizeJobConfig, args.config, args.overrides)
    if args.print_config:
        print(configlib.dump_yaml(cfg))
        return cli.OK
    run_job(cfg, args.kind, args.input, args.output)
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
