"""model/parallelize.py: FSDP2 over 2 gloo processes gives the loss and gradients of one process."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.parallelize import mixed_precision_policy, parallelize
from model.transformer import Transformer
from model.vocab import Vocab
from tests.helpers import gloo

VOCAB = Vocab(text_size=120, n_q=2, audio_codebook_size=16, image_codebook_size=32)
WORLD = 2


def build() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("debug"), vocab_size=VOCAB.size)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB.size, (4, 16), generator=g)
    targets = torch.randint(0, VOCAB.size, (4, 16), generator=g)
    seg = torch.ones(4, 16, dtype=torch.long)
    seg[:, 10:] = 2          # packed rows exercise the mask path
    seg[1, 13:] = 0          # and padding
    return ids, targets, seg


def loss_fn(model, ids, targets, seg) -> torch.Tensor:
    logits = model(ids, seg)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _worker(rank: int, out_dir: str) -> None:
    mesh = dist.device_mesh.init_device_mesh("cpu", (WORLD,))
    ids, targets, seg = (t.chunk(WORLD)[rank] for t in batch())   # each rank: half the batch
    for ac, unit in ((False, "block"), (True, "block"), (False, "model")):
        model = parallelize(build(), mesh, activation_checkpointing=ac, mixed_precision="bf16", shard_unit=unit)
        assert type(model.layers[0]).__name__.startswith("FSDP") == (unit == "block")  # fully_shard swaps the class
        names = [n for n, _ in model.named_parameters()]
        assert any("_checkpoint_wrapped_module" in n for n in names) == ac
        loss = loss_fn(model, ids, targets, seg)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
        grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor()
                 for n, p in model.named_parameters()}
        if rank == 0:
            save_file({"loss": mean_loss, **{f"grad.{k}": v for k, v in grads.items()}},
                      os.path.join(out_dir, f"ac{int(ac)}_{unit}.safetensors"))


def test_fsdp_two_processes_match_one_process(tmp_path):
    model = build()
    loss = loss_fn(model, *batch())
    loss.backward()
    gloo.spawn(_worker, str(tmp_path), world=WORLD)
    for ac, unit in ((0, "block"), (1, "block"), (0, "model")):
        got = load_file(str(tmp_path / f"ac{ac}_{unit}.safetensors"))
        torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[f"grad.{name}"], p.grad, atol=1e-5, rtol=1e-4, msg=f"{name} ac={ac}")


def test_mixed_precision_policies():
    bf16 = mixed_precision_policy("bf16", "cuda")
    assert bf16.param_dtype == torch.bfloat16 and bf16.reduce_dtype == torch.float32
    cpu = mixed_precision_policy("bf16", "cpu")             # gloo/CPU: fp32 instead
    assert cpu.param_dtype == torch.float32 and cpu.reduce_dtype == torch.float32
    assert mixed_precision_policy(None, "cuda").param_dtype is None
    with pytest.raises(ValueError, match="fp16"):
        mixed_precision_policy("fp16", "cuda")
