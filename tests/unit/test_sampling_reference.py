"""The reference Omni-Diffusion sampler as options of model.sampling.generate, proved against a plain loop.

`plain_reference` below is written from the reference's rules (VITA-MLLM/Omni-Diffusion
omni_diffusion/models/dream/generation_utils.py, `_sample` and `sample_tokens`), one row and one step at a time,
in plain torch, sharing nothing with model/sampling.py. `generate` run with a task's "reference" preset
(pipelines/infer/presets.py) must give its canvas token for token on a tiny random Dream-like Transformer
(Qwen2 q/k/v biases, shifted logits). The options left off, `generate` must give what the sampler gave before
they existed (tests/helpers/sampling_v1.py, a frozen copy).
"""
from __future__ import annotations

import math

import pytest
import torch

from model.config import ModelConfig
from model.sampling import (
    dream_transfer_count,
    generate,
    penalize,
    reveal_probability,
    select_positions,
    top_k_filter,
)
from model.transformer import Transformer
from model.vocab import Modality, Vocab
from pipelines.infer.presets import SamplerPresets, generate_kwargs
from tests.helpers import sampling_v1

VOCAB = Vocab(text_size=300, n_q=1, audio_codebook_size=64, image_codebook_size=96)   # 471 ids


@pytest.fixture(scope="module")
def dream() -> Transformer:
    """A tiny random Dream-like model: q/k/v biases, logits shifted (position i read from i - 1), weights large
    enough that its distributions are peaked (no near-ties between positions' confidences)."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, seq_len=512, qkv_bias=True,
                      logits="shifted", rope_theta=1_000_000.0)
    net = Transformer(cfg, vocab_size=VOCAB.size).eval()
    g = torch.Generator().manual_seed(1)
    for name, p in net.named_parameters():
        if "norm" not in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return net


def _prompts(B: int, P: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB.text_size, (B, P), generator=torch.Generator().manual_seed(seed))


# ---- the reference's rules, one row and one step at a time ---------------------------------------------------

def _ref_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _ref_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def plain_reference(model, prompt: torch.Tensor, *, G: int, steps: int, alg: str, allowed: torch.Tensor,
                    top_p: float = 0.9, top_k: int = 50, repeat_penalty: float = 1.0,
                    max_position_penalty: float = 1.0, cfg: float = 0.0, uncond: torch.Tensor | None = None,
                    boa: int | None = None, eps: float = 1e-3, seed: int = 0, start: int = 100,
                    history: list | None = None) -> torch.Tensor:
    """One prompt (P,) -> its canvas (G,), temperature 0, one block, by the reference's rules. `allowed` (V,)
    bool: ids the canvas may hold (ours: never the mask id or padding rows), -inf before the filters. `start`:
    the masked positions the position penalty spares (the reference's 100; smaller for short canvases)."""
    mask_id = VOCAB.mask_id
    P = prompt.shape[0]
    x = torch.cat([prompt, torch.full((G,), mask_id)])
    if boa is not None:
        x[int(P + G * 0.2)] = boa   # <|begin_of_audio|> at 20% of the canvas
    timesteps = torch.linspace(1, eps, steps + 1)
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        mask_index = x == mask_id
        if mask_index.sum() == 0:
            break
        logits = model(x[None])[0]                                   # (L, V), position i predicts token i
        if cfg > 0:
            un_x = torch.cat([uncond, x[P:]])
            un = model(un_x[None])[0][len(uncond):]                  # the unconditional canvas' logits
            logits = torch.cat([logits[:P], un + (cfg + 1) * (logits[P:] - un)])
        mask_logits = logits[mask_index].clone()                     # (N, V)
        mask_logits[:, ~allowed] = float("-inf")
        mask_logits = _ref_top_k(_ref_top_p(mask_logits, top_p), top_k)
        if alg == "entropy-penalty" and repeat_penalty != 1.0 and i > 0:   # histories[-1]: the canvas so far
            for token in set(x[P:][x[P:] != mask_id].tolist()):
                column = mask_logits[:, token]
                column[column < 0] *= repeat_penalty
                column[column >= 0] /= repeat_penalty
        n = mask_logits.shape[0]
        if max_position_penalty != 1.0 and n > start:
            ramp = [1.0] * start + [j / (n - start) * (max_position_penalty - 1.0) + 1.0 for j in range(n - start)]
            pm = torch.tensor(ramp).unsqueeze(-1).repeat(1, mask_logits.shape[-1])
            neg = mask_logits < 0
            mask_logits[neg] *= pm[neg]
            nonneg = mask_logits >= 0
            mask_logits[nonneg] /= pm[nonneg]
        probs = torch.softmax(mask_logits, dim=-1)
        confidence, x0 = probs.max(dim=-1)
        if alg == "topk_margin":
            sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
            confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
        if alg in ("entropy", "entropy-penalty"):
            confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        t, s = timesteps[i], timesteps[i + 1]
        where = mask_index.nonzero().squeeze(1)                      # masked positions, in order
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            reveal = torch.rand(n, generator=gen) < p_transfer
            x[where[reveal]] = x0[reveal]
        else:
            number = int(n * (1 - s / t)) if i < steps - 1 else n
            number = max(number, 1)
            # the `number` most confident, ties to the earlier position (sorted() is stable)
            transfer = torch.tensor(sorted(range(n), key=lambda j: -confidence[j].item())[:number])
            x[where[transfer]] = x0[transfer]
        if history is not None:
            history.append(x[P:].clone())
    return x[P:]


def _allowed(modality: Modality | None) -> torch.Tensor:
    if modality is None:
        allowed = torch.zeros(VOCAB.size, dtype=torch.bool)
        allowed[: VOCAB.size] = True
        allowed[VOCAB.mask_id] = False
        return allowed
    return VOCAB.allowed_ids(modality)


# ---- the reference presets, token for token -------------------------------------------------------------

REFERENCE = SamplerPresets.preset("reference")
# (task, canvas length, modality): the canvases of the reference script's tasks (t2i / s2i: 260 tokens, one a
# step; svqa / sqa: 128 with <boa> at 20%; vqa 64 / 64; asr and tts 50 tokens in 25 steps) ...
FULL = [("t2i", 260, Modality.IMAGE), ("s2i", 260, Modality.IMAGE), ("svqa", 128, None), ("sqa", 128, None),
        ("vqa", 64, Modality.TEXT), ("asr", 50, Modality.TEXT), ("tts", 50, Modality.AUDIO)]
# ... and shorter ones for the default suite: the same settings, steps cut in proportion, the position penalty
# sparing 10 positions instead of 100 so its ramp still acts
SHORT = [("t2i", 40, Modality.IMAGE), ("s2i", 40, Modality.IMAGE), ("svqa", 32, None), ("sqa", 24, None),
         ("vqa", 16, Modality.TEXT), ("asr", 20, Modality.TEXT), ("tts", 20, Modality.AUDIO)]


def _check_reference_preset(dream, task: str, G: int, modality: Modality | None, start: int) -> None:
    s = REFERENCE.for_task(task)
    steps = max(1, G * min(s.steps, s.length or 260) // (s.length or 260))   # the preset's tokens per step
    prompts = _prompts(2, 12, seed=len(task))
    uncond = None
    if s.cfg_scale:   # its own unconditional prompt (pipelines/infer/guidance.py builds the per-task ones); as
        # long as the prompt: left padding moves attention outputs by ~3e-6, which guidance x3 can turn into a
        # different argmax, a numerical difference that is not the sampler's (padding: test_sampling.py)
        uncond = _prompts(2, 12, seed=99)
    boa = VOCAB.boa_id if s.speech_answer else None
    out = generate(dream, prompts, vocab=VOCAB, gen_length=G, steps=steps, modality=modality,
                   pre_infill=[(boa, s.boa_fraction)] if boa else None, uncond_prompt_ids=uncond,
                   **{**generate_kwargs(s), "penalty_start": start})
    for b in range(2):
        want = plain_reference(dream, prompts[b], G=G, steps=steps, alg=s.alg, allowed=_allowed(modality),
                               top_p=s.top_p, top_k=s.top_k, repeat_penalty=s.repetition_penalty,
                               max_position_penalty=s.position_penalty, cfg=s.cfg_scale,
                               uncond=None if uncond is None else uncond[b], boa=boa, start=start)
        assert torch.equal(out[b], want), f"{task} row {b}: {(out[b] != want).sum()} tokens differ"


@pytest.mark.parametrize("task, G, modality", SHORT, ids=[c[0] for c in SHORT])
def test_reference_preset_reproduces_the_reference_sampler(dream, task, G, modality):
    _check_reference_preset(dream, task, G, modality, start=10)


@pytest.mark.slow
@pytest.mark.parametrize("task, G, modality", FULL, ids=[c[0] for c in FULL])
def test_reference_preset_reproduces_the_reference_sampler_full_canvases(dream, task, G, modality):
    _check_reference_preset(dream, task, G, modality, start=100)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy", "entropy-penalty"])
def test_every_alg_matches_the_reference_with_its_filters_and_schedule(dream, alg):
    rep = 1.3 if alg == "entropy-penalty" else 1.0   # the reference penalizes repeats under entropy-penalty only
    kw = {**generate_kwargs(REFERENCE.vqa), "alg": alg, "repetition_penalty": rep, "position_penalty": 1.5,
          "penalty_start": 100}
    prompts = _prompts(2, 9, seed=5)
    out = generate(dream, prompts, vocab=VOCAB, gen_length=30, steps=12, **{**kw, "penalty_start": 8})
    for b in range(2):
        want = plain_reference(dream, prompts[b], G=30, steps=12, alg=alg, allowed=_allowed(None),
                               repeat_penalty=rep, max_position_penalty=1.5, start=8)
        assert torch.equal(out[b], want), f"{alg} row {b}"


def test_origin_reveals_like_the_reference(dream):
    """alg "origin" draws one uniform per masked position (row-major) from the generator, as the reference
    draws torch.rand over its masked positions; one row, as the reference runs it."""
    prompt = _prompts(1, 8, seed=3)
    kw = {**generate_kwargs(REFERENCE.vqa), "alg": "origin"}
    out = generate(dream, prompt, vocab=VOCAB, gen_length=32, steps=16, generator=torch.Generator().manual_seed(4),
                   **kw)
    want = plain_reference(dream, prompt[0], G=32, steps=16, alg="origin", allowed=_allowed(None), seed=4)
    assert torch.equal(out[0], want)
    assert not (out == VOCAB.mask_id).any()


def test_reference_filters_change_the_entropy_confidence(dream):
    """Top-k 50 before the confidence at temperature 0: the entropy is that of the renormalised top-50, so the
    order in which positions are filled differs from the unfiltered entropy (the project's default)."""
    prompt = _prompts(1, 10, seed=8)
    base = {"vocab": VOCAB, "gen_length": 48, "steps": 24, "return_history": True}
    _, filtered = generate(dream, prompt, top_k=50, top_p=0.9, filter_greedy=True, schedule="dream", **base)
    _, plain = generate(dream, prompt, schedule="dream", **base)
    order = lambda h: [tuple((x != VOCAB.mask_id).nonzero()[:, 1].tolist()) for x in h]
    assert order(filtered) != order(plain)


# ---- the options off: the sampler as it was --------------------------------------------------------------

OLD_PATHS = [
    {"alg": "entropy"},
    {"alg": "maskgit_plus", "temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.3},
    {"alg": "topk_margin", "cfg_scale": 1.5, "block_length": 8},
    {"alg": "entropy", "modality": Modality.IMAGE, "position_penalty": 2.0, "penalty_start": 4, "cfg_scale": 2.0,
     "temperature": 0.7, "repetition_penalty": 1.2},
    {"alg": "random", "pre_infill": [(VOCAB.boa_id, 0.25)], "temperature": 1.0},
    {"alg": "entropy", "blocks": [(4, 4, 0.0, 0.0), (12, 4)], "cfg_scale": 1.0, "temperature": 0.5,
     "uncond_hidden": torch.arange(16) < 4},
]


@pytest.mark.parametrize("kw", OLD_PATHS, ids=[f"path{i}" for i in range(len(OLD_PATHS))])
def test_new_options_off_sample_what_the_sampler_sampled_before(dream, kw):
    """The project and demo presets leave every new option off: their canvases are the old sampler's, draws
    included (tests/helpers/sampling_v1.py is model/sampling.py before the options)."""
    prompts = torch.cat([_prompts(1, 6, seed=1), _prompts(1, 6, seed=2)])
    mask = torch.ones_like(prompts, dtype=torch.bool)
    mask[0, :2] = False   # a left-padded row
    args = {"vocab": VOCAB, "gen_length": 16, "steps": 8, "prompt_mask": mask, **kw}
    new = generate(dream, prompts, generator=torch.Generator().manual_seed(5), **args)
    old = sampling_v1.generate(dream, prompts, generator=torch.Generator().manual_seed(5), **args)
    assert torch.equal(new, old)


# ---- the rules as small functions --------------------------------------------------------------------------

def test_dream_transfer_count_follows_linspace():
    # linspace(1, 1e-3, 5) = 1, .75025, .5005, .25075, .001: 10 masked -> floor(10 x .24975) = 2, then 8 ->
    # floor(8 x .3329) = 2, 6 -> floor(6 x .4990) = 2, the last step all 4
    n, taken = torch.tensor([10]), []
    for step in range(4):
        k = dream_transfer_count(n, step, 4)
        taken.append(int(k))
        n = n - k
    assert taken == [2, 2, 2, 4]
    # at least one a step; never more than are masked (a full block takes none)
    assert dream_transfer_count(torch.tensor([1, 0, 3]), 0, 4).tolist() == [1, 0, 1]
    # 50 positions in 25 steps (the reference's asr / tts): floor(50 x .03996) = 1 first, then 2 a step
    n, taken = torch.tensor([50]), []
    for step in range(25):
        k = dream_transfer_count(n, step, 25)
        taken.append(int(k))
        n = n - k
    assert taken[0] == 1 and min(taken) >= 1 and sum(taken) == 50 and int(n) == 0


def test_reveal_probability_and_penalize():
    assert reveal_probability(3, 4) == 1.0
    assert math.isclose(reveal_probability(0, 4), 1 - 0.75025, rel_tol=1e-5)
    x = torch.tensor([2.0, -2.0, 0.0, float("-inf")])
    assert penalize(x, 2.0).tolist() == [1.0, -4.0, 0.0, float("-inf")]


def test_top_k_filter_keeps_k_and_ties():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[True, False, True, True, False]]
    assert torch.isfinite(top_k_filter(logits, 9)).all()


def test_select_positions_by_rank_and_by_alg_temp_draws():
    conf = torch.tensor([[0.0, math.log(2), math.log(4), float("-inf")]]).repeat(20000, 1)
    by_rank = select_positions(conf, torch.full((20000,), 2))
    assert by_rank[0].tolist() == [False, True, True, False] and (by_rank == by_rank[0]).all()
    drawn = select_positions(conf, torch.ones(20000, dtype=torch.long), alg_temp=1.0,
                             generator=torch.Generator().manual_seed(0))
    freq = drawn.float().mean(0)                     # softmax(conf): 1/7, 2/7, 4/7, never the -inf one
    torch.testing.assert_close(freq, torch.tensor([1 / 7, 2 / 7, 4 / 7, 0.0]), atol=0.015, rtol=0)
    two = select_positions(conf, torch.full((20000,), 2), alg_temp=1.0, generator=torch.Generator().manual_seed(1))
    assert (two.sum(1) == 2).all() and not two[:, 3].any()
    tied = torch.tensor([[0.5, 1.0, float("-inf"), 1.0, 1.0, 1.0]])   # ties: the earlier positions
    assert select_positions(tied, torch.tensor([2]), ties="first")[0].tolist() == [False, True, False, True,
                                                                                   False, False]


def test_alg_temp_in_generate_fills_the_canvas_by_the_schedule(dream):
    prompt = _prompts(2, 6, seed=4)
    out, history = generate(dream, prompt, vocab=VOCAB, gen_length=20, steps=5, schedule="dream", alg_temp=0.5,
                            generator=torch.Generator().manual_seed(2), return_history=True)
    filled = [int((h[0] != VOCAB.mask_id).sum()) for h in history]
    n, want = torch.tensor([20]), []
    for step in range(5):
        n = n - dream_transfer_count(n, step, 5)
        want.append(20 - int(n))
    assert filled == want and not (out == VOCAB.mask_id).any()
    with pytest.raises(ValueError, match="schedule"):
        generate(dream, prompt, vocab=VOCAB, gen_length=4, steps=2, schedule="cosine")
