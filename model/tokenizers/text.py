"""Text tokenizer: a thin wrapper over the HF `tokenizers` library.

Two sources, one class:
- `HFTextTokenizer.from_file(tokenizer.json)`: the backbone's own tokenizer (e.g. Dream's Qwen2 BPE), so text ids
  are the rows of the backbone's embedding. `text_size` reserves all of those rows (Dream has 152,064 rows for a
  151,665-token tokenizer); the vocabulary's text range is then `text_size` long.
- `HFTextTokenizer.train_bpe(texts, vocab_size)`: a small byte-level BPE learned in-process from the corpus, for
  the CPU demo and tests. The tokenize job saves it as `text.json` beside the shards, and every later step loads
  that file, so training, sampling and evaluation use the same merges.

Byte-level means every UTF-8 string encodes (no unknown token) and decode(encode(s)) == s for a trained BPE. A
backbone tokenizer may normalize (Qwen2 applies NFC), so there the round trip holds for normalized text.

Our special tokens and media placeholders are never text: model/prompts.py splits placeholders out before calling
`encode`, and the tokenizer's own special tokens (e.g. a literal "<|im_start|>" typed by a user) are encoded as
plain text, so user content cannot forge a chat turn.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from common import storage
from model.tasks import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER


def _normalized_json(tok: Tokenizer) -> str:
    """Canonical JSON of a tokenizer: key order and whitespace of the file do not change the fingerprint."""
    return json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class HFTextTokenizer:
    """Implements `model.tokenizers.base.TextTokenizer`."""

    def __init__(self, tokenizer: Tokenizer, *, name: str, text_size: int = 0, source: str = ""):
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        if text_size and text_size < n:
            raise ValueError(
                f"text.text_size={text_size} is smaller than the text tokenizer{f' {source}' if source else ''} "
                f"({n} tokens): set text.text_size to 0 (= tokenizer size) or to the backbone's embedding rows "
                f"(>= {n})")
        # Special tokens typed inside user text stay text (see module docstring).
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.name = name
        self._size = text_size or n
        self._fingerprint = hashlib.sha256(_normalized_json(tokenizer).encode()).hexdigest()[:16]

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str, text_size: int = 0, name: str = "hf") -> "HFTextTokenizer":
        """Load a `tokenizer.json` (local path or s3://)."""
        try:
            text = storage.read_text(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"text tokenizer file {path} does not exist: set text.path to the backbone's tokenizer.json") from None
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise ValueError(f"{path} is not a HF tokenizers JSON file: {e}") from None
        return cls(tok, name=name, text_size=text_size, source=path)

    @classmethod
    def from_json(cls, text: str, text_size: int = 0, name: str = "hf") -> "HFTextTokenizer":
        return cls(Tokenizer.from_str(text), name=name, text_size=text_size)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 512, *, min_frequency: int = 1, text_size: int = 0,
                  name: str | None = None) -> "HFTextTokenizer":
        """Learn a byte-level BPE from `texts`. `vocab_size` is an upper bound (256 bytes + merges): on a tiny
        corpus training stops when no pair is left to merge. `min_frequency=1` lets a word seen once still
        become one token, so a corpus of a few hundred captions ("the digit seven") gets whole-word tokens."""
        texts = [t for t in texts if t]
        if not texts:
            raise ValueError("text.kind=bpe needs a text corpus to learn from, got no texts: pass the corpus texts "
                             "to TokenizerSet.prepare(..., texts=...) or use text.kind=hf with text.path")
        if vocab_size < 257:
            raise ValueError(f"text.vocab_size={vocab_size}: a byte-level BPE needs > 256 (the 256 byte tokens)")
        tok = Tokenizer(models.BPE())
        # No normalizer: the round trip must be exact. add_prefix_space=False keeps "seven" and " seven" distinct
        # and decode(encode(s)) == s.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False, special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes even if unseen: any text encodes
        tok.train_from_iterator(texts, trainer)
        return cls(tok, name=name or f"bpe{vocab_size}", text_size=text_size)

    def with_added_tokens(self, tokens: Iterable[str]) -> HFTextTokenizer:
        """A copy with `tokens` appended as special tokens, in order, those already present skipped (as HF's
        `add_tokens` does): the reference's multimodal tokens on Dream's tokenizer (model/vocab.py
        OMNI_ADDED_TOKENS) get the ids the reference gives them."""
        tok = Tokenizer.from_str(self._tok.to_str())
        new = [t for t in tokens if tok.token_to_id(t) is None]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        return HFTextTokenizer(tok, name=self.name, text_size=0 if self._size == self.tokenizer_size else self._size)

    def token_id(self, token: str) -> int | None:
        """The id of a token string of the vocabulary or its added tokens (None when absent)."""
        return self._tok.token_to_id(token)

    def save(self, path: str) -> None:
        """Write the tokenizer JSON (local or s3://) atomically."""
        storage.write_text_atomic(path, self.to_json())

    def to_json(self) -> str:
        return self._tok.to_str(pretty=True)

    # ---- TextTokenizer protocol ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def tokenizer_size(self) -> int:
        """Ids the tokenizer itself can produce (<= size)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no BOS/EOS from a post-processor; prompts.py places our own markers.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts in one call into the Rust library (its threads: RAYON_NUM_THREADS)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        # Ids in the reserved rows beyond the tokenizer (possible in sampled output) are dropped, not an error.
        n = self.tokenizer_size
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return self._fingerprint

    def __repr__(self) -> str:
        return f"HFTextTokenizer(name={self.name!r}, size={self.size}, fingerprint={self._fingerprint})"


_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(AUDIO_PLACEHOLDER)})")


def text_pieces(messages: list[dict]) -> Iterator[str]:
    """The text between media placeholders of every message: what a chat layout asks the text tokenizer for."""
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            yield from (p for p in _PLACEHOLDERS.split(content) if p and p not in (IMAGE_PLACEHOLDER,
                                                                                      AUDIO_PLACEHOLDER))


class PreEncodedText:
    """A text tokenizer that answers `encode` from one `encode_batch` call over texts known in advance (a UDF
    batch's text pieces), so a batch crosses into the Rust library once instead of once per piece. A text not
    in the batch is encoded on its own (and kept): the ids are the same either way."""

    def __init__(self, tok: HFTextTokenizer, texts: Iterable[str]):
        unique = list(dict.fromkeys(texts))
        self._tok = tok
        self._ids = dict(zip(unique, tok.encode_batch(unique))) if unique else {}
        self.size = tok.size

    def encode(self, text: str) -> list[int]:
        ids = self._ids.get(text)
        if ids is None:   # kept: the reference turn layout asks for "\n" and the role names in every sample
            ids = self._ids[text] = self._tok.encode(text)
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def fingerprint(self) -> str:
        return self._tok.fingerprint()
