"""`omnidiff bench <tokenize|read|train|sample|all> [--quick] [--out runs/bench]`: every stage against its floor.

Each benchmark runs the pipeline's real code and, in the same process run, the bare work it wraps, and reports
the ratio. Side-by-side ratios hold on a noisy machine where absolute numbers do not: runs of the two sides are
interleaved (job, bare, job, bare, ...), every figure is the median of the repeats with its min and max, and
ratios are medians of the paired per-repeat ratios. These are measurements, not tests: nothing here fails on a
missed goal; the table says which goals are met.

    tokenize  Ray Data tokenize job (tokenize_jobs/run.run_job) vs a single-process loop calling the same saved
              tokenizers on the same inputs, per modality; 1 vs 2 tokenizer actors; peak RSS on a corpus and on
              one 10x larger.
    read      the trainer's data path (pipelines/train/data.py: shards -> sources -> packed rows -> collate) vs raw
              sequential tarfile reading of the same shards, and vs what the demo model consumes in training.
    train     one Ray Train FSDP2 worker (pipelines/trainer.run) vs a bare single-process PyTorch loop of the same
              model, batch and optimizer; 2 workers vs 1; achieved FLOP/s vs a measured matmul peak (MFU).
    sample    one denoising step of model.sampling.generate vs one plain forward on the same batch; generated
              tokens/s vs batch size; MAGVIT-v2 encode images/s at 256x256.
    fsdp      the trainer's own worker step (pipelines.train.trainer build_model + train_step: FSDP2, mixed precision,
              activation checkpointing) on one device vs the same step on the plain module; no Ray, no data
              shards (synthetic packed rows), so it runs on a bare GPU node: MFU vs a measured matmul peak,
              peak memory vs `omnidiff plan`'s estimate, bf16 vs fp32 loss on the same first batch.

Start-up is excluded from every throughput and reported on its own line: Ray start (once per suite), the
tokenize job's fixed cost (from a run on a one-batch corpus: throughput = extra inputs / extra seconds), and
Ray Train's fit() start (fit() call -> first steady step, from the step timestamps the trainer logs to MLflow).

Writes <out>/<bench>.json per benchmark and <out>/all.json (the host's load average is recorded in each: on a
shared machine the absolute numbers move, the ratios much less). See docs/performance.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

BENCHES = ("tokenize", "read", "train", "sample", "fsdp")
GOALS = {
    "tokenize.job_vs_bare_per_core": (">=", 0.90),
    "tokenize.memory_10x": ("<=", 1.2),
    "read.reader_vs_training": (">=", 10.0),
    "train.ray_vs_bare": (">=", 0.90),
    "sample.step_vs_forward": ("<=", 1.15),
    "fsdp.sharded_vs_bare": (">=", 0.90),
}


# ---- sizes --------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """How big each benchmark is. `full` is the default; `quick` fits in a few minutes on 2 cores; `tiny` is the
    smoke test's (numbers meaningless, every code path runs)."""
    mode: str = "full"
    repeats: int = 5
    # tokenize: inputs per corpus (a one-batch corpus of `tok_n0` inputs measures the job's fixed cost)
    tok_n: dict[str, int] = field(default_factory=lambda: {
        "text": 4000, "image-pixel": 2000, "image-magvit2-tiny": 400, "speech-encodec": 120})
    tok_n0: int = 16
    tok_n0_runs: int = 2                  # runs on the one-batch corpus; the fastest one is the fixed cost
    tok_workers_modalities: tuple[str, ...] = ("text", "image-pixel", "image-magvit2-tiny", "speech-encodec")
    magvit_size: int = 64                 # tokenize bench images (tiny preset: 16x downsampling -> 4x4 tokens)
    mem_modality: str = "image-pixel"
    mem_n: int = 1000                     # and 10x that
    demo_images: int | None = 60          # demo corpus image slots for read/train shards (None = small: 10)
    read_samples: int = 10000             # samples delivered per repeat
    train_model: str = "demo"
    bare_steps: int = 30                  # timed steps of the bare loop (after one warm-up step)
    ray_steps: int = 40                   # steps of each Ray Train fit
    log_every: int = 5                    # the trainer's logging window = our step-time sample
    seq_len: int = 256
    micro_batch: int = 4
    sample_model: str = "demo"
    sample_batches: tuple[int, ...] = (1, 4, 16)
    prompt_len: int = 32
    gen_length: int = 64
    gen_steps: int = 16
    magvit_preset: str = "public"
    magvit_batches: tuple[int, ...] = (1, 16)
    magvit_repeats: int = 1
    matmul_n: int = 2048
    # torch threads of each bare process and CPUs of each Ray Train worker: a worker is a fixed slice of the
    # machine (one core here, one GPU on a GPU node), so "2 workers vs 1" asks how throughput scales with it
    threads: int = 1
    demo_shard_samples: int = 16          # shards.max_samples of the demo shard set
    # fsdp: the trainer's worker step on one device, synthetic packed rows (GPU sizes: Plan.for_device)
    fsdp_model: str = "demo"
    fsdp_seq_len: int = 256
    fsdp_micro_batch: int = 4
    fsdp_steps: int = 10                  # timed steps per side, after one warm-up step
    fsdp_distinct_batches: int = 4        # batches cycled through, so the loss falls within the run
    big_vocab: bool = False               # Dream's 168k-id vocabulary instead of the demo's (GPU sizes)
    fsdp_overrides: tuple[str, ...] = ()  # TrainConfig overrides, e.g. train.activation_checkpointing=false
    fsdp_profile: bool = False            # profile 2 more FSDP2 steps: <out>/fsdp_profile.txt

    @classmethod
    def for_mode(cls, mode: str) -> "Plan":
        if mode == "full":
            return cls()
        if mode == "quick":
            return cls(mode="quick", repeats=3,
                       tok_n={"text": 1500, "image-pixel": 800, "image-magvit2-tiny": 160, "speech-encodec": 48},
                       tok_workers_modalities=("speech-encodec",), mem_n=300, demo_images=None,
                       read_samples=1500, bare_steps=8, ray_steps=12, log_every=3,
                       magvit_preset="tiny", magvit_repeats=2, matmul_n=1024)
        if mode == "tiny":
            return cls(mode="tiny", repeats=1,
                       tok_n={"text": 40, "image-pixel": 40, "speech-encodec": 20}, tok_n0=8,
                       tok_workers_modalities=("text",), mem_n=20, demo_images=None, read_samples=100,
                       train_model="debug", bare_steps=2, ray_steps=4, log_every=2, seq_len=128, micro_batch=2,
                       sample_model="debug", sample_batches=(1, 2), prompt_len=8, gen_length=8, gen_steps=4,
                       magvit_preset="tiny", magvit_batches=(1, 2), magvit_repeats=1, matmul_n=256,
                       tok_n0_runs=1, fsdp_model="debug", fsdp_seq_len=128, fsdp_micro_batch=2, fsdp_steps=2,
                       fsdp_distinct_batches=2)
        raise ValueError(f"unknown bench mode {mode!r}: full, quick or tiny")

    def for_device(self, cuda: bool) -> "Plan":
        """On a GPU the CPU sizes measure launch overheads, not the GPU: the fsdp and sample benchmarks use the
        `1b` preset with Dream's vocabulary there (full: seq_len 2048 x 4 rows per step; quick: 1024 x 2)."""
        if not cuda or self.mode == "tiny":
            return self
        full = self.mode == "full"
        return replace(self, fsdp_model="1b", fsdp_seq_len=2048 if full else 1024,
                       fsdp_micro_batch=4 if full else 2, fsdp_steps=20 if full else 8, big_vocab=True,
                       sample_model="1b", prompt_len=64, gen_length=256, gen_steps=32, sample_batches=(1, 16))


# ---- statistics ---------------------------------------------------------------------------------------------

def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median with min/max of the repeats (few repeats: min/max says more than an IQR of three points)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": float(np.median(v)), "min": min(v), "max": max(v), "n": len(v),
            "values": [round(x, 6) for x in v]}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """Ratios of repeats measured side by side (i-th with i-th), then their spread."""
    return spread([a / b for a, b in zip(num, den) if b])


def fmt(s: dict[str, Any] | float | None, digits: int = 3) -> str:
    if s is None:
        return "-"
    if isinstance(s, (int, float)):
        return _num(s, digits)
    if s.get("median") is None:
        return "-"
    if s["n"] <= 1:
        return _num(s["median"], digits)
    return f"{_num(s['median'], digits)} [{_num(s['min'], digits)}-{_num(s['max'], digits)}]"


def _num(x: float, digits: int) -> str:
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{max(0, digits - 1 - int(math.floor(math.log10(mag))))}f}"


def goal_check(key: str, value: float | None) -> dict[str, Any]:
    op, target = GOALS[key]
    met = None if value is None else (value >= target if op == ">=" else value <= target)
    return {"goal": f"{op} {target}", "met": met}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def host_info() -> dict[str, Any]:
    import importlib.util

    import torch

    # fsdp and sample run without Ray (a bare GPU node); the others need it
    ray = importlib.import_module("ray") if importlib.util.find_spec("ray") else None
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray and ray.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class PeakRSS:
    """Peak resident memory of this process and all its descendants (with a local Ray: GCS, raylet and every
    worker), sampled by a thread. RSS counts shared pages once per process, so it overstates the true total,
    equally for both corpus sizes."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self.baseline = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def tree_rss() -> int:
        import psutil

        root = psutil.Process()
        total = 0
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.tree_rss())
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.baseline = self.peak = self.tree_rss()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.tree_rss())


# ---- the suite: shared Ray, work dir, shared set-ups --------------------------------------------------------

class Suite:
    def __init__(self, plan: Plan, out: Path, work: Path, say: Callable[[str], None] = print) -> None:
        self.plan, self.out, self.work, self.say = plan, out, work, say
        self.ray_init_s: float | None = None
        self._ray_started = False
        self._demo_shards: Path | None = None
        self._bare_train: dict[str, Any] | None = None

    def ray(self) -> None:
        """Start Ray once for the whole suite (its start-up is reported, never inside a throughput)."""
        import ray

        if ray.is_initialized():
            return
        # report() waits for the Train controller's poll (default every 2 s); the benchmark times steps inside
        # the workers, but a short poll keeps each fit's tail short.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
        t = time.perf_counter()
        from common.rayutil import init_ray

        init_ray(num_cpus=os.cpu_count(), logging_level=logging.WARNING, log_to_driver=False)
        self.ray_init_s = time.perf_counter() - t
        self._ray_started = True
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        self.say(f"[bench] Ray started in {self.ray_init_s:.1f} s (reported, excluded from throughputs)")

    def close(self) -> None:
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False

    def demo_shards(self) -> Path:
        """The demo corpus (digits + speech, six tasks) tokenized by the real job: read and train use it."""
        if self._demo_shards is None:
            from common import configlib
            from demo.corpus import build_demo_corpus
            from tokenize_jobs.config import TokenizeJobConfig
            from tokenize_jobs.run import run_job

            self.ray()
            p = self.plan
            corpus = build_demo_corpus(self.work / "demo_corpus", small=p.demo_images is None,
                                       n_train_images=p.demo_images, n_test_images=p.demo_images)
            out = self.work / "demo_shards"
            cfg = configlib.load(TokenizeJobConfig, None, ["ray.progress_bars=false",
                                                           f"shards.max_samples={p.demo_shard_samples}"])
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                s = run_job(cfg, "messages", corpus["train"], str(out), print_summary=False)
            self.say(f"[bench] demo shards: {s['samples_written']} samples in {s['shards_written']} shards "
                     f"({time.perf_counter() - t:.0f} s, set-up)")
            self._demo_shards = out
        return self._demo_shards

    def train_config(self, name: str, overrides: Sequence[str] = ()):
        from pipelines.train import trainer

        p = self.plan
        run_dir = self.work / "train" / name
        base = [f"model.preset={p.train_model}", f"data.seq_len={p.seq_len}", f"data.micro_batch={p.micro_batch}",
                "data.grad_accum=1", "data.packing=pack", "train.eval_every=0", "train.eval_samples=0",
                "optim.warmup_steps=1", f"run.name={name}", "run.max_failures=0",
                f"mlflow.tracking_uri=sqlite:///{run_dir.resolve()}/mlflow.db", "mlflow.experiment=bench",
                "mlflow.system_metrics=false"]
        return trainer.resolve_config(None, [str(self.demo_shards())], str(run_dir), base + list(overrides))

    def bare_train(self) -> dict[str, Any]:
        """The bare training loop's figures, shared by the read and train benchmarks."""
        if self._bare_train is None:
            with torch_threads(self.plan.threads):
                self._bare_train = bare_train_loop(self.train_config("bare"), self.plan.bare_steps)
        return self._bare_train


# ---- 1. tokenize --------------------------------------------------------------------------------------------

WORDS = ("a", "small", "digit", "drawn", "by", "hand", "with", "thin", "strokes", "on", "dark", "paper", "the",
         "speaker", "reads", "each", "number", "slowly", "and", "clearly", "model", "learns", "to", "write",
         "seven", "three", "nine", "zero", "picture", "sound")


def _fresh(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


# Lines per JSONL file. The job expands each listed file in one task into one block, so a corpus held in a
# single file reaches only one tokenizer actor; real corpora come in many files, and so do these.
LINES_PER_FILE = 100


def write_text_corpus(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    _fresh(root)
    for start in range(0, n, LINES_PER_FILE):
        with open(root / f"texts-{start // LINES_PER_FILE:05d}.jsonl", "w") as f:
            for _ in range(min(LINES_PER_FILE, n - start)):
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
    per_file = 16  # one tokenizer batch per file: EnCodec work spreads over the actors
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
    overrides: list[str]        # tokenizer settings of the job config
    write: Callable[[Path, int], None]


def modalities(plan: Plan) -> dict[str, Modality]:
    return {
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
            "quarantined": s["inputs_quarantined"]}


def _media_lists(messages: list[dict], images: list, audios: list) -> tuple[list, list]:
    """A paired input's one image/audio fills every placeholder of its task's messages (as the job does)."""
    from model.prompts import count_placeholders

    n_img, n_aud = count_placeholders(messages)
    return images * n_img, audios * n_aud


def bare_tokenize(kind: str, corpus: Path, artifacts: Path, out_tar: Path, batch_size: int = 16,
                  audio_batch: int = 8) -> dict[str, Any]:
    """The floor: one process, one thread, no Ray. Reads every input, decodes and encodes its media in the
    job's batch sizes with the same saved tokenizers, lays out each task's chat, and writes the samples to one
    tar. Returns seconds (tokenizer loading excluded, reported as start-up), samples and tokens."""
    from model.prompts import TaskTemplates, encode_messages, task_messages
    from model.tokenizers import TokenizerSet
    from tokenize_jobs.config import TasksConfig
    from tokenize_jobs.writer import sample_tar_bytes, tar_end

    t_load = time.perf_counter()
    tok = TokenizerSet.load(str(artifacts))
    load_s = time.perf_counter() - t_load
    templates, tasks = TaskTemplates(), TasksConfig()

    # (source, text, media bytes or None) per input; listing happens inside the timed region, as in the job
    def inputs() -> Iterator[tuple[str, str, bytes | None]]:
        if kind == "text":
            for path in sorted(corpus.glob("*.jsonl")):
                with open(path) as f:
                    for line in f:
                        yield path.name, json.loads(line)["text"], None
        elif kind == "image-text":
            for img in sorted(corpus.glob("*.png")):
                yield img.name, img.with_suffix(".txt").read_text().strip(), img.read_bytes()
        elif kind == "speech-text":
            for path in sorted(corpus.glob("*.jsonl")):
                with open(path) as f:
                    for line in f:
                        rec = json.loads(line)
                        yield rec["audio"], rec["text"], (path.parent / rec["audio"]).read_bytes()
        else:
            raise ValueError(f"bare_tokenize: unsupported kind {kind!r}")

    def encode_media(batch: list[tuple[str, str, bytes | None]]) -> list[np.ndarray | None]:
        if kind == "image-text":
            arrays = [tok.image.load(data, src) for src, _, data in batch]
            codes = tok.image.encode(np.stack(arrays))            # (B, H, W, C) -> (B, N)
            return [codes[i] for i in range(len(batch))]
        if kind == "speech-text":
            wavs = [tok.speech.load(data, src) for src, _, data in batch]
            order = sorted(range(len(wavs)), key=lambda i: wavs[i].size)   # similar lengths share a batch
            out: list[np.ndarray | None] = [None] * len(wavs)
            for start in range(0, len(order), audio_batch):
                idx = order[start:start + audio_batch]
                for i, c in zip(idx, tok.speech.encode_batch([wavs[i] for i in idx])):
                    out[i] = c
            return out
        return [None] * len(batch)

    def samples_of(text: str, codes: np.ndarray | None) -> Iterator[tuple[str, Any]]:
        if kind == "text":
            yield "text", encode_messages(task_messages(templates.text, text="", answer=text), tok.vocab, tok.text)
            return
        media = "image" if kind == "image-text" else "audio"
        names = tasks.image_text if media == "image" else tasks.speech_text
        for task in names:
            tpl = templates.get(task)
            msgs = task_messages(tpl, text=text, answer=text if tpl.answer == "text" else
                                 ("<|image|>" if media == "image" else "<|audio|>"))
            imgs, auds = _media_lists(msgs, [codes] if media == "image" else [], [codes] if media == "audio" else [])
            yield task, encode_messages(msgs, tok.vocab, tok.text, images=imgs, audios=auds)

    n_samples = n_tokens = 0
    t = time.perf_counter()
    with open(out_tar, "wb") as f:
        size, batch = 0, []
        it = inputs()
        while True:
            batch = [x for _, x in zip(range(batch_size), it)]
            if not batch:
                break
            for (src, text, _), codes in zip(batch, encode_media(batch)):
                for j, (task, enc) in enumerate(samples_of(text, codes)):
                    blob = sample_tar_bytes(f"s{n_samples}_{j}", enc.input_ids, enc.answer_mask,
                                            {"task": task, "source": src, "n_tokens": len(enc)})
                    f.write(blob)
                    size += len(blob)
                    n_samples += 1
                    n_tokens += len(enc)
        f.write(tar_end(size))
    return {"wall_s": time.perf_counter() - t, "samples": n_samples, "tokens": n_tokens, "load_s": load_s}


def bench_tokenize(suite: Suite) -> dict[str, Any]:
    plan = suite.plan
    suite.ray()
    mods = modalities(plan)
    root = suite.work / "tokenize"
    result: dict[str, Any] = {"modalities": {}, "workers": {}, "memory": {}}
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
            result["workers"][name] = {
                "actors_1": entry["job_samples_per_s"], "actors_2": two["job_samples_per_s"],
                "job_vs_bare_per_core_2": two["job_vs_bare_per_core"],
                "speedup_2_vs_1": paired_ratio(two["job_runs_thr"], entry["job_runs_thr"]),
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
    t0 = min((run_job_timed(mod, small, out, artifacts, actors) for _ in range(plan.tok_n0_runs)),
             key=lambda r: r["wall_s"])
    jobs, bares = [], []
    for i in range(plan.repeats):
        jobs.append(run_job_timed(mod, corpus, out, artifacts, actors))
        if bare is None:
            with torch_threads(1):  # one actor = one core (Ray sets its OMP threads from its CPU share)
                bares.append(bare_tokenize(mod.kind, corpus, artifacts, out.parent / "bare.tar"))
        suite.say(f"[tokenize]   {mod.name} actors={actors} repeat {i + 1}/{plan.repeats}: job {jobs[-1]['wall_s']:.1f} s"
                  + (f", bare {bares[-1]['wall_s']:.1f} s" if bares else ""))
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
        "job_samples_per_s": spread(thr), "job_end_to_end_samples_per_s": spread(e2e),
        "bare_samples_per_s": spread(bare_thr), "bare_tokenizer_load_s": spread([b["load_s"] for b in bares]),
        "job_startup_s": spread(startup), "job_vs_bare_per_core": per_core,
        "end_to_end_vs_bare": paired_ratio(e2e, bare_thr),
        **goal_check("tokenize.job_vs_bare_per_core", per_core["median"]),
        "job_runs_thr": thr, "job_runs_e2e": e2e, "bare_runs": bares,
    }


# ---- 3. read ------------------------------------------------------------------------------------------------

def raw_tar_read(urls: Sequence[str], target: int) -> tuple[int, int, float]:
    """Sequential tarfile reading of the shards (every member's bytes), cycling until `target` samples.
    -> (samples, bytes, seconds)."""
    samples = nbytes = 0
    t = time.perf_counter()
    while samples < target:
        for url in urls:
            with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                keys = set()
                for m in tar:
                    if m.isfile():
                        data = tar.extractfile(m).read()  # type: ignore[union-attr]
                        keys.add(m.name.split(".", 1)[0])
                        assert len(data) == m.size
                samples += len(keys)
            nbytes += os.path.getsize(url)
            if samples >= target:
                break
    return samples, nbytes, time.perf_counter() - t


def stream_read(cfg, target: int) -> tuple[int, float]:
    """The trainer's data path on one rank: the row stream + collate, until `target` samples were packed."""
    from pipelines.train.data import collate, load_data

    data = load_data(cfg, warn=False)
    stream = data.stream(cfg)
    t = time.perf_counter()
    while stream.state.samples < target:
        for rows in stream.step_rows(1, 0, cfg.data.micro_batch, cfg.data.grad_accum):
            collate(rows, cfg.data.seq_len, data.vocab)
    return stream.state.samples, time.perf_counter() - t


def bench_read(suite: Suite) -> dict[str, Any]:
    from tokenize_jobs.shards import read_manifest, shard_urls

    plan = suite.plan
    shards = suite.demo_shards()
    manifest = read_manifest(str(shards))
    urls = shard_urls(str(shards))
    total_bytes = sum(int(e["bytes"]) for e in manifest["shards"])
    total_samples = sum(int(e["samples"]) for e in manifest["shards"])
    bytes_per_sample = total_bytes / total_samples
    cfg = suite.train_config("read")
    stream_thr, raw_thr, raw_mbs = [], [], []
    for _ in range(plan.repeats):
        n, s = stream_read(cfg, plan.read_samples)
        stream_thr.append(n / s)
        n, b, s = raw_tar_read(urls, plan.read_samples)
        raw_thr.append(n / s)
        raw_mbs.append(b / s / 1e6)
    bare = suite.bare_train()
    consume = bare["samples_per_s"]
    # the bare loop's median consumption: it is the same work whichever repeat of the reader it is paired with
    vs_training = paired_ratio(stream_thr, [consume["median"]] * len(stream_thr))
    return {
        "shards": len(urls), "samples_in_shards": total_samples, "shard_bytes": total_bytes,
        "sources": len({t for t, n in manifest["counts"]["samples_per_task"].items() if n}),
        "reader_samples_per_s": spread(stream_thr),
        "reader_mb_per_s": spread([x * bytes_per_sample / 1e6 for x in stream_thr]),
        "raw_tar_samples_per_s": spread(raw_thr), "raw_tar_mb_per_s": spread(raw_mbs),
        "reader_vs_raw_tar": paired_ratio(stream_thr, raw_thr),
        "training_samples_per_s": consume, "training_model": plan.train_model,
        "reader_vs_training": vs_training,
        **goal_check("read.reader_vs_training", vs_training["median"]),
    }


# ---- 4. train -----------------------------------------------------------------------------------------------

def bare_train_loop(cfg, steps: int) -> dict[str, Any]:
    """The floor: the same model, batch, data stream, masking, loss and AdamW in one process, plain PyTorch
    (no FSDP, no torch.distributed, no Ray, no MLflow) on the current torch threads (or the GPU). One warm-up step, then `steps` timed."""
    import torch

    from model.diffusion import loss_weights, mask_answer_tokens, masked_diffusion_loss
    from model.transformer import Transformer
    from pipelines.train.data import collate, load_data, step_generator
    from pipelines.train.trainer import build_optimizer

    data = load_data(cfg, warn=False)
    stream = data.stream(cfg)
    vocab, d = data.vocab, cfg.diffusion
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if _cuda() else "cpu")
    model = Transformer(cfg.model, vocab_size=vocab.size, media_markers=vocab.media_markers).to(device)
    model.train()
    # the trainer computes in bf16 on GPU (parallelize's mixed precision) and fp32 on CPU; so does the floor
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and
                cfg.train.mixed_precision == "bf16" else contextlib.nullcontext())
    optimizer, scheduler = build_optimizer(model, cfg)
    times, tokens, samples = [], [], []
    for step in range(steps + 1):
        t = time.perf_counter()
        s0 = stream.state.samples
        micro = [collate(r, cfg.data.seq_len, vocab) for r in stream.step_rows(1, 0, cfg.data.micro_batch,
                                                                               cfg.data.grad_accum)]
        count = 0.0
        prepared = []
        for m, batch in enumerate(micro):
            batch = batch.to(device)
            masked = mask_answer_tokens(batch.ids, batch.answer_mask, batch.tail_mask,
                                        step_generator(cfg.train.seed, step, 0, m, device), mask_id=vocab.mask_id,
                                        eps=d.eps, tail_factor=d.tail_factor, scheme=d.scheme,
                                        segment_ids=batch.segment_ids)
            weights, row_count = loss_weights(masked.is_masked, batch.answer_mask, masked.t, scheme=d.scheme)
            count += float(row_count.sum())
            prepared.append((batch, masked, weights, row_count))
        for batch, masked, weights, row_count in prepared:
            with autocast:
                # as the trainer: the head at masked positions only, (N_masked, V)
                logits = model(masked.noisy_ids, batch.segment_ids, only=masked.is_masked)
            terms = masked_diffusion_loss(logits, batch.ids, masked.is_masked, weights=weights,
                                          row_count=None if d.scheme == "per_token" else row_count)
            (terms.loss_sum / max(count, 1.0)).backward()
        if cfg.optim.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # step 0 is the warm-up (allocator, first-call kernels)
            times.append(time.perf_counter() - t)
            tokens.append(sum(b.n_tokens for b in micro))
            samples.append(stream.state.samples - s0)
    processed = cfg.data.micro_batch * cfg.data.grad_accum * cfg.data.seq_len
    return {"steps": steps, "step_s": spread(times), "steps_per_s": spread([1 / x for x in times]),
            "tokens_per_s": spread([n / x for n, x in zip(tokens, times)]),
            "samples_per_s": spread([n / x for n, x in zip(samples, times)]),
            "samples_per_step": float(np.mean(samples)), "processed_tokens_per_step": processed,
            "flops_per_token": model.flops_per_token(cfg.data.seq_len), "params": model.num_params()}


def ray_train_run(suite: Suite, workers: int) -> dict[str, Any]:
    """One pipelines.train.trainer.run fit; steady-state step times from the trainer's own MLflow metrics (step_time_s
    is the mean over each log window); the first window (warm-up) is dropped. Start-up = fit() call -> start of
    the first steady window."""
    from mlflow.tracking import MlflowClient

    from pipelines.train import trainer

    plan = suite.plan
    cores = plan.threads
    # Each worker gets `threads` CPUs (Ray sets its OMP/torch threads from that share), as the bare loop has
    # `threads` threads; on a GPU node each worker gets one GPU instead.
    cpus = cores
    gpu = ["scaling.use_gpu=true", "scaling.gpus_per_worker=1"] if _cuda() else []
    name = f"ray-{workers}w"
    shutil.rmtree(suite.work / "train" / name, ignore_errors=True)
    cfg = suite.train_config(name, [f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpus}",
                                    f"train.steps={plan.ray_steps}", f"train.log_every={plan.log_every}",
                                    f"train.checkpoint_every={plan.ray_steps}", *gpu])
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        result = trainer.run(cfg)
    wall = time.time() - start
    if getattr(result, "error", None):
        raise RuntimeError(f"bench train: Ray Train run {name} failed: {result.error}")
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    run = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    run = run[0] if run else client.search_runs([exp.experiment_id])[0]
    hist = sorted(client.get_metric_history(run.info.run_id, "step_time_s"), key=lambda m: m.step)
    tps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "tokens_per_s")}
    steady = hist[1:] if len(hist) > 1 else hist
    step_s = [m.value for m in steady]
    first = steady[0]
    startup = (first.timestamp / 1000 - start) - plan.log_every * first.value
    processed = workers * cfg.data.micro_batch * cfg.data.grad_accum * cfg.data.seq_len
    return {"workers": workers, "cpus_per_worker": cpus, "steps": plan.ray_steps, "windows": len(step_s),
            "step_s": spread(step_s), "steps_per_s": spread([1 / x for x in step_s]),
            "tokens_per_s": spread([tps[m.step] for m in steady if m.step in tps]),
            "processed_tokens_per_step": processed, "startup_s": startup, "fit_wall_s": wall}


def matmul_peak(n: int, dtype: str = "float32", device: str = "cpu", repeats: int = 5) -> dict[str, Any]:
    """Measured peak: GFLOP/s of an (n x n) @ (n x n) matmul (2 n^3 FLOPs), median of `repeats`."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    vals = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        sync()
        vals.append(2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return {"n": n, "dtype": dtype, "device": device, "gflops": spread(vals)}


def bench_train(suite: Suite) -> dict[str, Any]:
    import torch

    plan = suite.plan
    suite.ray()
    cores = plan.threads
    # the peak the MFU is measured against: fp32 on this CPU at the workers' thread count, bf16 on a GPU
    with torch_threads(cores):
        peak = matmul_peak(8192, "bfloat16", "cuda") if _cuda() else matmul_peak(plan.matmul_n)
    bare = suite.bare_train()
    one = ray_train_run(suite, 1)
    room = torch.cuda.device_count() >= 2 if _cuda() else (os.cpu_count() or 1) >= 2 * cores
    two = ray_train_run(suite, 2) if room else None
    # steady state of a fit is a handful of windows; the bare loop's steps spread the other side
    ratio = {"median": one["steps_per_s"]["median"] / bare["steps_per_s"]["median"],
             "min": one["steps_per_s"]["min"] / bare["steps_per_s"]["max"],
             "max": one["steps_per_s"]["max"] / bare["steps_per_s"]["min"], "n": one["windows"]}

    def mfu(run: dict[str, Any]) -> dict[str, Any]:
        # every position of every row is computed (padding included), so processed tokens, not real ones
        flops = bare["flops_per_token"] * run["processed_tokens_per_step"] * run["steps_per_s"]["median"]
        workers = run.get("workers", 1)
        # the peak is the best repeat: the hardware reached it, interference only lowers it
        return {"gflops": flops / 1e9, "mfu": flops / 1e9 / (peak["gflops"]["max"] * workers)}

    out = {"model": plan.train_model, "params": bare["params"], "seq_len": plan.seq_len,
           "micro_batch": plan.micro_batch, "matmul_peak": peak, "bare": bare, "ray_1": one, "ray_2": two,
           "ray_vs_bare": ratio, **goal_check("train.ray_vs_bare", ratio["median"]),
           "mfu_bare": mfu(bare), "mfu_ray_1": mfu(one), "mfu_ray_2": mfu(two) if two else None}
    if two:
        out["two_vs_one_tokens_per_s"] = two["tokens_per_s"]["median"] / one["tokens_per_s"]["median"]
    return out


# ---- 5. sample ----------------------------------------------------------------------------------------------

def _bench_vocab(big: bool = False):
    """The demo's vocabulary shape (BPE text, 8x8 pixel images, EnCodec 2 codebooks), or with `big` Dream's
    (Qwen2 text, MAGVIT-v2 8,192 codes, EnCodec 8 codebooks: 168,459 ids); speed does not depend on which ids
    are which."""
    from model.vocab import Vocab, dream_vocab

    if big:
        return dream_vocab()
    return Vocab(text_size=512, text_tokenizer="bench", n_q=2, audio_codebook_size=1024, image_codebook_size=17,
                 image_tokenizer="pixel-8x8x1-17", speech_tokenizer="encodec_24khz@1.5kbps")


def _seconds(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_sample(suite: Suite) -> dict[str, Any]:
    import torch

    from model.config import ModelConfig
    from model.sampling import generate
    from model.tokenizers.magvit2 import bench_encode
    from model.transformer import Transformer
    from model.vocab import Modality

    plan = suite.plan
    vocab = _bench_vocab(plan.big_vocab)
    torch.manual_seed(0)
    device = torch.device("cuda" if _cuda() else "cpu")
    model = Transformer(ModelConfig.preset(plan.sample_model), vocab_size=vocab.size,
                        media_markers=vocab.media_markers).to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)   # as pipelines.infer.predictor.load_model serves it on a GPU (dtype auto)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    lo, hi = vocab.text_range()
    per_batch = {}
    with torch_threads(plan.threads), torch.no_grad():
        for B in plan.sample_batches:
            prompt = torch.randint(lo, hi, (B, plan.prompt_len), generator=torch.Generator().manual_seed(B))
            prompt = prompt.to(device)
            full = torch.cat([prompt, torch.full_like(prompt[:, :1], vocab.mask_id).expand(B, plan.gen_length)],
                             dim=1)  # (B, P + G)
            gen_s, fwd_s = [], []
            # interleaved: each repeat times one generate and one forward under the same load
            gen_fn = lambda: (generate(model, prompt, vocab=vocab, gen_length=plan.gen_length,  # noqa: E731
                                       steps=plan.gen_steps, modality=Modality.TEXT), sync())
            # the same forward generate makes: the head on the canvas columns only
            canvas_cols = torch.zeros(full.shape, dtype=torch.bool, device=device)
            canvas_cols[:, prompt.shape[1]:] = True
            fwd_fn = lambda: (model(full, None, only=canvas_cols), sync())  # noqa: E731
            gen_fn(), fwd_fn()  # warm-up
            for _ in range(plan.repeats):
                gen_s.append(_seconds(gen_fn))
                fwd_s.append(_seconds(fwd_fn))
            step_s = [g / plan.gen_steps for g in gen_s]
            ratio = paired_ratio(step_s, fwd_s)
            per_batch[B] = {"step_s": spread(step_s), "forward_s": spread(fwd_s), "step_vs_forward": ratio,
                            "tokens_per_s": spread([B * plan.gen_length / g for g in gen_s])}
        # an image canvas at the largest batch: the head over the image codes alone (generate's subset head, the
        # default) vs every vocabulary row with the rest masked to -inf; the same canvases come out
        B = max(plan.sample_batches)
        prompt = torch.randint(lo, hi, (B, plan.prompt_len), generator=torch.Generator().manual_seed(B)).to(device)
        image_s: dict[bool, list[float]] = {True: [], False: []}
        canvases = {}
        for subset in (True, False):   # warm-up
            canvases[subset] = generate(model, prompt, vocab=vocab, gen_length=plan.gen_length, steps=plan.gen_steps,
                                        modality=Modality.IMAGE, subset_head=subset)
        for _ in range(plan.repeats):
            for subset in (True, False):
                image_s[subset].append(_seconds(lambda: (generate(  # noqa: B023
                    model, prompt, vocab=vocab, gen_length=plan.gen_length, steps=plan.gen_steps,
                    modality=Modality.IMAGE, subset_head=subset), sync())) / plan.gen_steps)
        lo_i, hi_i = vocab.image_range()
        image = {"batch": B, "image_ids": hi_i - lo_i, "vocab_rows": model.cfg.vocab_size or vocab.size,
                 "subset_step_s": spread(image_s[True]), "full_step_s": spread(image_s[False]),
                 "subset_vs_full": paired_ratio(image_s[True], image_s[False]),
                 "same_canvas": bool(torch.equal(canvases[True], canvases[False]))}
    largest = per_batch[max(plan.sample_batches)]
    with torch_threads(plan.threads):
        # one call: its own warm-up per batch size, then `magvit_repeats` timed calls (their mean)
        mag = bench_encode(256, plan.magvit_batches, preset=plan.magvit_preset, repeats=plan.magvit_repeats,
                           device="cuda" if _cuda() else "cpu")
    return {"model": plan.sample_model, "prompt_len": plan.prompt_len, "gen_length": plan.gen_length,
            "gen_steps": plan.gen_steps, "by_batch": per_batch, "image_canvas": image,
            "step_vs_forward": largest["step_vs_forward"],
            **goal_check("sample.step_vs_forward", largest["step_vs_forward"]["median"]),
            "magvit2_encode": {"preset": plan.magvit_preset, "size": 256, "repeats": plan.magvit_repeats,
                               "images_per_s": {bs: spread([mag[bs]]) for bs in plan.magvit_batches}}}


# ---- 6. fsdp ------------------------------------------------------------------------------------------------

def synthetic_batches(vocab, seq_len: int, micro_batch: int, n: int, seed: int = 0) -> list:
    """`n` collated (micro_batch, seq_len) batches of packed samples with random ids: each sample 1/4 prompt,
    3/4 answer, a random task; the rows are packed to at least 90% as the trainer's packer fills them."""
    from model.tasks import TASKS
    from pipelines.train.data import Sample, collate

    rng = np.random.default_rng(seed)
    lo, hi = vocab.text_range()
    batches = []
    for _ in range(n):
        rows = []
        for _ in range(micro_batch):
            row, used = [], 0
            while used < 0.9 * seq_len:
                length = int(min(seq_len - used, rng.integers(seq_len // 8, seq_len // 2 + 1)))
                answer = np.arange(length) >= length // 4
                row.append(Sample(key=f"s{len(row)}", task=str(rng.choice(TASKS)),
                                  ids=rng.integers(lo, hi, length), answer_mask=answer,
                                  tail_mask=np.zeros(length, dtype=bool)))
                used += length
            rows.append(row)
        batches.append(collate(rows, seq_len, vocab))
    return batches


def _fsdp_config(plan: Plan):
    from common import configlib
    from pipelines.train.config import TrainConfig

    # activation checkpointing on, as a model of this size is trained; everything else the trainer's defaults
    return configlib.load(TrainConfig, None, [
        f"model.preset={plan.fsdp_model}", f"data.seq_len={plan.fsdp_seq_len}",
        f"data.micro_batch={plan.fsdp_micro_batch}", "data.grad_accum=1", "train.activation_checkpointing=true",
        "optim.warmup_steps=1", f"train.steps={plan.fsdp_steps + 4}", *plan.fsdp_overrides])


def fsdp_side(cfg, vocab, batches: list, steps: int, device, *, sharded: bool,
              profile_to: Path | None = None) -> dict[str, Any]:
    """One side of the fsdp benchmark: `steps` timed optimizer steps (after one warm-up) of
    pipelines.train.trainer.train_step, on the trainer's FSDP2 model (`sharded`) or on the plain module with the same
    activation checkpointing and, on a GPU, bf16 autocast (what FSDP's mixed precision computes in)."""
    import gc

    import torch

    from model.parallelize import apply_activation_checkpointing
    from model.transformer import Transformer
    from pipelines.train.trainer import build_model, build_optimizer, train_step

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    out: dict[str, Any] = {}
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        model = build_model(cfg, vocab, device, init_device_mesh(device.type, (1,)))
        autocast = contextlib.nullcontext()
    else:
        torch.manual_seed(cfg.train.seed)   # build_model's seed: both sides start from the same weights
        model = Transformer(cfg.model, vocab_size=vocab.size, media_markers=vocab.media_markers)
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)   # as parallelize() does on the sharded side
        model = model.to(device)
        model.set_requires_gradient_sync = lambda flag: None   # the one FSDP call train_step makes
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if cuda and cfg.train.mixed_precision == "bf16" else contextlib.nullcontext())
        # the fp32 reference: the same first step's loss in full precision, weights left as they were (lr 0)
        optimizer, scheduler = build_optimizer(model, cfg)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        scheduler.base_lrs = [0.0] * len(scheduler.base_lrs)
        out["fp32_first_loss"] = train_step(model, optimizer, scheduler, [batches[0]], vocab=vocab, cfg=cfg,
                                            step=0, rank=0, world=1, device=device).loss
        del optimizer, scheduler
    optimizer, scheduler = build_optimizer(model, cfg)
    times, losses = [], []
    for step in range(steps + 1):
        sync()
        t = time.perf_counter()
        with autocast:
            st = train_step(model, optimizer, scheduler, [batches[step % len(batches)]], vocab=vocab, cfg=cfg,
                            step=step, rank=0, world=1, device=device)
        sync()   # train_step's float() already waits; this also covers the optimizer's kernels
        losses.append(st.loss)
        if step > 0:   # step 0 is the warm-up (allocator, kernel selection)
            times.append(time.perf_counter() - t)
    if profile_to is not None:
        out["profile"] = str(profile_steps(lambda k: train_step(
            model, optimizer, scheduler, [batches[k % len(batches)]], vocab=vocab, cfg=cfg, step=steps + 1 + k,
            rank=0, world=1, device=device), 2, device, profile_to))
    processed = cfg.data.micro_batch * cfg.data.seq_len
    out.update({"sharded": sharded, "steps": steps, "losses": losses, "first_loss": losses[0],
                "step_s": spread(times), "steps_per_s": spread([1 / x for x in times]),
                "tokens_per_s": spread([processed / x for x in times]), "processed_tokens_per_step": processed,
                "flops_per_token": model.flops_per_token(cfg.data.seq_len), "params": model.num_params()})
    if cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    del model, optimizer, scheduler
    return out


def profile_steps(step_fn: Callable[[int], Any], n: int, device, path: Path) -> Path:
    """Run `step_fn(k)` for k < n under torch.profiler; write the ops sorted by their own device time (self CPU
    time on CPU) to `path`, a table, and return it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for k in range(n):
            step_fn(k)
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70) + "\n")
    return path


@contextlib.contextmanager
def _one_process_group(device) -> Iterator[None]:
    """A torch.distributed group of this process alone (nccl on a GPU, gloo on CPU), as a Ray Train worker of a
    one-worker run has; torn down afterwards. Its store is in memory: a TCP store would listen on every
    interface for the rest of the process."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("bench fsdp runs in one process; start it without torchrun or Ray Train")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def bench_fsdp(suite: Suite) -> dict[str, Any]:
    """The trainer's worker step, sharded vs plain, on one device: the bare side runs first with no process
    group, then the FSDP2 side in a one-process group. The sides run one after the other, not interleaved:
    holding both models would double the memory, and a dedicated GPU does not drift between them."""
    import torch

    from model.plan import plan as memory_plan

    plan = suite.plan
    device = torch.device("cuda", torch.cuda.current_device()) if _cuda() else torch.device("cpu")
    cfg = _fsdp_config(plan)
    vocab = _bench_vocab(plan.big_vocab)
    seq_len, micro_batch = cfg.data.seq_len, cfg.data.micro_batch   # overrides may change them
    batches = [b.to(device) for b in synthetic_batches(vocab, seq_len, micro_batch, plan.fsdp_distinct_batches)]
    with torch_threads(plan.threads):
        peak = (matmul_peak(8192, "bfloat16", "cuda") if device.type == "cuda"
                else matmul_peak(plan.matmul_n))
        bare = fsdp_side(cfg, vocab, batches, plan.fsdp_steps, device, sharded=False)
        with _one_process_group(device):
            fsdp = fsdp_side(cfg, vocab, batches, plan.fsdp_steps, device, sharded=True,
                             profile_to=suite.out / "fsdp_profile.txt" if plan.fsdp_profile else None)
    # the sides ran one after the other, so steps do not pair: a ratio of medians, with the extremes' ratios
    f, b = fsdp["steps_per_s"], bare["steps_per_s"]
    ratio = {"median": f["median"] / b["median"], "min": f["min"] / b["max"], "max": f["max"] / b["min"],
             "n": f["n"]}

    def mfu(side: dict[str, Any]) -> dict[str, Any]:
        flops = side["flops_per_token"] * side["tokens_per_s"]["median"]
        return {"gflops": flops / 1e9, "mfu": flops / 1e9 / peak["gflops"]["max"]}

    dtype = "bf16" if device.type == "cuda" and cfg.train.mixed_precision == "bf16" else "fp32"
    estimate = memory_plan(cfg.model, gpus=1, gpu_mem_gb=0.0, seq_len=seq_len, micro_batch=micro_batch,
                           activation_checkpointing=cfg.train.activation_checkpointing, dtype=dtype,
                           vocab_size=vocab.size)
    presets = [o.split("=", 1)[1] for o in plan.fsdp_overrides if o.startswith("model.preset=")]
    out = {"model": (presets or [plan.fsdp_model])[-1], "params": fsdp["params"], "vocab_size": vocab.size,
           "seq_len": seq_len, "micro_batch": micro_batch, "device": str(device),
           "distinct_batches": plan.fsdp_distinct_batches, "compute_dtype": dtype,
           "overrides": list(plan.fsdp_overrides), "activation_checkpointing": cfg.train.activation_checkpointing,
           "matmul_peak": peak, "bare": bare, "fsdp": fsdp,
           "sharded_vs_bare": ratio, **goal_check("fsdp.sharded_vs_bare", ratio["median"]),
           "mfu_bare": mfu(bare), "mfu_fsdp": mfu(fsdp),
           # the same weights and first batch: how far the compute dtype moves the loss from fp32
           "first_loss": {"fp32": bare["fp32_first_loss"], "bare": bare["first_loss"], "fsdp": fsdp["first_loss"]},
           "plan_total_gib": estimate["total_gib"], "plan_memory_gib": estimate["memory_gib"]}
    if "peak_allocated_gib" in fsdp:
        out["allocated_vs_plan"] = fsdp["peak_allocated_gib"] / estimate["total_gib"]
    return out


# ---- table --------------------------------------------------------------------------------------------------

def _met(r: dict[str, Any]) -> str:
    return {True: "yes", False: "NO", None: "-"}[r.get("met")]


def table_rows(name: str, r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(measure, value, ratio, goal, met) rows of one benchmark's result."""
    rows: list[tuple[str, str, str, str, str]] = []
    if name == "tokenize":
        for mod, e in r["modalities"].items():
            rows.append((f"tokenize {mod}: job vs bare samples/s (1 actor = 1 core)",
                         f"{fmt(e['job_samples_per_s'])} vs {fmt(e['bare_samples_per_s'])}",
                         fmt(e["job_vs_bare_per_core"]), e["goal"], _met(e)))
            rows.append((f"  {mod}: end-to-end job samples/s (with {fmt(e['job_startup_s'], 2)} s start-up)",
                         fmt(e["job_end_to_end_samples_per_s"]), fmt(e["end_to_end_vs_bare"]), "", ""))
        for mod, w in r["workers"].items():
            rows.append((f"tokenize {mod}: 2 actors vs 1 (samples/s)",
                         f"{fmt(w['actors_2'])} vs {fmt(w['actors_1'])}", fmt(w["speedup_2_vs_1"]), "", ""))
            rows.append((f"  {mod}: 2 actors vs 1, end to end", "", fmt(w["speedup_2_vs_1_end_to_end"]), "", ""))
            rows.append((f"  {mod}: 2 actors per core vs bare", "", fmt(w["job_vs_bare_per_core_2"]),
                         ">= 0.9", _met({"met": None if w["job_vs_bare_per_core_2"]["median"] is None
                                         else w["job_vs_bare_per_core_2"]["median"] >= 0.9})))
        m = r["memory"]
        rows.append((f"tokenize memory peak RSS (MiB), {m['x1']['inputs']} vs {m['x10']['inputs']} inputs",
                     f"{m['x1']['peak_rss_mib']:.0f} -> {m['x10']['peak_rss_mib']:.0f}",
                     fmt(m["peak_ratio_10x"]), m["goal"], _met(m)))
    elif name == "read":
        rows.append(("read: trainer stream vs raw tar (samples/s)",
                     f"{fmt(r['reader_samples_per_s'])} vs {fmt(r['raw_tar_samples_per_s'])}",
                     fmt(r["reader_vs_raw_tar"]), "", ""))
        rows.append(("read: trainer stream vs raw tar (MB/s)",
                     f"{fmt(r['reader_mb_per_s'])} vs {fmt(r['raw_tar_mb_per_s'])}", "", "", ""))
        rows.append((f"read: stream vs {r['training_model']} model training (samples/s)",
                     f"{fmt(r['reader_samples_per_s'])} vs {fmt(r['training_samples_per_s'])}",
                     fmt(r["reader_vs_training"]), r["goal"], _met(r)))
    elif name == "train":
        b, one, two = r["bare"], r["ray_1"], r["ray_2"]
        rows.append((f"train {r['model']}: Ray Train 1 worker vs bare (steps/s)",
                     f"{fmt(one['steps_per_s'])} vs {fmt(b['steps_per_s'])}", fmt(r["ray_vs_bare"]),
                     r["goal"], _met(r)))
        rows.append(("  tokens/s (real, packed): Ray 1 worker vs bare",
                     f"{fmt(one['tokens_per_s'])} vs {fmt(b['tokens_per_s'])}", "", "", ""))
        rows.append(("  Ray Train start-up (fit() -> first steady step), s", fmt(one["startup_s"]), "", "", ""))
        if two:
            rows.append(("train: 2 workers vs 1 (tokens/s, same cores)",
                         f"{fmt(two['tokens_per_s'])} vs {fmt(one['tokens_per_s'])}",
                         fmt(r["two_vs_one_tokens_per_s"]), "", ""))
        rows.append((f"train MFU vs measured {r['matmul_peak']['dtype']} matmul peak "
                     f"{fmt(r['matmul_peak']['gflops']['max'])} GFLOP/s per worker",
                     f"bare {r['mfu_bare']['gflops']:.1f}, Ray {r['mfu_ray_1']['gflops']:.1f} GFLOP/s",
                     f"{r['mfu_bare']['mfu']:.2f} / {r['mfu_ray_1']['mfu']:.2f}", "", ""))
    elif name == "sample":
        for B, e in r["by_batch"].items():
            g = goal_check("sample.step_vs_forward", e["step_vs_forward"]["median"])
            rows.append((f"sample B={B}: denoising step vs plain forward (s)",
                         f"{fmt(e['step_s'])} vs {fmt(e['forward_s'])}", fmt(e["step_vs_forward"]), g["goal"],
                         _met(g)))
            rows.append((f"  B={B}: generated tokens/s", fmt(e["tokens_per_s"]), "", "", ""))
        im = r["image_canvas"]
        rows.append((f"sample B={im['batch']} image canvas: head over {im['image_ids']:,} image ids vs all "
                     f"{im['vocab_rows']:,} rows (s per step)",
                     f"{fmt(im['subset_step_s'])} vs {fmt(im['full_step_s'])}", fmt(im["subset_vs_full"]), "", ""))
        m = r["magvit2_encode"]
        for bs, v in m["images_per_s"].items():
            rows.append((f"MAGVIT-v2 {m['preset']} encode 256x256, batch {bs} (images/s)", fmt(v), "", "", ""))
    elif name == "fsdp":
        b, f = r["bare"], r["fsdp"]
        size = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e9 else f"{r['params'] / 1e6:.2f}M"
        ac = "AC" if r["activation_checkpointing"] else "no AC"
        rows.append((f"fsdp {r['model']} ({size} params, {r['micro_batch']} x {r['seq_len']}, "
                     f"{r['compute_dtype']}, {ac}, {r['device']}): FSDP2 step vs plain module (steps/s)",
                     f"{fmt(f['steps_per_s'])} vs {fmt(b['steps_per_s'])}", fmt(r["sharded_vs_bare"]),
                     r["goal"], _met(r)))
        rows.append((f"  MFU vs measured {r['matmul_peak']['dtype']} matmul peak "
                     f"{fmt(r['matmul_peak']['gflops']['max'])} GFLOP/s",
                     f"plain {r['mfu_bare']['gflops']:,.1f}, FSDP2 {r['mfu_fsdp']['gflops']:,.1f} GFLOP/s",
                     f"{r['mfu_bare']['mfu']:.2f} / {r['mfu_fsdp']['mfu']:.2f}", "", ""))
        fl = r["first_loss"]
        rows.append(("  first-step loss, same weights and batch: fp32 / plain / FSDP2",
                     f"{fl['fp32']:.4f} / {fl['bare']:.4f} / {fl['fsdp']:.4f}",
                     f"{abs(fl['fsdp'] - fl['fp32']) / fl['fp32']:.1e}", "", ""))
        rows.append((f"  loss, first -> last of {len(f['losses'])} steps cycling {r['distinct_batches']} batches: "
                     "plain / FSDP2",
                     f"{b['losses'][0]:.3f} -> {b['losses'][-1]:.3f} / {f['losses'][0]:.3f} -> {f['losses'][-1]:.3f}",
                     "", "", ""))
        if "allocated_vs_plan" in r:
            rows.append(("  FSDP2 peak memory allocated / reserved vs `omnidiff plan` total (GiB)",
                         f"{f['peak_allocated_gib']:.1f} / {f['peak_reserved_gib']:.1f} vs {r['plan_total_gib']:.1f}",
                         fmt(r["allocated_vs_plan"]), "", ""))
    return rows


def format_table(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = [("measure", "value (median [min-max])", "ratio", "goal", "met")]
    if meta.get("ray_init_s") is not None:
        rows.append(("Ray start-up (once per suite), s", fmt(meta["ray_init_s"]), "", "", ""))
    for name, r in results.items():
        rows += table_rows(name, r)
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = []
    if meta.get("ray_init_s") is not None:
        rows.append(("Ray start-up (once per suite), s", fmt(meta["ray_init_s"]), "", "", ""))
    for name, r in results.items():
        rows += table_rows(name, r)
    out = ["| measure | value (median [min-max]) | ratio | goal | met |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(c.strip() or " " for c in row) + " |" for row in rows]
    return "\n".join(out)


# ---- CLI ----------------------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Suite], dict[str, Any]]] = {
    "tokenize": bench_tokenize, "read": bench_read, "train": bench_train, "sample": bench_sample,
    "fsdp": bench_fsdp}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _strip(r: Any) -> Any:
    """Drop the bulky per-run lists kept only for pairing."""
    if isinstance(r, dict):
        return {str(k): _strip(v) for k, v in r.items() if k not in ("job_runs_thr", "job_runs_e2e", "bare_runs")}
    if isinstance(r, list):
        return [_strip(x) for x in r]
    return r


def run_benches(names: Sequence[str], plan: Plan, out: Path, work: Path | None = None,
                say: Callable[[str], None] = print) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="omnidiff-bench-")) if own_work else work
    work.mkdir(parents=True, exist_ok=True)
    suite = Suite(plan, out, work, say)
    results: dict[str, dict[str, Any]] = {}
    meta = {"plan": asdict(plan), "host_before": host_info(), "benches": list(names)}
    t0 = time.perf_counter()
    try:
        for name in names:
            t = time.perf_counter()
            say(f"[bench] {name} ({plan.mode}) ...")
            load_before = [round(x, 2) for x in os.getloadavg()]
            r = _strip(RUNNERS[name](suite))
            r["bench_wall_s"] = time.perf_counter() - t
            r["loadavg_before"], r["loadavg_after"] = load_before, [round(x, 2) for x in os.getloadavg()]
            r["mode"], r["ray_init_s"] = plan.mode, suite.ray_init_s
            results[name] = r
            (out / f"{name}.json").write_text(json.dumps(r, indent=1, default=_json_default) + "\n")
            say(f"[bench] {name} done in {r['bench_wall_s']:.0f} s -> {out / (name + '.json')}")
    finally:
        suite.close()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    meta.update({"host_after": host_info(), "wall_s": time.perf_counter() - t0, "ray_init_s": suite.ray_init_s})
    summary = {"meta": meta, "results": results, "table": format_table(results, meta),
               "markdown": markdown_table(results, meta)}
    if len(names) > 1:
        (out / "all.json").write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omnidiff bench",
        description="Benchmarks: each pipeline stage against its bare floor, measured side by side in one run "
                    "(ratios hold on a busy machine; absolute numbers do not). Prints a table and writes JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""benchmarks:
  tokenize  Ray Data tokenize job vs a single-process loop over the same tokenizers and inputs (text, pixel
            images, MAGVIT-v2 tiny images, EnCodec speech); 1 vs 2 actors; peak RSS on 1x and 10x corpora
  read      trainer data path vs raw tar reading of the same shards, and vs demo-model training consumption
  train     Ray Train FSDP2 (1 worker) vs a bare PyTorch loop; 2 workers vs 1; MFU vs measured matmul peak
  sample    denoising step vs one plain forward; generated tokens/s at batch 1/4/16; MAGVIT-v2 encode/s
  fsdp      the trainer's FSDP2 step vs the plain module on one device, no Ray (runs on a bare GPU node):
            MFU, peak memory vs `omnidiff plan`, bf16 vs fp32 first-step loss
  all       all of the above, Ray started once

examples:
  omnidiff bench all --quick                 # a few minutes on 2 CPU cores
  omnidiff bench train --out runs/bench-gpu  # on a GPU node: CUDA is used where the stage supports it
See docs/performance.md for what each ratio means.""")
    p.add_argument("bench", choices=[*BENCHES, "all"], help="which benchmark to run")
    p.add_argument("--quick", action="store_true", help="small sizes and 3 repeats (a few minutes on 2 cores)")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes: every code path, meaningless numbers")
    p.add_argument("--repeats", type=int, default=None, help="override the number of repeats per figure")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the bare training loop, sampling and matmul peak, and CPUs per Ray Train "
                        "worker (default 1: a worker is one core, as it is one GPU on a GPU node). Tokenize always "
                        "compares 1 actor with 1 thread.")
    p.add_argument("--out", default="runs/bench", help="folder for <bench>.json and all.json (default runs/bench)")
    p.add_argument("--profile", action="store_true",
                   help="fsdp: profile two more FSDP2 steps with torch.profiler -> <out>/fsdp_profile.txt")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="fsdp: TrainConfig overrides of its run, e.g. train.activation_checkpointing=false "
                        "data.micro_batch=8 model.preset=dream-7b")
    p.add_argument("--work", default=None,
                   help="keep corpora, shards and run dirs here (default: a temporary folder, deleted at the end)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)   # overrides may come after the options
    plan = Plan.for_mode("tiny" if args.tiny else "quick" if args.quick else "full")
    if args.repeats is not None:
        if args.repeats < 1:
            print(f"omnidiff bench: --repeats={args.repeats} must be >= 1", file=sys.stderr)
            return 2
        plan = replace(plan, repeats=args.repeats)
    if args.threads < 1:
        print(f"omnidiff bench: --threads={args.threads} must be >= 1", file=sys.stderr)
        return 2
    plan = replace(plan, threads=args.threads).for_device(_cuda())
    plan = replace(plan, fsdp_overrides=tuple(args.overrides), fsdp_profile=args.profile)
    names = list(BENCHES) if args.bench == "all" else [args.bench]
    if (args.overrides or args.profile) and "fsdp" not in names:
        print("omnidiff bench: KEY=VALUE overrides and --profile apply to the fsdp benchmark only", file=sys.stderr)
        return 2
    summary = run_benches(names, plan, Path(args.out), Path(args.work) if args.work else None)
    m = summary["meta"]
    print(f"\nomnidiff bench {args.bench} ({plan.mode}): {m['host_before']['cpus']} CPUs, load average "
          f"{m['host_before']['loadavg']} -> {m['host_after']['loadavg']}, {m['wall_s']:.0f} s")
    print(summary["table"])
    print(f"\nJSON in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
