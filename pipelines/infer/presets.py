"""Per-task sampler settings: each task's settings from the task registry (model/tasks.py), a named preset, a
YAML file and `key=value` overrides, in that order.

Presets:
    project    (default) the registry's settings: the even unmask split, filters only when sampling, the
               position penalty on confidence, canvases sized from the input (ratio-sized speech)
    reference  the reference Omni-Diffusion inference script's settings (tools/inference.py): temperature 0,
               top_p 0.9, top_k 50 (filtered at temperature 0 too), Dream's schedule, the position penalty on
               logits, and its per-task lengths, steps, algs and penalties
    demo       the project settings sized for the CPU demo
    fast       project + fast sampling where it kept accuracy (`FAST`, `with_fast_sampling`): image canvases
               in blocks of 32 with the dual key/value cache and a 0.9 confidence threshold (the schedule as
               its floor), text answers with the threshold alone, speech answers unchanged
    demo-fast  demo + the same fast sampling
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from common import configlib
from model.tasks import TASKS, TaskSampler, default_sampler, spec
from model.vocab import Modality

PRESETS = ("project", "reference", "demo", "fast", "demo-fast")

# Fast sampling (Fast-dLLM; docs/inference.md) per answer kind, each kept where it held the demo checkpoint's
# accuracy (`python -m demo.compare`, docs/performance.md). Image canvases decode in blocks of 32 with the dual
# key/value cache (one block would recompute the whole canvas each step) and every position above 0.9 confidence
# unmasked at once, the schedule as the floor (codes are rarely 0.9-confident; with a floor of one a threshold
# that seldom passes is one token a step). Text answers take the threshold alone: the cache moved the demo's
# short answers by 2-4 items of 120 without saving time. Speech answers keep one block and no cache: both cost
# TTS accuracy (blocks of 32: 28 -> 24%, with the cache 13%).
FAST_TEXT = {"unmask_threshold": 0.9}
FAST_IMAGE = {"kv_cache": "dual", "block_length": 32, "unmask_threshold": 0.9, "unmask_floor": "schedule"}
FAST_BY_ANSWER = {Modality.IMAGE: FAST_IMAGE, Modality.AUDIO: {}, Modality.TEXT: FAST_TEXT}
FAST = {task: FAST_BY_ANSWER[spec(task).answer] for task in TASKS}


def with_fast_sampling(p: "SamplerPresets") -> "SamplerPresets":
    """`p` with `FAST`'s settings on top of each task's (a new object)."""
    p = dataclasses.replace(p)
    for task, fast in FAST.items():
        setattr(p, task, dataclasses.replace(getattr(p, task), **fast))
    return p

# Every task of the reference inference script: temperature=0.0 and top_p=0.9 passed to generate, top_k=50 from
# the generation config (transformers' default), eps 1e-3, alg_temp 0, Dream's schedule, one block; equal
# confidences to the earlier position.
_REFERENCE = {"temperature": 0.0, "top_p": 0.9, "top_k": 50, "filter_greedy": True, "schedule": "dream",
              "eps": 1e-3, "position_penalty_on": "logits", "ties": "first"}


def reference_samplers() -> dict[str, TaskSampler]:
    """The reference script's per-task settings. Its canvases: t2i / s2i 260 tokens in 260 steps (one a step;
    ours fixes <eoi><im_end> and ends the prompt with <boi>, so tokens_per_image steps of one token), svqa 128 /
    128 with <boa> pre-infilled at 20%, vqa 64 / 64, asr and tts 50 tokens in 25 steps. It runs no i2t, sqa or
    text task: i2t and text take vqa's settings, sqa svqa's (the same spoken-answer format)."""
    image = {"length": 0, "steps": 260, "alg": "entropy-penalty", "position_penalty": 2.0, **_REFERENCE}
    spoken = {"length": 128, "steps": 128, "alg": "entropy-penalty", "repetition_penalty": 1.2,
              "speech_answer": True, "boa_fraction": 0.2, **_REFERENCE}
    plain = {"length": 64, "steps": 64, "alg": "entropy", **_REFERENCE}
    return {
        "t2i": TaskSampler(**image, repetition_penalty=1.2, uncond="random_text"),
        "s2i": TaskSampler(**image, repetition_penalty=1.5, cfg_scale=2.0, uncond="empty_user"),
        "svqa": TaskSampler(**spoken),
        "sqa": TaskSampler(**spoken),
        "vqa": TaskSampler(**plain),
        "i2t": TaskSampler(**plain),
        "text": TaskSampler(**plain),
        "asr": TaskSampler(length=50, steps=25, alg="entropy", **_REFERENCE),
        "tts": TaskSampler(length=50, steps=25, alg="entropy", **_REFERENCE),
    }


@dataclass
class SamplerPresets:
    """Per-task sampler settings (the module docstring lists the presets). "demo" sizes speech for the CPU
    demo's EnCodec at 1.5 kbps (150 ids per second: a spoken digit word of ~0.6 s is ~90 ids for one or two text
    tokens, far beyond 3.5 ids per text token)."""
    # defaults: each task's settings in the task registry (model/tasks.py), preset "project"
    t2i: TaskSampler = field(default_factory=lambda: default_sampler("t2i"))
    s2i: TaskSampler = field(default_factory=lambda: default_sampler("s2i"))
    i2t: TaskSampler = field(default_factory=lambda: default_sampler("i2t"))
    vqa: TaskSampler = field(default_factory=lambda: default_sampler("vqa"))
    svqa: TaskSampler = field(default_factory=lambda: default_sampler("svqa"))
    asr: TaskSampler = field(default_factory=lambda: default_sampler("asr"))
    tts: TaskSampler = field(default_factory=lambda: default_sampler("tts"))
    text: TaskSampler = field(default_factory=lambda: default_sampler("text"))
    sqa: TaskSampler = field(default_factory=lambda: default_sampler("sqa"))
    batch_size: int = 8          # prompts per generate call (rows sharing one canvas layout)
    seed: int = 0

    @classmethod
    def preset(cls, name: str) -> "SamplerPresets":
        if name == "project":
            return cls()
        if name == "reference":
            return cls(**reference_samplers())
        if name == "demo":
            p = cls()
            p.tts = TaskSampler(length_ratio=75.0, steps_ratio=0.5, min_length=64, max_length=256)
            p.asr = TaskSampler(length_ratio=0.2, steps_ratio=0.5, min_length=8, max_length=64)
            p.i2t = TaskSampler(length=16, steps=16)
            p.svqa = TaskSampler(length=16, steps=16)
            p.batch_size = 16
            return p
        if name in ("fast", "demo-fast"):
            return with_fast_sampling(cls.preset("project" if name == "fast" else "demo"))
        raise configlib.ConfigError(f"unknown sampler preset {name!r}; presets: {list(PRESETS)}")

    def for_task(self, task: str) -> TaskSampler:
        spec(task)   # unknown names fail here, naming the tasks
        return getattr(self, task)


SAMPLER_KEYS = tuple(f.name for f in dataclasses.fields(TaskSampler))


def generate_kwargs(s: TaskSampler) -> dict[str, Any]:
    """The `model.sampling.generate` keywords a task's sampler settings select (the canvas-shaping keys --
    length, steps, blocks, pre-infill, transcript -- are the predictor's)."""
    return {"alg": s.alg, "schedule": s.schedule, "eps": s.eps, "alg_temp": s.alg_temp, "ties": s.ties,
            "temperature": s.temperature,
            "top_p": s.top_p if s.top_p < 1.0 else None, "top_k": s.top_k or None, "filter_greedy": s.filter_greedy,
            "cfg_scale": s.cfg_scale, "position_penalty": s.position_penalty, "penalty_start": s.penalty_start,
            "position_penalty_on": s.position_penalty_on, "repetition_penalty": s.repetition_penalty,
            "kv_cache": s.kv_cache, "unmask_threshold": s.unmask_threshold or None, "unmask_floor": s.unmask_floor}


def load_presets(preset: str = "project", path: str | None = None, overrides: Sequence[str] = (),
                 tasks: Sequence[str] = TASKS) -> SamplerPresets:
    """defaults <- preset <- YAML <- overrides. A bare sampler key (`steps=32`) applies to every task in
    `tasks`; `t2i.steps=32` to one task; `batch_size=4`, `seed=1` are global."""
    expanded = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in SAMPLER_KEYS:
            expanded += [f"{t}.{item.strip()}" for t in tasks]
        else:
            expanded.append(item)
    try:
        return configlib.load(SamplerPresets, path, expanded, base={"preset": preset})
    except configlib.ConfigError as e:
        raise configlib.ConfigError(f"{e}. Sampler keys (bare, or per task as <task>.<key>): "
                                    f"{', '.join(SAMPLER_KEYS)}") from None
