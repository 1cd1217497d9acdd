"""The tasks, as data: one typed record per task that tokenization, training, inference, evaluation and the demo
all read. A new task is one new record here; nothing else branches on a task's name.

A task says what its prompt holds (`inputs`), what its answer is (`answer`), how its user turn reads by
default (`user`, `system`), how its answer is judged (`judge`), and how its answer canvas is sized and decoded
at sampling time (`sampler`, the reference's settings). The canvas of an answer is a short sequence of typed
segments (`canvas_layout`): one segment for a plain answer, or a text segment written before a media answer
(speech-to-image writing its transcript first, spoken answers that are text then speech).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Literal

from common.configlib import ConfigError
from model.sampler_options import (ALGS, CACHE_MODES, FLOORS, SCHEDULES, Alg, CacheMode, Floor, PenaltyOn,
                                   Schedule, Ties)
from model.vocab import Modality, PromptFormat

IMAGE_PLACEHOLDER = "<|image|>"
AUDIO_PLACEHOLDER = "<|audio|>"


class Judge(str, enum.Enum):
    """How an answer is scored against its reference."""
    TEXT = "text"      # normalized exact match of the answer text (option accuracy where options are given)
    SPEECH = "speech"  # the generated speech transcribed (Whisper, or the model's own ASR), then as TEXT
    IMAGE = "image"    # a classifier (and optionally CLIP) on the generated image


# What classifier-free guidance's unconditional rows see in place of the prompt (`TaskSampler.uncond`):
#   masked       the prompt with every token replaced by the mask id (Dream / LLaDA)
#   empty_user   the task's system prompt and an empty user turn (reference S2I)
#   random_text  the user turn's instruction with random text ids in place of its `{text}`, as many as the text
#                has tokens (reference T2I)
Uncond = Literal["masked", "empty_user", "random_text"]
UNCONDS = ("masked", "empty_user", "random_text")


class LengthBasis(str, enum.Enum):
    """What a ratio-sized answer canvas (`TaskSampler.length_ratio`) scales with."""
    FIXED = "fixed"                # no ratio: `length`
    PROMPT_SPEECH = "prompt_speech"  # speech ids in the prompt (a transcript is ~0.2x its audio ids)
    TEXT_TO_READ = "text_to_read"  # text tokens the answer speaks


@dataclass
class TaskSampler:
    """How one task's answer canvas is sized and decoded (see `model.sampling.generate` for the sampler keys)."""
    length: int = 64             # canvas tokens; 0 for image answers = the image tokenizer's tokens_per_image
    length_ratio: float = 0.0    # > 0: length = ratio x the task's length basis (LengthBasis)
    min_length: int = 1          # clamp for ratio-derived lengths
    max_length: int = 0          # 0 = no cap (the model's seq_len still bounds prompt + canvas)
    steps: int = 64              # model calls; capped at the number of positions to fill
    steps_ratio: float = 0.0     # > 0: steps = ceil(ratio x length) (asr/tts: length / 2)
    block_length: int = 0        # semi-autoregressive blocks; 0 = one block
    alg: Alg = "entropy"
    schedule: Schedule = "even"  # positions unmasked per step: even split, or Dream's max(1, n (1 - s/t))
    eps: float = 1e-3            # end of Dream's time grid (schedule "dream", alg "origin")
    alg_temp: float = 0.0        # > 0: positions to unmask drawn from softmax(confidence / alg_temp)
    ties: Ties = "topk"          # equal confidences: torch.topk's order, or "first" (the earlier position)
    temperature: float = 0.0
    top_p: float = 1.0           # 1.0 = off
    top_k: int = 0               # 0 = off
    filter_greedy: bool = False  # top_p / top_k at temperature 0 too (they then shape the confidence)
    cfg_scale: float = 0.0
    uncond: Uncond = "masked"    # guidance's unconditional prompt (see Uncond)
    position_penalty: float = 1.0
    penalty_start: int = 100
    position_penalty_on: PenaltyOn = "confidence"   # or "logits" (the reference)
    repetition_penalty: float = 1.0
    transcript: int = 0          # media answers: text tokens written before the media (chain of modalities)
    speech_answer: bool = False  # text answers: the answer is text then speech (begin-of-audio pre-infilled)
    boa_fraction: float = 0.2    # where <boa> is pre-infilled when speech_answer
    kv_cache: CacheMode = "off"  # block-wise key/value cache: "prefix" or "dual" (model/kvcache.py)
    unmask_threshold: float = 0.0   # > 0: unmask every position above this confidence, >= 1 a step; 0 = schedule
    unmask_floor: Floor = "one"     # with a threshold, at least one position a step, or the schedule's count

    def __post_init__(self) -> None:
        for key in ("length", "min_length", "max_length", "block_length", "penalty_start", "transcript"):
            if getattr(self, key) < 0:
                raise ConfigError(f"sampler {key}={getattr(self, key)} must be >= 0")
        if self.steps < 1 and self.steps_ratio <= 0:
            raise ConfigError(f"sampler steps={self.steps} must be >= 1 (or set steps_ratio)")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"sampler temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1]")
        if not 0 < self.boa_fraction < 1:
            raise ConfigError(f"sampler boa_fraction={self.boa_fraction} must be in (0, 1)")
        if self.unmask_threshold < 0 or (self.unmask_threshold > 0 and self.alg == "origin"):
            raise ConfigError(f"sampler unmask_threshold={self.unmask_threshold} must be >= 0 (0 = off) and needs "
                              f"a confidence alg, not alg={self.alg!r}")
        if self.top_k < 0 or self.alg_temp < 0 or not 0 < self.eps < 1:
            raise ConfigError(f"sampler top_k={self.top_k} and alg_temp={self.alg_temp} must be >= 0, "
                              f"eps={self.eps} in (0, 1)")
        for key, allowed in (("alg", ALGS), ("schedule", SCHEDULES), ("uncond", UNCONDS), ("ties", ("topk", "first")),
                             ("position_penalty_on", ("confidence", "logits")), ("kv_cache", CACHE_MODES),
                             ("unmask_floor", FLOORS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"sampler {key}={getattr(self, key)!r}; expected one of {list(allowed)}")


# Reference t2i/s2i: 256 MAGVIT-v2 tokens, 256 steps, raster-order position penalty 2.0.
_IMAGE_SAMPLER = TaskSampler(length=0, steps=256, position_penalty=2.0)


@dataclass(frozen=True)
class Wording:
    """A task's default user turn (`{text}` and media placeholders) and system prompt."""
    user: str
    system: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    inputs: tuple[Modality, ...]     # media in the prompt, in placeholder order
    answer: Modality                 # what the task learns to generate
    user: str                        # default user turn: `{text}` and media placeholders
    judge: Judge
    system: str = ""
    wer: bool = False                # report the word error rate beside exact match
    length_basis: LengthBasis = LengthBasis.FIXED
    sampler: TaskSampler = field(default_factory=TaskSampler)
    spoken: bool = False             # the reference answers it in speech (text then `<|audio|>`): infer_task
    # the wording of the reference's data and inference (tools/inference.py) for the REFERENCE prompt format;
    # None = `user`/`system` in every format
    reference: Wording | None = None

    def wording(self, prompt_format: PromptFormat) -> Wording:
        if prompt_format == PromptFormat.REFERENCE and self.reference is not None:
            return self.reference
        return Wording(self.user, self.system)

    @property
    def needs_text(self) -> bool:
        return "{text}" in self.user

    @property
    def speech(self) -> bool:
        """Speech in the prompt or in the answer."""
        return Modality.AUDIO in self.inputs or self.answer == Modality.AUDIO

    @property
    def metric(self) -> str:
        """The headline metric of `omnidiff eval` for this task (pipelines/eval/evaluate.py)."""
        return "class_accuracy" if self.judge == Judge.IMAGE else "exact_match"

    def canvas_layout(self, sampler: TaskSampler) -> tuple[Modality, ...]:
        """The answer canvas as typed segments under `sampler`: a text segment before a media answer when the
        sampler asks for one (a transcript before an image; text then speech for a spoken answer)."""
        if self.answer != Modality.TEXT and sampler.transcript:
            return Modality.TEXT, self.answer
        if self.answer == Modality.TEXT and sampler.speech_answer:
            return Modality.TEXT, Modality.AUDIO
        return (self.answer,)


_REGISTRY: tuple[Task, ...] = (
    Task("t2i", (), Modality.IMAGE, "Generate an image of {text}.", Judge.IMAGE, sampler=_IMAGE_SAMPLER,
         reference=Wording("Generate an image based on the provided text description.\n{text}")),
    # the reference publishes no captioning instruction: ours, in its order (instruction, then the image)
    Task("i2t", (Modality.IMAGE,), Modality.TEXT, f"{IMAGE_PLACEHOLDER}\nDescribe the image.", Judge.TEXT,
         reference=Wording(f"Describe the image.\n{IMAGE_PLACEHOLDER}")),
    Task("vqa", (Modality.IMAGE,), Modality.TEXT, f"{IMAGE_PLACEHOLDER}\n{{text}}", Judge.TEXT,
         reference=Wording(f"{{text}}\n{IMAGE_PLACEHOLDER}")),
    Task("asr", (Modality.AUDIO,), Modality.TEXT, f"{AUDIO_PLACEHOLDER}\nTranscribe the speech.", Judge.TEXT,
         wer=True, length_basis=LengthBasis.PROMPT_SPEECH,
         sampler=TaskSampler(length_ratio=0.2, steps_ratio=0.5, min_length=4),
         reference=Wording(f"Convert the speech to text.\n{AUDIO_PLACEHOLDER}")),
    Task("tts", (), Modality.AUDIO, "Read this aloud: {text}", Judge.SPEECH, wer=True,
         length_basis=LengthBasis.TEXT_TO_READ, sampler=TaskSampler(length_ratio=3.5, steps_ratio=0.5, min_length=8),
         reference=Wording("Convert the text to speech.\n{text}")),
    Task("s2i", (Modality.AUDIO,), Modality.IMAGE, f"{AUDIO_PLACEHOLDER}\nGenerate an image of what is said.",
         Judge.IMAGE, sampler=_IMAGE_SAMPLER,
         reference=Wording(f"\n{AUDIO_PLACEHOLDER}", "Please generate an image based on the input audio.")),
    Task("svqa", (Modality.IMAGE, Modality.AUDIO), Modality.TEXT, f"{IMAGE_PLACEHOLDER}\n{AUDIO_PLACEHOLDER}",
         Judge.TEXT, sampler=TaskSampler(length=128, steps=128), spoken=True,
         reference=Wording(f"{AUDIO_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}",
                           "Please response the input audio based on the given image.")),
    Task("text", (), Modality.TEXT, "{text}", Judge.TEXT),
    # spoken question, spoken answer: the reference's answers are text then speech (`"...\n<|audio|>"`), so its
    # canvas is text with <boa> pre-infilled at 20%, speech after it; judged on the text
    Task("sqa", (Modality.AUDIO,), Modality.TEXT, AUDIO_PLACEHOLDER, Judge.TEXT, spoken=True,
         sampler=TaskSampler(length=128, steps=128, speech_answer=True),
         reference=Wording(AUDIO_PLACEHOLDER, "Please response the input audio.")),
)

# Task names in registry order: a task's index here is its id in packed batches (per-position task ids). Ids are
# computed per batch from the task names that shards store (meta "task"), never persisted: appending a task is safe.
TASKS: tuple[str, ...] = tuple(t.name for t in _REGISTRY)
_BY_NAME = {t.name: t for t in _REGISTRY}


def spec(name: str) -> Task:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; tasks: {list(TASKS)}") from None


def all_tasks() -> tuple[Task, ...]:
    return _REGISTRY


def tasks_judged_by(judge: Judge) -> tuple[str, ...]:
    return tuple(t.name for t in _REGISTRY if t.judge == judge)


def default_sampler(name: str) -> TaskSampler:
    """A fresh copy of the task's reference sampler settings (safe to change)."""
    return replace(spec(name).sampler)


def infer_task(messages) -> str:
    """Name the task of a messages sample from what its prompt holds and what its last answer is (for a
    messages JSONL line with no explicit "task"): the task whose inputs and answer modality match. An answer
    with speech (`<|audio|>`, alone or after text, as the reference's spoken answers) fits speech-answer tasks
    (tts) and spoken tasks (svqa, sqa): a spoken question about an image is svqa, a spoken question sqa."""
    prompt = " ".join(m.get("content", "") for m in messages if m.get("role") != "assistant")
    answers = [m.get("content", "") for m in messages if m.get("role") == "assistant"]
    last = answers[-1] if answers else ""
    answer = (Modality.IMAGE if IMAGE_PLACEHOLDER in last else Modality.AUDIO if AUDIO_PLACEHOLDER in last
              else Modality.TEXT)
    inputs = {Modality.IMAGE} if IMAGE_PLACEHOLDER in prompt else set()
    inputs |= {Modality.AUDIO} if AUDIO_PLACEHOLDER in prompt else set()
    # the task with this answer whose inputs are the most of those present (registry order breaks ties: i2t
    # before vqa, asr before sqa for a text answer); a prompt's extra media do not change the task
    fits = [t for t in _REGISTRY if (t.answer == answer or (answer == Modality.AUDIO and t.spoken))
            and set(t.inputs) <= inputs]
    return max(fits, key=lambda t: len(t.inputs)).name if fits else "text"
