"""Any-to-any inference on a training export: load it once, build prompts, sample, decode every answer.

    load_export(uri)      a training export (pipelines/export.py) -> Loaded(model, vocab, tokenizers, ...)
    Predictor             holds one Loaded; prepare(Request) -> Prepared (prompt ids + canvas plan);
                          run([Prepared]) -> [Output] (batched `model.sampling.generate`, then detokenized)
    SamplerPresets        per-task sampler settings (pipelines/infer/presets.py)

Prompts are built exactly as training built them (model/prompts.py: the task templates and `encode_messages`
with `add_generation_prompt=True`), and the canvas has the layout of a training answer:

    text answer    <im_start><assistant> | text ... <im_end> <eos> ...           canvas: text ids, im_end, eos
    image answer   <im_start><assistant><boi> | codes x tokens_per_image <eoi> <im_end>
    speech answer  <im_start><assistant><boa> | codes ... <eoa> <im_end> <eos> ...

In the reference prompt format (model/prompts.py) `<im_start><assistant>` is `<|im_start|>assistant\n` and a
turn closes with `<|im_end|>\n`; a text answer is decoded up to its im_end either way.

For media answers the opening bracket ends the prompt. An image has a known length, so `<eoi><im_end>` are
placed at the end of the canvas and never sampled. A speech answer has no known length: every canvas position
may hold a code of its codebook (position i of the answer is codebook i mod n_q, the vocabulary's frame-major
layout) or a closing token (`<eoa>`, `<im_end>`, EOS), which `generate(allowed=...)` expresses; the waveform is
decoded from the codes up to the first non-audio id, trimmed to whole frames.

Speech-to-image as a chain of modalities (`s2i.transcript=N`, for a model trained on s2i answers that start
with the transcript, e.g. `"seven<|image|>"`): the model writes the N-token transcript, then the image, in one
canvas and one `generate` call, the transcript block first:

    transcript, then image  <im_start><assistant> | text x N <boi> codes x tokens_per_image <eoi> <im_end>

Spoken answers (`speech_answer=true`; the reference's spoken answers are text followed by speech) pre-infill
`<boa>` at 20% of the canvas (`boa_fraction`): text before it, speech after. sqa (spoken question, spoken answer)
samples this way by default; svqa answers in text unless `svqa.speech_answer=true` (preset "reference" sets it).

Classifier-free guidance's unconditional prompt is per task (`uncond`, pipelines/infer/guidance.py).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from common import storage
from model.config import ModelConfig
from model.prompts import (TaskTemplate, TaskTemplates, count_placeholders, encode_messages, last_user_text,
                           task_messages)
from model.sampling import Block, generate
from model.tasks import (
    AUDIO_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    TASKS,
    LengthBasis,
    infer_task,
    spec,
)
from model.tokenizers.base import BadInput
from model.vocab import Modality, Vocab
from pipelines import export as export_format
from pipelines.export import ExportConfig
from pipelines.infer.guidance import uncond_prompt
from pipelines.infer.presets import SamplerPresets, generate_kwargs

# ---- export loading ---------------------------------------------------------------------------------------

@dataclass
class Loaded:
    model: torch.nn.Module
    vocab: Vocab
    tokenizers: Any              # model.tokenizers.TokenizerSet
    model_config: ModelConfig
    config: ExportConfig         # the export's config.json
    path: str                    # local folder holding the export
    device: torch.device
    source: str = ""             # the export as given (local path or s3:// URI)

    def mlflow_run(self, tracking_uri: str = "") -> tuple[str, str] | None:
        return export_format.mlflow_run(self.config, self.source or self.path, tracking_uri)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None / "auto" -> cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_export(uri: str, device: str | torch.device | None = None, dtype: str = "auto") -> Loaded:
    """The model of the export at `uri` (local or s3://; pipelines/export.py) with its vocabulary and tokenizers,
    checked against each other. `dtype`: "auto" (bf16 on CUDA, fp32 on CPU), "bf16" or "fp32"."""
    from model.transformer import Transformer
    from model.weights import load_state_strict

    if dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"dtype={dtype!r}: expected auto, bf16 or fp32")
    ex = export_format.read(uri)
    vocab = ex.vocab()
    tokenizers = ex.tokenizers()
    device = resolve_device(device)
    model = Transformer(ex.config.model, vocab_size=vocab.size, media_markers=vocab.media_markers)
    load_state_strict(model, ex.state_dict(), str(ex.weights))
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        model = model.to(torch.bfloat16)
    model = model.to(device).eval()
    return Loaded(model, vocab, tokenizers, ex.config.model, ex.config, str(ex.path), device, str(uri))


# ---- requests ---------------------------------------------------------------------------------------------

@dataclass
class Request:
    """One prompt. Either `messages` (prompt turns with `<|image|>` / `<|audio|>` placeholders; no assistant
    answer), or nothing (the task template filled with `text`), or `prompt_ids` already tokenized (from shards;
    ending with `<im_start><assistant>`). With `messages`, a TTS request's `text` (if given) is the text to read,
    which sizes the canvas when the wording is not the task template's (a benchmark's prompt).

    images: each a path / s3:// URI (relative ones resolved against `base_dir`), file bytes, uint8 pixels
        (H, W, C), or integer codes (tokens_per_image,). audios: each a path / URI, file bytes, a float32 24 kHz
        waveform (N,), or integer codes (n_q, T)."""
    task: str
    text: str = ""
    messages: list[dict] | None = None
    images: list[Any] = field(default_factory=list)
    audios: list[Any] = field(default_factory=list)
    prompt_ids: np.ndarray | None = None
    base_dir: str = ""
    id: Any = None


@dataclass
class Canvas:
    """The answer canvas of one prompt: rows batch together when their (task, length, steps, fixed) agree."""
    task: str
    layout: tuple[Modality, ...]       # typed segments (Task.canvas_layout): (TEXT,), (AUDIO,), (TEXT, IMAGE) ...
    length: int
    steps: int
    fixed: tuple[tuple[int, int], ...]  # (canvas position, token id) placed before decoding
    split: int = 0                     # with a text head: position of the media's opening bracket (<boi>/<boa>)

    @property
    def media(self) -> Modality:
        """The last segment: what fills the canvas to its end."""
        return self.layout[-1]

    @property
    def text_head(self) -> bool:
        """A text segment before a media answer (a transcript before an image, text before speech)."""
        return len(self.layout) == 2

    @property
    def key(self) -> tuple:
        return self.task, self.layout, self.length, self.steps, self.fixed


@dataclass
class Prepared:
    request: Request
    prompt: np.ndarray                 # (P,) int64, ending with <boi>/<boa> for media answers
    canvas: Canvas
    uncond: np.ndarray | None = None   # guidance's unconditional prompt (P',); None = the masked prompt


@dataclass
class Output:
    task: str
    id: Any
    canvas: np.ndarray                 # (G,) int64 sampled ids
    prompt_len: int
    text: str | None = None
    image: np.ndarray | None = None    # uint8 (H, W, C)
    audio_codes: np.ndarray | None = None  # (n_q, T)
    wav: np.ndarray | None = None      # float32 (N,)
    sample_rate: int = 0

    def save(self, folder: str, stem: str = "") -> dict[str, str]:
        """Write answer.txt / image.png / speech.wav (or `<stem>.txt/.png/.wav`) under `folder` (local or
        s3://); returns {"text"|"image"|"audio": uri}."""
        names = {"text": f"{stem}.txt" if stem else "answer.txt", "image": f"{stem}.png" if stem else "image.png",
                 "audio": f"{stem}.wav" if stem else "speech.wav"}
        written = {}
        if self.text is not None and not stem:
            written["text"] = storage.join(folder, names["text"])
            storage.write_text_atomic(written["text"], self.text + "\n")
        if self.image is not None:
            written["image"] = storage.join(folder, names["image"])
            storage.write_bytes_atomic(written["image"], png_bytes(self.image))
        if self.wav is not None:
            written["audio"] = storage.join(folder, names["audio"])
            storage.write_bytes_atomic(written["audio"], wav_bytes(self.wav, self.sample_rate))
        return written


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]  # (H, W, 1) -> (H, W): grayscale PNG
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(wav: np.ndarray, sample_rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(wav, dtype=np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def resolve_media(ref: str, base_dir: str) -> str:
    """A media path from a prompt: absolute paths and URIs as they are, others relative to `base_dir`."""
    if storage.is_s3(ref) or os.path.isabs(ref) or not base_dir:
        return ref
    return storage.join(base_dir, ref)


def read_media(ref: str, base_dir: str, what: str) -> bytes:
    uri = resolve_media(ref, base_dir)
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise BadInput("missing_file", f"{what} file {uri} does not exist") from None
    except IsADirectoryError:
        raise BadInput("missing_file", f"{what} path {uri} is a folder, not a file") from None


def spoken_text(template: TaskTemplate, content: str) -> str:
    """The text to read aloud in a TTS user turn: the `{text}` part of the template when the content matches
    it, else the whole content."""
    if "{text}" in template.user:
        head, tail = template.user.split("{text}", 1)
        if content.startswith(head) and content.endswith(tail) and len(content) >= len(head) + len(tail):
            return content[len(head): len(content) - len(tail)]
    return content


def user_text(prompt_ids: np.ndarray, vocab: Vocab, text_tok: Any) -> str:
    """The text of the last user turn of a tokenized prompt (media spans and specials left out)."""
    return last_user_text(prompt_ids, vocab, text_tok)


# ---- the predictor ----------------------------------------------------------------------------------------

class Predictor:
    """Holds a loaded export; prompts in, detokenized answers out. One instance per process / Ray actor."""

    def __init__(self, loaded: Loaded, presets: SamplerPresets | None = None,
                 templates: TaskTemplates | None = None):
        self.loaded = loaded
        self.vocab = loaded.vocab
        self.tokenizers = loaded.tokenizers
        self.presets = presets or SamplerPresets()
        self.templates = templates or TaskTemplates()
        self.device = loaded.device
        self._allowed_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_export(cls, uri: str, device: str | None = None, presets: SamplerPresets | None = None,
                    dtype: str = "auto") -> "Predictor":
        return cls(load_export(uri, device, dtype), presets)

    # ---- prompts ------------------------------------------------------------------------------------------
    def layout(self, task: str) -> tuple[Modality, ...]:
        return spec(task).canvas_layout(self.presets.for_task(task))

    def _image_codes(self, item: Any, base_dir: str) -> np.ndarray:
        tok = self.tokenizers.image
        if isinstance(item, np.ndarray) and item.ndim == 1:
            return item.astype(np.int64)
        if isinstance(item, np.ndarray) and item.ndim == 3:
            pixels = item
        else:
            name = item if isinstance(item, str) else "<bytes>"
            data = read_media(item, base_dir, "image") if isinstance(item, str) else bytes(item)
            pixels = tok.load(data, source=name)
        return tok.encode(pixels[None])[0]  # (1, H, W, C) -> (tokens_per_image,)

    def _audio_codes(self, item: Any, base_dir: str) -> np.ndarray:
        tok = self.tokenizers.speech
        if isinstance(item, np.ndarray) and item.ndim == 2:
            return item.astype(np.int64)
        if isinstance(item, np.ndarray) and item.ndim == 1:
            wav = item.astype(np.float32)
        else:
            name = item if isinstance(item, str) else "<bytes>"
            data = read_media(item, base_dir, "audio") if isinstance(item, str) else bytes(item)
            wav = tok.load(data, source=name)
        return tok.encode(wav)

    def prompt_ids(self, req: Request) -> np.ndarray:
        """Prompt ids as training saw them, up to and including the assistant turn's head."""
        if req.prompt_ids is not None:
            return np.asarray(req.prompt_ids, dtype=np.int64)
        messages = req.messages
        if messages is None:
            messages = task_messages(self.templates.get(req.task, self.vocab.prompt_format), text=req.text)
        n_img, n_aud = count_placeholders(messages)
        if n_img != len(req.images) or n_aud != len(req.audios):
            need = {"image": n_img, "audio": n_aud}
            raise BadInput("missing_input",
                           f"task {req.task} prompt has {n_img} image / {n_aud} audio placeholders but "
                           f"{len(req.images)} image / {len(req.audios)} audio inputs were given "
                           f"(needs {', '.join(f'{v} {k}' for k, v in need.items() if v) or 'no media'})")
        images = [self._image_codes(x, req.base_dir) for x in req.images]
        audios = [self._audio_codes(x, req.base_dir) for x in req.audios]
        enc = encode_messages(messages, self.vocab, self.tokenizers.text, images=images, audios=audios,
                              add_generation_prompt=True)
        return enc.input_ids.astype(np.int64)

    def _text_to_read_tokens(self, req: Request, prompt: np.ndarray) -> int:
        template = self.templates.get(req.task, self.vocab.prompt_format)
        if req.prompt_ids is None and (req.messages is None or req.text):
            text = req.text   # the template's text, or the text to read beside messages of another wording
        elif req.messages is not None:
            users = [m.get("content", "") for m in req.messages if m.get("role") == "user"]
            text = spoken_text(template, users[-1] if users else "")
        else:
            text = spoken_text(template, user_text(prompt, self.vocab, self.tokenizers.text))
        return len(self.tokenizers.text.encode(text))

    def plan(self, task: str, prompt: np.ndarray, basis: int = 0) -> Canvas:
        """Canvas length, steps and fixed tokens for `task` (basis: input tokens for ratio-sized canvases)."""
        s = self.presets.for_task(task)
        layout = self.layout(task)
        head, media = len(layout) == 2, layout[-1]
        v = self.vocab
        fixed: tuple[tuple[int, int], ...] = ()
        split = 0
        if media == Modality.IMAGE:
            n_codes = s.length or self.tokenizers.image.tokens_per_image
            if n_codes != self.tokenizers.image.tokens_per_image:
                raise ValueError(f"{task}.length={s.length}: an image is exactly "
                                 f"{self.tokenizers.image.tokens_per_image} tokens for {self.tokenizers.image.name}"
                                 f" (leave length at 0)")
            # with a text head: the transcript, then <boi> (fixed: the image starts where the transcript ends)
            split = s.transcript if head else 0
            head = ((split, v.boi_id),) if split else ()
            length = split + bool(split) + n_codes + 2
            fixed = (*head, (length - 2, v.eoi_id), (length - 1, v.im_end_id))
        else:
            if s.length_ratio > 0:
                length = max(1, math.ceil(basis * s.length_ratio))
            else:
                length = s.length
            length = max(length, s.min_length)
            if s.max_length:
                length = min(length, s.max_length)
            if layout == (Modality.AUDIO,):
                length = -(-length // v.n_q) * v.n_q   # whole frames
            if head:
                split = int(s.boa_fraction * length)
                fixed = ((split, v.boa_id),)
        if s.block_length and media != Modality.IMAGE:
            length = -(-length // s.block_length) * s.block_length
        n_free = length - len(fixed)
        steps = math.ceil(s.steps_ratio * n_free) if s.steps_ratio > 0 else s.steps
        steps = max(1, min(steps, n_free))
        if head and media == Modality.IMAGE:
            steps = split + max(1, min(steps, n_free - split))   # one step per transcript token, then the image's
        if s.block_length and media != Modality.IMAGE:
            blocks = length // s.block_length
            steps = max(blocks, steps // blocks * blocks)
        limit = self.loaded.model_config.seq_len
        if len(prompt) + length > limit:
            raise BadInput("too_long", f"prompt of {len(prompt)} tokens + {task} canvas of {length} exceeds the "
                                       f"model's seq_len={limit}; shorten the input or lower {task}.max_length")
        return Canvas(task, layout, length, steps, fixed, split)

    def prepare(self, req: Request) -> Prepared:
        """Tokenize one request and plan its canvas. Raises BadInput (missing file, unreadable media, a task
        whose required input is absent, too long) or ValueError (unknown task)."""
        if req.task not in TASKS:
            raise BadInput("unknown_task", f"task {req.task!r}; tasks: {list(TASKS)}")
        task = spec(req.task)
        prompt = self.prompt_ids(req)
        if req.prompt_ids is None and req.messages is None and "{text}" in self.templates.get(req.task, self.vocab.prompt_format).user \
                and not req.text.strip():
            raise BadInput("missing_input", f"task {req.task} needs --text")
        layout = self.layout(req.task)
        s = self.presets.for_task(req.task)
        uncond = None
        if s.cfg_scale and s.uncond != "masked":
            n_text = self._text_to_read_tokens(req, prompt) if s.uncond == "random_text" else 0
            template = self.templates.get(req.task, self.vocab.prompt_format)
            uncond = uncond_prompt(s.uncond, template, self.vocab, self.tokenizers.text,
                                   n_text=n_text, rng=np.random.default_rng(self.presets.seed))
        bracket = {(Modality.IMAGE,): self.vocab.boi_id, (Modality.AUDIO,): self.vocab.boa_id}.get(layout)
        if bracket is not None:   # a media answer's opening bracket ends the prompt (module docstring)
            prompt = np.append(prompt, bracket)
            uncond = None if uncond is None else np.append(uncond, bracket)
        basis = 0
        if task.length_basis == LengthBasis.PROMPT_SPEECH:
            lo, hi = self.vocab.audio_range()
            basis = int(((prompt >= lo) & (prompt < hi)).sum())
        elif task.length_basis == LengthBasis.TEXT_TO_READ:
            basis = self._text_to_read_tokens(req, prompt)
        return Prepared(req, prompt, self.plan(req.task, prompt, basis), uncond)

    # ---- sampling -----------------------------------------------------------------------------------------
    def blocks(self, canvas: Canvas) -> list[Block] | None:
        """generate's explicit blocks: text+image decides the transcript (one token a step) before the image,
        as the text tasks are decoded: argmax, no guidance (one checkpoint, 120 s2i items: the transcript right
        for 81% this way, 72% at the image's temperature 0.5 and guidance 3). With `block_length`, an image
        canvas (its codes and closing tokens: rarely a multiple of it) is cut into blocks of that length, the
        last one shorter, its steps shared in proportion."""
        chain = canvas.layout == (Modality.TEXT, Modality.IMAGE)
        block_length = self.presets.for_task(canvas.task).block_length
        if not chain and not (block_length and canvas.layout[-1] == Modality.IMAGE):
            return None
        head = [Block(canvas.split, canvas.split, temperature=0.0, cfg_scale=0.0)] if chain else []
        length, steps = canvas.length - canvas.split, canvas.steps - canvas.split
        if not block_length or block_length >= length:
            return [*head, Block(length, steps)]
        lengths = [block_length] * (length // block_length) + ([length % block_length] if length % block_length
                                                              else [])
        # each block >= 1 step, the rest in proportion to length; the sum is generate's `steps`
        shares = [max(1, steps * n // length) for n in lengths]
        shares[0] += max(0, steps - sum(shares))
        return [*head, *(Block(n, k) for n, k in zip(lengths, shares))]

    def uncond_hidden(self, canvas: Canvas) -> torch.Tensor | None:
        """text+image: guidance's unconditional rows see neither the prompt nor the transcript, so guidance
        pushes the image towards what the speech and its transcript say (with the transcript visible to both
        rows, their difference is only what the speech adds to it)."""
        if canvas.layout != (Modality.TEXT, Modality.IMAGE):
            return None
        hidden = torch.zeros(canvas.length, dtype=torch.bool)
        hidden[:canvas.split] = True
        return hidden

    def allowed(self, canvas: Canvas) -> torch.Tensor:
        """(V,) or (G, V) bool mask of the ids each canvas position may take (see the module docstring)."""
        if canvas.key in self._allowed_cache:
            return self._allowed_cache[canvas.key]
        v = self.vocab
        if canvas.layout == (Modality.TEXT,):
            mask = v.allowed_ids(Modality.TEXT)
        else:
            mask = torch.zeros(canvas.length, v.size, dtype=torch.bool)
            if canvas.media == Modality.IMAGE:
                mask[canvas.split:, v.image_offset: v.size] = True
                # the transcript has the length the model was trained on: text ids, no end-of-turn or EOS
                mask[:canvas.split] = v.allowed_ids(Modality.TEXT)
                mask[:canvas.split, [v.im_end_id, v.eos_id]] = False
            else:
                start = canvas.split + 1 if canvas.text_head else 0
                if canvas.text_head:
                    mask[:start] = v.allowed_ids(Modality.TEXT)
                for i in range(start, canvas.length):
                    lo, hi = v.audio_range((i - start) % v.n_q)
                    mask[i, lo:hi] = True
                mask[start:, [v.eoa_id, v.im_end_id, v.eos_id]] = True
            for pos, tid in canvas.fixed:
                mask[pos] = False
                mask[pos, tid] = True
        self._allowed_cache[canvas.key] = mask
        return mask

    def run(self, items: Sequence[Prepared], *, decode_audio: bool = True) -> list[Output]:
        """Sample every prepared prompt: rows sharing a canvas layout run as one batched `generate` call (at most
        `batch_size` rows), prompts left-padded. Returns outputs in the order of `items`."""
        outputs: list[Output | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.canvas.key, []).append(i)
        bs = max(1, self.presets.batch_size)
        for idx in groups.values():
            for start in range(0, len(idx), bs):
                chunk = idx[start:start + bs]
                canvases = self._generate([items[i] for i in chunk])
                for i, row in zip(chunk, canvases):
                    outputs[i] = self.decode(items[i], row, decode_audio=decode_audio)
        return outputs  # type: ignore[return-value]

    def _generate(self, rows: Sequence[Prepared]) -> np.ndarray:
        canvas = rows[0].canvas
        s = self.presets.for_task(canvas.task)
        P = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), P), self.vocab.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), P), dtype=torch.bool)
        for i, r in enumerate(rows):  # left padding: the canvas starts at column P in every row
            ids[i, P - len(r.prompt):] = torch.from_numpy(r.prompt)
            mask[i, P - len(r.prompt):] = True
        uncond = {}
        if rows[0].uncond is not None:   # one task per batch: all rows have one, or none
            U = max(len(r.uncond) for r in rows)
            u_ids = torch.full((len(rows), U), self.vocab.pad_id, dtype=torch.long)
            u_mask = torch.zeros((len(rows), U), dtype=torch.bool)
            for i, r in enumerate(rows):
                u_ids[i, U - len(r.uncond):] = torch.from_numpy(r.uncond)
                u_mask[i, U - len(r.uncond):] = True
            uncond = {"uncond_prompt_ids": u_ids.to(self.device), "uncond_prompt_mask": u_mask.to(self.device)}
        G = canvas.length
        # generate places pre-infilled tokens at int(fraction * G): the centre of the cell is exact in floats.
        pre_infill = [(tid, (pos + 0.5) / G) for pos, tid in canvas.fixed]
        generator = torch.Generator(device=self.device).manual_seed(self.presets.seed)
        blocks = self.blocks(canvas)
        out = generate(
            self.loaded.model, ids.to(self.device), vocab=self.vocab, gen_length=G,
            steps=canvas.steps if blocks is None else sum(b.steps for b in blocks),
            block_length=(s.block_length or None) if blocks is None else None, blocks=blocks, uncond_hidden=self.uncond_hidden(canvas), pre_infill=pre_infill or None,
            allowed=self.allowed(canvas), prompt_mask=mask.to(self.device), generator=generator,
            **generate_kwargs(s), **uncond)
        return out.cpu().numpy()

    # ---- detokenizing -------------------------------------------------------------------------------------
    def decode_text(self, ids: np.ndarray) -> str:
        """Text ids up to the first `<im_end>` / EOS (any other non-text id is dropped)."""
        v = self.vocab
        stops = np.flatnonzero((ids == v.im_end_id) | (ids == v.eos_id))
        ids = ids[: stops[0]] if stops.size else ids
        text_ids = [int(t) for t in ids if t < v.text_size and t not in v.reuse_specials.values()]
        return self.tokenizers.text.decode(text_ids).strip()

    def audio_codes(self, ids: np.ndarray) -> np.ndarray:
        """Speech codes (n_q, T): the ids up to the first non-audio id, trimmed to whole frames."""
        lo, hi = self.vocab.audio_range()
        bad = np.flatnonzero((ids < lo) | (ids >= hi))
        ids = ids[: bad[0]] if bad.size else ids
        return self.vocab.audio_codes(ids)

    def decode(self, item: Prepared, row: np.ndarray, *, decode_audio: bool = True) -> Output:
        c = item.canvas
        out = Output(task=c.task, id=item.request.id, canvas=row, prompt_len=len(item.prompt))
        if c.layout == (Modality.TEXT,):
            out.text = self.decode_text(row)
            return out
        start = c.split + 1 if c.text_head else 0   # the media after the text head and its opening bracket
        if c.text_head:
            out.text = self.decode_text(row[:c.split])
        if c.media == Modality.IMAGE:
            n = self.tokenizers.image.tokens_per_image
            codes = self.vocab.image_codes(row[start:start + n])
            out.image = self.tokenizers.image.decode(codes[None])[0]  # (1, N) -> (H, W, C)
        else:
            out.audio_codes = self.audio_codes(row[start:])
            out.sample_rate = int(self.tokenizers.speech.sample_rate)
            if decode_audio:
                try:
                    out.wav = self.tokenizers.speech.decode(out.audio_codes)
                except NotImplementedError:   # codes-only speech (speech.kind=glm4voice): the codes are the answer
                    out.wav = None
        return out

    def predict(self, requests: Sequence[Request], *, decode_audio: bool = True) -> list[Output]:
        return self.run([self.prepare(r) for r in requests], decode_audio=decode_audio)


# ---- messages JSONL lines ---------------------------------------------------------------------------------

@dataclass
class Reference:
    """What a messages line says the answer is (for evaluation): text, or media refs of the answer turn."""
    text: str | None = None
    images: list[str] = field(default_factory=list)
    audios: list[str] = field(default_factory=list)
    label: int | None = None
    options: list[str] | None = None


def request_from_line(line: Any, base_dir: str = "", id: Any = None) -> tuple[Request, Reference]:
    """A messages-format line (`{"messages": [...], "images": [...], "audios": [...], "task"?, "id"?,
    "label"?, "options"?}`) -> the prompt (turns before a final assistant answer) and its reference answer.
    Raises BadInput naming what is wrong."""
    if not isinstance(line, dict):
        raise BadInput("bad_line", f"expected a JSON object, got {type(line).__name__}")
    messages = line.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadInput("bad_line", "\"messages\" must be a non-empty list of {\"role\", \"content\"} objects")
    images, audios = line.get("images", []), line.get("audios", [])
    if not isinstance(images, list) or not isinstance(audios, list) \
            or not all(isinstance(x, str) for x in images + audios):
        raise BadInput("bad_line", "\"images\" and \"audios\" must be lists of paths")
    task = line.get("task") or infer_task(messages)
    if task not in TASKS:
        raise BadInput("unknown_task", f"task {task!r}; tasks: {list(TASKS)}")
    prompt = list(messages)
    answer = None
    if prompt[-1].get("role") == "assistant":
        answer = prompt.pop()
    if not prompt:
        raise BadInput("bad_line", "no prompt turn before the assistant answer")
    n_img, n_aud = count_placeholders(prompt)
    ref = Reference(images=images[n_img:], audios=audios[n_aud:], options=line.get("options"))
    if answer is not None and spec(task).answer == Modality.TEXT:
        ref.text = str(answer.get("content", ""))
        if spec(task).spoken and AUDIO_PLACEHOLDER in ref.text:   # a spoken answer: its text is the reference
            ref.text = ref.text.replace(AUDIO_PLACEHOLDER, "").strip()
    elif answer is not None:
        # a media answer may start with text (an s2i transcript before its image): that text is its reference
        said = str(answer.get("content", "")).replace(IMAGE_PLACEHOLDER, "").replace(AUDIO_PLACEHOLDER, "").strip()
        ref.text = said or None
    meta = line.get("meta") if isinstance(line.get("meta"), dict) else {}
    label = line.get("label", meta.get("label"))
    ref.label = int(label) if isinstance(label, (int, float, str)) and str(label).lstrip("-").isdigit() else None
    req = Request(task=task, messages=prompt, images=images[:n_img], audios=audios[:n_aud], base_dir=base_dir,
                  id=line.get("id", id))
    return req, ref
