"""model/transformer.py: shapes on every preset, packing, RoPE convention, logit convention, counts."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from common.configlib import ConfigError
from model.config import ModelConfig
from model.transformer import Transformer, apply_rope, media_index, positions_and_mask, rope_cos_sin
from model.vocab import Vocab

VOCAB = Vocab(text_size=200, n_q=2, audio_codebook_size=16, image_codebook_size=32)


def debug_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(ModelConfig.preset("debug"), **overrides)
    return Transformer(cfg, vocab_size=VOCAB.size).eval()


def random_ids(B: int, L: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB.size, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ModelConfig.preset_names())
def test_forward_shapes_every_preset_on_meta(name):
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        model = Transformer(cfg, vocab_size=None if cfg.vocab_size else VOCAB.size)
        ids = torch.zeros(2, 16, dtype=torch.long)
        seg = torch.ones(2, 16, dtype=torch.long)
        logits = model(ids, seg)
        assert model(ids).shape == logits.shape
    V = cfg.vocab_size or VOCAB.size
    assert logits.shape == (2, 16, V) and logits.dtype == torch.float32
    assert model.tok_embeddings.weight.is_meta
    assert len(model.layers) == cfg.n_layers
    assert (model.output is None) == cfg.tie_embeddings


def test_debug_forward_backward_reaches_every_parameter():
    model = debug_model().train()
    ids = random_ids(2, 24)
    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    assert torch.isfinite(loss)
    # Untrained with std 0.02: the loss is close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(VOCAB.size)) < 0.5
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_attention_is_bidirectional():
    model = debug_model()
    ids = random_ids(1, 12)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB.size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first token sees the last one


def test_vocab_size_rules():
    cfg = ModelConfig.preset("debug")
    with pytest.raises(ConfigError, match="vocab_size"):
        Transformer(cfg)
    fixed = dataclasses.replace(cfg, vocab_size=300)
    assert Transformer(fixed).vocab_size == 300
    assert Transformer(fixed, vocab_size=250).vocab_size == 300   # spare rows are allowed
    with pytest.raises(ConfigError, match="cannot hold"):
        Transformer(fixed, vocab_size=301)


def test_positions_restart_per_segment():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    pos, mask, starts = positions_and_mask(seg, 2, 8, seg.device)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    assert starts[0].tolist() == [True, False, False, True, False, True, True, False]
    assert mask.shape == (2, 1, 8, 8)
    assert mask[0, 0, 0].tolist() == [True] * 3 + [False] * 5
    assert mask[0, 0, 7].tolist() == [False] * 6 + [True] * 2   # padding attends only to padding
    assert mask[1].all()


@pytest.mark.parametrize("logits", ["aligned", "shifted"])
def test_packing_isolates_segments_and_resets_positions(logits):
    model = debug_model(logits=logits)
    a, b = random_ids(1, 7, seed=2), random_ids(1, 9, seed=3)
    pad = torch.full((1, 4), VOCAB.pad_id)
    packed = torch.cat([a, b, pad], dim=1)
    seg = torch.tensor([[1] * 7 + [2] * 9 + [0] * 4])
    other = packed.clone()
    other[0, 7:16] = random_ids(1, 9, seed=4)
    with torch.no_grad():
        out = model(packed, seg)
        out_other = model(other, seg)
        alone_a, alone_b = model(a), model(b)
    assert not torch.allclose(out[0, 7:16], out_other[0, 7:16])
    torch.testing.assert_close(out[0, :7], out_other[0, :7])        # A does not see B
    torch.testing.assert_close(out[0, :7], alone_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 7:16], alone_b[0], atol=1e-5, rtol=1e-5)  # B starts at position 0


def test_mask_path_equals_maskless_path_with_grouped_heads():
    # One segment covering the row: the repeated-K/V masked path must equal the enable_gqa path.
    model = debug_model()
    assert model.cfg.n_kv_heads < model.cfg.n_heads
    ids = random_ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids, torch.ones_like(ids)), atol=1e-5, rtol=1e-5)


def test_shifted_logits_are_realigned():
    aligned = debug_model(seed=5)
    shifted = debug_model(seed=5, logits="shifted")
    ids = random_ids(2, 10)
    with torch.no_grad():
        raw, out = aligned(ids), shifted(ids)
    torch.testing.assert_close(out[:, 1:], raw[:, :-1])   # position i holds raw[i-1]: the prediction for i
    torch.testing.assert_close(out[:, 0], raw[:, 0])      # first position: its own output, as Dream does
    seg = torch.tensor([[1] * 4 + [2] * 6, [1] * 10])
    with torch.no_grad():
        raw, out = aligned(ids, seg), shifted(ids, seg)
    torch.testing.assert_close(out[0, 4], raw[0, 4])      # a segment start never reads the previous segment
    torch.testing.assert_close(out[0, 5], raw[0, 4])


def test_rope_is_rotate_half_and_relative():
    D, theta = 8, 10000.0
    x = torch.randn(1, 1, 1, D)
    pos = torch.tensor([[3]])
    cos, sin = rope_cos_sin(pos, D, theta)
    got = apply_rope(x, cos, sin)
    # HF convention: pair (j, j + D/2) rotated by angle pos * theta^(-2j/D), as a complex product.
    z = torch.complex(x[..., : D // 2], x[..., D // 2:])
    angle = 3 * theta ** (-torch.arange(0, D, 2).float() / D)
    rz = z * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(got, torch.cat([rz.real, rz.imag], dim=-1))
    # q.k depends only on the offset between positions.
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(m, n):
        cm, sm = rope_cos_sin(torch.tensor([[m]]), D, theta)
        cn, sn = rope_cos_sin(torch.tensor([[n]]), D, theta)
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum()

    torch.testing.assert_close(score(7, 2), score(105, 100))


def test_state_dict_has_only_parameters_and_tied_head():
    model = debug_model()
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}
    tied = debug_model(tie_embeddings=True)
    assert tied.output is None and "output.weight" not in tied.state_dict()
    assert model.num_params() - tied.num_params() == VOCAB.size * model.cfg.dim


def test_num_params_and_flops_formula():
    model = debug_model(qkv_bias=True)
    c = model.cfg
    kv = c.n_kv_heads * c.head_dim
    per_layer = 2 * c.dim * c.dim + 2 * c.dim * kv + (c.dim + 2 * kv) + 3 * c.dim * c.hidden_dim + 2 * c.dim
    expected = 2 * VOCAB.size * c.dim + c.n_layers * per_layer + c.dim
    assert model.num_params() == expected
    n_matmul = expected - VOCAB.size * c.dim
    L = 128
    assert model.flops_per_token(L) == 6 * n_matmul + 12 * c.n_layers * c.dim * L
    assert model.flops_per_token(L, training=False) == 2 * n_matmul + 4 * c.n_layers * c.dim * L


def test_init_scales_residual_projections():
    cfg = dataclasses.replace(ModelConfig.preset("demo"), init_std=0.02)
    torch.manual_seed(0)
    model = Transformer(cfg, vocab_size=VOCAB.size)
    wq_std = model.layers[0].attn.wq.weight.std().item()
    wo_std = model.layers[0].attn.wo.weight.std().item()
    assert abs(wq_std - 0.02) < 0.002
    assert abs(wo_std - 0.02 / math.sqrt(2 * cfg.n_layers)) < 0.001
    assert torch.equal(model.norm.weight, torch.ones(cfg.dim))
    # meta -> to_empty -> init_weights: the path parallelize.py relies on
    with torch.device("meta"):
        meta = Transformer(cfg, vocab_size=VOCAB.size)
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert torch.equal(meta.layers[1].mlp_norm.weight, torch.ones(cfg.dim))
    assert abs(meta.tok_embeddings.weight.std().item() - 0.02) < 0.002


MARKERS = VOCAB.media_markers  # (boi, eoi, boa, eoa)


def test_media_index_counts_inside_spans_and_restarts_per_segment():
    boi, eoi, boa, eoa = MARKERS
    t = 5  # any text id
    ids = torch.tensor([[t, boi, 7, 7, 7, eoi, t, boa, 9, 9, 9, 9, eoa, t]])
    assert media_index(ids, None, MARKERS, 3).tolist() == [[0, 0, 1, 2, 3, 0, 0, 0, 4, 5, 6, 6, 0, 0]]
    # a canvas still all masks after the prompt's <boi> is indexed like the answer it becomes
    canvas = torch.tensor([[t, boi, VOCAB.mask_id, VOCAB.mask_id, VOCAB.mask_id]])
    assert media_index(canvas, None, MARKERS, 8).tolist() == [[0, 0, 1, 2, 3]]
    # a packed segment that starts after an unclosed span is outside it
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[0, 0] = starts[0, 3] = True
    assert media_index(ids, starts, MARKERS, 8)[0, :6].tolist() == [0, 0, 1, 0, 0, 0]


def test_media_positions_change_only_media_tokens_and_need_markers():
    boi, eoi, _, _ = MARKERS
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.preset("debug"), media_positions=8)
    model = Transformer(cfg, vocab_size=VOCAB.size, media_markers=MARKERS).eval()
    plain = Transformer(dataclasses.replace(cfg, media_positions=0), vocab_size=VOCAB.size).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("media_pos")})
    text = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model(text), plain(text))           # no span: the table is not used
    img = torch.tensor([[5, boi, *range(VOCAB.image_offset, VOCAB.image_offset + 4), eoi]])
    assert not torch.allclose(model(img), plain(img))
    # the table is a lookup, not a matmul: it does not count toward FLOPs
    assert model.num_params(exclude_embedding=True) == plain.num_params(exclude_embedding=True)
    with pytest.raises(ValueError, match="media_markers"):
        Transformer(cfg, vocab_size=VOCAB.size)(img)


@pytest.mark.parametrize("logits", ["aligned", "shifted"])
def test_only_returns_the_full_logits_at_the_chosen_positions(logits):
    model = debug_model(logits=logits)
    ids = random_ids(2, 10)
    seg = torch.tensor([[1] * 4 + [2] * 6, [1] * 10])
    only = torch.rand(2, 10, generator=torch.Generator().manual_seed(3)) < 0.5
    only[0, 4] = True  # a segment's first token (shifted logits read raw there)
    full = model(ids, seg)
    assert torch.allclose(model(ids, seg, only=only), full[only], atol=1e-5)
    assert model(ids, only=torch.zeros(2, 10, dtype=torch.bool)).shape == (0, VOCAB.size)


def test_dropout_only_in_training_and_replayed_by_checkpointing():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    with pytest.raises(ConfigError, match="dropout"):
        ModelConfig(dropout=1.0)
    cfg = dataclasses.replace(ModelConfig.preset("debug"), dropout=0.3)
    torch.manual_seed(0)
    model = Transformer(cfg, vocab_size=97)
    ids = torch.randint(0, 97, (2, 16))
    model.eval()
    assert torch.equal(model(ids), model(ids))          # eval: dropout is the identity
    plain = Transformer(dataclasses.replace(cfg, dropout=0.0), vocab_size=97).eval()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model(ids), plain(ids))
    model.train()
    torch.manual_seed(1)
    a = model(ids)
    assert not torch.allclose(a, model(ids))            # training: a fresh mask per call
    # activation checkpointing recomputes each block in backward under the same RNG state: identical grads
    grads = []
    for ac in (False, True):
        m = Transformer(cfg, vocab_size=97)
        m.load_state_dict(model.state_dict())
        if ac:
            for i, block in enumerate(m.layers):
                m.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        torch.manual_seed(2)
        m(ids).float().pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
