"""Settings of one tokenize job: a tree of typed dataclasses loaded through common/configlib.py.

`python -m tokenize_jobs.run --config configs/tokenize/x.yaml shards.max_samples=500` builds a
`TokenizeJobConfig` from: these defaults -> the YAML file -> the `section.key=value` overrides. Without a YAML
file the tokenizers are the embedded demo set (small in-process BPE, pixel images, offline EnCodec), so any small
corpus can be tokenized with no weights at hand.

The kind of corpus, the input and the output are command-line arguments, not config keys: one YAML file
describes *how* to tokenize and is reused for many corpora.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.configlib import ConfigError
from model.prompts import TaskTemplates
from model.tokenizers import TokenizerConfig

KINDS = ("messages", "image-text", "speech-text", "text")
Kind = Literal["messages", "image-text", "speech-text", "text"]


@dataclass
class InputConfig:
    """How raw files are found and read, and the limits that send an input to quarantine."""
    image_exts: list[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png"])
    parquet_image_column: str = "image"      # bytes, or a struct with a "bytes" field (HF datasets layout)
    parquet_caption_column: str = "caption"
    # A JSONL line longer than this is quarantined without being held in memory (a corpus may hold a 100 MB
    # line by accident; the job must not die of it).
    max_line_bytes: int = 8 * 2**20
    max_text_file_bytes: int = 8 * 2**20     # a .txt file is one text input
    max_media_bytes: int = 256 * 2**20        # one image or audio file
    max_tokens: int = 0                      # samples longer than this are quarantined; 0 = no limit


@dataclass
class TasksConfig:
    """Which task templates each paired-corpus kind expands to (messages lines name their own task)."""
    image_text: list[str] = field(default_factory=lambda: ["t2i", "i2t"])
    speech_text: list[str] = field(default_factory=lambda: ["asr", "tts"])

    def __post_init__(self) -> None:
        allowed = {"image_text": {"t2i", "i2t"}, "speech_text": {"asr", "tts"}}
        for name, tasks in (("image_text", self.image_text), ("speech_text", self.speech_text)):
            bad = [t for t in tasks if t not in allowed[name]]
            if bad or not tasks:
                raise ConfigError(f"tasks.{name}={tasks}: choose a non-empty subset of {sorted(allowed[name])}")


@dataclass
class ShardConfig:
    """A shard closes when either limit is reached (after the input that crossed it: an input's samples are
    never split across shards)."""
    max_samples: int = 10_000
    max_bytes: int = 256 * 2**20


@dataclass
class FitConfig:
    """What the first run samples from the corpus to fit the tokenizers that learn from it (the BPE, and the
    EnCodec k-means when speech.weights=offline; its sample count is tokenizers.speech.fit_samples)."""
    max_texts: int = 20_000
    max_scan_units: int = 2_000   # how many listed inputs (files, pairs) the driver opens to collect the sample


CHEAP_BATCH = 512   # inputs per UDF call for text and pixel images
MODEL_BATCH = 16    # for inputs a neural tokenizer encodes (EnCodec, MAGVIT-v2)


@dataclass
class RayConfig:
    """Ray Data execution. Fractional actors keep a 2-CPU machine from deadlocking: where a unit is too large for
    one actor, expand tasks, Ray Data's shard-sized repartition tasks (a whole CPU each) and the write tasks need
    CPUs beside the actors."""
    actors: int = 1                 # tokenizer actor pool size
    actor_cpus: float = 0.5
    gpus_per_actor: float = 1.0     # used only when the cluster has GPUs; 0 keeps actors on CPU
    decode_cpus: float = 0.5        # per expand task (a listing with a unit too large for one actor)
    # Per write task: a core's worth of Python (tar headers, sha256, the sample index). On 2 CPUs at 0.5, a write
    # ran beside a repartition task and Ray started a worker for it mid-job (its imports ~1 s): text tokenized
    # at 0.68 of the bare loop per core against 0.85 at 1 CPU.
    write_cpus: float = 1.0
    # Inputs per UDF call; 0 = by the tokenizers' cost (`udf_batch_size`).
    batch_size: int = 0
    num_cpus: int = 0               # CPUs of a local Ray started by the job; 0 = all of this machine
    units_per_wave: int = 100_000   # listed inputs handed to one Ray Data execution (bounds driver memory)
    progress_bars: bool = True

    def udf_batch_size(self, kind: str, tokenizers: TokenizerConfig) -> int:
        """Inputs per UDF call. Text and pixel images cost microseconds per input, so a batch must be large for
        Ray's per-task cost (a few ms) to vanish; EnCodec and MAGVIT-v2 cost milliseconds per input, and small
        batches keep enough blocks to spread over the actors."""
        if self.batch_size > 0:
            return self.batch_size
        return CHEAP_BATCH if _cheap(kind, tokenizers) else MODEL_BATCH

    def rows_per_block(self, kind: str, tokenizers: TokenizerConfig) -> int:
        """Inputs per block `expand` hands on: within an actor, the rows it tokenizes at a time; through the
        streaming split (a unit too large for one actor), one actor task, so enough work to amortize the task
        (~5-20 ms of Ray Data work per block) and small enough that the blocks spread evenly over the actors."""
        batch = self.udf_batch_size(kind, tokenizers)
        # Speech (EnCodec ~17 ms a clip on a CPU core): one batch is ~0.3 s of work, so a block per batch; 2 actors
        # ran 1.62x one actor on 320 clips (2 cores).
        if kind == "speech-text":
            return batch
        # Text, pixel images (tens of us an input), MAGVIT-v2 (~0.8 ms an image for the tiny preset; 4 or 32
        # batches a block measured the same) and messages lines (mostly text, some media): four batches.
        return 4 * batch


def _cheap(kind: str, tokenizers: TokenizerConfig) -> bool:
    return kind == "text" or (kind == "image-text" and tokenizers.image.kind == "pixel")


@dataclass
class LockConfig:
    """The output lock: a run refreshes it every `heartbeat_s`; one not refreshed for `ttl_s` is stale and the
    next run takes it over (so a crashed run does not block the schedule for longer than `ttl_s`)."""
    # A lapsed lease is safe to take over even from a live but stalled owner: the new owner fences the output
    # (tokenize_jobs/writer.fence) and the stalled one can no longer commit. So the lease is short, and a crashed
    # run on another host (a retried RayJob, the next cron run) waits at most a minute.
    ttl_s: float = 60.0
    heartbeat_s: float = 15.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise ConfigError(f"lock.heartbeat_s={self.heartbeat_s} must be > 0 and below lock.ttl_s={self.ttl_s}")


@dataclass
class StorageConfig:
    """Every storage call of the job (listing, reading inputs, writing shards) retries transient faults
    (unreachable endpoint, timeouts, resets, 503 SlowDown) this way, then fails naming the URI. Defaults wait
    0.5, 1, 2, ... 30 s: about two minutes of throttling ridden out per call."""
    retries: int = 8                # attempts per call, the first included
    backoff_s: float = 0.5          # first wait; doubles on each retry (+-25% jitter)
    max_backoff_s: float = 30.0     # cap on one wait
    timeout_s: float = 0.0          # S3 connect/read timeout per request; 0 keeps botocore's 60 s

    def policy(self):
        from common.storage import RetryPolicy

        return RetryPolicy(attempts=self.retries, backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s,
                           timeout_s=self.timeout_s)

    def __post_init__(self) -> None:
        if self.retries < 1 or self.backoff_s < 0 or self.max_backoff_s < 0 or self.timeout_s < 0:
            raise ConfigError(f"storage: retries must be >= 1 and times >= 0 (got {self})")


@dataclass
class TrackingConfig:
    """Each job as an MLflow run (params, counts, quarantine reasons, throughput, the shard list). A tracking
    failure is one warning, never a failed job."""
    tracking_uri: str = ""          # "" = $MLFLOW_TRACKING_URI; neither = not tracked
    experiment: str = "omni-diffusion-tokenize"


@dataclass
class TokenizeJobConfig:
    tokenizers: TokenizerConfig = field(default_factory=TokenizerConfig)
    templates: TaskTemplates = field(default_factory=TaskTemplates)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    input: InputConfig = field(default_factory=InputConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    lock: LockConfig = field(default_factory=LockConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)

