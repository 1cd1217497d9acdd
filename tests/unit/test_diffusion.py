"""Masking statistics, the loss on hand-computed cases, and exact global normalization (model/diffusion.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.diffusion import (append_eos_tail, drop_prompts, global_count, loss_weights, mask_answer_tokens,
                             masked_diffusion_loss, task_position_weights)
from model.vocab import Vocab

VOCAB = Vocab(text_size=300, n_q=2, image_codebook_size=17)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- append_eos_tail ------------------------------------------------------------------------------------------

def test_eos_tail_inserted_after_each_answer_span():
    eos = VOCAB.eos_id
    #        prompt----  answer----  prompt  answer(ends in eos)
    ids = np.array([1, 2, 3, 10, 11, 12, 4, 5, 20, eos])
    ans = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 1], dtype=bool)
    seg = np.ones_like(ids)
    out = append_eos_tail(ids, ans, seg, eos_id=eos, generator=np.random.default_rng(0), max_tail=16)
    n = int(out.tail_mask.sum())
    assert 1 <= n <= 16 and out.ids.size == ids.size + n
    # The tail sits right after the first answer span; the span ending in EOS gets none.
    np.testing.assert_array_equal(out.ids[:6], ids[:6])
    assert (out.ids[6:6 + n] == eos).all() and out.tail_mask[6:6 + n].all()
    np.testing.assert_array_equal(out.ids[6 + n:], ids[6:])
    assert out.answer_mask[6:6 + n].all() and out.answer_mask.sum() == ans.sum() + n
    assert not out.tail_mask[6 + n:].any()
    np.testing.assert_array_equal(out.segment_ids, np.ones(ids.size + n))


def test_eos_tail_length_range_and_segment_boundaries():
    eos = VOCAB.eos_id
    # Two packed segments, each an answer that runs to its segment's end: one tail each, with its segment id.
    ids = np.array([1, 10, 11, 2, 12])
    ans = np.array([0, 1, 1, 0, 1], dtype=bool)
    seg = np.array([1, 1, 1, 2, 2])
    rng = np.random.default_rng(1)
    lengths = []
    for _ in range(400):
        out = append_eos_tail(ids, ans, seg, eos_id=eos, generator=rng, max_tail=4)
        first = int(np.argmax(out.segment_ids == 2))
        n1, n2 = int(out.tail_mask[:first].sum()), int(out.tail_mask[first:].sum())
        assert out.ids[first] == 2 and (out.ids[3:first] == eos).all()
        lengths += [n1, n2]
    assert set(lengths) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="one sample"):
        append_eos_tail(ids[None], ans[None], eos_id=eos, generator=rng)


# ---- mask_answer_tokens -----------------------------------------------------------------------------------------

def _batch(B=64, L=64):
    ids = torch.randint(0, VOCAB.text_size, (B, L), generator=_gen(1))
    answer = torch.zeros(B, L, dtype=torch.bool)
    answer[:, 16:] = True
    tail = torch.zeros(B, L, dtype=torch.bool)
    tail[:, 48:] = True
    return ids, answer, tail


def test_per_token_masking_rates():
    ids, answer, tail = _batch(B=256)
    noisy, is_masked, t = mask_answer_tokens(ids, answer, tail, _gen(0), mask_id=VOCAB.mask_id)
    assert not is_masked[~answer].any(), "prompt positions must never be masked"
    assert (noisy[~answer] == ids[~answer]).all()
    assert (noisy[is_masked] == VOCAB.mask_id).all() and (noisy[~is_masked] == ids[~is_masked]).all()
    body = answer & ~tail
    rate_body = is_masked[body].float().mean().item()
    rate_tail = is_masked[tail].float().mean().item()
    assert abs(rate_body - 0.5) < 0.02, rate_body
    assert abs(rate_tail / rate_body - 0.6) < 0.05, (rate_tail, rate_body)
    # t is a per-position probability: different across positions of one row, 0 off the answer.
    assert (t[~answer] == 0).all() and t[0, 16:48].unique().numel() > 1


def test_per_sequence_masking():
    ids, answer, tail = _batch(B=512)
    eps = 0.1
    _, is_masked, t = mask_answer_tokens(ids, answer, tail, _gen(0), mask_id=VOCAB.mask_id, eps=eps,
                                         scheme="per_sequence")
    assert not is_masked[~answer].any()
    p = t[:, 16]
    assert (t[:, 16:] == p[:, None]).all(), "one p_mask per sequence, tail included"
    assert p.min() >= eps and p.max() <= 1.0
    # Masked fraction of each row follows its own p_mask.
    frac = is_masked[:, 16:].float().mean(1)
    assert torch.corrcoef(torch.stack([frac, p]))[0, 1] > 0.95


def test_masking_is_reproducible_and_rejects_unknown_scheme():
    ids, answer, tail = _batch(B=4)
    a = mask_answer_tokens(ids, answer, tail, _gen(5), mask_id=VOCAB.mask_id)
    b = mask_answer_tokens(ids, answer, tail, _gen(5), mask_id=VOCAB.mask_id)
    assert torch.equal(a.is_masked, b.is_masked)
    with pytest.raises(ValueError, match="per_sequence"):
        mask_answer_tokens(ids, answer, tail, _gen(5), mask_id=VOCAB.mask_id, scheme="linear")


# ---- loss ----------------------------------------------------------------------------------------------------

def test_llada_loss_matches_hand_computation():
    V = 3
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
                           [[1.0, 1.0, 0.0], [0.0, 0.0, 3.0], [0.5, 0.0, 0.0]]])  # (2, 3, 3)
    targets = torch.tensor([[0, 1, 2], [1, 2, 0]])
    answer = torch.tensor([[False, True, True], [True, True, True]])
    is_masked = torch.tensor([[False, True, True], [True, False, True]])
    t = torch.tensor([[0.0, 0.5, 0.5], [0.25, 0.25, 0.25]])

    def ce(row, col):
        z = logits[row, col].tolist()
        return math.log(sum(math.exp(v) for v in z)) - z[targets[row, col]]

    # LLaDA: per sequence sum(CE / p_mask) / answer_length, averaged over sequences.
    seq0 = (ce(0, 1) / 0.5 + ce(0, 2) / 0.5) / 2
    seq1 = (ce(1, 0) / 0.25 + ce(1, 2) / 0.25) / 3
    expected = (seq0 + seq1) / 2
    weights, row_count = loss_weights(is_masked, answer, t, scheme="per_sequence")
    terms = masked_diffusion_loss(logits, targets, is_masked, weights=weights, row_count=row_count)
    assert terms.count.item() == 2
    assert (terms.loss_sum / global_count(terms.count)).item() == pytest.approx(expected, rel=1e-6)

    # Omni: plain mean over the 4 masked positions, no 1/t.
    w, rc = loss_weights(is_masked, answer, t, scheme="per_token")
    terms = masked_diffusion_loss(logits, targets, is_masked, weights=w, row_count=rc)
    expected = (ce(0, 1) + ce(0, 2) + ce(1, 0) + ce(1, 2)) / 4
    assert w is None and terms.count.item() == 4
    assert (terms.loss_sum / terms.count).item() == pytest.approx(expected, rel=1e-6)
    assert V == logits.shape[-1]


def test_per_task_breakdown():
    B, L, V = 4, 5, 7
    logits = torch.randn(B, L, V, generator=_gen(2))
    targets = torch.randint(0, V, (B, L), generator=_gen(3))
    is_masked = torch.rand(B, L, generator=_gen(4)) < 0.6
    tasks = torch.tensor([0, 2, 0, 2])
    terms = masked_diffusion_loss(logits, targets, is_masked, task_ids=tasks, num_tasks=3)
    full = torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1), reduction="none").view(B, L)
    full = full * is_masked
    expected_sum = torch.stack([full[[0, 2]].sum(), torch.tensor(0.0), full[[1, 3]].sum()])
    expected_count = torch.tensor([is_masked[[0, 2]].sum(), 0, is_masked[[1, 3]].sum()]).float()
    torch.testing.assert_close(terms.task_sum, expected_sum)
    torch.testing.assert_close(terms.task_count, expected_count)
    torch.testing.assert_close(terms.task_sum.sum(), terms.loss_sum.detach())


def test_per_position_tasks_and_multipliers_match_a_loop_over_tasks_and_parts():
    """Packed rows hold several tasks; each task has a loss weight and a weight for its text positions. One call
    with per-position tables equals summing one call per (task, text/non-text) part, and the per-task report
    leaves the multipliers out."""
    B, L, V = 3, 8, 11
    logits = torch.randn(B, L, V, generator=_gen(5))
    targets = torch.randint(0, V, (B, L), generator=_gen(6))
    is_masked = torch.rand(B, L, generator=_gen(7)) < 0.7
    task_ids = torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1], [2, 2, 2, 2, 0, 0, 0, 0], [1, 1, 1, 1, 1, 2, 2, -1]])
    is_masked &= task_ids >= 0
    is_text = torch.rand(B, L, generator=_gen(8)) < 0.5
    task_w, text_w = torch.tensor([1.0, 3.0, 0.5]), torch.tensor([1.0, 1.0, 4.0])
    mult = task_position_weights(task_ids, is_text, task_w, text_w)
    assert mult[0, 6] == 0 and mult[0, 3] == 3.0 and mult[1, 0] == (4.0 if is_text[1, 0] else 0.5)
    one = masked_diffusion_loss(logits, targets, is_masked, multipliers=mult, task_ids=task_ids, num_tasks=3)
    loop_sum, report = torch.tensor(0.0), torch.zeros(3)
    for ti in range(3):
        for part, w in ((~is_text, 1.0), (is_text, float(text_w[ti]))):
            picked = is_masked & (task_ids == ti) & part
            terms = masked_diffusion_loss(logits, targets, picked)
            loop_sum = loop_sum + float(task_w[ti]) * w * terms.loss_sum
            report[ti] += terms.loss_sum
    torch.testing.assert_close(one.loss_sum, loop_sum)
    torch.testing.assert_close(one.task_sum, report)
    torch.testing.assert_close(one.task_count, torch.stack([(is_masked & (task_ids == i)).sum() for i in range(3)])
                               .float())


@pytest.mark.parametrize("scheme", ["per_token", "per_sequence"])
def test_global_normalization_over_micro_batches_and_ranks(scheme):
    """4 rows split as 2 fake ranks x 2 micro-batches: sum/global-count (x world size, as DDP/FSDP average
    gradients) gives the full-batch loss and gradient."""
    torch.manual_seed(0)
    B, L, V, D = 4, 12, 11, 8
    model = torch.nn.Sequential(torch.nn.Embedding(V + 1, D), torch.nn.Linear(D, V)).double()
    ids = torch.randint(0, V, (B, L), generator=_gen(6))
    answer = torch.zeros(B, L, dtype=torch.bool)
    answer[:, 3:] = True
    answer[1, 3:8] = False  # rows with different answer lengths and masked counts
    m = mask_answer_tokens(ids, answer, None, _gen(7), mask_id=V, scheme=scheme)

    def terms(rows):
        w, rc = loss_weights(m.is_masked[rows], answer[rows], m.t[rows], scheme=scheme)
        return masked_diffusion_loss(model(m.noisy_ids[rows]), ids[rows], m.is_masked[rows], weights=w, row_count=rc)

    def grads():
        g = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return g

    full = terms(slice(0, 4))
    full_loss = full.loss_sum / full.count
    full_loss.backward()
    g_full = grads()

    world = 2
    shards = {0: [[0], [1]], 1: [[2], [3]]}  # rank -> micro-batches (row lists)
    count = sum(loss_weights(m.is_masked[r], answer[r], m.t[r], scheme=scheme)[1].sum()
                for mbs in shards.values() for r in mbs)  # what all_reduce(SUM) gives every rank
    count = global_count(count)
    total_loss, rank_grads = 0.0, []
    for rank, mbs in shards.items():
        for rows in mbs:
            t = terms(rows)
            (t.loss_sum * world / count).backward()
            total_loss += (t.loss_sum / count).item()
        rank_grads.append(grads())
    averaged = [(a + b) / world for a, b in zip(*rank_grads)]  # what DDP / FSDP's reduce does
    assert total_loss == pytest.approx(full_loss.item(), rel=1e-12)
    for a, b in zip(averaged, g_full):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_empty_mask_still_backpropagates():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    terms = masked_diffusion_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    loss = terms.loss_sum / global_count(terms.count)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and (logits.grad == 0).all()


def test_gathered_logits_give_the_same_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    targets = torch.randint(0, 11, (2, 6), generator=g)
    is_masked = torch.rand(2, 6, generator=g) < 0.5
    weights = torch.rand(2, 6, generator=g)
    full = masked_diffusion_loss(logits, targets, is_masked, weights=weights)
    gathered = masked_diffusion_loss(logits[is_masked], targets, is_masked, weights=weights)
    assert torch.allclose(full.loss_sum, gathered.loss_sum) and full.count == gathered.count
    with pytest.raises(ValueError, match="N_masked"):
        masked_diffusion_loss(logits[is_masked][:-1], targets, is_masked)


# ---- drop_prompts ---------------------------------------------------------------------------------------------

def test_drop_prompts_masks_a_whole_prompt_or_none_of_it():
    mask_id = 99
    seg = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
    ans = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    ids = torch.arange(10).view(1, 10)
    g = torch.Generator().manual_seed(0)
    out = drop_prompts(ids, ans, seg, torch.ones(1, 10), g, mask_id=mask_id)
    # every prompt token of both samples masked; answers and padding untouched (this is generate()'s uncond input)
    assert out.tolist() == [[99, 99, 2, 3, 99, 99, 6, 7, 8, 9]]
    assert torch.equal(drop_prompts(ids, ans, seg, torch.zeros(1, 10), g, mask_id=mask_id), ids)
    # only the second sample's task drops: rate is per position, taken from its sample
    rate = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    assert drop_prompts(ids, ans, seg, rate, g, mask_id=mask_id).tolist() == [[0, 1, 2, 3, 99, 99, 6, 7, 8, 9]]
    # at rate 0.3, each sample keeps or drops its prompt as a whole, ~30% of samples
    many = ids.repeat(4000, 1)
    out = drop_prompts(many, ans.repeat(4000, 1), seg.repeat(4000, 1), torch.full((4000, 10), 0.3),
                       torch.Generator().manual_seed(1), mask_id=mask_id)
    dropped = out[:, [0, 1, 4, 5]] == mask_id                                 # (4000, 4): prompt positions
    assert (dropped[:, 0] == dropped[:, 1]).all() and (dropped[:, 2] == dropped[:, 3]).all()
    assert 0.27 < dropped[:, [0, 2]].float().mean() < 0.33
    assert not torch.equal(dropped[:, 0], dropped[:, 2])                      # samples draw independently


def test_t_min_floors_the_masking_rate_per_position():
    ids = torch.zeros(400, 50, dtype=torch.long)
    ans = torch.ones(400, 50, dtype=torch.bool)
    floor = torch.zeros(400, 50)
    floor[200:] = 0.8                                                        # the second half's task has a floor
    m = mask_answer_tokens(ids, ans, None, _gen(3), mask_id=7, t_min=floor)
    assert m.t[:200].min() < 0.1 and m.t[200:].min() >= 0.8
    assert abs(m.is_masked[:200].float().mean() - 0.5) < 0.03 and abs(m.is_masked[200:].float().mean() - 0.9) < 0.03
    # no floor: identical to not passing one
    plain = mask_answer_tokens(ids, ans, None, _gen(3), mask_id=7)
    zero = mask_answer_tokens(ids, ans, None, _gen(3), mask_id=7, t_min=torch.zeros(400, 50))
    assert torch.equal(plain.is_masked, zero.is_masked) and torch.equal(plain.t, zero.t)


def test_per_sample_shares_t_within_a_sample_and_spreads_the_masked_fraction():
    # 2 packed samples of 64 answer tokens per row (segments 1 and 2), 2,000 rows
    ids = torch.zeros(2000, 128, dtype=torch.long)
    ans = torch.ones(2000, 128, dtype=torch.bool)
    seg = torch.cat([torch.ones(2000, 64), torch.full((2000, 64), 2)], 1).long()
    m = mask_answer_tokens(ids, ans, None, _gen(5), mask_id=7, scheme="per_sample", segment_ids=seg)
    assert (m.t[:, :64] == m.t[:, :1]).all() and (m.t[:, 64:] == m.t[:, 64:65]).all()   # one t per sample
    assert not torch.equal(m.t[:, 0], m.t[:, 64])                                          # drawn per sample
    frac = m.is_masked[:, :64].float().mean(1)                                             # (2000,) per sample
    # the masked fraction of an answer covers [0, 1] (~uniform), as iterative unmasking visits it ...
    assert (frac > 0.9).float().mean() > 0.07 and (frac < 0.1).float().mean() > 0.07
    # ... where per_token concentrates it near 0.5
    tok = mask_answer_tokens(ids, ans, None, _gen(5), mask_id=7, scheme="per_token").is_masked[:, :64]
    assert (tok.float().mean(1) > 0.75).float().mean() < 0.01
    assert abs(m.is_masked.float().mean() - 0.5) < 0.03
    floored = mask_answer_tokens(ids, ans, None, _gen(5), mask_id=7, scheme="per_sample", segment_ids=seg,
                                 t_min=torch.full((2000, 128), 0.8))
    assert floored.t.min() >= 0.8
    weights, count = loss_weights(m.is_masked, ans, m.t, scheme="per_sample")
    assert weights is None and torch.equal(count, m.is_masked.sum(1).float())   # per-token loss, as per_token
    with pytest.raises(ValueError, match="segment_ids"):
        mask_answer_tokens(ids, ans, None, _gen(5), mask_id=7, scheme="per_sample")


def test_shared_t_draws_per_sample_only_where_asked():
    ids = torch.zeros(500, 128, dtype=torch.long)
    ans = torch.ones(500, 128, dtype=torch.bool)
    seg = torch.cat([torch.ones(500, 64), torch.full((500, 64), 2)], 1).long()
    shared = torch.zeros(500, 128, dtype=torch.bool)
    shared[:, 64:] = True                                  # the second sample's task masks per sample
    m = mask_answer_tokens(ids, ans, None, _gen(2), mask_id=7, segment_ids=seg, shared_t=shared)
    assert (m.t[:, 64:] == m.t[:, 64:65]).all()
    assert (m.t[:, :64].std(1) > 0.1).all()                # per token in the first sample
    # without shared_t, per_token draws exactly the same stream as before the knob existed
    a = mask_answer_tokens(ids, ans, None, _gen(2), mask_id=7)
    b = mask_answer_tokens(ids, ans, None, _gen(2), mask_id=7, segment_ids=seg)
    assert torch.equal(a.t, b.t) and torch.equal(a.is_masked, b.is_masked)
