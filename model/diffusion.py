"""Masked-diffusion training math: EOS tail padding, answer masking, and a loss that normalizes globally.

Forward process (absorbing state, LLaDA §2.1 / MDLM): a clean token is replaced by the mask id with
probability t; the model predicts the clean token at every masked position. Only answer tokens are ever
masked: the prompt is the condition and stays clean (SFT, LLaDA §2.3).

Two masking schemes, chosen by `scheme`:

- "per_token" (Omni-Diffusion, the default): every answer position draws its own t ~ U(eps, 1) and is
  masked with probability t; EOS-tail positions with probability `tail_factor * t`. The loss is the plain
  mean cross-entropy over masked positions, with no 1/t weight.
- "per_sequence" (LLaDA SFT): one t ~ U(0, 1) per sequence, p_mask = (1 - eps) t + eps for every answer
  position; the loss is sum(CE / p_mask) over masked positions divided by the sequence's answer length,
  averaged over sequences.

Normalizing across data-parallel ranks and gradient accumulation
---------------------------------------------------------------
A mean computed per micro-batch and per rank weighs a token in a short micro-batch more than one in a long
one. Instead the loss functions here return a SUM and a COUNT, and the caller divides by the count summed
over every micro-batch of the optimizer step on every rank. The count depends only on the masks, so it is
known before any forward pass:

    micro = [mask_answer_tokens(b.ids, b.answer_mask, b.tail_mask, gen, mask_id=vocab.mask_id) for b in batches]
    weights = [loss_weights(m.is_masked, b.answer_mask, m.t, scheme=scheme) for m, b in zip(micro, batches)]
    count = global_count(sum(rc.sum() for _, rc in weights))       # all-reduced over ranks (SUM)
    for b, m, (w, rc) in zip(batches, micro, weights):
        terms = masked_diffusion_loss(model(m.noisy_ids, b.segment_ids), b.ids, m.is_masked,
                                      weights=w, row_count=rc)
        (terms.loss_sum * world_size / count).backward()

`* world_size` because DDP and FSDP2 AVERAGE gradients over ranks; with it, the summed gradient is exactly the
gradient of (sum of every rank's loss_sum) / count, i.e. of the full global batch's loss
(tests/unit/test_diffusion.py checks this with 2 micro-batches x 2 fake ranks).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

Scheme = Literal["per_token", "per_sample", "per_sequence"]
SCHEMES = ("per_token", "per_sample", "per_sequence")


# ---- EOS tail padding (collate time, one sample, numpy) ----------------------------------------------------

class TailPadded(NamedTuple):
    ids: np.ndarray             # (L',) int64
    answer_mask: np.ndarray     # (L',) bool: answer tokens, the new tail included
    tail_mask: np.ndarray       # (L',) bool: the EOS tokens added here
    segment_ids: np.ndarray | None  # (L',) int64, or None when none were given


def eos_tail_spans(ids: np.ndarray, answer_mask: np.ndarray, eos_id: int,
                   segment_ids: np.ndarray | None = None) -> np.ndarray:
    """(L,) bool: the last position of each answer span that does not already end in EOS, i.e. where
    `append_eos_tail` inserts a tail. Its count is all a planner needs to know a sample's padded length
    (the shard's sample index records it at tokenize time)."""
    # Last position of each answer span: the next position is not an answer or lies in another segment.
    next_answer = np.append(answer_mask[1:], False)
    if segment_ids is not None:
        next_answer &= np.append(segment_ids[1:] == segment_ids[:-1], False)
    return answer_mask & ~next_answer & (ids != eos_id)


def eos_tail_lengths(n_spans: int, max_tail: int, generator: np.random.Generator) -> np.ndarray:
    """(n_spans,) int64 tail lengths in 1..max_tail: the one draw `append_eos_tail` makes, so a planner that
    replays it on the same generator state gets the same lengths without the sample's tokens."""
    return generator.integers(1, max_tail + 1, size=n_spans)


def append_eos_tail(ids: np.ndarray, answer_mask: np.ndarray, segment_ids: np.ndarray | None = None, *,
                    eos_id: int, generator: np.random.Generator, max_tail: int = 16) -> TailPadded:
    """Insert 1..max_tail EOS tokens after every answer span of ONE sample that does not already end in EOS.

    Why: at inference the canvas is longer than the answer and the model must fill the rest with EOS, so it
    must learn to emit EOS after an answer ("attenuated tail padding" of the reference Omni-Diffusion / Dream
    SFT). The tail tokens are answer targets flagged in `tail_mask`, which `mask_answer_tokens` masks less
    often (`tail_factor`), so a handful of easy EOS targets does not dominate the loss.

    Runs in the data collator on a single un-padded sample (numpy in, numpy out, no per-token Python loop):
    the tail is INSERTED, so the sample grows by the tail lengths; pad/truncate/pack after calling this.
    `generator` is a numpy Generator owned by the collator (seeded per worker for reproducibility).

    ids, answer_mask, segment_ids: (L,) arrays. An answer span is a maximal run of answer positions inside one
    segment; the tail takes the span's segment id.
    """
    ids = np.asarray(ids, dtype=np.int64)
    answer_mask = np.asarray(answer_mask, dtype=bool)
    if ids.ndim != 1 or answer_mask.shape != ids.shape:
        raise ValueError(f"append_eos_tail works on one sample: ids and answer_mask must be equal-length 1-D arrays, "
                         f"got {ids.shape} and {answer_mask.shape} (call it per sample in the collator)")
    if max_tail < 1:
        raise ValueError(f"max_tail={max_tail} must be >= 1")
    seg = None if segment_ids is None else np.asarray(segment_ids, dtype=np.int64)
    if seg is not None and seg.shape != ids.shape:
        raise ValueError(f"segment_ids shape {seg.shape} != ids shape {ids.shape}")

    span_end = eos_tail_spans(ids, answer_mask, eos_id, seg)
    tail_len = np.zeros(ids.size, dtype=np.int64)
    tail_len[span_end] = eos_tail_lengths(int(span_end.sum()), max_tail, generator)

    # Every source position i becomes 1 + tail_len[i] output positions: itself, then its tail copies.
    repeats = 1 + tail_len
    src = np.repeat(np.arange(ids.size), repeats)                     # (L',) source position of each output
    first_out = np.cumsum(repeats) - repeats                          # (L,) output index of each source token
    is_tail = np.arange(src.size) - np.repeat(first_out, repeats) > 0  # (L',) copies after the first

    out_ids = np.where(is_tail, eos_id, ids[src])
    return TailPadded(out_ids, answer_mask[src], is_tail, None if seg is None else seg[src])


# ---- forward process ----------------------------------------------------------------------------------------

class Masked(NamedTuple):
    noisy_ids: torch.Tensor   # (B, L) int64: ids with masked positions replaced by the mask id
    is_masked: torch.Tensor   # (B, L) bool
    t: torch.Tensor           # (B, L) float32: probability with which each position was masked (0 off-answer)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Draw on the generator's device (torch requires it), then move: results do not depend on `device`.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _segment_uniform(segment_ids: torch.Tensor, generator: torch.Generator | None,
                     device: torch.device) -> torch.Tensor:
    """One uniform per (row, segment id), gathered to positions: (B, L) -> (B, L); a packed sample's positions
    share their draw."""
    B, L = segment_ids.shape
    u = _uniform((B, L + 1), generator, device)                     # (B, L + 1): one per possible segment id
    return torch.gather(u, 1, segment_ids.clamp(0, L).long())       # (B, L): the sample's uniform


def mask_answer_tokens(ids: torch.Tensor, answer_mask: torch.Tensor, tail_mask: torch.Tensor | None,
                       generator: torch.Generator | None, *, mask_id: int, eps: float = 1e-3,
                       tail_factor: float = 0.6, scheme: Scheme = "per_token",
                       t_min: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                       shared_t: torch.Tensor | None = None) -> Masked:
    """Mask answer tokens for one training step. Prompt (non-answer) positions are never masked.

    ids, answer_mask, tail_mask: (B, L); tail_mask may be None (no EOS tail).
    scheme="per_token": t ~ U(eps, 1) per answer position; masked when a second uniform < t, or
        < tail_factor * t on EOS-tail positions (attenuated tail padding, as in the reference).
        Expected masking rate (1 + eps) / 2 on answer tokens, tail_factor times that on the tail.
        t_min: optional (B, L) floor for t per position (per_token, per_sample): t ~ U(max(eps, t_min), 1), so
        a task whose answer is easy to complete from its own visible tokens (an image from its neighbours)
        trains mostly where only the prompt can tell the answer.
        With independent t per position the masked FRACTION of an answer concentrates near E[t] (0.5 +- 0.06
        for a 64-token image), while sampling walks it from 1 down to 0: the first and last steps of
        `generate` see fractions training never showed.
    scheme="per_sample": as per_token (same tail discount, floor and per-token loss), but one t per packed
        sample (segment_ids (B, L) required), shared by its answer positions: the masked fraction of each
        answer is itself ~U(floor, 1), covering every fraction the sampler visits.
        shared_t: optional (B, L) bool for per_token: positions that draw t per sample as per_sample does (the
        tasks that use it); None draws exactly as plain per_token.
    scheme="per_sequence": t ~ U(0, 1) per sequence, p_mask = (1 - eps) t + eps on every answer position
        (LLaDA SFT; the tail gets no discount).
    Returns (noisy_ids, is_masked, t) with t the per-position masking probability, broadcast to (B, L), which
    `loss_weights(scheme="per_sequence")` turns into the 1 / p_mask weight.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown masking scheme {scheme!r}; expected one of {SCHEMES}")
    if ids.shape != answer_mask.shape or (tail_mask is not None and tail_mask.shape != ids.shape):
        raise ValueError(f"ids {tuple(ids.shape)}, answer_mask {tuple(answer_mask.shape)} and tail_mask "
                         f"{None if tail_mask is None else tuple(tail_mask.shape)} must have the same (B, L) shape")
    B, L = ids.shape
    answer_mask = answer_mask.bool()
    if scheme in ("per_token", "per_sample"):
        lo = torch.full((B, L), eps, device=ids.device) if t_min is None else t_min.clamp(min=eps)   # (B, L)
        u = _uniform((B, L), generator, ids.device) if scheme == "per_token" else None
        if scheme == "per_sample" or shared_t is not None:
            if segment_ids is None or segment_ids.shape != ids.shape:
                raise ValueError("per_sample masking needs segment_ids with the (B, L) shape of ids")
            u_seg = _segment_uniform(segment_ids, generator, ids.device)        # (B, L): the sample's uniform
            u = u_seg if u is None else torch.where(shared_t.bool(), u_seg, u)
        t = lo + (1.0 - lo) * u
        if tail_mask is not None:
            t = torch.where(tail_mask.bool(), t * tail_factor, t)
    else:
        t_seq = _uniform((B, 1), generator, ids.device)
        t = ((1.0 - eps) * t_seq + eps).expand(B, L)  # (B, L)
    t = torch.where(answer_mask, t, torch.zeros_like(t))
    is_masked = answer_mask & (_uniform((B, L), generator, ids.device) < t)
    return Masked(torch.where(is_masked, torch.full_like(ids, mask_id), ids), is_masked, t)


def drop_prompts(noisy_ids: torch.Tensor, answer_mask: torch.Tensor, segment_ids: torch.Tensor,
                 rate: torch.Tensor, generator: torch.Generator | None, *, mask_id: int) -> torch.Tensor:
    """Prompt dropout for classifier-free guidance: with probability `rate` per packed sample, every prompt
    (non-answer) token of that sample becomes the mask id, exactly the unconditional input that
    `model.sampling.generate(cfg_scale=...)` builds (the whole prompt masked). The answer is masked as usual, so
    the model learns p(answer | nothing) on those samples; without this, the unconditional branch is a prompt
    the model never saw.

    noisy_ids, answer_mask, segment_ids: (B, L) (segment 0 = padding); rate: (B, L) float dropout probability of
    the sample each position belongs to (0 = never). One uniform per (row, segment): a sample drops all of its
    prompt or none of it. Returns the new noisy ids."""
    u_pos = _segment_uniform(segment_ids, generator, noisy_ids.device)      # (B, L): the sample's uniform
    drop = (u_pos < rate) & ~answer_mask.bool() & (segment_ids > 0)
    return torch.where(drop, torch.full_like(noisy_ids, mask_id), noisy_ids)


# ---- loss ---------------------------------------------------------------------------------------------------

class LossTerms(NamedTuple):
    loss_sum: torch.Tensor            # () float32, differentiable: sum of (weighted) CE over masked positions
    count: torch.Tensor               # () float32, no grad: this micro-batch's share of the normalizer
    task_sum: torch.Tensor | None     # (num_tasks,) detached loss sums per task, for logging
    task_count: torch.Tensor | None   # (num_tasks,) normalizer per task


def loss_weights(is_masked: torch.Tensor, answer_mask: torch.Tensor, t: torch.Tensor, *,
                 scheme: Scheme = "per_token") -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-position CE weights and per-row normalizer contributions of a scheme -> (weights (B, L) | None,
    row_count (B,) float32).

    per_token, per_sample: no weight; each row contributes its number of masked positions (loss = mean CE over
        masked).
    per_sequence: weight 1 / (p_mask * answer_length) and each row with an answer contributes 1, so
        loss = mean over sequences of sum(CE / p_mask) / answer_length (LLaDA SFT).
    row_count is known before the forward pass: sum it over micro-batches and ranks (`global_count`)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown loss scheme {scheme!r}; expected one of {SCHEMES}")
    if scheme in ("per_token", "per_sample"):
        return None, is_masked.sum(1).float()
    answer_mask = answer_mask.bool()
    answer_len = answer_mask.sum(1, keepdim=True).float()  # (B, 1)
    denom = (t * answer_len).clamp(min=torch.finfo(torch.float32).tiny)
    weights = torch.where(answer_mask, 1.0 / denom, torch.zeros_like(denom))
    return weights, (answer_len.squeeze(1) > 0).float()


def per_task(table: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """A per-task value at every position: table (num_tasks,), task_ids (B, L) with -1 for padding -> (B, L)
    (0 at padding)."""
    return table[task_ids.clamp(min=0)] * (task_ids >= 0)


def task_position_weights(task_ids: torch.Tensor, is_text: torch.Tensor, task_weight: torch.Tensor,
                          text_weight: torch.Tensor) -> torch.Tensor:
    """(B, L) loss multiplier of every position: its task's weight, times its task's text weight where the
    position holds text (the transcript an s2i answer writes before its image weighs text_weight).

    task_ids (B, L) (-1 = padding), is_text (B, L) bool, task_weight and text_weight (num_tasks,) tables
    (1 = neutral). A masked-token mean gives each task a gradient share proportional to its masked tokens; these
    multipliers rebalance it without changing the normalizer."""
    w = per_task(task_weight, task_ids)                                            # (B, L)
    return w * torch.where(is_text, per_task(text_weight, task_ids), torch.ones_like(w))


def masked_diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, is_masked: torch.Tensor, *,
                          weights: torch.Tensor | None = None, row_count: torch.Tensor | None = None,
                          multipliers: torch.Tensor | None = None, task_ids: torch.Tensor | None = None,
                          num_tasks: int = 0) -> LossTerms:
    """Cross-entropy SUMMED over masked positions, plus the normalizer count: divide by a global count.

    logits: (B, L, V) aligned (position i predicts token i), or (N, V) already taken at the N masked
        positions in `is_masked.nonzero()` order (`Transformer(..., only=is_masked)`);
        targets: (B, L) clean ids; is_masked: (B, L).
    weights: optional (B, L) per-position weights of the objective itself (see `loss_weights`).
    row_count: (B,) normalizer contribution per row; default the number of masked positions of each row.
    multipliers: optional (B, L) gradient multipliers (`task_position_weights`): they scale `loss_sum` only;
        the per-task sums report the objective without them.
    task_ids: optional task index per row (B,) or per position (B, L) -> per-task detached sums and counts in
        [0, num_tasks). Per position with a `row_count`, a row counts for its task (one task per row: the
        per_sequence scheme pads one sample per row).
    CE is computed in float32 on the masked positions only (a (N_masked, V) slice, not (B, L, V)).
    """
    rows, cols = is_masked.nonzero(as_tuple=True)
    gathered = logits.dim() == 2
    if is_masked.shape != targets.shape or (logits.shape[:2] != targets.shape if not gathered
                                            else logits.shape[0] != rows.numel()):
        raise ValueError(f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and is_masked "
                         f"{tuple(is_masked.shape)} disagree: logits must be (B, L, V) or (N_masked, V)")
    picked = logits if gathered else logits[rows, cols]                                      # (N_masked, V)
    ce = F.cross_entropy(picked.float(), targets[rows, cols], reduction="none")             # (N_masked,)
    if weights is not None:
        ce = ce * weights[rows, cols].float()
    given_count = row_count is not None
    if row_count is None:
        row_count = is_masked.sum(1).float()
    row_count = row_count.detach().float()
    loss_sum = (ce * multipliers[rows, cols].float()).sum() if multipliers is not None else ce.sum()

    task_sum = task_count = None
    if task_ids is not None:
        if num_tasks <= 0:
            raise ValueError("masked_diffusion_loss: task_ids given but num_tasks <= 0; pass the number of tasks")
        task_ids = task_ids.to(ce.device).long()
        zeros = torch.zeros(num_tasks, device=ce.device)
        if task_ids.dim() == 2:   # per position: each masked position's loss and count go to its task
            pos_task = task_ids[rows, cols].clamp(min=0)                                       # (N_masked,)
            task_sum = zeros.index_add(0, pos_task, ce.detach())
            if given_count:
                row_task = task_ids.amax(1).clamp(min=0)                                       # (B,)
                task_count = zeros.index_add(0, row_task, row_count * (task_ids.amax(1) >= 0))
            else:
                task_count = zeros.index_add(0, pos_task, torch.ones_like(ce))
        else:
            B = targets.shape[0]
            row_loss = torch.zeros(B, device=ce.device).index_add_(0, rows, ce.detach())  # (B,)
            task_sum = zeros.index_add(0, task_ids, row_loss)
            task_count = zeros.index_add(0, task_ids, row_count.to(ce.device))
    return LossTerms(loss_sum, row_count.sum(), task_sum, task_count)


def global_count(count: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum `count` over the ranks of `group` when torch.distributed is initialized, clamped to >= 1.

    Call it with the count of ALL micro-batches of the optimizer step (before any backward), on every rank:
    it is a collective, so `count` must live on the group's device (CUDA for NCCL). The clamp keeps a step
    with no masked token at loss 0 instead of NaN."""
    total = count.detach().float().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.clamp(min=1.0)
