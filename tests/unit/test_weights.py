"""model/weights.py: HF-layout checkpoints (dream and llada keys, single file and sharded), errors, vocab
extension, our own export, and a checkpoint laid out as the released Omni-Diffusion one: "dream" keys, sharded
with model.safetensors.index.json, rows in the reference's vocabulary layout (scaled down), and the reference's
speech encoder (model.audio_model.*) and projector (model.audio_projection.*) beside the LM."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model.config import ModelConfig
from model.transformer import Transformer
from model.vocab import Vocab, omni_diffusion_vocab, reference_layout
from model.weights import (EXTRA_MODULES, CheckpointError, extend_rows, hf_to_native, key_map, load_native,
                           load_pretrained, load_state_strict, native_to_hf, read_pretrained, save_safetensors)

VOCAB = Vocab(text_size=100, n_q=2, audio_codebook_size=8, image_codebook_size=16)
V = VOCAB.size


def cfg_for(layout: str, **overrides) -> ModelConfig:
    base = dataclasses.replace(ModelConfig.preset("debug"), vocab_size=V, weights_layout=layout,
                               qkv_bias=layout == "dream", logits="aligned")
    return dataclasses.replace(base, **overrides)


def make_model(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping of them shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def write_checkpoint(tmp_path, hf_state: dict, shards: int) -> None:
    hf_state = {k: v.contiguous() for k, v in hf_state.items()}
    if shards == 1:
        save_file(hf_state, str(tmp_path / "model.safetensors"))
        return
    keys = sorted(hf_state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: hf_state[k] for k in part}, str(tmp_path / name))
        weight_map.update({k: name for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def hf_reference_logits(hf: dict, cfg: ModelConfig, layout: str, ids: torch.Tensor) -> torch.Tensor:
    """An independent forward written against the HF key names (Qwen2 / LLaDA semantics), so a mapping that
    swaps e.g. gate and up in both directions cannot pass."""
    g = hf.get   # biases: None when the layout has none
    if layout == "dream":
        emb, blk, final, head = "model.embed_tokens.weight", "model.layers.{}.", "model.norm.weight", "lm_head.weight"
        n = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                 ln1="input_layernorm", ln2="post_attention_layernorm", gate="mlp.gate_proj", up="mlp.up_proj",
                 down="mlp.down_proj")
    else:
        emb, blk, final, head = ("model.transformer.wte.weight", "model.transformer.blocks.{}.",
                                 "model.transformer.ln_f.weight", "model.transformer.ff_out.weight")
        n = dict(q="q_proj", k="k_proj", v="v_proj", o="attn_out", ln1="attn_norm", ln2="ff_norm",
                 gate="ff_proj", up="up_proj", down="ff_out")

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps))

    B, L = ids.shape
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2).float() / D)
    ang = torch.arange(L).float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    x = hf[emb][ids]
    for i in range(cfg.n_layers):
        p = blk.format(i)
        h = rms(x, hf[p + n["ln1"] + ".weight"])
        q = F.linear(h, hf[p + n["q"] + ".weight"], g(p + n["q"] + ".bias")).view(B, L, H, D).transpose(1, 2)
        k = F.linear(h, hf[p + n["k"] + ".weight"], g(p + n["k"] + ".bias")).view(B, L, Hkv, D).transpose(1, 2)
        v = F.linear(h, hf[p + n["v"] + ".weight"], g(p + n["v"] + ".bias")).view(B, L, Hkv, D).transpose(1, 2)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / D ** 0.5, dim=-1) @ v   # (B, H, L, D)
        x = x + F.linear(att.transpose(1, 2).reshape(B, L, H * D), hf[p + n["o"] + ".weight"])
        h = rms(x, hf[p + n["ln2"] + ".weight"])
        act = F.silu(F.linear(h, hf[p + n["gate"] + ".weight"])) * F.linear(h, hf[p + n["up"] + ".weight"])
        x = x + F.linear(act, hf[p + n["down"] + ".weight"])
    return F.linear(rms(x, hf[final]), hf[head])


@pytest.mark.parametrize("layout,shards", [("dream", 1), ("dream", 2), ("llada", 1), ("llada", 2)])
def test_load_pretrained_matches_source_and_reference(tmp_path, layout, shards):
    cfg = cfg_for(layout)
    source = make_model(cfg, seed=0)
    hf = native_to_hf(source.state_dict(), cfg, layout)
    write_checkpoint(tmp_path, hf, shards)
    target = make_model(cfg, seed=1)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(target(ids), source(ids))
        load_pretrained(target, tmp_path, layout)
        out = target(ids)
        torch.testing.assert_close(out, source(ids))
        torch.testing.assert_close(out, hf_reference_logits(hf, cfg, layout, ids), atol=1e-4, rtol=1e-4)


def test_real_key_names():
    dream = key_map(cfg_for("dream"), "dream")
    assert dream["layers.1.mlp.w1.weight"] == "model.layers.1.mlp.gate_proj.weight"
    assert dream["layers.0.attn.wk.bias"] == "model.layers.0.self_attn.k_proj.bias"
    assert "layers.0.attn.wo.bias" not in dream      # Qwen2: biases on q/k/v only
    assert dream["output.weight"] == "lm_head.weight"
    llada = key_map(cfg_for("llada"), "llada")
    assert llada["layers.1.mlp.w1.weight"] == "model.transformer.blocks.1.ff_proj.weight"   # gate, activated
    assert llada["layers.1.mlp.w3.weight"] == "model.transformer.blocks.1.up_proj.weight"
    assert llada["layers.1.mlp.w2.weight"] == "model.transformer.blocks.1.ff_out.weight"
    assert llada["output.weight"] == "model.transformer.ff_out.weight"
    assert llada["tok_embeddings.weight"] == "model.transformer.wte.weight"
    assert len(set(llada.values())) == len(llada)


def test_hf_native_round_trip_and_tied_head():
    cfg = cfg_for("dream")
    state = make_model(cfg, 0).state_dict()
    back = hf_to_native(native_to_hf(state, cfg, "dream"), cfg, "dream")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    tied = cfg_for("dream", tie_embeddings=True)
    hf = native_to_hf(make_model(tied, 0).state_dict(), tied, "dream")
    assert "lm_head.weight" not in hf
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"]   # some tied checkpoints still store the head
    assert "output.weight" not in hf_to_native(hf, tied, "dream")


def test_missing_and_unexpected_keys_are_listed_with_the_file(tmp_path):
    cfg = cfg_for("dream")
    hf = native_to_hf(make_model(cfg, 0).state_dict(), cfg, "dream")
    del hf["model.layers.1.mlp.up_proj.weight"]
    hf["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    write_checkpoint(tmp_path, hf, 1)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(make_model(cfg, 1), tmp_path, "dream")
    msg = str(e.value)
    assert str(tmp_path) in msg and "1 missing" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "1 unexpected" in msg and "model.layers.9.mlp.up_proj.weight" in msg
    # the wrong layout fails the same way, not silently
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrained(make_model(cfg_for("llada"), 1), tmp_path, "llada")


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    cfg = cfg_for("llada")
    hf = native_to_hf(make_model(cfg, 0).state_dict(), cfg, "llada")
    hf["model.transformer.blocks.0.q_proj.weight"] = torch.zeros(cfg.dim, cfg.dim + 2)
    write_checkpoint(tmp_path, hf, 1)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.q_proj\.weight has shape \(64, 66\).*\(64, 64\)"):
        load_pretrained(make_model(cfg, 1), tmp_path, "llada")


def test_no_checkpoint_in_dir(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(make_model(cfg_for("dream"), 0), tmp_path, "dream")


def test_vocab_extension_keeps_old_rows(tmp_path):
    small_rows = 100
    small = cfg_for("dream", vocab_size=small_rows)
    src = make_model(small, 0)
    write_checkpoint(tmp_path, native_to_hf(src.state_dict(), small, "dream"), 2)
    big = cfg_for("dream")                                  # V > 100 rows
    a, b = make_model(big, 1), make_model(big, 2)
    load_pretrained(a, tmp_path, "dream", seed=3)
    load_pretrained(b, tmp_path, "dream", seed=3)
    for name in ("tok_embeddings", "output"):
        old = getattr(src, name).weight
        new = getattr(a, name).weight
        assert new.shape == (V, big.dim)
        assert torch.equal(new[:small_rows], old)
        added = new[small_rows:]
        torch.testing.assert_close(added.mean(0), old.mean(0), atol=0.01, rtol=0)
        assert (added - old.mean(0)).abs().max() < 0.2 * old.std()   # close to the mean, not a copy
        assert added.std(0).min() > 0                                  # rows differ from each other
        assert torch.equal(new, getattr(b, name).weight)               # seeded: reproducible
    # the model-free reader (rank 0 of a sharded run) gives the same state
    state = read_pretrained(tmp_path, big, "dream", vocab_rows=V, seed=3, dtype=torch.bfloat16)
    assert state.keys() == a.state_dict().keys() and state["output.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(state["tok_embeddings.weight"], a.tok_embeddings.weight.bfloat16())
    with pytest.raises(CheckpointError, match="vocab_extension"):
        load_pretrained(make_model(big, 1), tmp_path, "dream", vocab_extension="error")
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    write_checkpoint(bigger, native_to_hf(make_model(big, 0).state_dict(), big, "dream"), 1)
    with pytest.raises(CheckpointError, match=rf"embed_tokens.weight has shape \({V}, 64\)"):
        load_pretrained(make_model(cfg_for("dream", vocab_size=V - 5), 0), bigger, "dream")  # never shrink


def test_extend_rows_dtype():
    old = torch.randn(10, 4, dtype=torch.bfloat16)
    out = extend_rows(old, 13, torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and out.shape == (13, 4) and torch.equal(out[:10], old)


def test_native_export_round_trip(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    cfg = cfg_for("llada")
    model = make_model(cfg, 0)
    model.layers[0] = checkpoint_wrapper(model.layers[0])   # wrapper prefixes do not leak into the file
    path = tmp_path / "export" / "model.safetensors"
    save_safetensors(model, path, metadata={"vocab": VOCAB.to_json()})
    state, meta = load_native(path)
    assert "layers.0.attn.wq.weight" in state
    assert Vocab.from_json(meta["vocab"]) == VOCAB
    fresh = make_model(cfg, 1)
    load_state_strict(fresh, state, str(path))
    ids = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids))
    del state["norm.weight"]
    with pytest.raises(CheckpointError, match=r"model.safetensors.*1 missing.*norm.weight"):
        load_state_strict(fresh, state, str(path))


# ---- the released Omni-Diffusion checkpoint's layout ------------------------------------------------------

# A scaled-down released layout: 263 Dream ids, the 21 reference tokens, 64 speech codes, 32 image codes.
RVOCAB = reference_layout(263, {"mask": 262, "eos": 259, "im_start": 260, "im_end": 261}, n_q=1,
                         audio_codebook_size=64, image_codebook_size=32)
SKIP = ["speech_encoder", "speech_projector"]


def released_cfg() -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("debug"), vocab_size=RVOCAB.size, weights_layout="dream",
                               qkv_bias=True, tie_embeddings=False, logits="aligned")


def speech_modules(dim: int) -> dict[str, torch.Tensor]:
    """Tensors under the reference's key names: a SenseVoice encoder layer (512 wide there, 8 here) and the
    ResamplerProjector (pre_proj_layernorm, mlp.0, mlp.2) from its width to the LM's."""
    g = torch.Generator().manual_seed(7)
    enc = "model.audio_model.model.encoder."
    return {
        enc + "encoders0.0.self_attn.linear_q_k_v.weight": torch.randn(24, 8, generator=g),
        enc + "encoders0.0.self_attn.fsmn_block.weight": torch.randn(8, 1, 11, generator=g),
        enc + "after_norm.weight": torch.ones(8),
        "model.audio_projection.pre_proj_layernorm.weight": torch.ones(8),
        "model.audio_projection.pre_proj_layernorm.bias": torch.zeros(8),
        "model.audio_projection.mlp.0.weight": torch.randn(dim, 8, generator=g),
        "model.audio_projection.mlp.2.weight": torch.randn(dim, dim, generator=g),
    }


@pytest.fixture()
def released(tmp_path):
    cfg = released_cfg()
    source = make_model(cfg, seed=0)
    hf = native_to_hf(source.state_dict(), cfg, "dream")
    assert hf["model.embed_tokens.weight"].shape[0] == RVOCAB.size
    write_checkpoint(tmp_path, {**hf, **speech_modules(cfg.dim)}, shards=3)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    return cfg, source, hf, tmp_path


def test_speech_modules_are_refused_unless_skipped_by_name(released):
    cfg, _, _, path = released
    target = Transformer(cfg, vocab_size=RVOCAB.size)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(target, path, "dream")
    msg = str(e.value)
    assert "speech_encoder (model.audio_model.*, 3 tensors)" in msg
    assert "speech_projector (model.audio_projection.*, 4 tensors)" in msg
    assert "train.init.skip_modules=['speech_encoder', 'speech_projector']" in msg
    with pytest.raises(CheckpointError, match="speech_projector"):   # one named, the other still refused
        load_pretrained(target, path, "dream", skip_modules=["speech_encoder"])
    with pytest.raises(CheckpointError, match="unknown"):
        load_pretrained(target, path, "dream", skip_modules=["vision_tower"])


def test_released_layout_loads_in_place_with_reference_logits(released, caplog):
    cfg, source, hf, path = released
    target = make_model(cfg, seed=1)
    ids = torch.tensor([[RVOCAB.im_start_id, 5, RVOCAB.boa_id, RVOCAB.audio_offset, RVOCAB.audio_offset + 63,
                         RVOCAB.eoa_id, RVOCAB.boi_id, RVOCAB.image_offset + 31, RVOCAB.mask_id, RVOCAB.im_end_id]])
    with caplog.at_level(logging.WARNING, logger="model.weights"):
        load_pretrained(target, path, "dream", vocab_extension="error", skip_modules=SKIP)
    assert "skipping speech_encoder (model.audio_model.*, 3 tensors)" in caplog.text
    assert "skipping speech_projector" in caplog.text
    # every row where the checkpoint has it: <|audio_0|>, <|image_31|>, <|end_of_audio|> keep their ids
    for tid in (RVOCAB.audio_offset, RVOCAB.image_offset + 31, RVOCAB.eoa_id, RVOCAB.mask_id):
        assert torch.equal(target.tok_embeddings.weight[tid], hf["model.embed_tokens.weight"][tid])
        assert torch.equal(target.output.weight[tid], hf["lm_head.weight"][tid])
    with torch.no_grad():
        out = target(ids)
        torch.testing.assert_close(out, source(ids))
        torch.testing.assert_close(out, hf_reference_logits(hf, cfg, "dream", ids), atol=1e-4, rtol=1e-4)
    state = read_pretrained(path, cfg, "dream", RVOCAB.size, vocab_extension="error", skip_modules=SKIP)
    assert not any(k.startswith(("audio", "model.audio")) for k in state)
    torch.testing.assert_close(state["tok_embeddings.weight"], hf["model.embed_tokens.weight"])


def test_real_sizes_match_the_dream_preset():
    assert omni_diffusion_vocab().size == ModelConfig.preset("dream-7b").vocab_size == 176_264
    assert set(EXTRA_MODULES.values()) == {"model.audio_model.", "model.audio_projection."}
