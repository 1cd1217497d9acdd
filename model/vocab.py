"""The unified vocabulary: the only place where token ids are decided.

Layout of one id space shared by every modality (contiguous ranges, in this order):

    [0, text_size)                      text ids of the backbone's text tokenizer (rows of its embedding)
    [special_offset, +len(SPECIALS))    our special tokens (mask, eos/pad, role markers, media brackets)
    [audio_offset, +n_q * 1024)         one range of `audio_codebook_size` ids per EnCodec codebook
    [image_offset, +image_codebook_size) image codes (pixel levels or MAGVIT-v2's 8,192 codes)

A special token may instead *reuse* an id inside the text range (e.g. Dream's own `<|mask|>` = a Qwen2 added
token), so a pretrained backbone keeps the embedding it was trained with for that role.

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
from enum import IntEnum
from typing import Any

import numpy as np
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

    def __post_init__(self) -> None:
        for name, tid in self.reuse_specials.items():
            if name not in SPECIALS:
                raise ValueError(f"reuse_specials: unknown special token {name!r}; known: {SPECIALS}")
            if not 0 <= tid < self.text_size:
                raise ValueError(f"reuse_specials[{name!r}] = {tid} is outside the text range [0, {self.text_size})")

    # ---- ranges -------------------------------------------------------------------------------------------
    @property
    def special_offset(self) -> int:
        return self.text_size

    @property
    def audio_offset(self) -> int:
        return self.special_offset + len(SPECIALS)

    @property
    def image_offset(self) -> int:
        return self.audio_offset + self.n_q * self.audio_codebook_size

    @property
    def size(self) -> int:
        """Number of ids in use; a model's embedding may have more rows (padding) but never fewer."""
        return self.image_offset + self.image_codebook_size

    def special_id(self, name: str) -> int:
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
        return {name: self.special_id(name) for name in SPECIALS}

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
        """EnCodec codes (n_q, T) in [0, codebook) -> flat frame-major ids (T * n_q,) int64."""
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


def dream_vocab(n_q: int = 8, image_codebook_size: int = 8192, text_fingerprint: str = "") -> Vocab:
    """Vocabulary on Dream-7B's Qwen2 text tokenizer (152,064 embedding rows), reusing Dream's trained
    `<|mask|>`, `<|endoftext|>`, `<|im_start|>` and `<|im_end|>` (REUSED_SPECIALS["dream"])."""
    return Vocab(
        text_size=152064, text_tokenizer="qwen2", text_fingerprint=text_fingerprint, n_q=n_q,
        image_codebook_size=image_codebook_size, image_tokenizer="magvit2",
        speech_tokenizer=f"encodec_24khz@{n_q}q",
        reuse_specials=dict(REUSED_SPECIALS["dream"]),
    )
