"""tokenize: the Ray Data tokenize job (tokenize_jobs.run.run_job) against a single-process loop calling the same
saved tokenizers on the same inputs, per modality (text, pixel images, MAGVIT-v2 tiny images, EnCodec speech);
1 vs 2 tokenizer actors; peak RSS on a corpus and on one 10x larger; the bytes the job's driver receives per
shard; the shard writer's MB/s against a raw `tarfile` write of the same bytes.

The job's fixed cost (driver listing, tokenizer loading, Ray Data planning, the actor pool) comes from a run on a
one-batch corpus and is excluded from its throughput: throughput = extra inputs / extra seconds.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.common import PeakRSS, Plan, Suite, goal_check, paired_ratio, spread, torch_threads

WORDS = ("a", "small", "digit", "drawn", "by", "hand", "with", "thin", "strokes", "on", "dark", "paper", "the",
         "speaker", "reads", "each", "number", "slowly", "and", "clearly", "model", "learns", "to", "write",
         "seven", "three", "nine", "zero", "picture", "sound")


def _fresh(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


# Lines per JSONL file. A corpus held in a single file reaches the actors through the streaming split; real
# corpora come in many files, and so do these.
LINES_PER_FILE = 100


def _per_file(n: int, most: int) -> int:
    """Lines per file of an `n`-input corpus: at most `most`, and at least 16 files, so that the one-batch corpus
    (the fixed-cost run) takes the same plan with 2 actors as the full one: no file over half an actor's share
    of the bytes (`pipeline.expand_in_actors`; 4 files of uneven lines took the split path)."""
    return min(most, max(1, n // 16))


def write_text_corpus(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    _fresh(root)
    per_file = _per_file(n, LINES_PER_FILE)
    for start in range(0, n, per_file):
        with open(root / f"texts-{start // per_file:05d}.jsonl", "w") as f:
            for _ in range(min(per_file, n - start)):
                f.write(json.dumps({"text": _sentence(rng, int(rng.integers(12, 40)))}) + "\n")


def write_image_corpus(root: Path, n: int, size: int, channels: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    _fresh(root)
    shape = (size, size) if channels == 1 else (size, size, channels)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"{i:06d}.png")
        (root / f"{i:06d}.txt").write_text(_sentence(rng, int(rng.integers(3, 9))))


def write_speech_corpus(root: Path, n: int, seconds: float = 1.0, sr: int = 16000, seed: int = 0) -> None:
    """16 kHz WAV clips (the tokenizer resamples to 24 kHz, as for LibriSpeech) + a speech-text JSONL."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    _fresh(root)
    (root / "audio").mkdir()
    t = np.arange(int(seconds * sr), dtype=np.float32) / sr
    per_file = _per_file(n, 16)  # at most one tokenizer batch per file: EnCodec work spreads over the actors
    for i in range(n):
        f0 = 100 + 200 * rng.random()
        wav = (0.3 * np.sin(2 * np.pi * f0 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
        sf.write(root / "audio" / f"{i:06d}.wav", wav, sr, subtype="PCM_16")
        with open(root / f"speech-{i // per_file:05d}.jsonl", "a") as f:
            f.write(json.dumps({"audio": f"audio/{i:06d}.wav", "text": _sentence(rng, 6)}) + "\n")


@dataclass
class Modality:
    name: str
    kind: str                   # tokenize job --kind
    overrides: list[str]        # job config overrides (tokenizer settings, shard size)
    write: Callable[[Path, int], None]


def modalities(plan: Plan) -> dict[str, Modality]:
    mods = {
        "text": Modality("text", "text", [], write_text_corpus),
        "image-pixel": Modality("image-pixel", "image-text", [],
                                lambda root, n: write_image_corpus(root, n, 8, 1)),
        "image-magvit2-tiny": Modality(
            "image-magvit2-tiny", "image-text",
            ["tokenizers.image.kind=magvit2", "tokenizers.image.magvit2_preset=tiny",
             "tokenizers.image.random_init=true", f"tokenizers.image.size={plan.magvit_size}",
             "tokenizers.image.channels=3"],
            lambda root, n: write_image_corpus(root, n, plan.magvit_size, 3)),
        "speech-encodec": Modality("speech-encodec", "speech-text", [], write_speech_corpus),
    }
    # Shards smaller than the product's default, for job and bare alike: a bench corpus then spans several
    # shards, and the last shard's write (which no tokenization can overlap) weighs as little as in a large corpus.
    for m in mods.values():
        m.overrides.append(f"shards.max_samples={plan.tok_shard_samples}")
    return mods


def job_config(mod: Modality, actors: int, extra: Sequence[str] = ()):
    from common import configlib
    from tokenize_jobs.config import TokenizeJobConfig

    return configlib.load(TokenizeJobConfig, None, ["ray.progress_bars=false", f"ray.actors={actors}",
                                                     *mod.overrides, *extra])


def fit_tokenizers(mod: Modality, corpus: Path, artifacts: Path) -> None:
    """Fit the modality's tokenizer set once, as the job's first run would; every run below reuses it, so
    fitting (a one-off per output) is in neither side of the comparison."""
    from tokenize_jobs import sources
    from tokenize_jobs.run import prepare_tokenizers

    cfg = job_config(mod, 1)
    ctx = sources.corpus_context(mod.kind, str(corpus))
    with contextlib.redirect_stdout(io.StringIO()):  # the "no audio: synthetic codebooks" notice is expected
        prepare_tokenizers(cfg, str(artifacts), ctx, sources.list_units(ctx, cfg.input))


def run_job_timed(mod: Modality, corpus: Path, out: Path, artifacts: Path, actors: int,
                  rss: PeakRSS | None = None) -> dict[str, Any]:
    from tokenize_jobs.run import run_job

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(artifacts, out / "tokenizers")
    cfg = job_config(mod, actors)
    ctx = rss if rss is not None else contextlib.nullcontext()
    with ctx:
        t = time.perf_counter()
        s = run_job(cfg, mod.kind, str(corpus), str(out), print_summary=False)
        wall = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "samples": s["samples_written"], "inputs": s["inputs_tokenized"], "tokens": s["tokens"],
            "quarantined": s["inputs_quarantined"], "driver_bytes": s["driver_bytes"], "shards": s["shards_written"],
            "bytes_written": s["bytes_written"]}


def bare_tokenize(mod: Modality, corpus: Path, artifacts: Path, out_dir: Path,
                  ready: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """The floor: one process, one thread, no Ray, the job's own code in a plain loop. Lists and expands the
    corpus, calls the tokenize actor itself (`Tokenize.__call__`: its decode, each tokenizer's batch call --
    `encode_batch` for text, one numpy call per image shape, batched EnCodec/MAGVIT-v2 forwards -- and the
    chat layout) on batches of the job's batch size, and streams the results through one `writer.ShardStream`
    (shards of `shards.max_samples` samples and their indexes). What it leaves out is what the ratio is about:
    Ray Data's stages, the actor pool, the driver's commits. Returns seconds (tokenizer loading excluded,
    reported as start-up), samples and tokens. `ready` is called between the two (a barrier for loops started
    side by side)."""
    import pyarrow as pa

    from common import configlib
    from tokenize_jobs import sources
    from tokenize_jobs.pipeline import EXPAND_SCHEMA, Tokenize
    from tokenize_jobs.writer import ShardStream

    cfg = job_config(mod, 1)
    ctx = sources.corpus_context(mod.kind, str(corpus))
    t_load = time.perf_counter()
    job = configlib.to_dict(cfg)
    tokenize = Tokenize(str(artifacts), job["tokenizers"], cfg.input.max_tokens, ctx=ctx, job=job)
    load_s = time.perf_counter() - t_load
    batch_size = cfg.ray.udf_batch_size(mod.kind, cfg.tokenizers)

    shards_dir = out_dir / "bare"
    shutil.rmtree(shards_dir, ignore_errors=True)
    ready()
    t = time.perf_counter()
    rows = (r for u in sources.list_units(ctx, cfg.input) for r in sources.expand_unit(ctx, u, cfg.input, set()))
    stream = ShardStream(str(shards_dir), "bare", cfg.shards.max_samples, cfg.shards.max_bytes, tokenize.vocab.eos_id)
    while batch := [r for _, r in zip(range(batch_size), rows)]:
        stream.add(tokenize(pa.Table.from_pylist(batch, schema=EXPAND_SCHEMA)).to_pylist())
    commits = stream.finish()
    wall = time.perf_counter() - t
    shutil.rmtree(shards_dir, ignore_errors=True)
    return {"wall_s": wall, "samples": sum(c["samples"] for c in commits), "load_s": load_s,
            "tokens": sum(sum(json.loads(c["counts"])["tokens_per_task"].values()) for c in commits)}


def _bare_process(plan: Plan, name: str, corpus: str, artifacts: str, out_dir: str, barrier: Any) -> dict[str, Any]:
    """One of `bare_pair`'s loops, in a process of its own (spawned: the modality's corpus writer, a lambda, does
    not pickle, so the modality is looked up again by name)."""
    with torch_threads(1):
        return bare_tokenize(modalities(plan)[name], Path(corpus), Path(artifacts), Path(out_dir),
                             ready=barrier.wait)


def bare_pair(plan: Plan, mod: Modality, corpus: Path, artifacts: Path, out_dir: Path) -> dict[str, Any]:
    """The machine's own ceiling for 2 actors: two bare loops over the whole corpus at once, in two processes
    started together once both have loaded their tokenizers. Their samples/s together, against one loop's,
    is what two cores give two independent copies of the work (shared caches and memory bandwidth, a VM's
    vCPUs), with no Ray at all."""
    import multiprocessing as mp

    spawn = mp.get_context("spawn")
    with spawn.Manager() as manager, spawn.Pool(2) as pool:
        barrier = manager.Barrier(2)
        runs = pool.starmap(_bare_process, [(plan, mod.name, str(corpus), str(artifacts), str(out_dir / f"pair{i}"),
                                             barrier) for i in range(2)])
    return {"wall_s": max(r["wall_s"] for r in runs), "samples": sum(r["samples"] for r in runs)}


def writer_samples(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` samples as the write tasks hand them to the writer (WebDataset dicts of member bytes), token lengths
    and metadata as a text corpus gives them."""
    from tokenize_jobs.writer import wds_sample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(24, 160))
        ids = rng.integers(0, 50_000, length).astype(np.int32)
        mask = np.arange(length) >= length // 3
        out.append(wds_sample(f"{i:032x}_0", ids, mask, {"task": "text", "source": f"texts.jsonl:{i + 1}",
                                                            "fingerprint": f"{i:032x}", "n_tokens": length,
                                                            "n_answer": int(mask.sum())}))
    return out


def raw_tarfile_bytes(samples: Sequence[dict[str, Any]]) -> bytes:
    """The floor of the shard writer: `tarfile` itself adding the same members with the same header fields."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for sample in samples:
            key = sample["__key__"]
            for suffix in sorted(k for k in sample if not k.startswith("__")):   # TarWriter's member order
                data = sample[suffix]
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def writer_vs_tarfile(n: int, repeats: int) -> dict[str, Any]:
    """The shard writer (`writer.TarShard`: webdataset's TarWriter, pinned headers) against a raw `tarfile`
    write of the same members, interleaved in one process: MB/s each and their ratio. Both must give the same
    bytes, or the ratio would compare different work."""
    from tokenize_jobs.writer import shard_bytes

    samples = writer_samples(n)
    ours, raw = [], []
    same = True
    for _ in range(repeats):
        t = time.perf_counter()
        a = shard_bytes(samples)
        ours.append(len(a) / 2**20 / (time.perf_counter() - t))
        t = time.perf_counter()
        b = raw_tarfile_bytes(samples)
        raw.append(len(b) / 2**20 / (time.perf_counter() - t))
        same = same and a == b
    return {"samples": n, "shard_bytes": len(a), "same_bytes": same, "writer_mb_per_s": spread(ours),
            "tarfile_mb_per_s": spread(raw), "writer_vs_tarfile": paired_ratio(ours, raw)}


def run(suite: Suite) -> dict[str, Any]:
    """Per modality: job vs bare samples/s with 1 actor (and 2 where the plan asks); then peak memory, 1x vs 10x."""
    plan = suite.plan
    # One thread for the text tokenizer's encode_batch (a Rust thread pool) in this process and, inherited, in
    # Ray's workers: one actor = one core, like the bare loop.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    suite.ray()
    mods = modalities(plan)
    root = suite.work / "tokenize"
    result: dict[str, Any] = {"modalities": {}, "workers": {}, "memory": {},
                              "writer": writer_vs_tarfile(plan.tok_shard_samples, plan.repeats)}
    for name, n in plan.tok_n.items():
        mod = mods[name]
        corpus, small = root / name / "corpus", root / name / "small"
        mod.write(corpus, n)
        mod.write(small, plan.tok_n0)
        artifacts = root / name / "tokenizers"
        fit_tokenizers(mod, corpus, artifacts)
        suite.say(f"[tokenize] {name}: {n} inputs")
        entry = _tokenize_side_by_side(suite, mod, corpus, small, artifacts, actors=1)
        result["modalities"][name] = entry
        if name in plan.tok_workers_modalities:
            two = _tokenize_side_by_side(suite, mod, corpus, small, artifacts, actors=2, bare=entry["bare_runs"])
            pairs = [bare_pair(plan, mod, corpus, artifacts, root / name) for _ in range(plan.repeats)]
            pair_thr = [p["samples"] / p["wall_s"] for p in pairs]
            one_thr = [b["samples"] / b["wall_s"] for b in entry["bare_runs"]]
            speedup = paired_ratio(two["job_runs_thr"], entry["job_runs_thr"])
            vs_pair = paired_ratio(two["job_runs_thr"], pair_thr)
            result["workers"][name] = {
                "actors_1": entry["job_samples_per_s"], "actors_2": two["job_samples_per_s"],
                "speedup_2_vs_1": speedup, **goal_check("tokenize.actors_2_vs_1", speedup["median"]),
                # two bare loops at once against one: what the machine gives two copies of the work; the 2-actor
                # job against them is its per-core ratio on a busy machine, as 1 actor's is on a quiet one
                "bare_2_processes": spread(pair_thr), "bare_2_vs_1": paired_ratio(pair_thr, one_thr),
                "job_vs_bare_2": vs_pair, "job_vs_bare_2_goal": goal_check("tokenize.job_vs_bare_per_core",
                                                                           vs_pair["median"]),
                "speedup_2_vs_1_end_to_end": paired_ratio(two["job_runs_e2e"], entry["job_runs_e2e"]),
                "startup_s_2": two["job_startup_s"]}

    # memory: the same job on a corpus and on one 10x larger; streaming keeps the peak flat
    mod = mods[plan.mem_modality]
    mem_root = root / "memory"
    artifacts = root / mod.name / "tokenizers"
    if not artifacts.exists():
        mod.write(mem_root / "fit", plan.tok_n0)
        fit_tokenizers(mod, mem_root / "fit", artifacts)
    peaks = {}
    for scale in (1, 10):
        corpus = mem_root / f"x{scale}"
        mod.write(corpus, plan.mem_n * scale)
        rss = PeakRSS()
        r = run_job_timed(mod, corpus, mem_root / "out", artifacts, 1, rss)
        peaks[scale] = {"inputs": r["inputs"], "peak_rss_mib": rss.peak / 2**20,
                        "baseline_rss_mib": rss.baseline / 2**20, "growth_mib": (rss.peak - rss.baseline) / 2**20,
                        "wall_s": r["wall_s"], "rss_samples": rss.samples}
        shutil.rmtree(corpus, ignore_errors=True)
    ratio = peaks[10]["peak_rss_mib"] / peaks[1]["peak_rss_mib"]
    growth = peaks[10]["growth_mib"] / peaks[1]["growth_mib"] if peaks[1]["growth_mib"] > 0 else None
    result["memory"] = {"modality": mod.name, "x1": peaks[1], "x10": peaks[10], "peak_ratio_10x": ratio,
                        "growth_ratio_10x": growth, **goal_check("tokenize.memory_10x", ratio)}
    return result


def _tokenize_side_by_side(suite: Suite, mod: Modality, corpus: Path, small: Path, artifacts: Path, actors: int,
                           bare: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Job runs interleaved with bare runs. The job's fixed cost S comes from runs on a one-batch corpus:
    t(N) = S + N / thr, so thr = (N - n0) / (t(N) - t(n0)) per large run. A fixed cost only grows under
    interference, so the fastest small run estimates it."""
    plan = suite.plan
    out = suite.work / "tokenize" / mod.name / "out"
    # Not timed: the first job of a series starts the worker processes that Ray then keeps for the next ones (the
    # first modality's fixed cost came out 0.4-0.6 s above the others').
    run_job_timed(mod, small, out, artifacts, actors)
    t0 = min((run_job_timed(mod, small, out, artifacts, actors) for _ in range(plan.tok_n0_runs)),
             key=lambda r: r["wall_s"])
    jobs, bares = [], []
    for i in range(plan.repeats):
        jobs.append(run_job_timed(mod, corpus, out, artifacts, actors))
        if bare is None:
            with torch_threads(1):  # one actor = one core (Ray sets its OMP threads from its CPU share)
                bares.append(bare_tokenize(mod, corpus, artifacts, out.parent))
        suite.say(f"[tokenize]   {mod.name} actors={actors} repeat {i + 1}/{plan.repeats}: "
                  f"job {jobs[-1]['wall_s']:.1f} s" + (f", bare {bares[-1]['wall_s']:.1f} s" if bares else ""))
    bares = bares or bare
    n, n0 = jobs[0]["samples"], t0["samples"]
    thr = [(j["samples"] - n0) / (j["wall_s"] - t0["wall_s"]) if j["wall_s"] > t0["wall_s"] else float("nan")
           for j in jobs]
    e2e = [j["samples"] / j["wall_s"] for j in jobs]
    bare_thr = [b["samples"] / b["wall_s"] for b in bares]
    startup = [t0["wall_s"] - n0 / x for x in thr if math.isfinite(x)]
    per_core = paired_ratio([x / actors for x in thr], bare_thr)
    return {
        "actors": actors, "inputs": jobs[0]["inputs"], "samples": n, "samples_small_run": n0,
        "same_work": all(j["samples"] == bares[0]["samples"] and j["tokens"] == bares[0]["tokens"] for j in jobs),
        "quarantined": jobs[0]["quarantined"],
        # bytes the job's driver received (metadata rows, one per shard the workers wrote): O(shards)
        "driver_bytes": jobs[0]["driver_bytes"], "shards": jobs[0]["shards"],
        "driver_bytes_per_shard": jobs[0]["driver_bytes"] / max(1, jobs[0]["shards"]),
        "driver_bytes_per_input": jobs[0]["driver_bytes"] / max(1, jobs[0]["inputs"]),
        "job_samples_per_s": spread(thr), "job_end_to_end_samples_per_s": spread(e2e),
        "bare_samples_per_s": spread(bare_thr), "bare_tokenizer_load_s": spread([b["load_s"] for b in bares]),
        "job_startup_s": spread(startup), "job_vs_bare_per_core": per_core,
        "end_to_end_vs_bare": paired_ratio(e2e, bare_thr),
        **goal_check("tokenize.job_vs_bare_per_core", per_core["median"]),
        "job_runs_thr": thr, "job_runs_e2e": e2e, "bare_runs": bares,
    }

