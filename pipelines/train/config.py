"""Everything a training run is told: one tree of typed dataclasses (common/configlib.py).

    TrainConfig
      model      ModelConfig (model/config.py; `preset: debug | demo | 1b | dream-7b | llada-8b`)
      data       shard sets, sources, curriculum stages, packing, seq_len, micro_batch, grad_accum
      diffusion  masking scheme and EOS tail (model/diffusion.py)
      optim      AdamW + warmup/cosine + clipping
      train      steps, seed, log/checkpoint/eval intervals, init (scratch or pretrained), fault injection
      scaling    Ray Train workers, the process group's network interface
      run        name, run_dir (checkpoints, MLflow store, export), max_failures
      mlflow     tracking URI, experiment

Built as: dataclass defaults <- YAML (configs/train/*.yaml) <- `--shards/--run-dir` flags <- `a.b=value`
overrides. The resolved tree is what MLflow records as params and what every Ray worker receives.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal

from common.configlib import ConfigError
from model.config import ModelConfig

# The reference's progressive curriculum (Omni-Diffusion §3.3): vision-language alignment first, then speech,
# then the tasks that need both. A stage's mixture names sources; by default one source per task.
REFERENCE_STAGES = (("t2i", "i2t"), ("t2i", "i2t", "asr", "tts"), ("t2i", "i2t", "asr", "tts", "s2i", "svqa"))


@dataclass
class SourceConfig:
    """A named stream of samples: the samples of `tasks` (all tasks if empty) in `shards` (data.shards if
    empty). Stage mixtures weight sources by name."""
    name: str = ""
    shards: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)


@dataclass
class StageConfig:
    """One curriculum stage: `steps` optimizer steps drawing samples from `mixture` (source name -> weight;
    weights are relative). A source with no samples in the shard sets is dropped from the stage with a
    warning, so one preset runs on any tokenize output; a stage left with no source is an error."""
    name: str = ""
    steps: int = 0
    mixture: dict[str, float] = field(default_factory=dict)


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)      # shard sets (tokenize outputs, local or s3://)
    sources: list[SourceConfig] = field(default_factory=list)  # empty: one source per task in the manifests
    stages: list[StageConfig] = field(default_factory=list)    # empty: one stage, all sources, train.steps
    packing: Literal["pack", "pad"] = "pack"   # pack: several samples per row (segment ids); pad: one per row
    seq_len: int = 512
    micro_batch: int = 4                       # rows per rank per forward/backward
    grad_accum: int = 1                        # micro-batches per optimizer step
    too_long: Literal["drop", "error"] = "drop"  # a sample longer than seq_len (after its EOS tail)
    validate: Literal["all", "lazy"] = "all"   # all: scan every shard's ids before training; lazy: on first read
    # How a rank reads its samples (pipelines/train/feed.py): ranged reads of only its own samples, whole shards,
    # or auto (whole shards on one rank, which needs every sample; ranged with several). Shards tokenized
    # without a sample index are always read whole.
    read: Literal["auto", "ranged", "shard"] = "auto"
    prefetch: int = 2                          # steps planned, read and collated ahead by a thread; 0 = inline

    def __post_init__(self) -> None:
        for key in ("seq_len", "micro_batch", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be >= 1")
        if self.prefetch < 0:
            raise ConfigError(f"data.prefetch={self.prefetch} must be >= 0 (0 reads each step in the step loop)")


@dataclass
class DiffusionConfig:
    # per_token: t per answer position (the masked fraction of an answer stays near 0.5); per_sample: one t per
    # packed sample (every masked fraction, as sampling visits them); per_sequence: LLaDA's 1/t-weighted loss.
    scheme: Literal["per_token", "per_sample", "per_sequence"] = "per_token"
    eps: float = 1e-3
    tail_factor: float = 0.6     # EOS tail masked at 0.6x the answer rate (attenuated tail padding, reference)
    max_tail: int = 16           # 1..max_tail EOS appended after each answer
    # Per-task max_tail ({} = max_tail for all). The tail teaches where an answer stops inside a canvas longer
    # than it: a speech answer (tts) whose canvas is ~2x the clip needs tails as long as the slack.
    task_max_tail: dict[str, int] = field(default_factory=dict)
    # Loss multiplier per task ({} = 1 for all). A masked-token mean gives a task a share of the gradient
    # proportional to its masked tokens: a one-word answer (i2t, asr) gets ~1/40th of an image answer's share,
    # whatever the mixture says. The normalizer (masked-token count) is unchanged, so weights scale gradients.
    task_weights: dict[str, float] = field(default_factory=dict)
    # Per-task prompt dropout ({} = none): the fraction of a task's samples trained with the whole prompt masked,
    # so sampling with cfg_scale > 0 (classifier-free guidance) has a trained unconditional branch.
    prompt_dropout: dict[str, float] = field(default_factory=dict)
    # Per-task floor on the masking rate t (per_token scheme; {} = eps for all): t ~ U(floor, 1) for that task's
    # answers. An image answer is mostly predictable from its visible pixels; a floor keeps its training where
    # the prompt decides the answer (speech-to-image learns its conditioning from those steps). Media and special
    # positions only: text inside an answer (an s2i transcript before its image) trains at every rate.
    task_min_t: dict[str, float] = field(default_factory=dict)
    # Per-task loss multiplier at the TEXT positions of a task's answer ({} = 1), on top of task_weights: an s2i
    # answer that writes its transcript before the image has one text token beside ~64 image tokens.
    task_text_weights: dict[str, float] = field(default_factory=dict)
    # Per-task masking scheme under scheme=per_token ({} = the scheme for all): {tts: per_sample} draws t per
    # sample for that task's answers (see scheme above).
    task_scheme: dict[str, str] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1    # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1    # on matrices only; norms and biases are not decayed
    eps: float = 1e-8
    clip: float = 1.0            # max global grad norm; 0 disables clipping
    # AdamW's implementation: "auto" = fused (one kernel for all parameters) on CUDA, torch's default elsewhere. The
    # foreach step took 14% of a 1B model's FSDP2 step on an H200 (docs/performance.md).
    impl: Literal["auto", "fused", "foreach"] = "auto"


@dataclass
class InitConfig:
    """Start from random weights ("scratch") or a pretrained HF-layout safetensors checkpoint."""
    kind: Literal["scratch", "pretrained"] = "scratch"
    # dir or .safetensors file (pretrained), local or s3:// (read tensor by tensor with ranged GETs, no local
    # copy); its tokenizer.json must be the text tokenizer the shards were made with (model/weights.py)
    path: str = ""
    layout: Literal["dream", "llada"] = "dream"
    vocab_extension: Literal["mean", "error"] = "mean"
    # checkpoint modules to leave out (model/weights.py EXTRA_MODULES), e.g. the released Omni-Diffusion
    # checkpoint's [speech_encoder, speech_projector]; a checkpoint holding one not named here is refused
    skip_modules: list[str] = field(default_factory=list)


@dataclass
class TrainLoopConfig:
    steps: int = 100              # total optimizer steps (sum of stage steps when stages are given)
    seed: int = 0
    log_every: int = 10           # MLflow metrics + progress line
    checkpoint_every: int = 50    # also the only steps at which ray.train.report is called
    keep_last: int = 2            # checkpoints kept (>= 2 so a corrupt newest one has a fallback)
    eval_every: int = 0           # generate samples as MLflow artifacts; 0 = only at the end
    eval_samples: int = 2         # prompts per task at each eval
    eval_steps: int = 8           # diffusion steps of the eval sampler
    activation_checkpointing: bool = False
    mixed_precision: Literal["bf16", "fp32"] = "bf16"   # bf16 on GPU; parallelize() computes fp32 on CPU
    # FSDP2 unit: "block" (one all-gather per block, large models) or "model" (one per step; tiny models, where
    # collective latency dominates: the CPU demo). See model/parallelize.py.
    fsdp_unit: Literal["block", "model"] = "block"
    init: InitConfig = field(default_factory=InitConfig)
    # Fault injection for tests: rank `fail_rank` raises once at step `fail_at_step` (a marker file in the
    # run dir makes it fire once per run, so the restarted group goes past it). 0 disables.
    fail_at_step: int = 0
    fail_rank: int = 1
    fail_mode: Literal["raise", "kill"] = "raise"   # kill = SIGKILL of the worker process

    def __post_init__(self) -> None:
        for key in ("steps", "log_every", "checkpoint_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1")


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    # Fractional CPUs let 2 workers (plus Ray Data / the driver) fit on a 2-core machine.
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 1.0
    # Network interface(s) of the process group's sockets, e.g. "eth0" (comma-separated names allowed): set as
    # GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME in every worker's environment before its process group starts.
    # "" leaves both as the workers inherit them. Needed with one worker per host where the hostname resolves to
    # 127.0.0.1 (containers, network namespaces): gloo then fails with "Gloo connectFullMesh failed ...
    # remote=[127.0.0.1]". The infra/ manifests set the variables on every Ray pod (eth0) instead.
    socket_ifname: str = ""

    def __post_init__(self) -> None:
        if self.socket_ifname and not re.fullmatch(r"[\w.:@-]+(,[\w.:@-]+)*", self.socket_ifname):
            raise ConfigError(f"scaling.socket_ifname={self.socket_ifname!r}: expected interface names such as "
                              f"eth0 or eth0,eth1 (see `ip -brief link` on a worker host)")


@dataclass
class RunConfig:
    name: str = "omnidiff"
    run_dir: str = "runs/train"   # local or s3://: Ray storage_path; checkpoints in <run_dir>/<name>/
    max_failures: int = 1         # group restarts from the last checkpoint before the run fails
    # Restarting a group waits up to $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) for its resources, e.g. a lost
    # host coming back; the run fails after this many such waits in a row (-1 = wait for ever, Ray's default).
    max_start_failures: int = 5


@dataclass
class MlflowConfig:
    tracking_uri: str = ""        # "" = $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db
    experiment: str = "omni-diffusion"
    # MLflow's system metrics monitor: CPU, memory, disk, network, and GPU utilisation/memory (needs psutil;
    # pynvml on GPU nodes), sampled every system_metrics_s seconds
    system_metrics: bool = True
    system_metrics_s: float = 10.0
    # "" = the export is not logged as a model; a name = logged as a pyfunc model and registered as a new
    # version of this registered model (needs a store with a model registry: sqlite or a server's database)
    registered_model: str = ""
    # where the tokenize jobs of the shard sets were tracked (tokenize_jobs/config.py `mlflow.experiment`):
    # the run is tagged with their run ids
    tokenize_experiment: str = "omni-diffusion-tokenize"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("debug"))
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.seq_len={self.model.seq_len} "
                              f"(the RoPE table); lower data.seq_len or raise model.seq_len")
        if self.data.stages:
            total = sum(s.steps for s in self.data.stages)
            if total != self.train.steps:
                raise ConfigError(f"data.stages add up to {total} steps but train.steps={self.train.steps}; "
                                  f"make them agree (train.steps is the run's length)")
            for i, s in enumerate(self.data.stages):
                if s.steps < 1 or not s.mixture:
                    raise ConfigError(f"data.stages[{i}] ({s.name or 'unnamed'}) needs steps >= 1 and a "
                                      f"non-empty mixture")
                bad = {k: w for k, w in s.mixture.items() if w < 0}
                if bad:
                    raise ConfigError(f"data.stages[{i}].mixture has negative weights {bad}")
        from model.tasks import TASKS

        if self.diffusion.max_tail < 1:
            raise ConfigError(f"diffusion.max_tail={self.diffusion.max_tail} must be >= 1")
        # the per-task maps: key -> (valid value, what the error says values must be)
        per_task = {"task_weights": (lambda w: w >= 0, ">= 0"), "task_max_tail": (lambda n: n >= 1, ">= 1"),
                    "task_text_weights": (lambda w: w >= 0, ">= 0"),
                    "prompt_dropout": (lambda r: 0 <= r < 1, "in [0, 1)"),
                    "task_min_t": (lambda r: 0 <= r < 1, "in [0, 1)"),
                    "task_scheme": (lambda x: x in ("per_token", "per_sample"), "per_token or per_sample")}
        for key, (valid, rule) in per_task.items():
            values = getattr(self.diffusion, key)
            unknown = sorted(set(values) - set(TASKS))
            if unknown or not all(valid(v) for v in values.values()):
                raise ConfigError(f"diffusion.{key} {values}: keys must be tasks {list(TASKS)} (unknown: "
                                  f"{unknown}) and values {rule}")
        for key in ("task_min_t", "task_scheme", "task_text_weights"):
            if getattr(self.diffusion, key) and self.diffusion.scheme == "per_sequence":
                raise ConfigError(f"diffusion.{key} needs diffusion.scheme=per_token or per_sample")
        names = [s.name for s in self.data.sources]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"data.sources need unique non-empty names, got {names}")

    def with_steps(self, steps: int) -> TrainConfig:
        """This config with train.steps = `steps` and the stages shrunk or stretched to match, keeping their
        proportions (each keeps >= 1 step; the last takes the rounding)."""
        if steps < max(1, len(self.data.stages)):
            raise ConfigError(f"{steps} steps: the curriculum has {len(self.data.stages)} stages, each needs "
                              f"at least one step")
        stages, used, old = [], 0, sum(s.steps for s in self.data.stages)
        for i, s in enumerate(self.data.stages):
            left = len(self.data.stages) - 1 - i
            n = steps - used if left == 0 else max(1, round(s.steps * steps / old))
            n = min(n, steps - used - left)
            stages.append(replace(s, steps=n))
            used += n
        return replace(self, train=replace(self.train, steps=steps), data=replace(self.data, stages=stages))

    def stage_bounds(self) -> list[tuple[int, int]]:
        """[start, end) optimizer steps of each stage; one stage covering the run when none are given."""
        if not self.data.stages:
            return [(0, self.train.steps)]
        out, start = [], 0
        for s in self.data.stages:
            out.append((start, start + s.steps))
            start += s.steps
        return out

    def stage_at(self, step: int) -> int:
        """Index of the stage that optimizer step `step` (0-based) belongs to."""
        for i, (lo, hi) in enumerate(self.stage_bounds()):
            if lo <= step < hi:
                return i
        return len(self.stage_bounds()) - 1
