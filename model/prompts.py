"""Conversations -> token ids + answer mask, and the named task templates.

One layout for training samples, sampling prompts and evaluation, so a prompt at inference time is token for
token what the model saw as the prompt part of a training sample. The vocabulary's prompt format
(model/vocab.py `PromptFormat`) decides how a turn is written:

    COMPACT     <im_start><role-id> content <im_end>
    REFERENCE   <|im_start|> "user" "\n" content <|im_end|> "\n"      (Omni-Diffusion's Qwen2 chat text)

In the REFERENCE format every piece is tokenized on its own, as the reference's data code does: im_start, the
role name, "\n", the content, im_end, "\n". (The reference's inference tokenizes the chat-template string as a
whole instead, which merges "\n" + "\n" into one token where a content starts with a newline; we keep the
training tokenization for sampling too, so a prompt is always the prefix of a training sample.)

Content is text with media placeholders (`<|image|>`, `<|audio|>`, as in the Omni-Diffusion messages JSONL)
filled in order from the sample's media lists; an image becomes `<boi> codes <eoi>`, audio `<boa> codes <eoa>`
(in the REFERENCE format `<|begin_of_image|> <|image_i|>... <|end_of_image|>` and the audio equivalents).
The answer is the content of assistant turns plus their closing im_end, and in the REFERENCE format the "\n"
after it, which the reference also learns: a visible "\n" there would tell the model where the answer ends,
something a sampling canvas cannot show. Those are the only positions the diffusion objective may mask. The
assistant turn's head (`<im_start><assistant>`, or `<|im_start|>assistant\n`) stays in the prompt, so the model
is told which turn it writes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from model.tasks import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, spec
from model.tokenizers.base import BadInput, TextTokenizer
from model.vocab import Modality, PromptFormat, Vocab

_PLACEHOLDER_RE = re.compile(r"(<\|image\|>|<\|audio\|>)")
ROLES = ("system", "user", "assistant")
# Role names the reference's data also accepts (ShareGPT style).
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}


@dataclass
class Encoded:
    input_ids: np.ndarray    # (L,) int32
    answer_mask: np.ndarray  # (L,) bool: positions the model learns to generate

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def count_placeholders(messages: Sequence[dict]) -> tuple[int, int]:
    n_img = sum(m.get("content", "").count(IMAGE_PLACEHOLDER) for m in messages)
    n_aud = sum(m.get("content", "").count(AUDIO_PLACEHOLDER) for m in messages)
    return n_img, n_aud


def _content_ids(content: str, images: list[np.ndarray], audios: list[np.ndarray], vocab: Vocab,
                 text_tok: TextTokenizer) -> list[int]:
    """Text with placeholders -> ids; consumes `images`/`audios` from the front (they are lists of codes)."""
    out: list[int] = []
    for piece in _PLACEHOLDER_RE.split(content):
        if piece == IMAGE_PLACEHOLDER:
            out += [vocab.boi_id, *vocab.image_ids(images.pop(0)).tolist(), vocab.eoi_id]
        elif piece == AUDIO_PLACEHOLDER:
            out += [vocab.boa_id, *vocab.audio_ids(audios.pop(0)).tolist(), vocab.eoa_id]
        elif piece:
            out += text_tok.encode(piece)
    return out


@dataclass(frozen=True)
class TurnFormat:
    """The ids around a turn's content: `head(role)` before it, `tail` after it (the tail closes the turn and
    belongs to the answer in assistant turns)."""
    heads: dict[str, tuple[int, ...]]
    tail: tuple[int, ...]

    def head(self, role: str) -> list[int]:
        return list(self.heads[role])


def turn_format(vocab: Vocab, text_tok: TextTokenizer) -> TurnFormat:
    """The turn layout of the vocabulary's prompt format (module docstring)."""
    if vocab.prompt_format == PromptFormat.REFERENCE:
        nl = text_tok.encode("\n")
        return TurnFormat({r: (vocab.im_start_id, *text_tok.encode(r), *nl) for r in ROLES}, (vocab.im_end_id, *nl))
    return TurnFormat({r: (vocab.im_start_id, vocab.role_id(r)) for r in ROLES}, (vocab.im_end_id,))


def encode_messages(messages: Sequence[dict], vocab: Vocab, text_tok: TextTokenizer, *,
                    images: Sequence[np.ndarray] = (), audios: Sequence[np.ndarray] = (),
                    add_generation_prompt: bool = False) -> Encoded:
    """Encode a chat. `images[i]` are image codes (N,), `audios[i]` speech codes (n_q, T), matched in order
    to the placeholders. With `add_generation_prompt`, the assistant turn's head is appended (for sampling)."""
    n_img, n_aud = count_placeholders(messages)
    if n_img != len(images) or n_aud != len(audios):
        raise BadInput("placeholder_mismatch",
                       f"{n_img} {IMAGE_PLACEHOLDER} / {n_aud} {AUDIO_PLACEHOLDER} placeholders but "
                       f"{len(images)} images / {len(audios)} audios")
    fmt = turn_format(vocab, text_tok)
    imgs, auds = list(images), list(audios)
    ids: list[int] = []
    answer: list[bool] = []
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise BadInput("bad_role", f"message {i} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise BadInput("bad_content", f"message {i} content must be a string, got {type(content).__name__}")
        body = _content_ids(content, imgs, auds, vocab, text_tok) + list(fmt.tail)
        head = fmt.head(role)
        ids += head + body
        answer += [False] * len(head) + [role == "assistant"] * len(body)
    if add_generation_prompt:
        head = fmt.head("assistant")
        ids += head
        answer += [False] * len(head)
    return Encoded(np.asarray(ids, dtype=np.int32), np.asarray(answer, dtype=bool))


def last_user_text(prompt_ids: np.ndarray, vocab: Vocab, text_tok: TextTokenizer) -> str:
    """The text of the last user turn of a tokenized prompt (media spans and specials left out)."""
    ids = np.asarray(prompt_ids).tolist()
    head = turn_format(vocab, text_tok).head("user")
    starts = [i for i in range(len(ids)) if ids[i:i + len(head)] == head]
    span = ids[starts[-1] + len(head):] if starts else ids
    end = span.index(vocab.im_end_id) if vocab.im_end_id in span else len(span)
    specials = set(vocab.special_ids().values())
    return text_tok.decode([t for t in span[:end] if t < vocab.text_size and t not in specials])


# ---- task templates ----------------------------------------------------------------------------------------

@dataclass
class TaskTemplate:
    """How a task's user turn reads. `user` may use {text} and the media placeholders."""
    user: str
    system: str = ""


def _default(task: str):
    return lambda: TaskTemplate(spec(task).user, spec(task).system)


@dataclass
class TaskTemplates:
    """Prompt wording per task (defaults from the task registry, model/tasks.py); configurable in job configs
    as `templates.<task>.user=...` (and `.system`). A template left at the registry's default is worded as the
    registry says for the vocabulary's prompt format (`get(task, prompt_format)`): the reference's wording in
    the REFERENCE format."""
    t2i: TaskTemplate = field(default_factory=_default("t2i"))
    i2t: TaskTemplate = field(default_factory=_default("i2t"))
    vqa: TaskTemplate = field(default_factory=_default("vqa"))
    asr: TaskTemplate = field(default_factory=_default("asr"))
    tts: TaskTemplate = field(default_factory=_default("tts"))
    s2i: TaskTemplate = field(default_factory=_default("s2i"))
    svqa: TaskTemplate = field(default_factory=_default("svqa"))
    text: TaskTemplate = field(default_factory=_default("text"))
    sqa: TaskTemplate = field(default_factory=_default("sqa"))

    def get(self, task: str, prompt_format: PromptFormat = PromptFormat.COMPACT) -> TaskTemplate:
        t = spec(task)  # unknown names fail here, naming the tasks
        own = getattr(self, task)
        if (own.user, own.system) != (t.user, t.system):
            return own   # configured wording wins in every format
        w = t.wording(PromptFormat(prompt_format))
        return TaskTemplate(w.user, w.system)


def task_messages(template: TaskTemplate, *, text: str = "", answer: str | None = None) -> list[dict]:
    """Messages for one task instance; `answer` (text, or a placeholder for media answers) is omitted when
    building a generation prompt."""
    msgs = []
    if template.system:
        msgs.append({"role": "system", "content": template.system})
    msgs.append({"role": "user", "content": template.user.replace("{text}", text)})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def answer_content(task: str, text: str) -> str:
    """The assistant turn of a paired sample: the text for text answers, the media placeholder otherwise."""
    answer = spec(task).answer
    return text if answer == Modality.TEXT else IMAGE_PLACEHOLDER if answer == Modality.IMAGE else AUDIO_PLACEHOLDER
