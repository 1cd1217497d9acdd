"""The demo's training and sampling are a function of their seeds: the demo's own model and diffusion settings
(configs/train/demo.yaml), trained a few steps twice from train.seed on the same shards, take bit-identical
steps and then sample bit-identical canvases (random order at temperature 1, as the demo's TTS sampler does).
The whole demo, Ray and two gloo workers included, twice: tests/slow/test_small_demo_repeats.py."""
from __future__ import annotations

from pathlib import Path

import torch

from model.sampling import generate
from model.vocab import Modality
from pipelines.train import trainer
from pipelines.train.data import collate, load_data
from tests.helpers.shardgen import small_vocab, write_shard_set

DEMO_TRAIN = Path(__file__).resolve().parents[2] / "configs" / "train" / "demo.yaml"
STEPS = 6


def run_once(shards: Path, tmp: Path) -> tuple[list[tuple[float, float]], torch.Tensor]:
    cfg = trainer.resolve_config(str(DEMO_TRAIN), [str(shards)], str(tmp / "run"),
                                 ["data.stages=[]", "data.seq_len=128"]).with_steps(STEPS)
    data = load_data(cfg)
    model = trainer.init_model(cfg, data.vocab)
    optimizer, scheduler = trainer.build_optimizer(model, cfg)
    stream = data.stream(cfg)
    cpu = torch.device("cpu")
    stats = []
    for step in range(STEPS):
        micro = [collate(r, cfg.data.seq_len, data.vocab) for r in stream.step_rows(1, 0, cfg.data.micro_batch, 1)]
        s = trainer.train_step(model, optimizer, scheduler, micro, vocab=data.vocab, cfg=cfg, step=step, rank=0,
                               world=1, device=cpu)
        stats.append((s.loss, s.grad_norm))
    model.eval()
    v = data.vocab
    prompt = torch.tensor([[v.im_start_id, 5, 6, 7, v.im_end_id, v.im_start_id, v.boa_id]])   # (1, P)
    canvas = generate(model, prompt, vocab=v, gen_length=24, steps=12, alg="random", temperature=1.0,
                      modality=Modality.AUDIO, generator=torch.Generator().manual_seed(0))
    return stats, canvas


def test_demo_training_and_sampling_repeat_bit_for_bit(tmp_path):
    shards = write_shard_set(tmp_path / "set", small_vocab(), {"tts": 16, "i2t": 16, "t2i": 16},
                             samples_per_shard=16)
    first_stats, first_canvas = run_once(shards, tmp_path / "a")
    second_stats, second_canvas = run_once(shards, tmp_path / "b")
    assert first_stats == second_stats            # exact floats: the same masks, batches and updates
    assert torch.equal(first_canvas, second_canvas)
    assert first_stats[-1][0] != first_stats[0][0]   # it did train (the comparison is not of constants)
