"""Block-wise key/value cache (model/kvcache.py, Transformer.forward(kv=, window=)) and confidence-threshold
decoding (generate's kv_cache and unmask_threshold) on the debug Transformer."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import ModelConfig
from model.kvcache import KVCache, decode_window, window_cost
from model.sampling import generate, threshold_transfer
from model.transformer import Transformer
from model.vocab import Modality, Vocab

VOCAB = Vocab(text_size=200, n_q=2, audio_codebook_size=16, image_codebook_size=32)


def debug_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(ModelConfig.preset("debug"), **overrides)
    return Transformer(cfg, vocab_size=VOCAB.size, media_markers=VOCAB.media_markers).eval()


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Left-padded (B, P) prompts of text ids, their (B, P) mask and the prompts alone (1, n)."""
    lo, hi = VOCAB.text_range()
    prompts = [torch.randint(lo, hi, (1, n), generator=torch.Generator().manual_seed(seed + i))
               for i, n in enumerate(lengths)]
    P = max(lengths)
    ids = torch.full((len(lengths), P), VOCAB.pad_id)
    mask = torch.zeros(len(lengths), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - p.shape[1]:], mask[i, P - p.shape[1]:] = p[0], True
    return ids, mask, prompts


class Recorder(torch.nn.Module):
    """Passes every call to the model and keeps (kwargs keys, logits)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.calls.append((kwargs.get("window"), out))
        return out


@pytest.mark.parametrize("logits", ["aligned", "shifted"])
def test_full_forward_with_a_cache_is_exact_and_fills_it(logits):
    model = debug_model(logits=logits, media_positions=8)
    ids, mask, _ = padded_batch([5, 9])
    ids = torch.cat([ids, torch.full((2, 6), VOCAB.mask_id)], 1)                     # (2, 15)
    seg = torch.cat([mask.long(), torch.ones(2, 6, dtype=torch.long)], 1)
    kv = KVCache()
    assert torch.equal(model(ids, seg, kv=kv), model(ids, seg))
    assert kv.filled and kv.length == 15 and len(kv.layers) == model.cfg.n_layers
    assert kv.layers[0].k.shape == (2, model.cfg.n_kv_heads, 15, model.cfg.head_dim)


@pytest.mark.parametrize("logits", ["aligned", "shifted"])
@pytest.mark.parametrize("padded", [False, True])
def test_window_matches_a_full_recompute_when_nothing_changed(logits, padded):
    """Grouped heads (debug: 4 query, 2 key/value), true RoPE positions of padded rows, the head on a subset
    of ids: a window over the filled cache gives the full forward's logits of its columns."""
    model = debug_model(logits=logits, media_positions=8)
    ids, mask, _ = padded_batch([4, 7] if padded else [7, 7])
    ids = torch.cat([ids, torch.full((2, 1), VOCAB.boi_id), torch.full((2, 8), VOCAB.mask_id)], 1)  # (2, 16)
    seg = torch.cat([mask.long(), torch.ones(2, 9, dtype=torch.long)], 1) if padded else None
    full = model(ids, seg)                                                              # (2, 16, V)
    kv = KVCache()
    model(ids, seg, kv=kv)
    for a, b in [(8, 12), (12, 16), (0, 16), (3, 9)]:
        torch.testing.assert_close(model(ids, seg, kv=kv, window=(a, b)), full[:, a:b], atol=1e-5, rtol=1e-5)
    rows = torch.arange(VOCAB.image_range()[0], VOCAB.image_range()[1])
    only = torch.zeros(ids.shape, dtype=torch.bool)
    only[:, 9:13] = True
    got = model(ids, seg, only=only, vocab_rows=rows, kv=kv, window=(9, 13))            # (8, C)
    torch.testing.assert_close(got, full[only][:, rows], atol=1e-5, rtol=1e-5)


def test_one_layer_window_sees_its_new_tokens_at_their_true_positions():
    """In one layer the cached keys and values of the other columns depend on their own tokens only: a window
    whose tokens changed since the fill equals the full forward of the new sequence (so the window's RoPE
    positions, the merge into the cache and the mask rows are right)."""
    model = debug_model(n_layers=1)
    ids, mask, _ = padded_batch([3, 8])
    ids = torch.cat([ids, torch.full((2, 8), VOCAB.mask_id)], 1)                      # (2, 16)
    seg = torch.cat([mask.long(), torch.ones(2, 8, dtype=torch.long)], 1)
    kv = KVCache()
    model(ids, seg, kv=kv)
    new = ids.clone()
    new[:, 10:14] = torch.randint(0, 200, (2, 4), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(new, seg, kv=kv, window=(10, 14)), model(new, seg)[:, 10:14],
                               atol=1e-5, rtol=1e-5)


def test_window_errors_name_the_problem():
    model = debug_model()
    ids = torch.randint(0, 200, (1, 10))
    with pytest.raises(ValueError, match="filled by a full forward"):
        model(ids, kv=KVCache(), window=(2, 4))
    kv = KVCache()
    model(ids, kv=kv)
    only = torch.zeros(1, 10, dtype=torch.bool)
    only[0, 0] = True
    with pytest.raises(ValueError, match="inside window"):
        model(ids, only=only, kv=kv, window=(2, 4))
    with pytest.raises(ValueError, match="0 <= a < b"):
        model(ids, kv=kv, window=(4, 4))
    assert decode_window("dual", 5, 9, 20) == (5, 9) and decode_window("prefix", 5, 9, 20) == (5, 20)
    assert window_cost(None, 20) == 1.0 and window_cost((5, 9), 20) == 0.2


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_first_step_equals_the_uncached_step_exactly(mode):
    model = debug_model()
    ids, mask, _ = padded_batch([4, 6])
    runs = {}
    for cache in ("off", mode):
        rec = Recorder(model)
        out = generate(rec, ids, vocab=VOCAB, gen_length=8, steps=4, prompt_mask=mask, modality=Modality.TEXT,
                       kv_cache=cache)
        runs[cache] = (out, rec.calls)
    (_, off_calls), (_, on_calls) = runs["off"], runs[mode]
    assert torch.equal(on_calls[0][1], off_calls[0][1]) and on_calls[0][0] is None
    assert [w for w, _ in on_calls[1:]] == [(6, 14)] * 3        # one block: the canvas columns, prompt cached
    one_step = [generate(model, ids, vocab=VOCAB, gen_length=8, steps=1, prompt_mask=mask, kv_cache=c)
                for c in ("off", mode)]
    assert torch.equal(*one_step)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_one_layer_model_decodes_the_same_canvas_cached(mode):
    """In one layer nothing outside the running columns changes what they see during a block (the prompt, the
    finished blocks and the still-masked rest keep their tokens), so the cache is exact: same canvas in 3 blocks,
    batched with padding, with guidance (2B rows) too."""
    model = debug_model(n_layers=1)
    ids, mask, _ = padded_batch([3, 7, 5])
    for kw in ({}, {"cfg_scale": 1.5}):
        ref = generate(model, ids, vocab=VOCAB, gen_length=12, steps=6, block_length=4, prompt_mask=mask,
                       modality=Modality.TEXT, ties="first", **kw)
        got = generate(model, ids, vocab=VOCAB, gen_length=12, steps=6, block_length=4, prompt_mask=mask,
                       modality=Modality.TEXT, ties="first", kv_cache=mode, **kw)
        assert torch.equal(got, ref), kw


def test_dual_cache_runs_block_windows_and_refreshes_at_block_starts():
    rec = Recorder(debug_model())
    ids, _, _ = padded_batch([5, 5])
    generate(rec, ids, vocab=VOCAB, gen_length=12, steps=6, block_length=4, kv_cache="dual")
    assert [w for w, _ in rec.calls] == [None, (5, 9), None, (9, 13), None, (13, 17)]


def test_threshold_that_never_passes_is_one_token_per_step():
    """A threshold >= 1 unmasks the most confident position alone: the canvas and every step of the schedule
    with steps = gen_length (one a step)."""
    model = debug_model()
    ids, mask, _ = padded_batch([4, 6])
    kw = {"vocab": VOCAB, "gen_length": 8, "prompt_mask": mask, "modality": Modality.TEXT, "return_history": True}
    out, hist = generate(model, ids, steps=2, unmask_threshold=1.0, **kw)
    ref, ref_hist = generate(model, ids, steps=8, **kw)
    assert len(hist) == 8 and [int((h != VOCAB.mask_id).sum()) for h in hist] == [2 * i for i in range(1, 9)]
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(hist, ref_hist))


def test_threshold_transfer_is_per_row():
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.95], [0.2, 0.3, 0.1, 0.0]])
    p = torch.tensor([[0.1, 0.9, 0.5, 0.95], [0.2, 0.3, 0.1, 0.0]])
    cand = torch.tensor([[True, True, True, False], [True, True, True, True]])
    got = threshold_transfer(conf, p, cand, 0.4, torch.tensor([1, 1]))
    assert got.tolist() == [[False, True, True, False], [False, True, False, False]]   # row 2: its best alone
    got = threshold_transfer(conf, p, cand, 0.4, torch.tensor([1, 2]))                  # a floor of 2 in row 2
    assert got.tolist() == [[False, True, True, False], [True, True, False, False]]
    none = torch.zeros(2, 4, dtype=torch.bool)
    assert not threshold_transfer(conf, p, none, 0.4, torch.tensor([0, 0])).any()


@pytest.mark.parametrize("schedule", ["even", "dream"])
def test_schedule_floor_never_unmasks_less_than_the_schedule(schedule):
    """unmask_floor="schedule": a threshold that never passes is the schedule itself; a low one fills blocks in
    fewer steps, never more than the schedule's."""
    model = debug_model(init_std=0.2)
    ids, mask, _ = padded_batch([4, 6])
    kw = {"vocab": VOCAB, "gen_length": 12, "steps": 6, "block_length": 4, "prompt_mask": mask,
          "modality": Modality.TEXT, "schedule": schedule, "return_history": True}
    ref, ref_hist = generate(model, ids, **kw)
    out, hist = generate(model, ids, unmask_threshold=1.0, unmask_floor="schedule", kv_cache="dual", **kw)
    plain_dual, _ = generate(model, ids, kv_cache="dual", **kw)
    assert torch.equal(out, plain_dual) and len(hist) == len(ref_hist) == 6
    assert [int((h != VOCAB.mask_id).sum()) for h in hist] == [int((h != VOCAB.mask_id).sum()) for h in ref_hist]
    out, hist = generate(model, ids, unmask_threshold=0.3, unmask_floor="schedule", **kw)
    done = [int((h != VOCAB.mask_id).sum()) for h in hist]
    assert all(d >= r for d, r in zip(done, [int((h != VOCAB.mask_id).sum()) for h in ref_hist]))
    assert done[-1] == 24 and not (out == VOCAB.mask_id).any()


def test_low_threshold_fills_a_block_per_step_and_padded_rows_match_single_runs():
    # init_std 0.2: confidences spread as a trained model's do (at 0.02 every position is ~uniform, ~1/V)
    model = debug_model(init_std=0.2)
    ids, mask, prompts = padded_batch([3, 7])
    kw = {"vocab": VOCAB, "gen_length": 8, "steps": 4, "block_length": 4, "modality": Modality.TEXT}
    _, hist = generate(model, ids, prompt_mask=mask, unmask_threshold=1e-9, return_history=True, **kw)
    assert len(hist) == 2 and not (hist[-1] == VOCAB.mask_id).any()
    # a threshold between: rows unmask different counts, each row as it would alone (cache and padding)
    for cache in ("off", "dual"):
        together, hist = generate(model, ids, prompt_mask=mask, unmask_threshold=0.3, kv_cache=cache,
                                  return_history=True, **kw)
        counts = [(h != VOCAB.mask_id).sum(1).tolist() for h in hist]
        assert any(a != b for a, b in counts) and counts[-1] == [8, 8], counts
        for i, p in enumerate(prompts):
            alone = generate(model, p, unmask_threshold=0.3, kv_cache=cache, **kw)
            assert torch.equal(together[i], alone[0]), (cache, i)
    with pytest.raises(ValueError, match="unmask_threshold"):
        generate(model, ids, alg="origin", unmask_threshold=0.5, **kw)
    with pytest.raises(ValueError, match="kv_cache"):
        generate(model, ids, kv_cache="both", **kw)
