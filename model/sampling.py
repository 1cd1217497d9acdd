"""Reverse process: fill a fully masked canvas after the prompt in `steps` model calls (LLaDA / Dream sampler).

One batched function, `generate`, whose keyword arguments are its configuration, and a few small helpers
(the unmask schedules, the logit filters and penalties, confidence scores, position selection, adaptive output
lengths). No per-row Python loop: every row of a batch shares the canvas layout, so each step unmasks the same
number of positions per row (with `unmask_threshold`, each row as many as pass it). `kv_cache` reuses keys and
values across a block's steps (model/kvcache.py).

Its defaults are this project's sampler; options select the reference Omni-Diffusion / Dream rules one by one
(`schedule="dream"`, `filter_greedy`, `top_k`, `position_penalty_on="logits"`, `alg="origin"` and
`"entropy-penalty"`, `alg_temp`, `ties="first"`; docs/fidelity.md lists them with the tests that prove them).
Per step: logits -> guidance -> allowed ids -> temperature -> top-p, top-k -> repetition and position penalties
-> probabilities -> tokens and confidence -> which positions to unmask.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from model.kvcache import KVCache, decode_window
from model.sampler_options import (ALGS, CACHE_MODES, FLOORS, SCHEDULES, Alg, CacheMode, Floor,
                                   PenaltyOn, Schedule, Ties)
from model.vocab import Modality, Vocab


class Block(NamedTuple):
    """One of `generate`'s explicit blocks: `length` canvas positions filled in `steps` model calls, with its own
    temperature and cfg_scale (None = generate's)."""
    length: int
    steps: int
    temperature: float | None = None
    cfg_scale: float | None = None


# ---- schedule and lengths -----------------------------------------------------------------------------------

def num_transfer_tokens(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Linear schedule: how many masked positions to unmask at each step so all are filled after `steps`.

    mask_count: (B,) int masked positions per row -> (B, steps) int64; base = n // steps per step, the
    remainder n % steps spread one each over the first steps (LLaDA's schedule). Rows sum to mask_count."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    mask_count = mask_count.long()
    base = mask_count // steps
    rem = mask_count % steps
    extra = torch.arange(steps, device=mask_count.device)[None, :] < rem[:, None]  # (B, steps)
    return base[:, None] + extra.long()


def dream_timesteps(steps: int, eps: float = 1e-3, device: torch.device | None = None) -> torch.Tensor:
    """Dream's time grid for one block: linspace(1, eps, steps + 1) in fp32; step i runs from t = grid[i] to
    s = grid[i + 1]."""
    if steps < 1 or not 0 < eps < 1:
        raise ValueError(f"steps={steps} must be >= 1 and eps={eps} in (0, 1)")
    return torch.linspace(1, eps, steps + 1, device=device)


def dream_transfer_count(n_masked: torch.Tensor, step: int, steps: int, eps: float = 1e-3) -> torch.Tensor:
    """Dream's schedule (reference Omni-Diffusion / Dream `_sample`): of the n still-masked positions of a
    block, unmask k = max(1, floor(n (1 - s/t))) at step `step` < steps - 1 and all n at the last step.

    n_masked: (B,) int -> (B,) int64. Unlike the reference, k never exceeds n (the reference still unmasks one
    position, outside the block, when its block is already full)."""
    grid = dream_timesteps(steps, eps, n_masked.device)
    t, s = grid[step], grid[step + 1]
    n = n_masked.long()
    k = (n * (1 - s / t)).long() if step < steps - 1 else n   # int64 * fp32 -> fp32, truncated as int() does
    return torch.minimum(k.clamp(min=1), n)


def reveal_probability(step: int, steps: int, eps: float = 1e-3) -> float:
    """alg="origin": each still-masked position is revealed with probability 1 - s/t at step `step`, all of them
    at the last step (Dream's original sampler)."""
    if step == steps - 1:
        return 1.0
    grid = dream_timesteps(steps, eps)
    return float(1 - grid[step + 1] / grid[step])


def asr_length(n_speech_tokens: int, ratio: float = 0.2, multiple: int = 1) -> int:
    """Canvas length for a transcript of `n_speech_tokens` speech ids (text is ~5x shorter than EnCodec ids),
    rounded up to `multiple` (e.g. the block length)."""
    return _round_up(max(1, math.ceil(n_speech_tokens * ratio)), multiple)


def tts_length(n_text_tokens: int, ratio: float = 3.5, multiple: int = 1) -> int:
    """Canvas length for speech from `n_text_tokens` text ids, rounded up to `multiple` (use n_q so the canvas
    holds whole frames, or the block length)."""
    return _round_up(max(1, math.ceil(n_text_tokens * ratio)), multiple)


def default_steps(length: int, tokens_per_step: int = 2) -> int:
    """Steps for a canvas of `length`: `length // 2` by default (two tokens per model call)."""
    return max(1, length // tokens_per_step)


def block_spans(gen_length: int, steps: int, block_length: int | None = None,
                blocks: Sequence[tuple] | None = None) -> list[tuple[int, int, Block]]:
    """The canvas blocks `generate` fills left to right, as [(start, end, Block), ...]: equal blocks of
    `block_length` sharing `steps` evenly (None = one block), or the explicit `blocks` ((length, steps) pairs or
    `Block`s)."""
    G = gen_length
    if blocks is not None:
        if block_length is not None:
            raise ValueError("pass either block_length or blocks to generate, not both")
        blocks = [Block(*b) for b in blocks]
        if not blocks or any(b.length < 1 or b.steps < 1 for b in blocks) or sum(b.length for b in blocks) != G \
                or sum(b.steps for b in blocks) != steps:
            raise ValueError(f"blocks={[tuple(b[:2]) for b in blocks]} must be (length >= 1, steps >= 1) whose "
                             f"lengths sum to gen_length={G} and steps to steps={steps}")
        ends = [sum(b.length for b in blocks[:i + 1]) for i in range(len(blocks))]
        return [(end - b.length, end, b) for end, b in zip(ends, blocks)]
    block_length = block_length or G
    if G < 1 or G % block_length:
        raise ValueError(f"gen_length={G} must be a positive multiple of block_length={block_length}")
    num_blocks = G // block_length
    if steps < 1 or steps % num_blocks:
        raise ValueError(f"steps={steps} must be a positive multiple of the number of blocks "
                         f"gen_length/block_length = {num_blocks}; change steps or block_length")
    per_block = Block(block_length, steps // num_blocks)
    return [(b * block_length, (b + 1) * block_length, per_block) for b in range(num_blocks)]


def _round_up(n: int, multiple: int) -> int:
    if multiple < 1:
        raise ValueError(f"multiple={multiple} must be >= 1")
    return -(-n // multiple) * multiple


# ---- per-step pieces ----------------------------------------------------------------------------------------

def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter on the last dim: keep the smallest set of ids whose probability reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p   # mass BEFORE this id already reaches top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits on the last dim (ties with the k-th kept), the rest -inf."""
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]   # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def penalize(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """CTRL-style penalty: divide non-negative values by `factor`, multiply negative ones (both lower them for a
    factor > 1). Used for the repetition penalty and the position penalty, on logits or on confidences."""
    return torch.where(x >= 0, x / factor, x * factor)


def select_positions(conf: torch.Tensor, k: torch.Tensor, alg_temp: float = 0.0,
                     generator: torch.Generator | None = None, ties: Ties = "topk") -> torch.Tensor:
    """Which positions to unmask: conf (B, N) with -inf at non-candidates, k (B,) -> (B, N) bool, k per row.

    alg_temp = 0: the k most confident; > 0: k drawn without replacement from softmax(conf / alg_temp)
    (reference `alg_temp`), by Gumbel top-k, which draws exactly that distribution. ties: among equal scores,
    "topk" keeps torch.topk's order (unspecified, depends on the tensor's layout), "first" the earlier position.
    Ties are common at temperature 0 under top-p (a one-token nucleus: confidence 1, entropy 0) and in
    untrained models."""
    k_max = int(k.max())
    scores = conf
    if alg_temp > 0:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(conf.shape, generator=generator, device=gen_device).to(conf.device)
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1 - 1e-7)))
        scores = conf / alg_temp + gumbel
    if ties == "first":
        top = scores.sort(dim=-1, descending=True, stable=True).indices[:, :k_max]  # (B, k_max)
    else:
        top = scores.topk(k_max, dim=-1).indices                                    # (B, k_max)
    keep = torch.arange(k_max, device=conf.device)[None, :] < k[:, None]           # (B, k_max)
    return torch.zeros(conf.shape, dtype=torch.bool, device=conf.device).scatter_(1, top, keep)


def confidence(probs: torch.Tensor, x0: torch.Tensor, alg: Alg,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Confidence of each position's prediction (higher = unmask earlier). probs (B, N, V), x0 (B, N) -> (B, N).

    entropy (and entropy-penalty): negative entropy sum p log p (<= 0); maskgit_plus: probability of the chosen token;
    topk_margin: top-1 minus top-2 probability; random: uniform noise (ignores the model)."""
    if alg in ("entropy", "entropy-penalty"):
        return torch.special.xlogy(probs, probs).sum(-1)  # xlogy: 0 * log 0 = 0 where an id is forbidden
    if alg == "maskgit_plus":
        return probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values  # (B, N, 2)
        return top2[..., 0] - top2[..., 1]
    if alg == "random":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.rand(x0.shape, generator=generator, device=gen_device).to(probs.device)
    raise ValueError(f"unknown confidence alg {alg!r}; expected one of {ALGS}")


def threshold_transfer(conf: torch.Tensor, p_x0: torch.Tensor, candidates: torch.Tensor, threshold: float,
                       k: torch.Tensor, alg_temp: float = 0.0, generator: torch.Generator | None = None,
                       ties: Ties = "topk") -> torch.Tensor:
    """Confidence-threshold parallel decoding (Fast-dLLM §3.3): every candidate whose predicted token has
    probability above `threshold`, and at least the row's k (B,) most confident by `conf` (chosen as
    `select_positions` chooses). conf, p_x0 (B, N) float, candidates (B, N) bool -> (B, N) bool. A threshold
    >= 1 never passes: k positions per row."""
    best = select_positions(conf.masked_fill(~candidates, float("-inf")), k, alg_temp, generator, ties)
    return candidates & ((p_x0 > threshold) | best)


def position_penalty_factor(is_masked: torch.Tensor, penalty: float, start: int = 100) -> torch.Tensor:
    """Raster-order bias for image canvases (reference Omni-Diffusion `max_position_penalty`).

    is_masked: (B, G) masked positions of the whole canvas -> (B, G) factor >= 1 (for penalty >= 1): 1 for the
    first `start` masked positions of each row, then rising linearly towards `penalty` over the remaining
    masked positions, so positions far down the canvas wait until earlier ones are filled."""
    rank = is_masked.long().cumsum(1) - 1                          # (B, G) index among the row's masked positions
    n = is_masked.sum(1, keepdim=True)                             # (B, 1)
    ramp = (rank - start).clamp(min=0).float() / (n - start).clamp(min=1).float()
    return 1.0 + (penalty - 1.0) * ramp


# ---- the sampler --------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    *,
    vocab: Vocab,
    gen_length: int,
    steps: int,
    block_length: int | None = None,
    blocks: Sequence[tuple | Block] | None = None,
    alg: Alg = "entropy",
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    filter_greedy: bool = False,
    schedule: Schedule = "even",
    eps: float = 1e-3,
    alg_temp: float = 0.0,
    ties: Ties = "topk",
    cfg_scale: float = 0.0,
    uncond_prompt_ids: torch.Tensor | None = None,
    uncond_prompt_mask: torch.Tensor | None = None,
    uncond_hidden: torch.Tensor | None = None,
    position_penalty: float = 1.0,
    penalty_start: int = 100,
    position_penalty_on: PenaltyOn = "confidence",
    pre_infill: Sequence[tuple[int, float]] | None = None,
    repetition_penalty: float = 1.0,
    modality: Modality | torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_history: bool = False,
    subset_head: bool = True,
    kv_cache: CacheMode = "off",
    unmask_threshold: float | None = None,
    unmask_floor: Floor = "one",
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Generate `gen_length` tokens after each prompt by iterative unmasking; returns the canvas (B, gen_length).

    model: called as `model(input_ids (B, L), segment_ids (B, L) | None, only=(B, L) bool) -> logits (N, V)` at
        the `only` positions in row-major order (the canvas block being decoded; see Transformer.forward),
        aligned (position i predicts token i); with `subset_head`, also with `vocab_rows=(C,) ids` -> (N, C).
        Segment 0 marks padding; the prompt and canvas of a row are segment 1.
    prompt_ids: (B, P) int64 prompts, LEFT-padded when their lengths differ (the canvas then starts at column P
        for every row).
    vocab: the vocabulary; supplies the mask id and the modality id ranges. Ids >= vocab.size (embedding
        padding rows) and the mask id are never emitted.
    gen_length: canvas length G; it starts as G mask tokens.
    steps: model calls in total; the canvas is full after exactly `steps` steps (fewer calls when a step has
        nothing to unmask).
    schedule: how many positions each step unmasks — "even": `num_transfer_tokens(masked, steps_per_block)`, the
        block's masked positions split evenly over its steps (LLaDA); "dream": `dream_transfer_count`,
        max(1, floor(n (1 - s/t))) of the n still masked with t, s consecutive values of linspace(1, eps,
        steps_per_block + 1), all the rest at the block's last step (Dream, reference Omni-Diffusion).
    eps: the end of Dream's time grid ("dream" schedule and alg "origin").
    block_length: semi-autoregressive decoding (LLaDA §2.4): the canvas is cut into G / block_length blocks
        filled left to right, each with steps / num_blocks steps. None = one block. Both must divide evenly.
    blocks: explicit blocks instead, [(length, steps), ...] or `Block`s left to right, lengths summing to
        gen_length and steps to `steps`; a Block may set its own temperature and cfg_scale. E.g.
        [Block(1, 1, 0.0, 0.0), Block(66, 16)] decides a one-token transcript by argmax without guidance, then
        the image after it (a chain of modalities, pipelines/infer/predictor.py). Excludes block_length.
    alg: which masked positions to fill first, by confidence — "entropy" (negative entropy, default),
        "maskgit_plus" (probability of the sampled token), "topk_margin" (top-1 minus top-2 probability),
        "random"; "entropy-penalty": entropy with `repetition_penalty` counted over every id in the canvas, as
        the reference does (pre-infilled ones included, from the second step on), applied after the filters;
        "origin": no confidence, each masked position of the block is revealed with probability 1 - s/t
        (`reveal_probability`, uniforms drawn for the masked positions in row-major order), all at the block's
        last step. Only masked positions of the current block compete.
    alg_temp: > 0: the positions to unmask are drawn from softmax(confidence / alg_temp) instead of taken by
        rank (`select_positions`). 0 = by rank.
    ties: equal confidences by rank — "topk": torch.topk's order; "first": the earlier position, a
        deterministic order (the reference's torch.topk over its masked positions alone gave it in every case
        tested; its order among ties is unspecified).
    temperature: 0 = argmax (deterministic); > 0 = sample from softmax(logits / temperature) with `generator`.
    top_p: nucleus filter, applied after temperature; None = off.
    top_k: keep the top_k largest logits (after top_p, as the reference does); None = off.
    filter_greedy: apply top_p / top_k at temperature 0 too. They then shape the distribution the confidence
        is computed from (the reference filters at every temperature: its "entropy" is the entropy of the
        renormalised top-k). False = filters only when sampling (temperature > 0).
    cfg_scale: classifier-free guidance, logits = u + (cfg_scale + 1) (c - u) where u comes from the
        unconditional input. The conditional and unconditional rows run as ONE forward (batch 2B). 0 = off
        (no unconditional forward at all, so the output equals the plain conditional path exactly).
    uncond_prompt_ids, uncond_prompt_mask: the unconditional prompt (B, P') (left-padded, mask True = real
        token); default: the prompt with every real token replaced by the mask id (Dream / LLaDA).
    uncond_hidden: (gen_length,) bool canvas positions the unconditional rows see masked even once decoded (a
        chain's transcript: guidance then contrasts the image with neither the prompt nor the transcript).
    position_penalty: raster-order bias (images, reference Omni-Diffusion): after the first `penalty_start`
        masked positions of the canvas, confidence is divided (if >= 0) or multiplied (if < 0) by a factor
        ramping from 1 to position_penalty, which lowers it either way (entropy confidences are negative, so
        multiplying by a factor > 1 makes them more negative). 1.0 = off.
    penalty_start: number of leading masked positions exempt from the position penalty.
    position_penalty_on: "confidence" (above: the same ordering bias for every `alg`) or "logits" (the
        reference: the filtered logits of every masked position are penalized the same way before the softmax,
        which flattens far positions' distributions and so lowers their entropy confidence).
    pre_infill: [(token_id, fraction), ...] tokens fixed at canvas position int(fraction * gen_length) before
        decoding (e.g. begin-of-audio at 0.2 for spoken answers); they are never re-sampled.
    repetition_penalty: CTRL-style, > 1 discourages repeats: logits of ids already decoded in the row's canvas
        (pre-infilled tokens excluded; with alg "entropy-penalty", every id in the canvas) are divided by it when
        positive and multiplied when negative. 1.0 = off.
    modality: None (any non-mask id), a `Modality` for the whole canvas, or a (gen_length,) tensor of Modality
        values per position; ids outside `vocab.allowed_ids(modality)` get -inf logits.
    allowed: an explicit bool mask instead of `modality`, (V',) for the whole canvas or (gen_length, V') per
        position, V' <= the model's rows (missing columns = not allowed). For canvases whose positions admit ids
        of several modalities, e.g. a speech answer where codes, `<eoa>`, `<im_end>` and EOS may all appear
        (pipelines/infer/predictor.py). The mask id and ids >= vocab.size are always forbidden; every position must
        allow at least one id.
    prompt_mask: (B, P) bool, True at real prompt tokens, False at left padding; None = no padding.
    generator: torch.Generator on the model's device for sampling and "random" confidence.
    return_history: also return the list of canvases (B, G) after every step (for tests and visualisation).
    subset_head: when the ids the canvas may emit are at most a quarter of the model's rows (an image or speech
        canvas), call the model with `vocab_rows=` those ids after the first step, so the head, the softmax and
        the sampling run over them alone; the result is the same as masking the rest to -inf. The model must
        then accept `vocab_rows` (Transformer does). False = always the full rows.
    kv_cache: block-wise key/value cache (Fast-dLLM; model/kvcache.py; the model must accept `kv=`, `window=`).
        "off": full forwards. "prefix" / "dual": a block's first step is a full forward that fills the cache, its
        later steps run the block and the canvas after it / the block alone against the cached rest.
        Approximate: the cached rest is that of the block's first step (bidirectional attention would update it).
    unmask_threshold: confidence-threshold parallel decoding (Fast-dLLM) in place of the schedule: each step
        unmasks every masked position of the block whose token probability exceeds it, and at least the row's
        floor (`threshold_transfer`); a block takes the steps it needs. None = the schedule.
    unmask_floor: with a threshold, the least a step unmasks per row: "one" (Fast-dLLM; at most the block's
        length in steps, a threshold >= 1 is one a step) or "schedule" (what the schedule leaves for the block's
        remaining steps: ceil(masked / steps left) for "even", Dream's count; a threshold >= 1 is the schedule).
    """
    if alg not in ALGS:
        raise ValueError(f"unknown alg {alg!r}; expected one of {ALGS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if position_penalty_on not in ("confidence", "logits"):
        raise ValueError(f"position_penalty_on={position_penalty_on!r}; expected 'confidence' or 'logits'")
    if ties not in ("topk", "first"):
        raise ValueError(f"ties={ties!r}; expected 'topk' or 'first'")
    if alg_temp < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"alg_temp={alg_temp} must be >= 0 and top_k={top_k} None or >= 1")
    if kv_cache not in CACHE_MODES:
        raise ValueError(f"kv_cache={kv_cache!r}; expected one of {CACHE_MODES}")
    if unmask_floor not in FLOORS:
        raise ValueError(f"unmask_floor={unmask_floor!r}; expected one of {FLOORS}")
    if unmask_threshold is not None and (alg == "origin" or unmask_threshold <= 0):
        raise ValueError(f"unmask_threshold={unmask_threshold} must be > 0 and needs a confidence alg, not "
                         f"alg={alg!r}")
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be (B, P), got shape {tuple(prompt_ids.shape)}")
    G = gen_length
    spans = block_spans(G, steps, block_length, blocks)   # [(lo, hi, Block), ...]
    mask_id = vocab.mask_id
    device = prompt_ids.device
    B = prompt_ids.shape[0]
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    prompt_mask = prompt_mask.bool()

    use_cfg = cfg_scale != 0.0 or any(b.cfg_scale for *_, b in spans)
    if use_cfg:
        if uncond_prompt_ids is None:
            uncond_prompt_ids = prompt_ids.masked_fill(prompt_mask, mask_id)
            uncond_prompt_mask = prompt_mask
        elif uncond_prompt_mask is None:
            uncond_prompt_mask = torch.ones_like(uncond_prompt_ids, dtype=torch.bool)
        if uncond_prompt_ids.shape[0] != B:
            raise ValueError(f"uncond_prompt_ids has {uncond_prompt_ids.shape[0]} rows, prompt_ids has {B}")
        # Left-pad both prompts to one length so the canvas sits at the same columns in all 2B rows.
        P = max(prompt_ids.shape[1], uncond_prompt_ids.shape[1])
        prompt_ids, prompt_mask = _left_pad(prompt_ids, prompt_mask, P, vocab.pad_id)
        uncond_prompt_ids, uncond_prompt_mask = _left_pad(uncond_prompt_ids, uncond_prompt_mask.bool(), P,
                                                          vocab.pad_id)
    P = prompt_ids.shape[1]

    # Canvas, with pre-infilled tokens fixed in place.
    canvas = torch.full((B, G), mask_id, dtype=torch.long, device=device)
    fixed = torch.zeros(G, dtype=torch.bool, device=device)
    for token_id, fraction in pre_infill or ():
        pos = int(fraction * G)
        if not 0 <= pos < G or token_id == mask_id:
            raise ValueError(f"pre_infill ({token_id}, {fraction}): position {pos} outside the canvas [0, {G}) "
                             f"or token is the mask id")
        canvas[:, pos] = token_id
        fixed[pos] = True

    # Segment ids: 0 = left padding, 1 = prompt + canvas. None when there is no padding (lets the model skip
    # building an attention mask).
    any_padding = not bool(prompt_mask.all()) or (use_cfg and not bool(uncond_prompt_mask.all()))
    ones = torch.ones(B, G, dtype=torch.long, device=device)
    segments = torch.cat([prompt_mask.long(), ones], dim=1)  # (B, P + G)
    if use_cfg:
        segments = torch.cat([segments, torch.cat([uncond_prompt_mask.long(), ones], dim=1)], dim=0)  # (2B, P + G)
    segments = segments if any_padding else None

    if allowed is not None and modality is not None:
        raise ValueError("pass either modality or allowed to generate, not both")
    if uncond_hidden is not None:
        if uncond_hidden.shape != (G,):
            raise ValueError(f"uncond_hidden must be (gen_length={G},) bool, got {tuple(uncond_hidden.shape)}")
        uncond_hidden = uncond_hidden.to(device=device, dtype=torch.bool)
    allowed_mask = None  # (V,) or (G, V) bool, built (or checked) at the first forward once V is known
    rows = None          # (C,) the ids any canvas position may emit, when the head runs on them alone
    canvas_penalty = alg == "entropy-penalty" and repetition_penalty != 1.0   # every canvas id, after filters
    history: list[torch.Tensor] = []
    stepped = False      # a step has run (the reference's entropy-penalty starts counting from the second step)
    for lo, hi, block in spans:
        block_cfg = cfg_scale if block.cfg_scale is None else block.cfg_scale
        block_temperature = temperature if block.temperature is None else block.temperature
        block_segments = segments if segments is None or block_cfg else segments[:B]
        even = num_transfer_tokens((canvas[:, lo:hi] == mask_id).sum(1), block.steps)  # (B, S)
        cache = None   # refilled by the block's first forward
        # with a threshold, at least one position per row per step: the block is full after hi - lo steps
        one_floor = unmask_threshold is not None and unmask_floor == "one"
        for step in range(hi - lo if one_floor else block.steps):
            n_masked = (canvas[:, lo:hi] == mask_id).sum(1)                    # (B,)
            if one_floor:
                k = n_masked.clamp(max=1)          # a row's floor; the threshold adds more below
                if int(k.max()) == 0:
                    break
            elif unmask_threshold is not None and schedule == "even":
                k = -(-n_masked // (block.steps - step))   # the even split of what the threshold left
            elif alg == "origin":
                k = n_masked                       # an upper bound: the draw below decides
            elif schedule == "dream":
                k = dream_transfer_count(n_masked, step, block.steps, eps)
            else:
                k = even[:, step]  # (B,)
            k_max = int(k.max())
            if k_max == 0:
                if return_history:
                    history.append(canvas.clone())
                continue
            x = torch.cat([prompt_ids, canvas], dim=1)  # (B, P + G)
            if block_cfg:
                seen = canvas if uncond_hidden is None else canvas.masked_fill(uncond_hidden, mask_id)
                x = torch.cat([x, torch.cat([uncond_prompt_ids, seen], dim=1)], dim=0)  # (2B, P + G)
            only = torch.zeros(x.shape, dtype=torch.bool, device=device)
            only[:, P + lo:P + hi] = True  # the head runs on the block's columns only
            extra = {} if rows is None else {"vocab_rows": rows}
            if kv_cache != "off":
                if cache is None:
                    cache = extra["kv"] = KVCache()          # the block's first step: full forward, fills it
                else:
                    extra.update(kv=cache, window=decode_window(kv_cache, P + lo, P + hi, P + G))
            logits = model(x, block_segments, only=only, **extra).float()         # (N, V) or (N, C)
            logits = logits.view(x.shape[0], hi - lo, -1)                         # (B or 2B, Lb, V or C)
            if block_cfg:
                cond, uncond = logits[:B], logits[B:]
                logits = uncond + (block_cfg + 1.0) * (cond - uncond)
            if allowed_mask is None:
                V = logits.shape[-1]
                allowed_mask = (_allowed_ids(vocab, modality, V, G, device) if allowed is None
                                else _explicit_allowed(allowed, vocab, V, G, device))
                union = allowed_mask if allowed_mask.dim() == 1 else allowed_mask.any(0)   # (V,)
                subset = subset_head and int(union.sum()) * 4 <= V
            if rows is None and subset:
                # from the next step on, logits come in `rows` order: narrow the masks to match
                rows = union.nonzero().squeeze(1)                                # (C,)
                logits = logits[..., rows]                                        # (B, Lb, C)
                allowed_mask = allowed_mask[..., rows]                            # (C,) or (G, C)
                canvas_index = torch.full((V,), -1, dtype=torch.long, device=device)
                canvas_index[rows] = torch.arange(rows.numel(), device=device)    # id -> column; others -1
            C = logits.shape[-1]

            index = canvas_index if rows is not None else None
            if repetition_penalty != 1.0 and not canvas_penalty:
                seen = _seen_columns(canvas, (canvas != mask_id) & ~fixed, index, C)  # (B, C)
                logits = torch.where(seen[:, None, :], penalize(logits, repetition_penalty), logits)
            logits = logits.masked_fill(~(allowed_mask if allowed_mask.dim() == 1 else allowed_mask[lo:hi]),
                                        float("-inf"))

            if block_temperature > 0:
                logits = logits / block_temperature
            if block_temperature > 0 or filter_greedy:
                if top_p is not None and top_p < 1.0:
                    logits = top_p_filter(logits, top_p)
                if top_k is not None:
                    logits = top_k_filter(logits, top_k)
            if canvas_penalty and stepped:
                seen = _seen_columns(canvas, canvas != mask_id, index, C)           # (B, C)
                logits = torch.where(seen[:, None, :], penalize(logits, repetition_penalty), logits)
            still_masked = canvas == mask_id  # (B, G)
            if position_penalty != 1.0:
                factor = position_penalty_factor(still_masked, position_penalty, penalty_start)[:, lo:hi]  # (B, Lb)
                if position_penalty_on == "logits":
                    logits = penalize(logits, factor[..., None])
            probs = logits.softmax(-1)  # (B, Lb, C)
            x0 = sample_categorical(probs, generator) if block_temperature > 0 else probs.argmax(-1)  # (B, Lb)
            candidates = still_masked[:, lo:hi]
            if alg == "origin":
                # uniforms for the masked positions only, row-major, as the reference draws them
                gen_device = generator.device if generator is not None else torch.device("cpu")
                u = torch.ones(candidates.shape, device=device)
                u[candidates] = torch.rand(int(candidates.sum()), generator=generator, device=gen_device).to(device)
                transfer = candidates & (u < reveal_probability(step, block.steps, eps))
            else:
                conf = confidence(probs, x0, alg, generator)  # (B, Lb)
                if position_penalty != 1.0 and position_penalty_on == "confidence":
                    conf = penalize(conf, factor)
                if unmask_threshold is not None:
                    p_x0 = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)            # (B, Lb)
                    transfer = threshold_transfer(conf, p_x0, candidates, unmask_threshold, k, alg_temp,
                                                  generator, ties)
                else:
                    conf = conf.masked_fill(~candidates, float("-inf"))
                    transfer = select_positions(conf, k, alg_temp, generator, ties) & candidates
            if rows is not None:
                x0 = rows[x0]   # columns -> ids
            canvas[:, lo:hi] = torch.where(transfer, x0, canvas[:, lo:hi])
            stepped = True
            if return_history:
                history.append(canvas.clone())
    return (canvas, history) if return_history else canvas


def _seen_columns(canvas: torch.Tensor, counted: torch.Tensor, canvas_index: torch.Tensor | None,
                  C: int) -> torch.Tensor:
    """(B, C) bool: logit columns of the ids at the `counted` (B, G) canvas positions (the repetition penalty's
    ids); `canvas_index` maps ids to the subset head's columns (-1 = not a column). Uncounted slots and ids
    outside the columns write to a spare column C, dropped."""
    cols = canvas if canvas_index is None else canvas_index[canvas]
    cols = torch.where(counted & (cols >= 0), cols, C)                           # (B, G)
    seen = torch.zeros(canvas.shape[0], C + 1, dtype=torch.bool, device=canvas.device)
    return seen.scatter_(1, cols, True)[:, :C]                                   # (B, C)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of probs (..., C) -> (...) int64, by inverting the CDF with one uniform per row. Unlike
    torch.multinomial, a draw does not depend on zero-probability columns: the same uniforms pick the same ids
    from the full vocabulary with -inf logits as from the allowed columns alone (generate's subset head)."""
    cdf = probs.cumsum(-1)                                                          # (..., C)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=probs.device, dtype=cdf.dtype)
    pick = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)                   # (..., 1)
    return pick.clamp(max=probs.shape[-1] - 1).squeeze(-1)


def _left_pad(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - ids.shape[1]
    if extra == 0:
        return ids, mask
    return F.pad(ids, (extra, 0), value=pad_id), F.pad(mask, (extra, 0), value=False)


def _allowed_ids(vocab: Vocab, modality: Modality | torch.Tensor | None, V: int, G: int,
                 device: torch.device) -> torch.Tensor:
    """(V,) or (G, V) bool of ids the sampler may emit."""
    if modality is None:
        allowed = torch.zeros(V, dtype=torch.bool)
        allowed[: vocab.size] = True      # never the embedding's padding rows
        allowed[vocab.mask_id] = False    # a sampled mask would leave the position masked for ever
        return allowed.to(device)
    if isinstance(modality, torch.Tensor):
        if modality.shape != (G,):
            raise ValueError(f"per-position modality must be (gen_length={G},), got {tuple(modality.shape)}")
        table = torch.stack([vocab.allowed_ids(m, vocab_rows=V) for m in Modality]).to(device)  # (4, V)
        return table[modality.to(device).long()]  # (G, V)
    return vocab.allowed_ids(Modality(modality), vocab_rows=V).to(device)


def _explicit_allowed(allowed: torch.Tensor, vocab: Vocab, V: int, G: int, device: torch.device) -> torch.Tensor:
    """Check a caller's (V',) / (G, V') bool mask and widen it to the model's V rows."""
    if allowed.dim() not in (1, 2) or (allowed.dim() == 2 and allowed.shape[0] != G):
        raise ValueError(f"allowed must be (V,) or (gen_length={G}, V) bool, got {tuple(allowed.shape)}")
    if allowed.shape[-1] > V:
        raise ValueError(f"allowed has {allowed.shape[-1]} columns but the model emits {V} logits")
    out = F.pad(allowed.to(device=device, dtype=torch.bool), (0, V - allowed.shape[-1]), value=False)
    out[..., vocab.mask_id] = False
    out[..., vocab.size:] = False
    if not bool(out.any(-1).all()):
        raise ValueError("allowed forbids every id at some canvas position; each position needs at least one id")
    return out
