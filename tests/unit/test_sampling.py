"""The batched sampler (model/sampling.py) on a tiny bidirectional stand-in model and on the debug Transformer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model.config import ModelConfig
from model.sampling import (Block, asr_length, block_spans, default_steps, generate, num_transfer_tokens,
                            position_penalty_factor, sample_categorical, tts_length)
from model.transformer import Transformer
from model.vocab import Modality, Vocab

VOCAB = Vocab(text_size=300, n_q=2, image_codebook_size=17)


class TinyMixer(nn.Module):
    """Same call signature as model.transformer.Transformer: embedding + one bidirectional mixing layer.
    Tokens see the mean of their own segment (segment 0 = padding, isolated), and positions restart at every
    segment start, so a left-padded row computes what the unpadded row computes."""

    def __init__(self, vocab_size: int, dim: int = 32, max_len: int = 128) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab_size)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
        self.calls: list[torch.Tensor] = []
        self.rows_seen: list[torch.Tensor | None] = []

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None, *,
                only: torch.Tensor | None = None, vocab_rows: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append(input_ids.clone())
        self.rows_seen.append(vocab_rows)
        B, L = input_ids.shape
        seg = torch.ones_like(input_ids) if segment_ids is None else segment_ids
        idx = torch.arange(L).expand(B, L)
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        positions = idx - torch.where(starts, idx, 0).cummax(1).values  # (B, L)
        h = self.tok(input_ids) + self.pos(positions)
        same = (seg[:, :, None] == seg[:, None, :]).float()  # (B, L, L)
        ctx = (same @ h) / same.sum(-1, keepdim=True)
        logits = self.out(torch.tanh(h + self.mix(ctx)))  # (B, L, V)
        logits = logits if vocab_rows is None else logits[..., vocab_rows]   # (B, L, C)
        return logits if only is None else logits[only]   # (N, V) at the chosen positions


@pytest.fixture
def model() -> TinyMixer:
    return TinyMixer(VOCAB.size)


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB.text_size, (1, n), generator=torch.Generator().manual_seed(seed))


# ---- helpers ----------------------------------------------------------------------------------------------

def test_num_transfer_tokens_schedule():
    s = num_transfer_tokens(torch.tensor([10, 3, 0]), 4)
    assert s.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert (s.sum(1) == torch.tensor([10, 3, 0])).all()


def test_length_helpers():
    assert asr_length(100) == 20 and asr_length(101) == 21 and asr_length(100, ratio=0.1, multiple=8) == 16
    assert tts_length(10) == 35 and tts_length(10, multiple=2) == 36 and tts_length(10, ratio=2.0) == 20
    assert default_steps(64) == 32 and default_steps(1) == 1


def test_position_penalty_factor_ramps_after_start():
    masked = torch.ones(1, 10, dtype=torch.bool)
    f = position_penalty_factor(masked, 3.0, start=4)[0]
    # Reference ramp: 1 + (penalty - 1) * i / (n - start) for the i-th masked position after `start`.
    torch.testing.assert_close(f, torch.tensor([1, 1, 1, 1, 1, 1 + 2 / 6, 1 + 4 / 6, 2, 1 + 8 / 6, 1 + 10 / 6]))


# ---- generate ---------------------------------------------------------------------------------------------

def test_fills_canvas_following_the_schedule(model):
    prompt = _prompt(6)
    out, history = generate(model, prompt, vocab=VOCAB, gen_length=10, steps=4, return_history=True)
    assert out.shape == (1, 10) and not (out == VOCAB.mask_id).any()
    assert len(history) == 4 and torch.equal(history[-1], out)
    filled = [int((h != VOCAB.mask_id).sum()) for h in history]
    per_step = [b - a for a, b in zip([0] + filled, filled)]
    assert per_step == num_transfer_tokens(torch.tensor([10]), 4)[0].tolist() == [3, 3, 2, 2]
    # Once a position is decoded it never changes.
    for before, after in zip(history, history[1:]):
        kept = before != VOCAB.mask_id
        assert torch.equal(before[kept], after[kept])


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "topk_margin", "random"])
def test_temperature_zero_is_deterministic(model, alg):
    prompt = _prompt(5)
    a = generate(model, prompt, vocab=VOCAB, gen_length=8, steps=4, alg=alg, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, vocab=VOCAB, gen_length=8, steps=4, alg=alg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not (a == VOCAB.mask_id).any()


def test_temperature_sampling_uses_generator(model):
    prompt = _prompt(5)
    run = lambda seed: generate(model, prompt, vocab=VOCAB, gen_length=16, steps=8, temperature=1.0, top_p=0.9,
                                generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_cfg_zero_equals_plain_and_cfg_batches_one_forward(model):
    prompt = torch.cat([_prompt(5, 0), _prompt(5, 1)])
    plain = generate(model, prompt, vocab=VOCAB, gen_length=8, steps=4)
    assert torch.equal(generate(model, prompt, vocab=VOCAB, gen_length=8, steps=4, cfg_scale=0.0), plain)

    model.calls.clear()
    guided = generate(model, prompt, vocab=VOCAB, gen_length=8, steps=4, cfg_scale=3.0)
    assert len(model.calls) == 4 and all(c.shape == (4, 13) for c in model.calls)
    uncond = model.calls[0][2:]
    assert (uncond[:, :5] == VOCAB.mask_id).all(), "unconditional rows see the prompt fully masked"
    assert torch.equal(model.calls[0][:2, :5], prompt)
    assert not torch.equal(guided, plain), "guidance with this scale should change the argmax somewhere"
    # An explicit unconditional prompt of another length is left-padded into the same batch.
    model.calls.clear()
    generate(model, prompt, vocab=VOCAB, gen_length=8, steps=4, cfg_scale=1.0,
             uncond_prompt_ids=torch.full((2, 3), VOCAB.im_start_id))
    assert model.calls[0].shape == (4, 13)


def test_pre_infill_token_is_fixed(model):
    boa = VOCAB.boa_id
    out, history = generate(model, _prompt(4), vocab=VOCAB, gen_length=20, steps=10, pre_infill=[(boa, 0.2)],
                            return_history=True)
    assert out[0, 4] == boa and all(h[0, 4] == boa for h in history)
    assert not (out == VOCAB.mask_id).any()


@pytest.mark.parametrize("modality", [Modality.AUDIO, Modality.IMAGE])
def test_modality_mask_holds(model, modality):
    out = generate(model, _prompt(4), vocab=VOCAB, gen_length=12, steps=6, modality=modality, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    allowed = VOCAB.allowed_ids(modality)
    assert allowed[out].all()


def test_per_position_modality(model):
    mod = torch.tensor([int(Modality.TEXT)] * 4 + [int(Modality.IMAGE)] * 8)
    out = generate(model, _prompt(4), vocab=VOCAB, gen_length=12, steps=6, modality=mod)
    assert VOCAB.allowed_ids(Modality.TEXT)[out[0, :4]].all()
    assert VOCAB.allowed_ids(Modality.IMAGE)[out[0, 4:]].all()


def test_blockwise_fills_left_to_right(model):
    out, history = generate(model, _prompt(4), vocab=VOCAB, gen_length=12, steps=6, block_length=4,
                            return_history=True)
    assert len(history) == 6 and not (out == VOCAB.mask_id).any()
    for h in history:
        filled = (h[0] != VOCAB.mask_id).view(3, 4)  # (blocks, block_length)
        for b in range(1, 3):
            if filled[b].any():
                assert filled[:b].all(), "a block started before the previous one was full"
    # 2 steps per block: after step 2 exactly block 0 is full.
    assert (history[1][0, :4] != VOCAB.mask_id).all() and (history[1][0, 4:] == VOCAB.mask_id).all()
    with pytest.raises(ValueError, match="block_length"):
        generate(model, _prompt(4), vocab=VOCAB, gen_length=12, steps=6, block_length=5)
    with pytest.raises(ValueError, match="number of blocks"):
        generate(model, _prompt(4), vocab=VOCAB, gen_length=12, steps=4, block_length=4)


def test_explicit_blocks_decide_the_first_block_first(model):
    """blocks=[(1, 1), (11, 3)]: a one-token transcript in the first step, then the rest in three steps."""
    out, history = generate(model, _prompt(4), vocab=VOCAB, gen_length=12, steps=4, blocks=[(1, 1), (11, 3)],
                            alg="random", generator=torch.Generator().manual_seed(0), return_history=True)
    assert len(history) == 4 and not (out == VOCAB.mask_id).any()
    assert (history[0][:, 0] != VOCAB.mask_id).all() and (history[0][:, 1:] == VOCAB.mask_id).all()
    assert [int((h[0] != VOCAB.mask_id).sum()) for h in history] == [1, 5, 9, 12]
    assert block_spans(12, 6, 4) == [(0, 4, Block(4, 2)), (4, 8, Block(4, 2)), (8, 12, Block(4, 2))]
    assert block_spans(12, 4, blocks=[(1, 1), (11, 3)]) == [(0, 1, Block(1, 1)), (1, 12, Block(11, 3))]
    for bad in ([(1, 1), (10, 3)], [(1, 2), (11, 3)], [(0, 1), (12, 3)]):
        with pytest.raises(ValueError, match="blocks"):
            generate(model, _prompt(4), vocab=VOCAB, gen_length=12, steps=4, blocks=bad)
    with pytest.raises(ValueError, match="not both"):
        generate(model, _prompt(4), vocab=VOCAB, gen_length=12, steps=4, blocks=[(12, 4)], block_length=4)


def test_a_block_can_decode_by_argmax_without_guidance(model):
    """Block(4, 2, 0.0, 0.0) under cfg_scale=2, temperature=1: the first block is what plain argmax decoding
    gives (the rest of the canvas is masked in both), with conditional rows only; the second block is guided."""
    batch_sizes = []

    def counting(x, *args, **kwargs):
        batch_sizes.append(x.shape[0])
        return model(x, *args, **kwargs)

    prompt = _prompt(4).repeat(2, 1)
    mixed = generate(counting, prompt, vocab=VOCAB, gen_length=12, steps=6, cfg_scale=2.0, temperature=1.0,
                     blocks=[Block(4, 2, 0.0, 0.0), Block(8, 4)], generator=torch.Generator().manual_seed(0))
    assert batch_sizes == [2, 2, 4, 4, 4, 4]       # guidance doubles the rows of the second block only
    plain = generate(model, prompt, vocab=VOCAB, gen_length=12, steps=6, blocks=[(4, 2), (8, 4)])
    assert torch.equal(mixed[:, :4], plain[:, :4])


def test_uncond_hidden_keeps_decoded_positions_masked_for_the_unconditional_rows(model):
    seen = []

    def recording(x, *args, **kwargs):
        seen.append(x.clone())
        return model(x, *args, **kwargs)

    hidden = torch.zeros(12, dtype=torch.bool)
    hidden[:4] = True
    out = generate(recording, _prompt(4), vocab=VOCAB, gen_length=12, steps=6, cfg_scale=2.0,
                   blocks=[Block(4, 2, 0.0, 0.0), Block(8, 4)], uncond_hidden=hidden)
    cond, uncond = seen[-1][0, 4:], seen[-1][1, 4:]     # the last call: (2B, P + G), canvas after the prompt
    assert torch.equal(cond[:4], out[0, :4]) and (uncond[:4] == VOCAB.mask_id).all()
    assert torch.equal(cond[4:], uncond[4:])            # the rest of the canvas is shared
    with pytest.raises(ValueError, match="uncond_hidden"):
        generate(model, _prompt(4), vocab=VOCAB, gen_length=12, steps=6, cfg_scale=2.0, uncond_hidden=hidden[:5])


def test_repetition_penalty_reduces_repeats(model):
    prompt = _prompt(4)
    plain = generate(model, prompt, vocab=VOCAB, gen_length=16, steps=16)
    penalized = generate(model, prompt, vocab=VOCAB, gen_length=16, steps=16, repetition_penalty=50.0)
    assert plain[0].unique().numel() < 16, "the stand-in model repeats itself without a penalty"
    assert penalized[0].unique().numel() > plain[0].unique().numel()


@pytest.mark.parametrize("alg", ["maskgit_plus", "entropy"])  # positive and negative confidences
def test_position_penalty_prefers_raster_order(model, alg):
    prompt = _prompt(4)
    kw = dict(vocab=VOCAB, gen_length=20, steps=20, alg=alg, penalty_start=0, return_history=True)
    _, plain = generate(model, prompt, **kw)
    _, raster = generate(model, prompt, position_penalty=1e6, **kw)

    def order(history):
        return [int((b != a)[0].nonzero()) for a, b in zip([torch.full_like(history[0], VOCAB.mask_id)] + history,
                                                           history)]
    assert order(raster) == sorted(order(raster)) and order(plain) != sorted(order(plain))


def test_batched_left_padded_prompts_match_single_runs(model):
    lengths = [3, 7, 5]
    prompts = [_prompt(n, seed=i) for i, n in enumerate(lengths)]
    P = max(lengths)
    batch = torch.full((3, P), VOCAB.pad_id)
    mask = torch.zeros(3, P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        batch[i, P - p.shape[1]:] = p[0]
        mask[i, P - p.shape[1]:] = True
    for kw in (dict(), dict(cfg_scale=2.0, block_length=4)):
        together = generate(model, batch, vocab=VOCAB, gen_length=8, steps=4, prompt_mask=mask, **kw)
        for i, p in enumerate(prompts):
            alone = generate(model, p, vocab=VOCAB, gen_length=8, steps=4, **kw)
            assert torch.equal(together[i], alone[0]), f"row {i} ({kw})"


def test_real_debug_transformer():
    torch.manual_seed(0)
    net = Transformer(ModelConfig.preset("debug"), vocab_size=VOCAB.size).eval()
    lengths = [3, 6]
    P = max(lengths)
    batch = torch.full((2, P), VOCAB.pad_id)
    mask = torch.zeros(2, P, dtype=torch.bool)
    prompts = [_prompt(n, seed=i) for i, n in enumerate(lengths)]
    for i, p in enumerate(prompts):
        batch[i, P - p.shape[1]:] = p[0]
        mask[i, P - p.shape[1]:] = True
    out, history = generate(net, batch, vocab=VOCAB, gen_length=8, steps=4, prompt_mask=mask,
                            modality=Modality.TEXT, return_history=True)
    assert not (out == VOCAB.mask_id).any() and VOCAB.allowed_ids(Modality.TEXT)[out].all()
    assert [int((h != VOCAB.mask_id).sum()) for h in history] == [4, 8, 12, 16]
    for i, p in enumerate(prompts):
        alone = generate(net, p, vocab=VOCAB, gen_length=8, steps=4, modality=Modality.TEXT)
        assert torch.equal(out[i], alone[0])


def test_explicit_allowed_mask_per_position(model):
    """`allowed` expresses canvases mixing modalities per position (a speech answer: codebook q's codes at
    frame offset q, or the closing tokens), which `modality` cannot."""
    G = 8
    allowed = torch.zeros(G, VOCAB.size, dtype=torch.bool)
    for i in range(G):
        lo, hi = VOCAB.audio_range(i % VOCAB.n_q)
        allowed[i, lo:hi] = True
    allowed[:, [VOCAB.eoa_id, VOCAB.im_end_id, VOCAB.mask_id]] = True   # the mask id is dropped by generate
    out = generate(model, _prompt(5), vocab=VOCAB, gen_length=G, steps=4, allowed=allowed, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))[0]
    for i, tid in enumerate(out.tolist()):
        assert allowed[i, tid] and tid != VOCAB.mask_id
    # a (V',) mask narrower than the model's rows: the missing columns are forbidden
    only_eos = torch.zeros(VOCAB.eos_id + 1, dtype=torch.bool)
    only_eos[VOCAB.eos_id] = True
    out = generate(model, _prompt(5), vocab=VOCAB, gen_length=4, steps=2, allowed=only_eos)
    assert (out == VOCAB.eos_id).all()
    with pytest.raises(ValueError, match="at least one id"):
        generate(model, _prompt(5), vocab=VOCAB, gen_length=4, steps=2, allowed=torch.zeros(4, VOCAB.size).bool())
    with pytest.raises(ValueError, match="not both"):
        generate(model, _prompt(5), vocab=VOCAB, gen_length=4, steps=2, allowed=only_eos, modality=Modality.TEXT)


@pytest.mark.parametrize("temperature,alg,rep", [(0.0, "entropy", 1.0), (0.8, "maskgit_plus", 1.0),
                                                 (1.0, "random", 1.3), (0.7, "topk_margin", 1.2)])
def test_subset_head_matches_the_full_head(model, temperature, alg, rep):
    """An image canvas may emit 17 of ~2.4k ids: after the first step the model computes those rows alone, and
    the canvas is the one the full rows with -inf elsewhere give, sampled draws included."""
    prompt = torch.randint(0, 300, (3, 6), generator=torch.Generator().manual_seed(1))
    out = {}
    for subset in (False, True):
        model.rows_seen.clear()
        out[subset] = generate(model, prompt, vocab=VOCAB, gen_length=12, steps=6, alg=alg, temperature=temperature,
                               repetition_penalty=rep, cfg_scale=1.0, modality=Modality.IMAGE, subset_head=subset,
                               generator=torch.Generator().manual_seed(7))
        rows = model.rows_seen
        if subset:
            assert rows[0] is None and all(r is not None for r in rows[1:])
            lo, hi = VOCAB.image_range()
            assert rows[1].tolist() == list(range(lo, hi))
        else:
            assert all(r is None for r in rows)
    assert torch.equal(out[False], out[True])


def test_subset_head_is_skipped_for_wide_canvases(model):
    """A text canvas may emit most ids: the head keeps every row."""
    prompt = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(2))
    model.rows_seen.clear()
    generate(model, prompt, vocab=VOCAB, gen_length=8, steps=4, modality=None)
    assert all(r is None for r in model.rows_seen)


def test_transformer_vocab_rows_are_the_full_logits_columns():
    from model.config import ModelConfig
    from model.transformer import Transformer

    torch.manual_seed(0)
    net = Transformer(ModelConfig.preset("debug"), vocab_size=VOCAB.size).eval()
    ids = torch.randint(0, VOCAB.size, (2, 10))
    only = torch.zeros(2, 10, dtype=torch.bool)
    only[:, 6:] = True
    rows = torch.tensor([3, 17, 400, VOCAB.size - 1])
    with torch.no_grad():
        full = net(ids, None, only=only)                 # (8, V)
        part = net(ids, None, only=only, vocab_rows=rows)   # (8, 4)
    assert part.shape == (8, 4) and torch.allclose(part, full[:, rows], atol=1e-5)


def test_sample_categorical_frequencies_and_zero_columns():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.0, 0.3])
    draws = sample_categorical(probs.expand(20000, 5), torch.Generator().manual_seed(0))   # (20000,)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert freq[1] == 0 and freq[3] == 0 and torch.allclose(freq, probs, atol=0.01)
    # the same uniforms pick the same ids with or without the zero columns
    kept = torch.tensor([0, 2, 4])
    a = sample_categorical(probs.expand(500, 5), torch.Generator().manual_seed(3))
    b = kept[sample_categorical(probs[kept].expand(500, 3), torch.Generator().manual_seed(3))]
    assert torch.equal(a, b)
