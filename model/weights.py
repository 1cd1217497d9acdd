"""Weights on disk: pretrained HF-layout safetensors checkpoints in, our own single-file export in and out.

Two pretrained key layouts map onto the native names of model/transformer.py:

  native                     "dream" (Qwen2 / HF)                              "llada" (LLaDA-8B, OLMo-derived)
  tok_embeddings.weight      model.embed_tokens.weight                         model.transformer.wte.weight
  layers.{i}.attn_norm       model.layers.{i}.input_layernorm                  model.transformer.blocks.{i}.attn_norm
  layers.{i}.attn.wq/wk/wv   model.layers.{i}.self_attn.{q,k,v}_proj (+bias)   model.transformer.blocks.{i}.{q,k,v}_proj
  layers.{i}.attn.wo         model.layers.{i}.self_attn.o_proj                 model.transformer.blocks.{i}.attn_out
  layers.{i}.mlp_norm        model.layers.{i}.post_attention_layernorm         model.transformer.blocks.{i}.ff_norm
  layers.{i}.mlp.w1 (gate)   model.layers.{i}.mlp.gate_proj                    model.transformer.blocks.{i}.ff_proj
  layers.{i}.mlp.w3 (up)     model.layers.{i}.mlp.up_proj                      model.transformer.blocks.{i}.up_proj
  layers.{i}.mlp.w2 (down)   model.layers.{i}.mlp.down_proj                    model.transformer.blocks.{i}.ff_out
  norm.weight                model.norm.weight                                 model.transformer.ln_f.weight
  output.weight              lm_head.weight                                    model.transformer.ff_out.weight

In LLaDA's block `ff_proj` is the SiLU-activated branch (our gate w1) and `up_proj` the linear one (w3); its
final head is `transformer.ff_out` (not tied). Both layouts use the rotate-half RoPE that our model uses, so
q/k weights need no permutation.

Omni-Diffusion's released checkpoint is the "dream" layout (sharded, `model.safetensors.index.json`) with
176,264 embedding/head rows, read in place (model/vocab.py `omni_diffusion_vocab` is their layout), plus two
modules this product does not have, since it reads speech as discrete codes (EXTRA_MODULES):

  speech_encoder     model.audio_model.*        the reference's SenseVoice-Small encoder (continuous speech input)
  speech_projector   model.audio_projection.*   its ResamplerProjector (LayerNorm + 2-layer MLP, 512 -> dim)

A checkpoint holding them is refused unless they are named in `skip_modules` (train.init.skip_modules); then
each skipped module is logged with its tensor count.

A checkpoint may be local or `s3://bucket/prefix`: an s3:// shard is read by byte ranges (its header, then each
tensor as it is needed; `RangedSafetensors`), never copied whole into memory or onto local disk. Training
refuses shards whose text tokenizer is not the backbone's `tokenizer.json` (`check_text_tokenizer`).

Only safetensors is read here: no pickle, so a checkpoint cannot run code when loaded.
"""
from __future__ import annotations

import json
import logging
import math
import posixpath
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Literal, Protocol, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from common import storage
from model.config import ModelConfig
from model.transformer import Transformer
from model.vocab import OMNI_ADDED_TOKENS, PromptFormat, Vocab, VocabMismatch

Layout = Literal["dream", "llada"]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Rows whose count may grow when the vocabulary is extended (new modalities' codes).
VOCAB_KEYS = ("tok_embeddings.weight", "output.weight")
# Prefixes added by wrappers (activation checkpointing, torch.compile) that are not part of the model's names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


log = logging.getLogger(__name__)

# Modules of a pretrained checkpoint that have no counterpart here, by name -> key prefix ("dream" layout).
EXTRA_MODULES: dict[str, str] = {
    "speech_encoder": "model.audio_model.",
    "speech_projector": "model.audio_projection.",
}


class CheckpointError(ValueError):
    """A checkpoint does not match the model: the message names the file, the keys and the shapes."""


# ---- key maps ---------------------------------------------------------------------------------------------

def _layer_names(layout: Layout, qkv_bias: bool) -> dict[str, str]:
    """native suffix under layers.{i}. -> HF suffix under the layout's block prefix."""
    if layout == "dream":
        names = {
            "attn_norm.weight": "input_layernorm.weight",
            "attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
            "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
            "mlp_norm.weight": "post_attention_layernorm.weight",
            "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w3.weight": "mlp.up_proj.weight",
            "mlp.w2.weight": "mlp.down_proj.weight",
        }
        if qkv_bias:
            names.update({"attn.wq.bias": "self_attn.q_proj.bias", "attn.wk.bias": "self_attn.k_proj.bias",
                          "attn.wv.bias": "self_attn.v_proj.bias"})
        return names
    if layout == "llada":
        if qkv_bias:
            raise CheckpointError("layout 'llada' has no q/k/v biases but model.qkv_bias is true; "
                                  "use the llada-8b preset or set model.qkv_bias=false")
        return {
            "attn_norm.weight": "attn_norm.weight",
            "attn.wq.weight": "q_proj.weight", "attn.wk.weight": "k_proj.weight",
            "attn.wv.weight": "v_proj.weight", "attn.wo.weight": "attn_out.weight",
            "mlp_norm.weight": "ff_norm.weight",
            "mlp.w1.weight": "ff_proj.weight", "mlp.w3.weight": "up_proj.weight",
            "mlp.w2.weight": "ff_out.weight",
        }
    raise CheckpointError(f"unknown weights layout {layout!r}; expected 'dream' or 'llada'")


def key_map(cfg: ModelConfig, layout: Layout) -> dict[str, str]:
    """native key -> HF key for every tensor of a model built from `cfg`."""
    per_layer = _layer_names(layout, cfg.qkv_bias)
    if layout == "dream":
        block, top = "model.layers.{i}.", {"tok_embeddings.weight": "model.embed_tokens.weight",
                                           "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    else:
        block, top = "model.transformer.blocks.{i}.", {
            "tok_embeddings.weight": "model.transformer.wte.weight", "norm.weight": "model.transformer.ln_f.weight",
            "output.weight": "model.transformer.ff_out.weight"}
    if cfg.tie_embeddings:
        del top["output.weight"]
    out = dict(top)
    for i in range(cfg.n_layers):
        for native, hf in per_layer.items():
            out[f"layers.{i}.{native}"] = block.format(i=i) + hf
    return out


def _ignorable(hf_key: str, cfg: ModelConfig, layout: Layout) -> bool:
    # Tied checkpoints sometimes still store the head; it is the embedding, so it is safe to skip.
    return cfg.tie_embeddings and hf_key in ("lm_head.weight", "model.transformer.ff_out.weight")


def _check_keys(have: set[str], want: set[str], source: str, what: str) -> None:
    missing, unexpected = sorted(want - have), sorted(have - want)
    if not missing and not unexpected:
        return
    parts = [f"{source}: keys do not match {what}."]
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[:20]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:20]}")
    parts.append("Check the weights layout ('dream' or 'llada') and the model preset (n_layers, qkv_bias, "
                 "tie_embeddings) against the checkpoint's config.json.")
    raise CheckpointError(" ".join(parts))


def hf_to_native(state: dict[str, torch.Tensor], cfg: ModelConfig, layout: Layout,
                 source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename an HF-layout state dict to native keys; strict: every key must be known and present."""
    kmap = key_map(cfg, layout)
    state = {k: v for k, v in state.items() if not _ignorable(k, cfg, layout)}
    _check_keys(set(state), set(kmap.values()), source, f"layout {layout!r} for a {cfg.n_layers}-layer model")
    return {native: state[hf] for native, hf in kmap.items()}


def native_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, layout: Layout) -> dict[str, torch.Tensor]:
    """Native state dict -> HF layout (export, and tests that write checkpoints with the real key names)."""
    kmap = key_map(cfg, layout)
    state = strip_wrapper_prefixes(state)
    _check_keys(set(state), set(kmap), "native state dict", f"a {cfg.n_layers}-layer model")
    return {hf: state[native] for native, hf in kmap.items()}


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for p in _WRAPPER_PREFIXES:
            k = k.replace(p, "")
        out[k] = v
    return out


# ---- reading HF checkpoints -------------------------------------------------------------------------------

# A checkpoint is read through tensor sources: one per safetensors file, local (mmap through safe_open) or
# remote (the file's header once, then one ranged read per tensor as it is needed, through common/storage, so
# an s3:// shard is never copied whole into memory or onto local disk). Everything above the source (key maps,
# strict checks, vocabulary rows) is one code path for both.

# safetensors dtype names -> torch dtypes (the format's own table; byte order is little-endian, as on every host
# these jobs run on)
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_HEADER_LIMIT = 100 << 20      # the safetensors library's own cap on a header's JSON
# One ranged GET reads at most READ_CHUNK bytes, READ_THREADS of them at once: a tensor is assembled in place
# (a 1.3 GB embedding never sits in memory twice), and parallel range GETs, as S3's performance guidance
# advises, are what fill a node's bandwidth; one stream is far below it.
READ_CHUNK = 16 << 20
READ_THREADS = 8


class TensorSource(Protocol):
    """The tensors of one safetensors file, read one at a time."""
    uri: str

    def keys(self) -> list[str]: ...

    def get(self, key: str) -> torch.Tensor: ...


class LocalSafetensors:
    """A local file through safe_open (memory-mapped: a tensor's pages are read when it is copied)."""

    def __init__(self, path: str) -> None:
        self.uri = str(path)
        self._f = safe_open(self.uri, framework="pt")

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def get(self, key: str) -> torch.Tensor:
        return self._f.get_tensor(key)


class RangedSafetensors:
    """A safetensors file read by byte ranges (`storage.read_range`, retried; a fault past the retries raises
    StorageError naming the URI): its 8-byte header length and JSON header at open, then each tensor's bytes
    when `get` asks for it. Works on any URI storage reads; used for s3://."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        head = storage.read_range(uri, 0, 8)
        if len(head) < 8:
            raise CheckpointError(f"{uri}: {len(head)} bytes, not a safetensors file")
        n = int.from_bytes(head, "little")
        if not 2 <= n <= _HEADER_LIMIT:
            raise CheckpointError(f"{uri}: header length {n:,} is not that of a safetensors file")
        raw = storage.read_range(uri, 8, 8 + n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{uri}: safetensors header is not JSON ({e})") from None
        header.pop("__metadata__", None)
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, e in header.items():
            try:
                dtype, shape, (begin, end) = _DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{uri}: header entry {key!r} = {e!r} is not a tensor of a known dtype "
                                      f"({sorted(_DTYPES)})") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(f"{uri}: {key} spans bytes {begin}..{end} but {e['dtype']}{list(shape)} "
                                      f"needs {nbytes}")
            self._entries[key] = (dtype, shape, 8 + n + begin, 8 + n + end)   # offsets in the file

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        out = torch.empty(end - begin, dtype=torch.uint8)
        view = out.numpy()

        def fill(lo: int) -> None:
            hi = min(lo + READ_CHUNK, end)
            data = storage.read_range(self.uri, lo, hi)
            if len(data) != hi - lo:
                raise CheckpointError(f"{self.uri}: truncated: {key} needs bytes {begin:,}..{end:,} but the file "
                                      f"ends at {lo + len(data):,}")
            view[lo - begin:hi - begin] = np.frombuffer(data, dtype=np.uint8)

        chunks = range(begin, end, READ_CHUNK)
        if len(chunks) <= 1:
            for lo in chunks:
                fill(lo)
        else:
            with ThreadPoolExecutor(min(READ_THREADS, len(chunks))) as pool:
                list(pool.map(fill, chunks))   # list(): the first failed chunk's error is raised here
        return out.view(dtype).reshape(shape)   # (bytes,) -> shape, as the header says


def open_tensor_source(uri: str) -> TensorSource:
    return RangedSafetensors(uri) if storage.is_s3(uri) else LocalSafetensors(uri)


def _is_file(uri: str) -> bool:
    return storage.isfile(uri) if storage.is_s3(uri) else Path(uri).is_file()


def _shard_source(uri: str, index: str) -> TensorSource:
    missing = CheckpointError(f"{index} lists shard {posixpath.basename(uri)}, which is not at {uri}")
    if not storage.is_s3(uri) and not Path(uri).is_file():
        raise missing
    try:
        return open_tensor_source(uri)
    except FileNotFoundError:   # s3: found missing by the header read itself (no extra request per shard)
        raise missing from None


def checkpoint_sources(path: str | Path) -> dict[str, TensorSource]:
    """HF key -> the source holding it, for a dir (local or s3://) with `model.safetensors` or a sharded index,
    or one .safetensors file. Opens every shard's header once."""
    path = str(path).rstrip("/") if storage.is_s3(str(path)) else str(path)
    if _is_file(path):
        source = open_tensor_source(path)
        return {k: source for k in source.keys()}
    index = storage.join(path, INDEX_FILE)
    try:
        index_text = storage.read_text(index)
    except FileNotFoundError:
        index_text = None
    if index_text is not None:
        try:
            weight_map = json.loads(index_text)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        base = posixpath.dirname(index) if storage.is_s3(index) else str(Path(index).parent)
        sources = {name: _shard_source(storage.join(base, name), index) for name in sorted(set(weight_map.values()))}
        out = {k: sources[name] for k, name in weight_map.items()}
        for name, source in sources.items():
            listed = {k for k, n in weight_map.items() if n == name}
            if listed - set(source.keys()):
                raise CheckpointError(f"{index} puts {sorted(listed - set(source.keys()))[:5]} in {name}, whose "
                                      f"header does not hold them")
        return out
    single = storage.join(path, SINGLE_FILE)
    if _is_file(single):
        return checkpoint_sources(single)
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found (only safetensors checkpoints are "
                          f"read; convert .bin checkpoints with the safetensors tools first)")


def extend_rows(old: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    """Grow a (rows_old, dim) embedding/head matrix to `rows` rows.

    Old rows are kept exactly. New rows start at the mean of the old rows plus small per-dimension noise,
    N(0, (0.02 * std_d)^2) with std_d the old rows' std in dimension d. Starting at the mean (the "mean
    resizing" practice, Hewitt 2021; HF `resize_token_embeddings(mean_resizing=True)`) keeps the new tokens'
    logits close to the average logit, so they do not swamp the pretrained distribution; the noise breaks the
    symmetry between the new rows. A diagonal covariance keeps this cheap for 150k x 4k matrices."""
    old32 = old.float()
    mean, std = old32.mean(dim=0), old32.std(dim=0)                   # (dim,), (dim,)
    noise = torch.randn(rows - old.shape[0], old.shape[1], generator=generator)  # (new, dim)
    new = mean + noise * (0.02 * std)
    return torch.cat([old32, new]).to(old.dtype)                      # (rows, dim)


def split_extra_modules(keys: set[str], skip_modules: Sequence[str], source: str) -> set[str]:
    """The keys of `keys` that belong to the model: EXTRA_MODULES named in `skip_modules` are dropped (logged
    with their tensor counts); one present but not named is refused with a message naming the flag."""
    unknown = sorted(set(skip_modules) - set(EXTRA_MODULES))
    if unknown:
        raise CheckpointError(f"skip_modules {unknown} unknown; known modules: {sorted(EXTRA_MODULES)}")
    found = {name: sorted(k for k in keys if k.startswith(prefix)) for name, prefix in EXTRA_MODULES.items()}
    found = {name: ks for name, ks in found.items() if ks}
    refused = [name for name in found if name not in skip_modules]
    if refused:
        what = ", ".join(f"{name} ({EXTRA_MODULES[name]}*, {len(found[name])} tensors)" for name in refused)
        raise CheckpointError(
            f"{source}: holds {what}, which this model does not have: it reads speech as discrete codes. Load "
            f"without them with train.init.skip_modules={sorted(found)} (skip_modules= in load_pretrained)")
    for name, ks in found.items():
        log.warning("%s: skipping %s (%s*, %d tensors): speech enters as discrete codes here", source, name,
                    EXTRA_MODULES[name], len(ks))
    dropped = {k for ks in found.values() for k in ks}
    return keys - dropped


def iter_pretrained(path: str | Path, cfg: ModelConfig, layout: Layout, shapes: dict[str, torch.Size],
                    vocab_extension: Literal["mean", "error"] = "mean", seed: int = 0,
                    skip_modules: Sequence[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (native key, tensor) for every tensor of an HF-layout safetensors checkpoint (single file or
    sharded index), one at a time, fitted to `shapes` (native key -> the model's shape).

    Strict: every model tensor must come from the checkpoint and every checkpoint tensor must be used.
    vocab_extension: "mean" grows embedding/head rows when the checkpoint has fewer rows than the model (see
    `extend_rows`, seeded by `seed`); "error" refuses. Rows are never moved: id i of the checkpoint is row i of
    the model. `skip_modules`: EXTRA_MODULES to leave out (see the module docstring). Tensors keep the
    checkpoint's dtype."""
    sources = checkpoint_sources(path)
    kmap = key_map(cfg, layout)
    have = split_extra_modules({k for k in sources if not _ignorable(k, cfg, layout)}, skip_modules, str(path))
    _check_keys(have, set(kmap.values()), str(path), f"layout {layout!r} for a {cfg.n_layers}-layer model")
    _check_keys(set(shapes), set(kmap), "model", "the key map (model and config disagree)")
    generator = torch.Generator().manual_seed(seed)
    by_source: dict[str, list[str]] = {}
    for native, hf in kmap.items():
        by_source.setdefault(sources[hf].uri, []).append(native)
    for uri, natives in sorted(by_source.items()):   # shard by shard, in the order of the file names
        for native in natives:
            source = sources[kmap[native]]
            tensor = source.get(kmap[native])
            if tensor.shape != shapes[native]:
                tensor = _fit_vocab_rows(tensor, shapes[native], native, kmap[native], uri, vocab_extension,
                                         generator)
            yield native, tensor


@torch.no_grad()
def load_pretrained(model: nn.Module, path: str | Path, layout: Layout,
                    vocab_extension: Literal["mean", "error"] = "mean", seed: int = 0,
                    skip_modules: Sequence[str] = ()) -> None:
    """Load an HF-layout safetensors checkpoint into `model` (plain tensors) in place; see `iter_pretrained`.
    Tensors are read one at a time and cast to the model's dtype, so a 7B checkpoint never sits in memory
    twice. Call before `parallelize`; for a model built on the meta device and sharded, build the full state
    on rank 0 with `read_pretrained` and broadcast it with torch.distributed.checkpoint.state_dict's
    `set_model_state_dict(..., StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))`."""
    params = strip_wrapper_prefixes(dict(model.state_dict(keep_vars=True)))
    shapes = {k: v.shape for k, v in params.items()}
    for native, tensor in iter_pretrained(path, model.cfg, layout, shapes, vocab_extension, seed, skip_modules):
        params[native].copy_(tensor)


def read_pretrained(path: str | Path, cfg: ModelConfig, layout: Layout, vocab_rows: int,
                    vocab_extension: Literal["mean", "error"] = "mean", seed: int = 0,
                    dtype: torch.dtype | None = None, skip_modules: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Full native state dict of an HF checkpoint for a model of `cfg` with `vocab_rows` embedding rows,
    without building the model (e.g. on rank 0, to broadcast into a sharded model)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg, vocab_size=vocab_rows).state_dict().items()}
    return {k: (t if dtype is None else t.to(dtype))
            for k, t in iter_pretrained(path, cfg, layout, shapes, vocab_extension, seed, skip_modules)}


def _fit_vocab_rows(tensor: torch.Tensor, shape: torch.Size, native: str, hf: str, file: str,
                    vocab_extension: str, generator: torch.Generator) -> torch.Tensor:
    grows = (native in VOCAB_KEYS and tensor.ndim == 2 and len(shape) == 2 and tensor.shape[1] == shape[1]
             and tensor.shape[0] < shape[0])
    if not grows:
        raise CheckpointError(f"{file}: {hf} has shape {tuple(tensor.shape)} but the model's {native} has "
                              f"{tuple(shape)}; check the model preset against the checkpoint's config.json")
    if vocab_extension != "mean":
        raise CheckpointError(f"{file}: {hf} has {tensor.shape[0]} rows, the model {shape[0]}; pass "
                              f"vocab_extension='mean' to initialise the new rows, or build the model with "
                              f"model.vocab_size={tensor.shape[0]}")
    return extend_rows(tensor, shape[0], generator)


# ---- the backbone's text tokenizer ------------------------------------------------------------------------

TOKENIZER_FILE = "tokenizer.json"


def backbone_tokenizer_uri(path: str | Path) -> str:
    """Where a backbone keeps its text tokenizer: `tokenizer.json` in the checkpoint dir (or beside a single
    .safetensors file), as HF checkpoints ship it."""
    path = str(path).rstrip("/") if storage.is_s3(str(path)) else str(path)
    if path.endswith(".safetensors"):
        path = posixpath.dirname(path) if storage.is_s3(path) else str(Path(path).parent)
    return storage.join(path, TOKENIZER_FILE)


def check_text_tokenizer(vocab: Vocab, weights_path: str | Path, shards: str) -> None:
    """Refuse shards whose text tokenizer is not the backbone's: text id i is row i of the backbone's
    embedding only when both come from the same tokenizer. Compares the fingerprint the tokenize job recorded
    in the shards' vocabulary with the backbone's `tokenizer.json` fingerprinted the way that job does (with
    the reference's multimodal tokens added for prompt_format=reference). A backbone without tokenizer.json,
    or shards without a recorded fingerprint, cannot be checked: logged, not refused."""
    from model.tokenizers.text import HFTextTokenizer

    uri = backbone_tokenizer_uri(weights_path)
    if not vocab.text_fingerprint:
        log.warning("shards %s record no text tokenizer fingerprint: not checked against %s", shards, uri)
        return
    try:
        backbone = HFTextTokenizer.from_file(uri)
    except FileNotFoundError:
        log.warning("backbone %s has no %s: the shards' text tokenizer (%s, fingerprint %s) is not checked "
                    "against it", weights_path, TOKENIZER_FILE, vocab.text_tokenizer, vocab.text_fingerprint)
        return
    if vocab.prompt_format == PromptFormat.REFERENCE:
        backbone = backbone.with_added_tokens(OMNI_ADDED_TOKENS)
    if backbone.fingerprint() != vocab.text_fingerprint:
        raise VocabMismatch(
            f"text tokenizer mismatch: shards {shards} were tokenized with text tokenizer {vocab.text_tokenizer!r} "
            f"(fingerprint {vocab.text_fingerprint}, saved in {storage.join(shards, 'tokenizers', 'text.json')}), "
            f"but the backbone {weights_path} has {uri} (fingerprint {backbone.fingerprint()}, "
            f"{backbone.tokenizer_size} tokens): their text ids would index the wrong embedding rows. Tokenize "
            f"with text.kind=hf text.path={uri} (configs/tokenize/dream-magvit2.yaml), or start from the "
            f"backbone whose tokenizer made these shards.")


# ---- our own export ---------------------------------------------------------------------------------------

def save_safetensors(model_or_state: nn.Module | dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """One-file export of plain tensors (the trainer gathers FSDP DTensors with full_tensor() first).
    `metadata` (str -> str, e.g. the model config and vocabulary JSON) is stored in the file header."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    state = {k: v.detach().contiguous().cpu() for k, v in strip_wrapper_prefixes(state).items()}
    bad = [k for k, v in state.items() if type(v) is not torch.Tensor]
    if bad:
        raise CheckpointError(f"cannot save {path}: {bad[:5]} are not plain tensors (gather FSDP DTensors "
                              f"with .full_tensor() first)")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)


def load_native(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (state dict, metadata) of a file written by `save_safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(state)` with errors that name the source, missing/unexpected keys and shapes."""
    own = strip_wrapper_prefixes(dict(model.state_dict(keep_vars=True)))
    state = strip_wrapper_prefixes(state)
    _check_keys(set(state), set(own), source, "the model")
    with torch.no_grad():
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)} but the model's has "
                                      f"{tuple(own[k].shape)}")
            own[k].copy_(v)
