"""What every benchmark shares: the sizes (`Plan`), the statistics of side-by-side repeats, host facts, and the
`Suite` (one Ray for all benchmarks, the work folder, the set-ups more than one benchmark uses)."""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import platform
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

GOALS = {
    "tokenize.job_vs_bare_per_core": (">=", 0.90),
    "tokenize.actors_2_vs_1": (">=", 1.7),
    "tokenize.memory_10x": ("<=", 1.2),
    "read.reader_vs_training": (">=", 10.0),
    "train.ray_vs_bare": (">=", 0.90),
    "sample.step_vs_forward": ("<=", 1.15),
    "sample.fast_media_speedup": (">=", 3.0),
    "fsdp.sharded_vs_bare": (">=", 0.90),
}


# ---- sizes --------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """How big each benchmark is. `full` is the default; `quick` fits in a few minutes on 2 cores; `tiny` is the
    smoke test's (numbers meaningless, every code path runs)."""
    mode: str = "full"
    repeats: int = 5
    # tokenize: inputs per corpus (a one-batch corpus of `tok_n0` inputs measures the job's fixed cost). Speech
    # comes in blocks of one 16-clip batch: 320 clips give each of 2 actors 10 blocks, enough to compare 2 vs 1.
    tok_n: dict[str, int] = field(default_factory=lambda: {
        "text": 60000, "image-pixel": 30000, "image-magvit2-tiny": 4000, "speech-encodec": 640})
    tok_shard_samples: int = 2000         # shards.max_samples of the tokenize bench jobs (and its bare loop)
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
    fast_batch: int = 2                   # rows of the fast-sampling comparison (bench/sample.py)
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
    # ranks: the dream-7b recipe's data path per rank at each world size, on synthetic shards
    ranks_worlds: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    ranks_steps: int = 12                 # timed steps per rank, after one warm-up step
    ranks_per_task: int = 1500            # synthetic samples per task (6 tasks)
    ranks_shard_samples: int = 500        # samples per synthetic shard

    @classmethod
    def for_mode(cls, mode: str) -> "Plan":
        if mode == "full":
            return cls()
        if mode == "quick":
            return cls(mode="quick", repeats=3,
                       tok_n={"text": 60000, "image-pixel": 12000, "image-magvit2-tiny": 2000,
                              "speech-encodec": 320},
                       tok_workers_modalities=("text", "speech-encodec"), mem_n=300, demo_images=None,
                       read_samples=1500, bare_steps=8, ray_steps=12, log_every=3, ranks_steps=4,
                       ranks_per_task=600, ranks_shard_samples=300,
                       magvit_preset="tiny", magvit_repeats=2, matmul_n=1024)
        if mode == "tiny":
            return cls(mode="tiny", repeats=1,
                       tok_n={"text": 40, "image-pixel": 40, "speech-encodec": 20}, tok_n0=8,
                       tok_workers_modalities=("text",), mem_n=20, demo_images=None, read_samples=100,
                       train_model="debug", bare_steps=2, ray_steps=4, log_every=2, seq_len=128, micro_batch=2,
                       sample_model="debug", sample_batches=(1, 2), prompt_len=8, gen_length=8, gen_steps=4,
                       magvit_preset="tiny", magvit_batches=(1, 2), magvit_repeats=1, matmul_n=256,
                       tok_n0_runs=1, fsdp_model="debug", fsdp_seq_len=128, fsdp_micro_batch=2, fsdp_steps=2,
                       fsdp_distinct_batches=2, ranks_worlds=(1, 2, 4), ranks_steps=1, ranks_per_task=120,
                       ranks_shard_samples=60)
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


# ---- host and device ----------------------------------------------------------------------------------------

def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def host_info() -> dict[str, Any]:
    import importlib
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


def device_peak(threads: int, matmul_n: int) -> dict[str, Any]:
    """The peak an MFU is measured against: bf16 on a GPU (8192 x 8192), else fp32 on this CPU at `threads`."""
    with torch_threads(threads):
        return matmul_peak(8192, "bfloat16", "cuda") if cuda_available() else matmul_peak(matmul_n)


# ---- the trainer's step on a plain module ---------------------------------------------------------------------

def plain_model(cfg, vocab, device):
    """The trainer's model unsharded: `build_model`'s weights (same seed, same init) and activation checkpointing,
    without FSDP. pipelines.train.trainer.train_step runs on it with no process group."""
    from model.parallelize import apply_activation_checkpointing
    from pipelines.train.trainer import init_model

    model = init_model(cfg, vocab)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)   # as parallelize() does before sharding
    return model.to(device)


def plain_autocast(cfg, device) -> contextlib.AbstractContextManager:
    """What FSDP2's mixed precision computes in, for the plain module: bf16 autocast on a GPU when
    train.mixed_precision is bf16; fp32 on CPU (parallelize() computes fp32 on a CPU mesh)."""
    import torch

    if device.type == "cuda" and cfg.train.mixed_precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench_vocab(big: bool = False):
    """The demo's vocabulary shape (BPE text, 8x8 pixel images, EnCodec 2 codebooks), or with `big` Dream's
    (Qwen2 text, MAGVIT-v2 8,192 codes, EnCodec 8 codebooks: 168,459 ids); speed does not depend on which ids
    are which."""
    from model.vocab import PromptFormat, Vocab, dream_vocab

    if big:   # the compact Dream layout: the size the published measurements were taken with
        return dream_vocab(prompt_format=PromptFormat.COMPACT)
    return Vocab(text_size=512, text_tokenizer="bench", n_q=2, audio_codebook_size=1024, image_codebook_size=17,
                 image_tokenizer="pixel-8x8x1-17", speech_tokenizer="encodec_24khz@1.5kbps")


# ---- the suite: shared Ray, work dir, shared set-ups --------------------------------------------------------

class Suite:
    """One run of `omnidiff bench`: its plan, output and work folders, and what benchmarks share (one Ray, the
    demo shard set, figures one benchmark measures and another compares with, in `shared`)."""

    def __init__(self, plan: Plan, out: Path, work: Path, say: Callable[[str], None] = print) -> None:
        self.plan, self.out, self.work, self.say = plan, out, work, say
        self.ray_init_s: float | None = None
        self.shared: dict[str, Any] = {}
        self._ray_started = False
        self._demo_shards: Path | None = None

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
        """The TrainConfig of one training side (`name` = its run name) on the demo shards, at the plan's sizes."""
        from pipelines.train import trainer

        p = self.plan
        run_dir = self.work / "train" / name
        base = [f"model.preset={p.train_model}", f"data.seq_len={p.seq_len}", f"data.micro_batch={p.micro_batch}",
                "data.grad_accum=1", "data.packing=pack", "train.eval_every=0", "train.eval_samples=0",
                "optim.warmup_steps=1", f"run.name={name}", "run.max_failures=0",
                f"mlflow.tracking_uri=sqlite:///{run_dir.resolve()}/mlflow.db", "mlflow.experiment=bench",
                "mlflow.system_metrics=false"]
        return trainer.resolve_config(None, [str(self.demo_shards())], str(run_dir), base + list(overrides))
