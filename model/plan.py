"""`omnidiff plan`: will this model train on these GPUs? Parameter count, FLOPs per token and a per-GPU memory plan.

The model is built on the meta device (no memory, no time), so the counts are those of the real module.
The memory plan assumes how pipelines/train runs the model (model/parallelize.py):

  * FSDP2 over all GPUs; the sharded master parameters, their gradients and AdamW's m and v are fp32:
    16 bytes per parameter, divided by the number of GPUs.
  * Compute in --dtype (bf16: the all-gathered parameters are bf16 copies). Two blocks are unsharded at
    once (the current one and the prefetched next), plus one block's gradients in the compute dtype and
    their fp32 copy for the reduce-scatter. The root group (embedding, final norm, head) stays unsharded
    from the start of forward to the end of backward, and so do its gradients.
  * Activations saved for backward, per token and layer, about 10*dim + 2*kv_dim + 4*hidden_dim values
    (norm inputs/outputs, q/k/v before and after RoPE, attention output, the four SwiGLU tensors). With
    activation checkpointing only each block's input is kept, plus one block's activations while it is
    recomputed. The (B, 1, L, L) boolean packing mask is counted once.
  * Logits: the head's output in the compute dtype plus four fp32 (B, L, V) tensors at the loss (the fp32
    logits, the shifted copy for Dream-style heads, log-softmax and the gradient).
  * A headroom factor (default 1.15) for allocator fragmentation and temporaries, plus a fixed reserve for the
    CUDA context and NCCL buffers.
These are estimates for planning, good to ~10-20%; measure with `omnidiff bench` before a long run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from common import cli, configlib
from model.config import ModelConfig
from model.transformer import Transformer

GiB = 1024 ** 3
CUDA_RESERVE_GIB = 1.5   # CUDA context, NCCL buffers, cuBLAS workspaces: not visible to the allocator's stats
BYTES = {"bf16": 2, "fp32": 4}


def _model_config(model: str | ModelConfig) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if Path(model).suffix in (".yaml", ".yml"):
        return configlib.load(ModelConfig, model)
    return ModelConfig.preset(model)


def plan(model: str | ModelConfig, *, gpus: int, gpu_mem_gb: float, seq_len: int, micro_batch: int = 1,
         activation_checkpointing: bool = True, dtype: Literal["bf16", "fp32"] = "bf16",
         vocab_size: int | None = None, headroom: float = 1.15) -> dict[str, Any]:
    """Memory and compute plan for one GPU; sizes in GiB. See the module docstring for the assumptions."""
    if gpus < 1 or micro_batch < 1 or seq_len < 1:
        raise ValueError(f"gpus={gpus}, micro_batch={micro_batch}, seq_len={seq_len}: all must be >= 1")
    if dtype not in BYTES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(BYTES)}")
    cfg = _model_config(model)
    if not cfg.vocab_size and not vocab_size:
        raise ValueError("this model config has vocab_size 0 (the vocabulary decides it at train time): "
                         "pass --vocab-size, e.g. the size of the vocabulary you tokenized with")
    with torch.device("meta"):
        m = Transformer(cfg, vocab_size=vocab_size)
    c = BYTES[dtype]
    n_params = m.num_params()
    n_block = sum(p.numel() for p in m.layers[0].parameters())
    n_root = n_params - cfg.n_layers * n_block
    tokens = micro_batch * seq_len
    kv_dim = cfg.n_kv_heads * cfg.head_dim

    sharded_state = 16 * n_params / gpus
    root = (2 * c + 4) * n_root                               # params + grads unsharded, fp32 reduce copy
    blocks = 2 * c * n_block + (c + 4) * n_block              # two gathered blocks + one block's grads
    per_layer = (10 * cfg.dim + 2 * kv_dim + 4 * cfg.hidden_dim) * c * tokens
    if activation_checkpointing:
        activations = cfg.n_layers * cfg.dim * c * tokens + per_layer
    else:
        activations = cfg.n_layers * per_layer
    activations += micro_batch * seq_len * seq_len            # packing mask, bool
    logits = tokens * m.vocab_size * (c + 16)
    parts = {"sharded params+grads+AdamW (fp32)": sharded_state, "unsharded root (embed/head)": root,
             "unsharded blocks": blocks, "activations": activations, "logits and loss": logits}
    total = sum(parts.values()) / GiB
    need = total * headroom + CUDA_RESERVE_GIB
    return {
        "model": cfg, "params": n_params, "vocab_size": m.vocab_size,
        "flops_per_token": m.flops_per_token(seq_len, training=True),
        "flops_per_token_forward": m.flops_per_token(seq_len, training=False),
        "memory_gib": {k: v / GiB for k, v in parts.items()}, "total_gib": total,
        "needed_gib": need, "gpu_mem_gib": gpu_mem_gb, "headroom": headroom, "fits": need <= gpu_mem_gb,
        "gpus": gpus, "seq_len": seq_len, "micro_batch": micro_batch, "dtype": dtype,
        "activation_checkpointing": activation_checkpointing,
    }


def format_plan(p: dict[str, Any]) -> str:
    ac = "on" if p["activation_checkpointing"] else "off"
    lines = [
        f"parameters          {p['params']:,}  (vocabulary rows {p['vocab_size']:,})",
        f"FLOPs per token     {p['flops_per_token'] / 1e9:,.3f} GFLOP train, "
        f"{p['flops_per_token_forward'] / 1e9:,.3f} GFLOP forward  (seq_len {p['seq_len']})",
        f"per-GPU memory      {p['gpus']} GPUs, micro-batch {p['micro_batch']}, {p['dtype']} compute, "
        f"activation checkpointing {ac}",
    ]
    for name, gib in p["memory_gib"].items():
        lines.append(f"  {name:<36} {gib:8.2f} GiB")
    lines.append(f"  {'total':<36} {p['total_gib']:8.2f} GiB")
    lines.append(f"  {'x headroom ' + str(p['headroom']) + ' + CUDA reserve':<36} {p['needed_gib']:8.2f} GiB"
                 f"  of {p['gpu_mem_gib']:.1f} GiB")
    verdict = "fits" if p["fits"] else "does not fit"
    lines.append(f"verdict             {verdict}")
    if not p["fits"]:
        tips = ["more GPUs"] + ([] if p["activation_checkpointing"] else ["--activation-checkpointing"])
        lines.append(f"  try: {', '.join(tips)}, a smaller --micro-batch or --seq-len")
    return "\n".join(lines)


@cli.command
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="omnidiff plan",
        description="Estimate parameters, FLOPs per token and per-GPU memory for training a model with FSDP2 "
                    "(bf16 compute, fp32 master weights and AdamW state).",
        epilog=cli.EXIT_STATUS_HELP)
    ap.add_argument("--model", default="debug",
                    help=f"a model preset ({', '.join(ModelConfig.preset_names())}) or a model YAML file")
    ap.add_argument("--gpus", type=int, default=8, help="number of GPUs sharing the model (FSDP world size)")
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU in GiB (H100: 80)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's seq_len)")
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward pass")
    ap.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute each block in backward instead of keeping its activations (default on)")
    ap.add_argument("--dtype", choices=sorted(BYTES), default="bf16", help="compute dtype (default bf16)")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="embedding rows, for presets whose vocab_size is 0 (taken from the vocabulary)")
    ap.add_argument("--headroom", type=float, default=1.15, help="safety factor on the estimate (default 1.15)")
    args = ap.parse_args(argv)
    cfg = _model_config(args.model)
    p = plan(cfg, gpus=args.gpus, gpu_mem_gb=args.gpu_mem_gb, seq_len=args.seq_len or cfg.seq_len,
             micro_batch=args.micro_batch, activation_checkpointing=args.activation_checkpointing,
             dtype=args.dtype, vocab_size=args.vocab_size, headroom=args.headroom)
    print(f"model               {args.model}: dim {cfg.dim}, n_layers {cfg.n_layers}, n_heads {cfg.n_heads}, "
          f"n_kv_heads {cfg.n_kv_heads}, hidden_dim {cfg.hidden_dim}")
    print(format_plan(p))
    return cli.OK if p["fits"] else cli.NOT_MET


if __name__ == "__main__":
    sys.exit(main())
