"""The unified vocabulary: the only place where token ids are decided.

Layout of one id space shared by every modality (contiguous ranges, in this order):

    [0, text_size)                      text ids of the backbone's text tokenizer (rows of its embedding)
    [special_offset, +n_own_specials)   our special tokens (mask, eos/pad, role markers, media brackets)
    [audio_offset, +n_q * codebook)     one range of `audio_codebook_size` ids per speech codebook
    [image_offset, +image_codebook_size) image codes (pixel levels or MAGVIT-v2's 8,192 codes)

A special token may instead *reuse* an id inside the text range (e.g. Dream's own `<|mask|>` = a Qwen2 added
token), so a pretrained backbone keeps the embedding it was trained with for that role.

The prompt format (`PromptFormat`, model/prompts.py writes it) is part of the vocabulary, so shards, training
and sampling agree on it:
- COMPACT: `<im_start><role-id> content <im_end>` with our own ids for every special (len(SPECIALS) of them,
  after the text range; reused ones leave their slot unused). For models trained from scratch (the demo).
- REFERENCE: Omni-Diffusion's Qwen2 chat text, `<|im_start|>user\n content <|im_end|>\n`: role names and
  newlines are text, every special the format uses (REFERENCE_SPECIALS) is a token of the text tokenizer, and
  there is no own special range. `omni_diffusion_vocab()` is the released checkpoint's layout (176,264 ids).

Speech codes (n_q, T) are flattened frame-major: [f0q0, f0q1, ..., f0q{n_q-1}, f1q0, ...], codebook q of frame f
at flat position f*n_q + q mapping to id `audio_offset + q*audio_codebook_size + code`. Distinct ranges per
codebook let the model tell which codebook it is predicting without any positional bookkeeping.

The vocabulary serializes to JSON; every shard manifest and checkpoint stores it and training refuses shards
whose vocabulary differs (`check_same`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:   # torch is imported by the two sampler views below: the tokenize job's workers never load it
    import torch

# Names of the special tokens, in id order. Their string forms (for templates and debugging) are `<|name|>`.
SPECIALS = (
    "mask",       # the absorbing [MASK] state of the diffusion process
    "eos",        # end of sequence; also the padding token and the tail-padding target
    "im_start",   # start of a chat turn
    "im_end",     # end of a chat turn
    "system",     # role markers, right after im_start
    "user",
    "assistant",
    "boi",        # begin / end of an image span
    "eoi",
    "boa",        # begin / end of an audio span
    "eoa",
)


# The specials the REFERENCE format uses (roles are text there), and their strings in the reference's tokenizer.
REFERENCE_SPECIALS = ("mask", "eos", "im_start", "im_end", "boi", "eoi", "boa", "eoa")
REFERENCE_TOKEN_STRINGS = {
    "mask": "<|mask|>", "eos": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
    "boi": "<|begin_of_image|>", "eoi": "<|end_of_image|>", "boa": "<|begin_of_audio|>", "eoa": "<|end_of_audio|>",
}
# The multimodal tokens Omni-Diffusion adds to Dream's tokenizer, in the order they get ids: its image, video,
# patch, quad, ref, box brackets and tags first, then the audio brackets and tag (the audio list repeats the
# others, which the tokenizer skips as already present). Its 16,384 `<|audio_i|>` then 8,192 `<|image_i|>`
# follow: they are our speech and image ranges.
OMNI_ADDED_TOKENS = (
    "<|begin_of_image|>", "<|end_of_image|>", "<|context_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>", "<|context_of_video|>",
    "<|begin_of_patch|>", "<|end_of_patch|>", "<|context_of_patch|>",
    "<|begin_of_quad|>", "<|end_of_quad|>", "<|begin_of_ref|>", "<|end_of_ref|>",
    "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>",
    "<|begin_of_audio|>", "<|end_of_audio|>", "<|context_of_audio|>", "<|audio|>",
)
DREAM_TOKENIZER_SIZE = 151_667   # Dream-v0's tokenizer: 151,643 Qwen2 BPE ids + 24 added (<|endoftext|> .. <|mask|>)
GLM4VOICE_CODEBOOK_SIZE = 16_384  # GLM-4-Voice speech tokenizer: one codebook, 12.5 tokens per second
MAGVIT2_CODEBOOK_SIZE = 8_192


class PromptFormat(str, Enum):
    """How a chat becomes ids (model/prompts.py); see the module docstring."""
    COMPACT = "compact"
    REFERENCE = "reference"


class Modality(IntEnum):
    TEXT = 0
    SPECIAL = 1
    AUDIO = 2
    IMAGE = 3


class VocabMismatch(ValueError):
    """Two vocabularies (e.g. shards vs model) differ; the message lists what differs."""


@dataclass(frozen=True)
class Vocab:
    text_size: int                      # rows reserved for the text tokenizer (its embedding size)
    text_tokenizer: str = ""            # name/kind of the text tokenizer
    text_fingerprint: str = ""          # content hash of the text tokenizer file
    n_q: int = 2                        # EnCodec codebooks kept (2 = 1.5 kbps ... 32 = 24 kbps)
    audio_codebook_size: int = 1024
    image_codebook_size: int = 8192
    image_tokenizer: str = ""           # e.g. "pixel-8x8x1-17" or "magvit2"
    speech_tokenizer: str = ""          # e.g. "encodec_24khz@1.5kbps"
    reuse_specials: dict[str, int] = field(default_factory=dict)  # special name -> id inside the text range
    prompt_format: PromptFormat = PromptFormat.COMPACT

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_format", PromptFormat(self.prompt_format))
        for name, tid in self.reuse_specials.items():
            if name not in SPECIALS:
                raise ValueError(f"reuse_specials: unknown special token {name!r}; known: {SPECIALS}")
            if not 0 <= tid < self.text_size:
                raise ValueError(f"reuse_specials[{name!r}] = {tid} is outside the text range [0, {self.text_size})")
        if self.prompt_format == PromptFormat.REFERENCE:
            missing = [n for n in REFERENCE_SPECIALS if n not in self.reuse_specials]
            if missing:
                tokens = [REFERENCE_TOKEN_STRINGS[n] for n in missing]
                raise ValueError(f"prompt_format=reference takes every special from the text tokenizer, but "
                                 f"reuse_specials lacks {missing} (tokens {tokens})")

    @property
    def used_specials(self) -> tuple[str, ...]:
        """The specials the prompt format writes: roles are text in the REFERENCE format."""
        return REFERENCE_SPECIALS if self.prompt_format == PromptFormat.REFERENCE else SPECIALS

    @property
    def n_own_specials(self) -> int:
        """Ids of the own special range: none in the REFERENCE format (all specials are text tokens)."""
        return 0 if self.prompt_format == PromptFormat.REFERENCE else len(SPECIALS)

    # ---- ranges -------------------------------------------------------------------------------------------
    @property
    def special_offset(self) -> int:
        return self.text_size

    @property
    def audio_offset(self) -> int:
        return self.special_offset + self.n_own_specials

    @property
    def image_offset(self) -> int:
        return self.audio_offset + self.n_q * self.audio_codebook_size

    @property
    def size(self) -> int:
        """Number of ids in use; a model's embedding may have more rows (padding) but never fewer."""
        return self.image_offset + self.image_codebook_size

    def special_id(self, name: str) -> int:
        if name not in self.used_specials:
            raise ValueError(f"special {name!r} has no id in the {self.prompt_format.value} prompt format "
                             f"(specials: {self.used_specials})")
        if name in self.reuse_specials:
            return self.reuse_specials[name]
        return self.special_offset + SPECIALS.index(name)

    @property
    def mask_id(self) -> int:
        return self.special_id("mask")

    @property
    def eos_id(self) -> int:
        return self.special_id("eos")

    @property
    def pad_id(self) -> int:
        return self.eos_id

    @property
    def im_start_id(self) -> int:
        return self.special_id("im_start")

    @property
    def im_end_id(self) -> int:
        return self.special_id("im_end")

    def role_id(self, role: str) -> int:
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {role!r}; expected system, user or assistant")
        if self.prompt_format == PromptFormat.REFERENCE:
            raise ValueError("roles are text in the reference prompt format: no role id (model/prompts.py)")
        return self.special_id(role)

    @property
    def boi_id(self) -> int:
        return self.special_id("boi")

    @property
    def eoi_id(self) -> int:
        return self.special_id("eoi")

    @property
    def boa_id(self) -> int:
        return self.special_id("boa")

    @property
    def eoa_id(self) -> int:
        return self.special_id("eoa")

    @property
    def media_markers(self) -> tuple[int, int, int, int]:
        """(boi, eoi, boa, eoa): the brackets of image and audio spans, for `Transformer(media_markers=...)`."""
        return self.boi_id, self.eoi_id, self.boa_id, self.eoa_id

    def special_ids(self) -> dict[str, int]:
        return {name: self.special_id(name) for name in self.used_specials}

    def audio_range(self, q: int | None = None) -> tuple[int, int]:
        """[lo, hi) of all audio ids, or of codebook `q` only."""
        if q is None:
            return self.audio_offset, self.image_offset
        if not 0 <= q < self.n_q:
            raise ValueError(f"codebook {q} out of range for n_q={self.n_q}")
        lo = self.audio_offset + q * self.audio_codebook_size
        return lo, lo + self.audio_codebook_size

    def image_range(self) -> tuple[int, int]:
        return self.image_offset, self.size

    def text_range(self) -> tuple[int, int]:
        return 0, self.text_size

    # ---- codes <-> ids ------------------------------------------------------------------------------------
    def audio_ids(self, codes: np.ndarray) -> np.ndarray:
        """Speech codes (n_q, T) in [0, codebook) -> flat frame-major ids (T * n_q,) int64."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.n_q:
            raise ValueError(f"audio codes must be (n_q={self.n_q}, T), got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.audio_codebook_size):
            raise ValueError(f"audio codes outside [0, {self.audio_codebook_size})")
        offsets = self.audio_offset + np.arange(self.n_q)[:, None] * self.audio_codebook_size
        return (codes.astype(np.int64) + offsets).T.reshape(-1)  # (T, n_q) -> (T * n_q,)

    def audio_codes(self, ids: np.ndarray) -> np.ndarray:
        """Flat frame-major audio ids -> codes (n_q, T). A trailing partial frame is dropped; a position whose id
        is not of its codebook's range (possible in sampled output) is clamped to code 0 of that codebook."""
        ids = np.asarray(ids, dtype=np.int64)
        T = ids.size // self.n_q
        frames = ids[: T * self.n_q].reshape(T, self.n_q)  # (T, n_q)
        codes = frames - (self.audio_offset + np.arange(self.n_q)[None, :] * self.audio_codebook_size)
        codes = np.where((codes >= 0) & (codes < self.audio_codebook_size), codes, 0)
        return codes.T.copy()  # (n_q, T)

    def image_ids(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.image_codebook_size):
            raise ValueError(f"image codes outside [0, {self.image_codebook_size})")
        return codes.astype(np.int64) + self.image_offset

    def image_codes(self, ids: np.ndarray) -> np.ndarray:
        """Image ids -> codes; ids outside the image range (possible in sampled output) become code 0."""
        codes = np.asarray(ids, dtype=np.int64) - self.image_offset
        return np.where((codes >= 0) & (codes < self.image_codebook_size), codes, 0)

    # ---- modality views (for the sampler's logit masks and for evaluation) ------------------------------
    def modality_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Modality of each id (same shape, int64 of `Modality`)."""
        import torch

        out = torch.full_like(ids, int(Modality.SPECIAL))
        out[(ids >= 0) & (ids < self.text_size)] = int(Modality.TEXT)
        out[(ids >= self.audio_offset) & (ids < self.image_offset)] = int(Modality.AUDIO)
        out[(ids >= self.image_offset) & (ids < self.size)] = int(Modality.IMAGE)
        for tid in self.reuse_specials.values():
            out[ids == tid] = int(Modality.SPECIAL)
        return out

    def allowed_ids(self, modality: Modality, vocab_rows: int | None = None) -> torch.Tensor:
        """Boolean (vocab_rows,) of ids a sampler may emit inside a span of `modality`.

        Text spans may also end the turn (im_end) and pad (eos); media spans only carry their own codes,
        their brackets being placed by the prompt/template. The mask id is never allowed."""
        rows = vocab_rows or self.size
        if rows < self.size:
            raise ValueError(f"model has {rows} embedding rows but the vocabulary needs {self.size}")
        import torch

        allowed = torch.zeros(rows, dtype=torch.bool)
        if modality == Modality.TEXT:
            allowed[: self.text_size] = True
            for tid in self.reuse_specials.values():
                allowed[tid] = False
            allowed[self.im_end_id] = True
            allowed[self.eos_id] = True
        elif modality == Modality.AUDIO:
            allowed[self.audio_offset: self.image_offset] = True
        elif modality == Modality.IMAGE:
            allowed[self.image_offset: self.size] = True
        else:
            # the special ids themselves: reused ones live in the text range, not in our own special range
            allowed[list(self.special_ids().values())] = True
        allowed[self.mask_id] = False
        return allowed

    # ---- serialization and checks -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prompt_format"] = self.prompt_format.value
        d["layout"] = {
            "special_offset": self.special_offset, "audio_offset": self.audio_offset,
            "image_offset": self.image_offset, "size": self.size, "specials": self.special_ids(),
        }
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Vocab":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields - {"layout"}
        if unknown:
            raise ValueError(f"vocab JSON has unknown keys {sorted(unknown)}")
        v = cls(**{k: d[k] for k in fields if k in d})
        layout = d.get("layout")
        if layout and layout.get("size") != v.size:
            raise ValueError(f"vocab JSON layout size {layout.get('size')} != recomputed {v.size} (edited file?)")
        return v

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        return cls.from_dict(json.loads(text))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def diff(self, other: "Vocab") -> list[str]:
        a, b = self.to_dict(), other.to_dict()
        out = []
        for k in sorted(set(a) | set(b)):
            if k != "layout" and a.get(k) != b.get(k):
                out.append(f"{k}: {a.get(k)!r} != {b.get(k)!r}")
        return out

    def check_same(self, other: "Vocab", what: str = "shards", expected: str = "model") -> None:
        """Raise VocabMismatch naming each differing field (e.g. shards tokenized with another tokenizer)."""
        d = self.diff(other)
        if d:
            raise VocabMismatch(
                f"vocabulary of the {what} differs from the {expected}'s: " + "; ".join(d)
                + f". Re-tokenize the {what} with the {expected}'s tokenizers, or train a model on this vocabulary.")


# Special tokens a pretrained backbone already has trained embeddings for, by backbone name: a vocabulary built
# on that backbone's text tokenizer reuses them (`TextTokenizerConfig.reuse_specials`), so fine-tuning starts from
# the backbone's own mask/eos/chat-turn rows instead of freshly initialized ones.
REUSED_SPECIALS: dict[str, dict[str, int]] = {
    # Dream-v0 (Qwen2 tokenizer): <|mask|>, <|endoftext|>, <|im_start|>, <|im_end|>
    "dream": {"mask": 151666, "eos": 151643, "im_start": 151644, "im_end": 151645},
}


def reference_layout(base_size: int, base_specials: dict[str, int], *, n_q: int = 1,
                     audio_codebook_size: int = GLM4VOICE_CODEBOOK_SIZE,
                     image_codebook_size: int = MAGVIT2_CODEBOOK_SIZE, speech_tokenizer: str = "glm4voice",
                     image_tokenizer: str = "magvit2", text_tokenizer: str = "qwen2",
                     text_fingerprint: str = "") -> Vocab:
    """Omni-Diffusion's layout on a text tokenizer of `base_size` ids whose mask/eos/im_start/im_end are
    `base_specials`: OMNI_ADDED_TOKENS get ids base_size.. in their order, then the speech range, then the
    image range, each id where the reference's tokenizer puts `<|audio_i|>` / `<|image_i|>`. Sizes are
    parameters so tests can build a scaled-down analogue; `omni_diffusion_vocab()` is the real one."""
    added = {name: base_size + OMNI_ADDED_TOKENS.index(REFERENCE_TOKEN_STRINGS[name])
             for name in ("boi", "eoi", "boa", "eoa")}
    return Vocab(
        text_size=base_size + len(OMNI_ADDED_TOKENS), text_tokenizer=text_tokenizer, text_fingerprint=text_fingerprint,
        n_q=n_q, audio_codebook_size=audio_codebook_size, image_codebook_size=image_codebook_size,
        image_tokenizer=image_tokenizer, speech_tokenizer=speech_tokenizer,
        reuse_specials={**base_specials, **added}, prompt_format=PromptFormat.REFERENCE)


def omni_diffusion_vocab(text_fingerprint: str = "") -> Vocab:
    """The released Omni-Diffusion checkpoint's 176,264 rows: Dream's text and specials [0, 151,667), the 21
    multimodal tokens [151,667, 151,688) (<|begin_of_image|> 151,667, <|end_of_image|> 151,668,
    <|begin_of_audio|> 151,684, <|end_of_audio|> 151,685), GLM-4-Voice's 16,384 speech codes
    [151,688, 168,072) (`<|audio_0|>` = 151,688), MAGVIT-v2's 8,192 image codes [168,072, 176,264)."""
    return reference_layout(DREAM_TOKENIZER_SIZE, REUSED_SPECIALS["dream"], text_fingerprint=text_fingerprint)


def dream_vocab(n_q: int = 8, image_codebook_size: int = MAGVIT2_CODEBOOK_SIZE, text_fingerprint: str = "",
                prompt_format: PromptFormat = PromptFormat.REFERENCE) -> Vocab:
    """Vocabulary on Dream-7B's Qwen2 text tokenizer with EnCodec speech (`n_q` codebooks of 1,024).
    REFERENCE (default): the reference's layout with EnCodec's ranges where GLM-4-Voice's are
    (`reference_layout`). COMPACT: all 152,064 embedding rows as text, our own specials after them, reusing
    Dream's trained `<|mask|>`, `<|endoftext|>`, `<|im_start|>` and `<|im_end|>` (REUSED_SPECIALS["dream"])."""
    if PromptFormat(prompt_format) == PromptFormat.REFERENCE:
        return reference_layout(DREAM_TOKENIZER_SIZE, REUSED_SPECIALS["dream"], n_q=n_q, audio_codebook_size=1024,
                                image_codebook_size=image_codebook_size, speech_tokenizer=f"encodec_24khz@{n_q}q",
                                text_fingerprint=text_fingerprint)
    return Vocab(
        text_size=152064, text_tokenizer="qwen2", text_fingerprint=text_fingerprint, n_q=n_q,
        image_codebook_size=image_codebook_size, image_tokenizer="magvit2",
        speech_tokenizer=f"encodec_24khz@{n_q}q",
        reuse_specials=dict(REUSED_SPECIALS["dream"]),
    )
