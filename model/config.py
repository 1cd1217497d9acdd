"""Model shape and behaviour: one typed dataclass with named presets (`ModelConfig.preset("demo")`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from common.configlib import ConfigError


@dataclass
class ModelConfig:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 172              # SwiGLU inner size
    vocab_size: int = 0                # embedding rows; 0 = take the vocabulary's size when the model is built
    seq_len: int = 512                 # longest sequence (RoPE table length)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qkv_bias: bool = False             # Qwen2 (Dream) has biases on q/k/v projections
    tie_embeddings: bool = False
    # Dream keeps the AR convention: the logit at position i predicts token i+1 ("shifted"); LLaDA predicts
    # token i at position i. Loading a backbone must keep its convention.
    logits: Literal["shifted", "aligned"] = "aligned"
    init_std: float = 0.02
    # Key layout for pretrained weights: "dream" (Qwen2/HF) or "llada".
    weights_layout: Literal["dream", "llada"] = "dream"
    # Learned embedding of a token's index inside its image or audio span (1st pixel, 2nd pixel, ...), added to
    # the token embedding, for up to this many positions per span (later ones share the last row); 0 = off.
    # RoPE alone only gives relative offsets, so a small model from scratch needs many samples to learn which
    # pixel a token is; the pretrained backbones (Dream, LLaDA) have no such table and keep it at 0.
    media_positions: int = 0
    # Dropout on each block's attention and MLP outputs before they join the residual stream, in training only
    # (model.train()). A small model on a small corpus memorises its training set; the backbones use 0.
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.media_positions < 0:
            raise ConfigError(f"model.media_positions={self.media_positions} must be >= 0 (0 = off)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"model head_dim={self.dim // self.n_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        try:
            return dataclasses.replace(_PRESETS[name])
        except KeyError:
            raise ConfigError(f"unknown model preset {name!r}; presets: {sorted(_PRESETS)}") from None

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(_PRESETS)


_PRESETS: dict[str, ModelConfig] = {
    # < 2M parameters with the demo vocabulary: unit tests, CPU, seconds.
    "debug": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172, seq_len=512),
    # CPU demo on 2 cores: trains the digit corpus in minutes.
    "demo": ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=688, seq_len=512),
    # A 1B-class model for small GPU runs (Llama-3.2-1B shape).
    "1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab_size=176264,
                      seq_len=4096, norm_eps=1e-5, rope_theta=500000.0),
    # The reference backbone: Dream-v0-7B = Qwen2.5-7B shape, vocabulary extended to 176,264 rows.
    "dream-7b": ModelConfig(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18944, vocab_size=176264,
                            seq_len=4096, norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True,
                            tie_embeddings=False, logits="shifted", weights_layout="dream"),
    # LLaDA-8B (LLaMA-3-like, full multi-head attention), base vocabulary 126,464.
    "llada-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=12288, vocab_size=126464,
                            seq_len=4096, norm_eps=1e-5, rope_theta=500000.0, qkv_bias=False,
                            tie_embeddings=False, logits="aligned", weights_layout="llada"),
}
