"""Block-wise key/value cache for the sampler (Fast-dLLM, Wu et al. 2025, §3.2).

A full forward with a `KVCache` records every layer's keys and values (after RoPE) for the whole sequence. A
later forward over a *window* of columns [a, b) computes fresh queries, keys and values for those columns alone,
writes the keys and values into the cache at [a, b) and attends over the whole cached sequence. The window's
logits are exact when no token outside it changed since the fill; in the sampler the prompt and the finished
blocks do not change, but attention is bidirectional, so their cached keys and values are those of the
*previous* canvas (before the current block's tokens were unmasked): Fast-dLLM's approximation, refreshed by a
full forward at every block boundary.

`decode_window` says which columns a step runs for each cache mode:
    prefix  the current block and everything after it (the still-masked suffix) run each step; the prompt and
            the finished blocks come from the cache
    dual    the current block alone runs; the prompt, the finished blocks and the masked suffix come from the
            cache (the suffix's keys and values are those of the block's first step)
"""
from __future__ import annotations

import torch

from model.sampler_options import CacheMode


class LayerKV:
    """One layer's keys and values (B, Hkv, L, D) of the last full forward, updated in place by windows."""
    __slots__ = ("k", "v")

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def merge(self, k: torch.Tensor, v: torch.Tensor, start: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """start None: a full forward, (re)fill with k, v (B, Hkv, L, D). Else write the window's k, v
        (B, Hkv, Lw, D) at columns [start, start + Lw) and return the whole sequence's keys and values."""
        if start is None:
            self.k, self.v = k, v
            return k, v
        if self.k is None or self.v is None:
            raise ValueError("a windowed forward needs a KVCache filled by a full forward first")
        if self.k.shape[0] != k.shape[0] or start < 0 or start + k.shape[2] > self.k.shape[2]:
            raise ValueError(f"window of {k.shape[2]} columns at {start} (batch {k.shape[0]}) does not fit the "
                             f"cache of {self.k.shape[2]} columns (batch {self.k.shape[0]})")
        self.k[:, :, start:start + k.shape[2]] = k
        self.v[:, :, start:start + v.shape[2]] = v
        return self.k, self.v


class KVCache:
    """Every layer's `LayerKV`; `Transformer.forward(..., kv=cache)` fills it, `window=(a, b)` reads it."""

    def __init__(self) -> None:
        self.layers: list[LayerKV] = []

    def layer(self, i: int) -> LayerKV:
        """Layer i's slot (created on first use, so the cache needs no model shape)."""
        while len(self.layers) <= i:
            self.layers.append(LayerKV())
        return self.layers[i]

    @property
    def filled(self) -> bool:
        return bool(self.layers) and all(layer.k is not None for layer in self.layers)

    @property
    def length(self) -> int:
        """Columns cached (0 before the first full forward)."""
        k = self.layers[0].k if self.layers else None
        return 0 if k is None else k.shape[2]


def decode_window(mode: CacheMode, lo: int, hi: int, length: int) -> tuple[int, int]:
    """Columns [a, b) of a cached in-block step: the current block [lo, hi) of a sequence of `length` columns,
    and with mode "prefix" everything after it too."""
    if mode not in ("prefix", "dual"):
        raise ValueError(f"kv_cache={mode!r}; a windowed step needs 'prefix' or 'dual'")
    return (lo, length) if mode == "prefix" else (lo, hi)


def window_cost(window: tuple[int, int] | None, length: int) -> float:
    """A forward's share of a full forward over `length` columns, counted in query columns (the matmuls and
    the attention scores both scale with them): 1.0 for a full forward."""
    return 1.0 if window is None else (window[1] - window[0]) / length
