"""Per-task sampler settings: each task's reference settings from the task registry (model/tasks.py), a named
preset ("reference": the Omni-Diffusion evaluation settings; "demo": sized for the CPU demo), a YAML file and
`key=value` overrides, in that order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from common import configlib
from model.tasks import TASKS, TaskSampler, default_sampler, spec


@dataclass
class SamplerPresets:
    """Per-task sampler settings. Preset "reference" follows the Omni-Diffusion evaluation settings; "demo"
    sizes speech for the CPU demo's EnCodec at 1.5 kbps (150 ids per second: a spoken digit word of ~0.6 s is
    ~90 ids for one or two text tokens, far beyond 3.5 ids per text token)."""
    # defaults: each task's reference settings in the task registry (model/tasks.py)
    t2i: TaskSampler = field(default_factory=lambda: default_sampler("t2i"))
    s2i: TaskSampler = field(default_factory=lambda: default_sampler("s2i"))
    i2t: TaskSampler = field(default_factory=lambda: default_sampler("i2t"))
    vqa: TaskSampler = field(default_factory=lambda: default_sampler("vqa"))
    svqa: TaskSampler = field(default_factory=lambda: default_sampler("svqa"))
    asr: TaskSampler = field(default_factory=lambda: default_sampler("asr"))
    tts: TaskSampler = field(default_factory=lambda: default_sampler("tts"))
    text: TaskSampler = field(default_factory=lambda: default_sampler("text"))
    batch_size: int = 8          # prompts per generate call (rows sharing one canvas layout)
    seed: int = 0

    @classmethod
    def preset(cls, name: str) -> "SamplerPresets":
        if name == "reference":
            return cls()
        if name == "demo":
            p = cls()
            p.tts = TaskSampler(length_ratio=75.0, steps_ratio=0.5, min_length=64, max_length=256)
            p.asr = TaskSampler(length_ratio=0.2, steps_ratio=0.5, min_length=8, max_length=64)
            p.i2t = TaskSampler(length=16, steps=16)
            p.svqa = TaskSampler(length=16, steps=16)
            p.batch_size = 16
            return p
        raise configlib.ConfigError(f"unknown sampler preset {name!r}; presets: ['reference', 'demo']")

    def for_task(self, task: str) -> TaskSampler:
        spec(task)   # unknown names fail here, naming the tasks
        return getattr(self, task)


SAMPLER_KEYS = tuple(f.name for f in dataclasses.fields(TaskSampler))


def load_presets(preset: str = "reference", path: str | None = None, overrides: Sequence[str] = (),
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
