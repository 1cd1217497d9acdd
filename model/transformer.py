"""The bidirectional transformer: one backbone for text, speech and image tokens, written for a single device.

Architecture (Llama / Qwen2 family, without the causal mask): token embedding -> n_layers x Block ->
RMSNorm -> output head. A Block is pre-norm grouped-query attention with RoPE, then a pre-norm SwiGLU MLP.
RoPE uses the rotate-half convention of HF Llama/Qwen2 (and LLaDA), so their checkpoints load unchanged
(model/weights.py maps the key names). Parallelism is applied from outside (model/parallelize.py).

Packed sequences. `segment_ids` (B, L) int: ids >= 1 mark real segments, 0 marks padding. A token attends only
to tokens of its own segment (padding attends only to padding, so no attention row is empty), and RoPE
positions restart at 0 at the first token of every segment, so a segment packed anywhere in a row sees exactly
what it would see alone. Segments must be contiguous runs within a row.

Logit convention. `forward` always returns *aligned* logits: position i holds the prediction for token i.
 - cfg.logits == "aligned" (LLaDA): the network's output at i predicts token i; returned as is.
 - cfg.logits == "shifted" (Dream): the backbone kept its autoregressive habit, its raw output at i predicts
   token i+1. We re-align as Dream's own `generate` does: out[i] = raw[i-1], and out at the first token of a
   sequence (of every segment when packed) = raw there. The loss and the sampler therefore never need to know
   which backbone they talk to.

Cached decoding. `forward(kv=KVCache())` also records every layer's keys and values; `forward(kv=, window=(a,
b))` then runs columns [a, b) alone against them, through the same attention (model/kvcache.py; the sampler's
`kv_cache` option).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.configlib import ConfigError
from model.config import ModelConfig
from model.kvcache import KVCache, LayerKV


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as HF Llama/Qwen2 do, so bf16 outputs match theirs.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, L) int -> cos, sin (B, 1, L, head_dim) fp32, in the rotate-half layout (both halves of
    the head share frequency j at indices j and j + head_dim/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))                          # (D/2,)
    angles = positions.float()[..., None] * inv_freq                 # (B, L, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]            # (B, 1, L, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D); rotate-half RoPE: x*cos + rotate_half(x)*sin with rotate_half(x) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def positions_and_mask(segment_ids: torch.Tensor | None, B: int, L: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """-> positions (B, L) int64, attention mask (B, 1, L, L) bool or None, segment starts (B, L) bool or None.

    Positions restart at every segment start: index minus the index of the run's first token, found with a
    running max over start indices (vectorised over rows)."""
    idx = torch.arange(L, device=device).expand(B, L)                # (B, L)
    if segment_ids is None:
        return idx, None, None
    if segment_ids.shape != (B, L):
        raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected input_ids' {(B, L)}")
    starts = torch.ones(B, L, dtype=torch.bool, device=device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    run_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    positions = idx - run_start
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # (B, 1, L, L)
    return positions, mask, starts


def media_index(input_ids: torch.Tensor, starts: torch.Tensor | None, markers: tuple[int, int, int, int],
                max_positions: int) -> torch.Tensor:
    """input_ids (B, L) -> (B, L) int64 row of the media position table: 0 outside media spans, 1..M for the
    k-th token after <boi>, M+1..2M for the k-th token after <boa> (k clamped to M = max_positions).

    A span is everything after an opening bracket up to the next bracket or segment start, so a generation
    canvas that is still all mask tokens after the prompt's <boi>/<boa> gets the same indices as the clean
    answer it will become. `starts` (B, L) bool marks segment starts of packed rows (None = one segment)."""
    boi, eoi, boa, eoa = markers
    B, L = input_ids.shape
    idx = torch.arange(L, device=input_ids.device).expand(B, L)                    # (B, L)
    bracket = (input_ids == boi) | (input_ids == eoi) | (input_ids == boa) | (input_ids == eoa)
    event = bracket if starts is None else bracket | starts
    # Index of the last event strictly before each position (-1 if none): running max, shifted right by one.
    last = torch.where(event, idx, torch.full_like(idx, -1)).cummax(dim=1).values  # (B, L)
    last = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)      # (B, L)
    opener = input_ids.gather(1, last.clamp(min=0))                                 # (B, L) id at that event
    inside = (last >= 0) & ~bracket
    if starts is not None:
        inside &= ~starts
    k = (idx - last).clamp(max=max_positions)                                       # (B, L) 1-based offset
    row = torch.where(opener == boi, k, torch.where(opener == boa, k + max_positions, torch.zeros_like(k)))
    return torch.where(inside & ((opener == boi) | (opener == boa)), row, torch.zeros_like(row))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv: LayerKV | None = None, start: int | None = None) -> torch.Tensor:
        """x (B, L, dim) -> (B, L, dim). kv: this layer's cache; a full forward (start None) fills it with its
        keys and values; with `start`, x holds the columns [start, start + L) of a longer cached sequence: their
        keys and values replace the cached ones there and the queries attend over the whole cache (mask then
        (B, 1, L, L_cache))."""
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, L, D)
        k = self.wk(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.wv(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.merge(k, v, start)                                              # (B, Hkv, L_cache, D)
        rep = self.n_heads // self.n_kv_heads
        if mask is None:
            # No mask: flash attention takes grouped K/V directly.
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=rep > 1)
        else:
            # With a mask, repeat K/V to all heads so the memory-efficient kernel (which takes masks) applies
            # on every backend instead of the L x L math fallback.
            if rep > 1:
                k = k.repeat_interleave(rep, dim=1)                                   # (B, H, L_kv, D)
                v = v.repeat_interleave(rep, dim=1)                                   # (B, H, L_kv, D)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)        # (B, L, H * D)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg.dim, cfg.hidden_dim)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv: LayerKV | None = None, start: int | None = None) -> torch.Tensor:
        # F.dropout is the identity when p == 0 or in eval mode; activation checkpointing replays the same RNG
        h = x + F.dropout(self.attn(self.attn_norm(x), cos, sin, mask, kv, start), self.dropout, self.training)
        return h + F.dropout(self.mlp(self.mlp_norm(h)), self.dropout, self.training)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None,
                 media_markers: tuple[int, int, int, int] | None = None) -> None:
        """media_markers: `Vocab.media_markers` (boi, eoi, boa, eoa); needed to run forward when
        cfg.media_positions > 0 (building the model for its shapes alone does not need them)."""
        super().__init__()
        if cfg.vocab_size:
            # The config's row count wins; it may exceed the vocabulary (unused padding rows), never fall short.
            if vocab_size and vocab_size > cfg.vocab_size:
                raise ConfigError(
                    f"model.vocab_size={cfg.vocab_size} rows cannot hold the vocabulary's {vocab_size} ids; set "
                    f"model.vocab_size=0 to take the vocabulary's size, or a value >= {vocab_size}")
            vocab_size = cfg.vocab_size
        if not vocab_size:
            raise ConfigError("model.vocab_size is 0 and no vocab_size was given: pass the vocabulary's size "
                              "(Vocab.size) to Transformer(cfg, vocab_size=...) or set model.vocab_size")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        self.media_markers = tuple(media_markers) if media_markers is not None else None
        # Row 0 (outside media) is never looked up for the sum (masked out), so it stays an unused row.
        self.media_pos = nn.Embedding(2 * cfg.media_positions + 1, cfg.dim) if cfg.media_positions else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied models reuse tok_embeddings.weight as the head, so there is no `output` module to shard or save.
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) everywhere; the projections that write into the residual stream (attn.wo,
        mlp.w2) get init_std / sqrt(2 * n_layers) so the residual's variance does not grow with depth
        (GPT-2 / nanoGPT). Biases 0, norms 1. Works on meta, real and sharded (DTensor) parameters."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if self.media_pos is not None:
            nn.init.normal_(self.media_pos.weight, std=std)
        for block in self.layers:
            for lin in (block.attn.wq, block.attn.wk, block.attn.wv, block.mlp.w1, block.mlp.w3):
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.normal_(block.attn.wo.weight, std=out_std)
            nn.init.normal_(block.mlp.w2.weight, std=out_std)
            block.attn_norm.reset_parameters()
            block.mlp_norm.reset_parameters()
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None, *,
                only: torch.Tensor | None = None, vocab_rows: torch.Tensor | None = None,
                kv: KVCache | None = None, window: tuple[int, int] | None = None) -> torch.Tensor:
        """input_ids (B, L) int64, segment_ids (B, L) int or None -> aligned logits (B, L, V) float32.
        See the module docstring for the segment and logit conventions.

        only: optional (B, L) bool; then the output head runs at those positions alone and the result is
        (N, V) float32, rows in `only.nonzero()` order (row-major). The loss needs logits at masked positions
        and the sampler at canvas positions only; the head is V x dim per position, so skipping the rest
        saves a large share of a small model's FLOPs.
        vocab_rows: optional (C,) int64 ids; the head then computes only those rows' logits, (..., C) with column
        j = id vocab_rows[j]. The sampler passes the ids its canvas may emit (8,192 image codes of 176k ids).
        kv: a `model.kvcache.KVCache`; without `window` this forward (re)fills it with every layer's keys and
        values; with window=(a, b) only the columns [a, b) of input_ids run (at their true RoPE positions, with
        the segment mask's rows of those columns), against the cached keys and values of the others, and the
        result is (B, b - a, V) logits of those columns, or (N, V) at `only` (which must lie inside the window).
        A "shifted" model also runs column a - 1, whose raw output is column a's aligned logit."""
        B, L = input_ids.shape
        positions, mask, starts = positions_and_mask(segment_ids, B, L, input_ids.device)
        media = None
        if self.media_pos is not None:
            if self.media_markers is None:
                raise ValueError("model.media_positions > 0 but the model was built without media_markers: "
                                 "pass Transformer(..., media_markers=vocab.media_markers)")
            media = media_index(input_ids, starts, self.media_markers, self.cfg.media_positions)  # (B, L)
        start, window_shape = None, None
        if window is not None:
            window_shape = (B, window[1] - window[0]) if only is None else None   # whole window: (B, Lw, V)
            only, start = self._window(window, only, kv, B, L)
            cols = slice(start, window[1])
            input_ids, positions = input_ids[:, cols], positions[:, cols]          # (B, Lw)
            media = None if media is None else media[:, cols]                       # (B, Lw)
            starts = None if starts is None else starts[:, cols]                    # (B, Lw)
            mask = None if mask is None else mask[:, :, cols]                       # (B, 1, Lw, L)
            B, L = input_ids.shape
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        h = self.tok_embeddings(input_ids)                                  # (B, L, dim)
        if media is not None:
            h = h + self.media_pos(media) * (media > 0)[..., None].to(h.dtype)
        for i, block in enumerate(self.layers):
            h = block(h, cos, sin, mask, None if kv is None else kv.layer(i), start)
        h = self.norm(h)
        head = self.tok_embeddings.weight if self.output is None else self.output.weight
        if vocab_rows is not None:
            head = head[vocab_rows]                                         # (C, dim)
        if only is not None:
            if only.shape != (B, L):
                raise ValueError(f"only has shape {tuple(only.shape)}, expected input_ids' {(B, L)}")
            rows, cols = only.nonzero(as_tuple=True)                         # (N,), (N,)
            if self.cfg.logits == "shifted":
                # aligned out[i] = raw[i-1], except at a sequence's (segment's) first token: raw there
                first = cols + (start or 0) == 0 if starts is None else starts[rows, cols]
                cols = torch.where(first, cols, cols - 1)
            out = F.linear(h[rows, cols], head).float()                      # (N, V)
            return out if window_shape is None else out.view(*window_shape, -1)  # (B, b - a, V)
        raw = F.linear(h, head).float()                                     # (B, L, V)
        if self.cfg.logits == "aligned":
            return raw
        shifted = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)               # (B, L, V): out[i] = raw[i-1]
        if starts is None:
            return shifted
        # Within a packed row, a segment's first token must not read the previous segment's last output.
        return torch.where(starts[..., None], raw, shifted)

    def _window(self, window: tuple[int, int], only: torch.Tensor | None, kv: KVCache | None, B: int,
                L: int) -> tuple[torch.Tensor, int]:
        """Check a cached forward's window -> (only over the columns that run (B, Lw), first column run)."""
        a, b = window
        if kv is None or not kv.filled or kv.length != L:
            raise ValueError(f"window={window} needs kv= a KVCache filled by a full forward over these {L} "
                             f"columns (cached: {0 if kv is None else kv.length})")
        if not 0 <= a < b <= L:
            raise ValueError(f"window={window} must satisfy 0 <= a < b <= {L}")
        if only is None:
            only = torch.zeros(B, L, dtype=torch.bool, device=kv.layers[0].k.device)
            only[:, a:b] = True
        elif only.shape != (B, L) or bool(only[:, :a].any()) or bool(only[:, b:].any()):
            raise ValueError(f"only must be (B, L) = {(B, L)} and True inside window={window} alone")
        start = a - 1 if self.cfg.logits == "shifted" and a > 0 else a   # raw[a - 1] is a's aligned logit
        return only[:, start:b], start

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count; exclude_embedding drops the input embedding table (a lookup, not a matmul).
        Counts the logical (unsharded) size, also on the meta device and under FSDP."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and self.output is not None:
            n -= self.tok_embeddings.weight.numel()
        if exclude_embedding and self.media_pos is not None:
            n -= self.media_pos.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Model FLOPs per token (the PaLM appendix B / nanoGPT MFU estimate): 2N per token forward for the
        matmul parameters N (all but the embedding lookup) plus the attention scores and values,
        2 * 2 * n_layers * dim * seq_len forward; training (forward + backward) is 3x forward, i.e.
        6N + 12 * n_layers * dim * seq_len. Attention is bidirectional, so the full L x L is counted."""
        L = self.cfg.seq_len if seq_len is None else seq_len
        forward = 2 * self.num_params(exclude_embedding=True) + 4 * self.cfg.n_layers * self.cfg.dim * L
        return float(3 * forward if training else forward)
