"""The tokenizer set: one text, one image and one speech tokenizer, their configs, and the vocabulary they imply.

The tokenize job calls `TokenizerSet.prepare(cfg, "<out>/tokenizers", texts=..., wavs=...)` once: it fits what
must be fitted on the corpus (a byte-level BPE, EnCodec's codebooks when no published weights are used) and saves
the result beside the shards. Every later step (tokenize actors, training, sampling, evaluation) calls
`TokenizerSet.load("<out>/tokenizers")` and so tokenizes and detokenizes exactly as the shards were made.

Artifacts dir (local or s3://):
    tokenizers.json       resolved config, tokenizer names and fingerprints (written last: marks a complete set)
    vocab.json            the Vocab (model/vocab.py) built from the three tokenizers
    text.json             HF tokenizers file (the trained BPE, or a copy of the backbone's tokenizer.json)
    encodec.safetensors   EnCodec state fitted on the corpus (speech.weights=offline only)
Pixel images need no file; MAGVIT-v2 and published EnCodec weights are referenced by their config.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import numpy as np

from common import configlib, storage
from common.configlib import ConfigError
from model.tokenizers.base import BadInput, ImageTokenizer, SpeechTokenizer, TextTokenizer
from model.vocab import (OMNI_ADDED_TOKENS, REFERENCE_SPECIALS, REFERENCE_TOKEN_STRINGS, REUSED_SPECIALS, PromptFormat,
                         Vocab)

FORMAT_VERSION = 1
SET_FILE = "tokenizers.json"
VOCAB_FILE = "vocab.json"
TEXT_FILE = "text.json"
ENCODEC_FILE = "encodec.safetensors"

# Input guards: they decide which inputs are rejected, never which codes an accepted input gets, so a saved set
# may be reused with other values.
_GUARD_KEYS = ("image.max_pixels", "speech.max_seconds")


@dataclass
class TextTokenizerConfig:
    kind: Literal["bpe", "hf"] = "bpe"
    path: str = ""              # kind=hf: the backbone's tokenizer.json (local or s3://)
    vocab_size: int = 512       # kind=bpe: upper bound of the trained vocabulary (256 bytes + merges)
    text_size: int = 0          # text rows the vocabulary reserves (the backbone's embedding rows); 0 = tokenizer size
    # Backbone whose trained special tokens (mask, eos, chat turns) the vocabulary reuses, e.g. "dream"
    # (model/vocab.py REUSED_SPECIALS); "" = our own special ids after the text range.
    reuse_specials: str = ""

    def __post_init__(self) -> None:
        from model.vocab import REUSED_SPECIALS

        if self.reuse_specials and self.reuse_specials not in REUSED_SPECIALS:
            raise ConfigError(f"text.reuse_specials={self.reuse_specials!r}: known backbones {sorted(REUSED_SPECIALS)}")
        if self.kind == "hf" and not self.path:
            raise ConfigError("text.path: text.kind=hf needs the path of the backbone's tokenizer.json")
        if self.kind == "bpe" and self.vocab_size <= 256:
            raise ConfigError(f"text.vocab_size={self.vocab_size}: a byte-level BPE needs more than 256 ids")
        if self.text_size < 0:
            raise ConfigError(f"text.text_size={self.text_size} must be >= 0")


@dataclass
class ImageTokenizerConfig:
    kind: Literal["pixel", "magvit2"] = "pixel"
    size: int = 8               # square side in pixels
    channels: int = 1           # 1 = grayscale, 3 = RGB
    levels: int = 17            # pixel: quantization levels per channel (17 = sklearn digits' 0..16)
    magvit2_preset: str = "public"
    weights: str = ""           # magvit2: path or s3:// of the weights
    random_init: bool = False   # magvit2: random weights (tests only)
    max_pixels: int = 50_000_000  # decompression-bomb guard, checked on the header before decoding

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"image.size={self.size} must be >= 1")
        if self.channels not in (1, 3):
            raise ConfigError(f"image.channels={self.channels} must be 1 or 3")
        if self.kind == "pixel" and not 2 <= self.levels <= 256:
            raise ConfigError(f"image.levels={self.levels} must be in [2, 256]")
        if self.max_pixels < 1:
            raise ConfigError(f"image.max_pixels={self.max_pixels} must be >= 1")


@dataclass
class SpeechTokenizerConfig:
    # "encodec" (default): waveforms -> EnCodec codes. "glm4voice": the reference's GLM-4-Voice codes, read
    # precomputed from messages lines (`speech_codes`); one codebook of 16,384 (model/tokenizers/glm4voice.py)
    kind: Literal["encodec", "glm4voice"] = "encodec"
    bandwidth: float = 1.5      # kbps: 1.5, 3, 6, 12, 24 -> 2, 4, 8, 16, 32 codebooks
    codebooks: int = 0          # keep the first N of those residual codebooks (0 = all)
    codebook_size: int = 1024   # codes per codebook; smaller (a power of two) only with weights=offline
    # encoder frames averaged into one code (75 a second): 3 = 25 codes a second; > 1 only with weights=offline
    frame_stride: int = 1
    # "offline" = random EnCodec + k-means codebooks fitted on the corpus (saved beside the shards);
    # "pretrained" = published weights from the torch hub cache; or a local/s3:// path to encodec_24khz-d7cc33bc.th
    weights: str = "offline"
    kmeans_iters: int = 1       # offline: EnCodec k-means iterations per codebook
    fit_samples: int = 64       # offline: waveforms the codebooks are fitted on
    max_seconds: float = 30.0   # longer audio is rejected (checked on the header before decoding)

    def __post_init__(self) -> None:
        from model.tokenizers.encodec_spec import BANDWIDTHS

        if self.bandwidth not in BANDWIDTHS:
            raise ConfigError(f"speech.bandwidth={self.bandwidth} must be one of {list(BANDWIDTHS)} (kbps)")
        if not self.weights:
            raise ConfigError("speech.weights is empty: use offline, pretrained, or a path to "
                              "encodec_24khz-d7cc33bc.th")
        if self.kmeans_iters < 1 or self.fit_samples < 1:
            raise ConfigError(f"speech.kmeans_iters={self.kmeans_iters} and speech.fit_samples={self.fit_samples} "
                              "must be >= 1")
        if self.max_seconds <= 0:
            raise ConfigError(f"speech.max_seconds={self.max_seconds} must be > 0")
        if self.kind == "glm4voice":
            return   # codes come precomputed: bandwidth, weights and codebooks do not apply
        from model.tokenizers.encodec_spec import (CODEBOOK_SIZE, check_codebook_size, check_codebooks,
                                                   check_frame_stride)

        try:
            check_codebooks(self.bandwidth, self.codebooks)
            check_codebook_size(self.codebook_size)
            check_frame_stride(self.frame_stride)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.frame_stride != 1 and self.weights != "offline":
            raise ConfigError(f"speech.frame_stride={self.frame_stride} needs speech.weights=offline: the published "
                              "codebooks are fitted on single encoder frames")
        if self.codebook_size != CODEBOOK_SIZE and self.weights != "offline":
            raise ConfigError(f"speech.codebook_size={self.codebook_size} needs speech.weights=offline: the published "
                              f"EnCodec has {CODEBOOK_SIZE} codes per codebook")


@dataclass
class TokenizerConfig:
    text: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    image: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    speech: SpeechTokenizerConfig = field(default_factory=SpeechTokenizerConfig)
    # How chats become ids (model/prompts.py), stored in vocab.json with the shards: "reference" for Dream-based
    # models (Omni-Diffusion's Qwen2 chat text), "compact" for models trained from scratch (the demo).
    prompt_format: PromptFormat = PromptFormat.COMPACT

    def __post_init__(self) -> None:
        self.prompt_format = PromptFormat(self.prompt_format)
        if self.prompt_format == PromptFormat.REFERENCE and self.text.text_size:
            raise ConfigError(f"text.text_size={self.text.text_size} with prompt_format=reference: the reference "
                              f"puts speech ids right after the text tokenizer's ids; set text.text_size=0")

    @classmethod
    def preset(cls, name: str) -> "TokenizerConfig":
        if name != "demo":
            raise ConfigError(f"unknown tokenizers preset {name!r}; presets: ['demo']")
        return default_tokenizer_config()


def default_tokenizer_config() -> TokenizerConfig:
    """The embedded CPU demo: a small BPE learned from the captions (512 is an upper bound; a digit corpus
    stops far below it), exact 8x8 grayscale pixels with sklearn digits' 17 levels, EnCodec at 1.5 kbps
    (2 codebooks) with codebooks fitted on the corpus, so nothing is downloaded."""
    return TokenizerConfig(
        text=TextTokenizerConfig(kind="bpe", vocab_size=512),
        image=ImageTokenizerConfig(kind="pixel", size=8, channels=1, levels=17),
        speech=SpeechTokenizerConfig(kind="encodec", bandwidth=1.5, weights="offline"),
    )


class TokenizerMismatch(ValueError):
    """A saved tokenizer set differs from what was asked for (config) or from what was recorded (fingerprints)."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(saved: TokenizerConfig, requested: TokenizerConfig) -> list[str]:
    """`key: saved X, requested Y` for each setting that changes the tokens (input guards excluded)."""
    a, b = _flatten(configlib.to_dict(saved)), _flatten(configlib.to_dict(requested))
    return [f"{k}: saved {a.get(k)!r}, requested {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if k not in _GUARD_KEYS and a.get(k) != b.get(k)]


def _text_name(cfg: TextTokenizerConfig) -> str:
    return f"bpe{cfg.vocab_size}" if cfg.kind == "bpe" else "hf"


def _build_image(cfg: ImageTokenizerConfig) -> ImageTokenizer:
    if cfg.kind == "magvit2":
        from model.tokenizers.magvit2 import build_magvit2  # heavy, optional: only when asked for

        return build_magvit2(cfg)
    from model.tokenizers.pixel import PixelTokenizer

    return PixelTokenizer.from_config(cfg)


# The vocabulary's fields each media tokenizer decides: Vocab field -> the tokenizer's attribute.
_MEDIA_FIELDS = {"image": {"image_codebook_size": "codebook_size", "image_tokenizer": "name"},
                 "speech": {"n_q": "n_q", "audio_codebook_size": "codebook_size", "speech_tokenizer": "name"}}


def _media_fields(modality: str, tok: Any) -> dict[str, Any]:
    return {field_: getattr(tok, attr) for field_, attr in _MEDIA_FIELDS[modality].items()}


class _Deferred:
    """A saved media tokenizer built on its first use (`TokenizerSet.load(lazy_media=True)`): a text or image
    tokenize actor builds no EnCodec (0.35 s and ~220 MB of peak RSS less per actor). Built, it must match its
    recorded fingerprint and the saved vocabulary, as an eager load checks."""

    def __init__(self, modality: str, build: Callable[[], Any], fingerprint: str | None, artifacts_dir: str):
        self.modality, self.build, self.fingerprint, self.artifacts_dir = modality, build, fingerprint, artifacts_dir

    def resolve(self, vocab: Vocab) -> Any:
        tok = self.build()
        if tok.fingerprint() != self.fingerprint:
            raise TokenizerMismatch(
                f"the {self.modality} tokenizer loaded from {self.artifacts_dir} differs from the one recorded in "
                f"{SET_FILE} (recorded {self.fingerprint!r}, loaded {tok.fingerprint()!r}): restore the original "
                "files or tokenize again into a new output.")
        built = dataclasses.replace(vocab, **_media_fields(self.modality, tok))
        vocab.check_same(built, what=f"saved vocabulary ({storage.join(self.artifacts_dir, VOCAB_FILE)})",
                         expected=f"loaded {self.modality} tokenizer")
        return tok


class TokenizerSet:
    """`.text`, `.image`, `.speech`, `.config`, `.vocab`. Build with `prepare` (fit + save) or `load`."""

    def __init__(self, config: TokenizerConfig, text: TextTokenizer, image: ImageTokenizer | _Deferred,
                 speech: SpeechTokenizer | _Deferred, *, saved: Vocab | None = None):
        """`image` and `speech` may be `_Deferred` (built on first use); their vocabulary fields then come from
        `saved`, the vocabulary saved with them."""
        self.config, self.text = config, text
        self._media: dict[str, Any] = {"image": image, "speech": speech}
        reuse = dict(REUSED_SPECIALS.get(config.text.reuse_specials, {}))
        if config.prompt_format == PromptFormat.REFERENCE:
            reuse = _reference_specials(text, reuse)
        media: dict[str, Any] = {}
        for name, tok in self._media.items():
            if isinstance(tok, _Deferred):
                assert saved is not None, "a deferred tokenizer takes its vocabulary fields from the saved vocabulary"
                media.update({k: getattr(saved, k) for k in _MEDIA_FIELDS[name]})
            else:
                media.update(_media_fields(name, tok))
        self.vocab = Vocab(text_size=text.size, text_tokenizer=text.name, text_fingerprint=text.fingerprint(),
                           reuse_specials=reuse, prompt_format=config.prompt_format, **media)

    def _resolved(self, modality: str) -> Any:
        tok = self._media[modality]
        if isinstance(tok, _Deferred):
            tok = self._media[modality] = tok.resolve(self.vocab)
        return tok

    @property
    def image(self) -> ImageTokenizer:
        return self._resolved("image")

    @property
    def speech(self) -> SpeechTokenizer:
        return self._resolved("speech")

    def fingerprints(self) -> dict[str, str]:
        return {"text": self.text.fingerprint(), "image": self.image.fingerprint(),
                "speech": self.speech.fingerprint()}

    def names(self) -> dict[str, str]:
        return {"text": self.text.name, "image": self.image.name, "speech": self.speech.name}

    # ---- prepare / save / load ----------------------------------------------------------------------------
    @classmethod
    def prepare(cls, cfg: TokenizerConfig, artifacts_dir: str, *, texts: Iterable[str] = (),
                wavs: Iterable[np.ndarray] = (), lazy_media: bool = False) -> "TokenizerSet":
        """Load the set saved in `artifacts_dir` (checking it was made with `cfg`), or fit and save a new one:
        BPE on `texts`, EnCodec codebooks on up to `speech.fit_samples` of `wavs` (float32 mono, 24 kHz).
        `lazy_media`: a saved set's image and speech tokenizers are built (and checked) on first use."""
        if storage.exists(storage.join(artifacts_dir, SET_FILE)):
            saved = cls.read_config(artifacts_dir)
            diff = config_diff(saved, cfg)
            if diff:
                raise TokenizerMismatch(
                    f"{storage.join(artifacts_dir, SET_FILE)} holds tokenizers prepared with another config ("
                    + "; ".join(diff) + "). Shards in this output were tokenized with the saved tokenizers: write to "
                    "a new output location, delete the old one, or set these keys back to the saved values.")
            return cls._load(artifacts_dir, cfg, lazy_media)

        if cfg.text.kind == "bpe":
            from model.tokenizers.text import HFTextTokenizer

            text = HFTextTokenizer.train_bpe(texts, cfg.text.vocab_size, text_size=cfg.text.text_size,
                                             name=_text_name(cfg.text))
        else:
            text = _build_text_from_path(cfg.text)
        if cfg.prompt_format == PromptFormat.REFERENCE:
            text = text.with_added_tokens(OMNI_ADDED_TOKENS)  # type: ignore[attr-defined]  # HFTextTokenizer
        image = _build_image(cfg.image)
        s = cfg.speech
        if s.kind == "encodec" and s.weights == "offline":
            from model.tokenizers.speech import EncodecTokenizer

            speech = EncodecTokenizer.fit_offline(
                list(itertools.islice(wavs, s.fit_samples)), bandwidth=s.bandwidth, codebooks=s.codebooks,
                codebook_size=s.codebook_size, kmeans_iters=s.kmeans_iters, fit_samples=s.fit_samples,
                max_seconds=s.max_seconds, frame_stride=s.frame_stride)
        else:
            speech = _build_speech(s, artifacts_dir)
        out = cls(cfg, text, image, speech)
        out.save(artifacts_dir)
        return out

    def save(self, artifacts_dir: str) -> None:
        j = lambda name: storage.join(artifacts_dir, name)  # noqa: E731
        self.text.save(j(TEXT_FILE))  # type: ignore[attr-defined]  # HFTextTokenizer
        files = {"text": TEXT_FILE}
        if self.config.speech.kind == "encodec" and self.config.speech.weights == "offline":
            self.speech.save_offline(j(ENCODEC_FILE))  # type: ignore[attr-defined]  # EncodecTokenizer
            files["speech"] = ENCODEC_FILE
        storage.write_text_atomic(j(VOCAB_FILE), self.vocab.to_json())
        record = {"format_version": FORMAT_VERSION, "config": configlib.to_dict(self.config),
                  "names": self.names(), "fingerprints": self.fingerprints(), "files": files,
                  "vocab_fingerprint": self.vocab.fingerprint()}
        # written last: a reader that finds tokenizers.json finds every file it lists
        storage.write_text_atomic(j(SET_FILE), json.dumps(record, indent=2, sort_keys=True))

    @classmethod
    def load(cls, artifacts_dir: str, *, lazy_media: bool = False) -> "TokenizerSet":
        """Restore a saved set; refuses files whose fingerprints differ from the recorded ones. `lazy_media`:
        the image and speech tokenizers are built, and checked, on first use (a step that reads only text)."""
        return cls._load(artifacts_dir, None, lazy_media)

    @staticmethod
    def read_record(artifacts_dir: str) -> dict[str, Any]:
        path = storage.join(artifacts_dir, SET_FILE)
        try:
            record = json.loads(storage.read_text(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"no tokenizer set at {artifacts_dir} ({SET_FILE} is missing): run the tokenize "
                                    "job first (it prepares <output>/tokenizers/), or point at its output") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}): delete the output and tokenize again") from None
        if record.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {record.get('format_version')!r} is not {FORMAT_VERSION}")
        return record

    @classmethod
    def read_config(cls, artifacts_dir: str) -> TokenizerConfig:
        record = cls.read_record(artifacts_dir)
        try:
            return configlib.from_dict(TokenizerConfig, record["config"])
        except (ConfigError, KeyError) as e:
            raise ValueError(f"{storage.join(artifacts_dir, SET_FILE)}: bad config section: {e}") from None

    @staticmethod
    def read_vocab(artifacts_dir: str) -> Vocab:
        """The saved vocabulary alone (no tokenizer is built): for steps that only need ids."""
        return Vocab.from_json(storage.read_text(storage.join(artifacts_dir, VOCAB_FILE)))

    @classmethod
    def _load(cls, artifacts_dir: str, requested: TokenizerConfig | None, lazy_media: bool = False
              ) -> "TokenizerSet":
        record = cls.read_record(artifacts_dir)
        cfg = cls.read_config(artifacts_dir)
        if requested is not None:  # same tokens (checked by the caller); the requested input guards apply
            cfg = requested
        from model.tokenizers.text import HFTextTokenizer

        text = HFTextTokenizer.from_file(storage.join(artifacts_dir, TEXT_FILE), cfg.text.text_size,
                                         name=_text_name(cfg.text))
        recorded = record.get("fingerprints", {})
        vocab_path = storage.join(artifacts_dir, VOCAB_FILE)
        saved_vocab = Vocab.from_json(storage.read_text(vocab_path))
        if lazy_media:
            out = cls(cfg, text, _Deferred("image", lambda: _build_image(cfg.image), recorded.get("image"),
                                           artifacts_dir),
                      _Deferred("speech", lambda: _build_speech(cfg.speech, artifacts_dir), recorded.get("speech"),
                                artifacts_dir), saved=saved_vocab)
            loaded = {"text": text.fingerprint()}
        else:
            out = cls(cfg, text, _build_image(cfg.image), _build_speech(cfg.speech, artifacts_dir))
            loaded = out.fingerprints()
        bad = [f"{k}: recorded {recorded.get(k)!r}, loaded {v!r}" for k, v in loaded.items() if recorded.get(k) != v]
        if bad:
            raise TokenizerMismatch(
                f"tokenizers loaded from {artifacts_dir} differ from those recorded in {SET_FILE} (" + "; ".join(bad)
                + "): a file was changed or different weights were found (e.g. another EnCodec checkpoint in the "
                "hub cache). Restore the original files or tokenize again into a new output.")
        saved_vocab.check_same(out.vocab, what=f"saved vocabulary ({vocab_path})", expected="loaded tokenizers")
        return out


def _build_text_from_path(cfg: TextTokenizerConfig) -> TextTokenizer:
    from model.tokenizers.text import HFTextTokenizer

    return HFTextTokenizer.from_file(cfg.path, cfg.text_size, name=_text_name(cfg))


def _reference_specials(text: TextTokenizer, reuse: dict[str, int]) -> dict[str, int]:
    """The ids of the REFERENCE format's specials in the text tokenizer, by the reference's token strings."""
    token_id = text.token_id  # type: ignore[attr-defined]  # HFTextTokenizer
    found = {name: token_id(REFERENCE_TOKEN_STRINGS[name]) for name in REFERENCE_SPECIALS}
    missing = [REFERENCE_TOKEN_STRINGS[n] for n, tid in found.items() if tid is None]
    if missing:
        raise ConfigError(f"prompt_format=reference needs the text tokenizer to hold {missing}: use the backbone's "
                          f"tokenizer.json (Dream's), or prompt_format=compact")
    clash = {n: (reuse[n], found[n]) for n in reuse if n in found and reuse[n] != found[n]}
    if clash:
        raise ConfigError(f"text.reuse_specials names ids that differ from the tokenizer's {clash}: leave "
                          f"text.reuse_specials empty with prompt_format=reference (the ids come from the tokenizer)")
    return {**reuse, **found}


def _build_speech(cfg: SpeechTokenizerConfig, artifacts_dir: str) -> SpeechTokenizer:
    from model.tokenizers.speech import EncodecTokenizer

    if cfg.kind == "glm4voice":
        from model.tokenizers.glm4voice import Glm4VoiceCodes

        return Glm4VoiceCodes()

    if cfg.weights == "offline":
        path = storage.join(artifacts_dir, ENCODEC_FILE)
        if not storage.exists(path):
            raise FileNotFoundError(f"{path} is missing (speech.weights=offline saves the fitted EnCodec there): "
                                    "tokenize again into a new output")
        return EncodecTokenizer.load_offline(path, bandwidth=cfg.bandwidth, codebooks=cfg.codebooks,
                                             codebook_size=cfg.codebook_size, max_seconds=cfg.max_seconds,
                                             frame_stride=cfg.frame_stride)
    return EncodecTokenizer.from_config(cfg)


__all__ = [
    "BadInput", "TextTokenizerConfig", "ImageTokenizerConfig", "SpeechTokenizerConfig", "TokenizerConfig",
    "TokenizerSet", "TokenizerMismatch", "default_tokenizer_config", "config_diff",
]
