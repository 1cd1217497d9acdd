"""pipelines/train/trainer.py without Ray: schedule, eval prompts, and train_step on a 1-rank FSDP2 (gloo) group
and on the plain module with no process group."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from common.configlib import ConfigError, from_dict
from model.tasks import TASKS
from model.vocab import Modality
from pipelines.train import trainer
from pipelines.train.budget import BudgetProbe, TimeBudget, fit_steps
from pipelines.train.config import TrainConfig
from pipelines.train.data import Sample, collate, load_data
from tests.helpers.shardgen import make_sample, small_vocab, write_shard_set

VOCAB = small_vocab()


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = from_dict(TrainConfig, {"optim": {"warmup_steps": 4, "min_lr_ratio": 0.1}, "train": {"steps": 20}})
    f = [trainer.lr_factor(s, cfg) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[20] == pytest.approx(0.1)


def test_fit_steps_spends_the_remaining_budget_and_only_shortens():
    # 21 steps done in 5 s at 0.25 s a step: 55 s left buy 220 more
    assert fit_steps(21, 5.0, 0.25, 60.0, 1000) == 241
    assert fit_steps(21, 5.0, 0.25, 60.0, 100) == 100      # a budget never lengthens the run
    assert fit_steps(21, 90.0, 0.25, 60.0, 100) == 21      # already over: stop where it is
    # 100 steps' worth (25 s at this step time) kept for after the loop: 30 s buy 120
    assert fit_steps(21, 5.0, 0.25, 60.0, 1000, reserve_steps=100) == 141


def test_budget_probe_times_the_steps_after_the_first_then_fits_once():
    probe = BudgetProbe(TimeBudget(60.0, probe_steps=4, reserve_steps=0), first_step=0, started=0.0)
    assert probe.after_step(1, 1.0, 1000) is None      # step 1 starts the clock (step 0's cost is not timed)
    assert probe.after_step(3, 1.5, 1000) is None
    fitted, step_s = probe.after_step(5, 2.0, 1000)     # steps 2-5 took 1 s: 0.25 s a step, 58 s left
    assert step_s == 0.25 and fitted == 5 + 232
    with pytest.raises(ValueError, match="seconds must be > 0"):
        TimeBudget(0)


def test_with_steps_rescales_stages_and_refit_schedule_follows():
    cfg = from_dict(TrainConfig, {"optim": {"warmup_steps": 2, "min_lr_ratio": 0.1}, "train": {"steps": 500},
                                  "data": {"stages": [{"name": "a", "steps": 200, "mixture": {"t2i": 1}},
                                                      {"name": "b", "steps": 150, "mixture": {"i2t": 1}},
                                                      {"name": "c", "steps": 150, "mixture": {"asr": 1}}]}})
    short = cfg.with_steps(24)
    assert short.train.steps == 24 and [s.steps for s in short.data.stages] == [10, 7, 7]
    assert [s.steps for s in cfg.with_steps(3).data.stages] == [1, 1, 1]
    assert cfg.train.steps == 500                                  # a new config; the old one is unchanged
    with pytest.raises(ConfigError, match="3 stages"):
        cfg.with_steps(2)
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = trainer.build_optimizer(model, cfg)
    trainer.refit_schedule(scheduler, short)
    for _ in range(24):
        optimizer.step()
        scheduler.step()
    # the cosine now ends at step 24: the floor, not the ~0.99 of a 500-step schedule
    assert scheduler.get_last_lr()[0] == pytest.approx(cfg.optim.lr * 0.1)


def test_generation_request_keeps_the_media_bracket_in_the_prompt():
    ids, mask = make_sample("t2i", VOCAB, key=3, media_len=16)
    s = Sample("k", "t2i", ids.astype(np.int64), mask, np.zeros_like(mask))
    req = trainer.generation_request(s, VOCAB)
    assert req["prompt"][-1] == VOCAB.boi_id and req["length"] == 16 and req["modality"] == Modality.IMAGE
    ids, mask = make_sample("i2t", VOCAB, key=3, text_len=6)
    req = trainer.generation_request(Sample("k", "i2t", ids.astype(np.int64), mask, mask & False), VOCAB)
    assert req["modality"] == Modality.TEXT and req["length"] == 7        # 6 text ids + <im_end>
    assert req["prompt"][-1] == VOCAB.role_id("assistant")


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_train_step_lowers_the_loss_with_accumulation_and_clipping(one_rank_group, tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    shards = write_shard_set(tmp_path / "set", VOCAB, {"t2i": 16, "i2t": 16}, samples_per_shard=16)
    cfg = from_dict(TrainConfig, {"data": {"shards": [str(shards)], "seq_len": 128, "micro_batch": 2,
                                           "grad_accum": 2},
                                  "optim": {"lr": 3e-3, "warmup_steps": 1, "clip": 0.5}, "train": {"steps": 20}})
    data = load_data(cfg)
    model = trainer.build_model(cfg, data.vocab, torch.device("cpu"), init_device_mesh("cpu", (1,)))
    optimizer, scheduler = trainer.build_optimizer(model, cfg)
    stream = data.stream(cfg)
    rows = stream.step_rows(1, 0, 2, 2)
    micro = [collate(r, 128, data.vocab) for r in rows]
    losses = []
    for step in range(20):   # the same rows every step (masks differ): the loss must fall fast
        stats = trainer.train_step(model, optimizer, scheduler, micro, vocab=data.vocab, cfg=cfg, step=step,
                                 rank=0, world=1, device=torch.device("cpu"))
        losses.append(stats.loss)
        assert stats.grad_norm > 0 and stats.masked > 0
    assert set(stats.task_loss) <= {"t2i", "i2t"} and stats.task_loss
    assert stats.tokens == sum(b.n_tokens for b in micro)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0


def test_train_step_on_a_plain_module_is_the_one_rank_fsdp_step(tmp_path):
    """The benchmarks' floor runs train_step on the unsharded model with no process group: from the same weights
    on the same batches it must take the steps a one-rank FSDP2 worker takes (task weights, prompt dropout, a
    media floor and gradient accumulation included), so a floor-vs-worker ratio compares the same work."""
    from torch.distributed.device_mesh import init_device_mesh

    shards = write_shard_set(tmp_path / "set", VOCAB, {"t2i": 16, "i2t": 16}, samples_per_shard=16)
    cfg = from_dict(TrainConfig, {"data": {"shards": [str(shards)], "seq_len": 128, "micro_batch": 2,
                                           "grad_accum": 2},
                                  "diffusion": {"task_weights": {"t2i": 2.0}, "prompt_dropout": {"t2i": 0.5},
                                                "task_min_t": {"t2i": 0.3}},
                                  "optim": {"lr": 3e-3, "warmup_steps": 1, "clip": 0.5}, "train": {"steps": 4}})
    data = load_data(cfg)
    micro = [collate(r, 128, data.vocab) for r in data.stream(cfg).step_rows(1, 0, 2, 2)]
    cpu = torch.device("cpu")

    def steps(model):
        optimizer, scheduler = trainer.build_optimizer(model, cfg)
        return [trainer.train_step(model, optimizer, scheduler, micro, vocab=data.vocab, cfg=cfg, step=step, rank=0,
                                   world=1, device=cpu) for step in range(4)]

    assert not dist.is_initialized()
    plain_model = trainer.init_model(cfg, data.vocab)
    assert not hasattr(plain_model, "set_requires_gradient_sync")
    plain = steps(plain_model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        sharded = steps(trainer.build_model(cfg, data.vocab, cpu, init_device_mesh("cpu", (1,))))
    finally:
        dist.destroy_process_group()
    # later steps start from the weights the earlier updates left: equal losses mean equal updates
    assert [s.loss for s in plain] == pytest.approx([s.loss for s in sharded], rel=1e-5)
    assert [s.grad_norm for s in plain] == pytest.approx([s.grad_norm for s in sharded], rel=1e-4)
    assert [(s.masked, s.tokens) for s in plain] == [(s.masked, s.tokens) for s in sharded]
    assert plain[0].task_loss.keys() == {"t2i", "i2t"} and plain[-1].loss < plain[0].loss


def test_task_weights_scale_each_tasks_gradient_not_its_logged_loss(one_rank_group, tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    from common.configlib import ConfigError

    shards = write_shard_set(tmp_path / "set", VOCAB, {"t2i": 8, "i2t": 8}, samples_per_shard=16)

    def one_step(weights, text_weights=None):
        cfg = from_dict(TrainConfig, {"data": {"shards": [str(shards)], "seq_len": 128, "micro_batch": 2},
                                      "diffusion": {"task_weights": weights,
                                                    "task_text_weights": text_weights or {}},
                                      "train": {"steps": 1}})
        data = load_data(cfg)
        torch.manual_seed(0)
        model = trainer.build_model(cfg, data.vocab, torch.device("cpu"), init_device_mesh("cpu", (1,)))
        optimizer, scheduler = trainer.build_optimizer(model, cfg)
        micro = [collate(r, 128, data.vocab) for r in data.stream(cfg).step_rows(1, 0, 2, 1)]
        return trainer.train_step(model, optimizer, scheduler, micro, vocab=data.vocab, cfg=cfg, step=0, rank=0,
                                world=1, device=torch.device("cpu"))

    plain, doubled, off = one_step({}), one_step({"t2i": 2.0, "i2t": 2.0}), one_step({"t2i": 0.0, "i2t": 0.0})
    assert plain.loss == pytest.approx(doubled.loss) == pytest.approx(off.loss) and plain.loss > 0
    assert doubled.grad_norm == pytest.approx(2 * plain.grad_norm, rel=1e-4)
    assert off.grad_norm == 0.0
    with pytest.raises(ConfigError, match="task_weights"):
        from_dict(TrainConfig, {"diffusion": {"task_weights": {"captioning": 2.0}}})
    # task_text_weights: only the text positions of a task's answer (an image answer has none); logged unweighted
    assert one_step({}, {"t2i": 3.0}).grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)
    i2t_only = one_step({"t2i": 0.0})
    text_heavy, text_off = one_step({"t2i": 0.0}, {"i2t": 3.0}), one_step({"t2i": 0.0}, {"i2t": 0.0})
    assert text_heavy.loss == pytest.approx(i2t_only.loss) == pytest.approx(text_off.loss)
    assert text_off.grad_norm < i2t_only.grad_norm < text_heavy.grad_norm
    assert text_off.grad_norm > 0                  # the answer's <im_end> and EOS tail still train
    assert one_step({"t2i": 0.0, "i2t": 0.0}, {"i2t": 5.0}).grad_norm == 0.0   # on top of task_weights
    with pytest.raises(ConfigError, match="task_text_weights needs"):
        from_dict(TrainConfig, {"diffusion": {"scheme": "per_sequence", "task_text_weights": {"s2i": 4.0}}})


def test_prompt_dropout_masks_the_prompts_the_model_sees(one_rank_group, tmp_path):
    """diffusion.prompt_dropout: t2i samples reach the model with their whole prompt masked (the sampler's
    unconditional input), i2t samples never; answers are masked as without it."""
    from torch.distributed.device_mesh import init_device_mesh

    from common.configlib import ConfigError

    shards = write_shard_set(tmp_path / "set", VOCAB, {"t2i": 8, "i2t": 8}, samples_per_shard=16)
    cfg = from_dict(TrainConfig, {"data": {"shards": [str(shards)], "seq_len": 128, "micro_batch": 4},
                                  "diffusion": {"prompt_dropout": {"t2i": 0.9999}}, "train": {"steps": 1}})
    data = load_data(cfg)
    model = trainer.build_model(cfg, data.vocab, torch.device("cpu"), init_device_mesh("cpu", (1,)))
    optimizer, scheduler = trainer.build_optimizer(model, cfg)
    micro = [collate(r, 128, data.vocab) for r in data.stream(cfg).step_rows(1, 0, 4, 1)]
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    trainer.train_step(model, optimizer, scheduler, micro, vocab=data.vocab, cfg=cfg, step=0, rank=0, world=1,
                     device=torch.device("cpu"))
    b, noisy = micro[0], seen[0]
    prompt = ~b.answer_mask & (b.segment_ids > 0)
    t2i, i2t = b.task_ids == TASKS.index("t2i"), b.task_ids == TASKS.index("i2t")
    assert t2i.any() and i2t.any()
    assert (noisy[prompt & t2i] == data.vocab.mask_id).all()
    assert torch.equal(noisy[prompt & i2t], b.ids[prompt & i2t])
    with pytest.raises(ConfigError, match="prompt_dropout"):
        from_dict(TrainConfig, {"diffusion": {"prompt_dropout": {"t2i": 1.0}}})


def test_adamw_implementation_choice_and_fused_equals_foreach(one_rank_group):
    """optim.impl picks AdamW's kernel (auto: fused on CUDA only); the fused step updates sharded (DTensor)
    parameters as the foreach step does."""
    from torch.distributed.device_mesh import init_device_mesh

    from model.config import ModelConfig

    finals = {}
    for impl in ("auto", "fused", "foreach"):
        cfg = from_dict(TrainConfig, {"optim": {"impl": impl, "lr": 1e-2, "warmup_steps": 1}})
        cfg.model = ModelConfig.preset("debug")
        model = trainer.build_model(cfg, VOCAB, torch.device("cpu"), init_device_mesh("cpu", (1,)))
        optimizer, _ = trainer.build_optimizer(model, cfg)
        assert bool(optimizer.defaults["fused"]) == (impl == "fused")
        assert bool(optimizer.defaults["foreach"]) == (impl == "foreach")
        for _ in range(3):
            model(torch.arange(16)[None] % VOCAB.size).float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        finals[impl] = torch.cat([p.full_tensor().flatten() for p in model.parameters()])
    assert torch.allclose(finals["fused"], finals["foreach"], atol=1e-6)
    assert torch.allclose(finals["auto"], finals["foreach"], atol=1e-6)
    with pytest.raises(Exception, match="impl"):
        from_dict(TrainConfig, {"optim": {"impl": "apex"}})


def test_task_scheme_config_picks_the_shared_t_positions():
    cfg = from_dict(TrainConfig, {"diffusion": {"task_scheme": {"tts": "per_sample", "t2i": "per_token"}}})
    task_ids = torch.tensor([[TASKS.index("tts"), TASKS.index("t2i"), -1]])
    assert trainer.shared_t_positions(cfg.diffusion.task_scheme, task_ids).tolist() == [[True, False, False]]
    assert trainer.shared_t_positions({}, task_ids) is None
    with pytest.raises(ConfigError, match="per_token or per_sample"):
        from_dict(TrainConfig, {"diffusion": {"task_scheme": {"tts": "per_sequence"}}})
    with pytest.raises(ConfigError, match="task_scheme needs"):
        from_dict(TrainConfig, {"diffusion": {"scheme": "per_sequence", "task_scheme": {"tts": "per_sample"}}})


def test_media_floor_spares_the_text_of_an_answer():
    """task_min_t floors an answer's media positions; an s2i transcript before its image trains at every rate."""
    class B:   # the part of a Batch the floor reads
        ids = torch.tensor([[5, VOCAB.boi_id, VOCAB.image_offset + 1, VOCAB.eoi_id, VOCAB.im_end_id, 7]])
        task_ids = torch.tensor([[TASKS.index("s2i")] * 5 + [TASKS.index("i2t")]])

    floor = trainer.media_floor({"s2i": 0.8}, B, VOCAB)
    assert torch.allclose(floor, torch.tensor([[0.0, 0.8, 0.8, 0.8, 0.8, 0.0]]))
    assert trainer.media_floor({}, B, VOCAB) is None


def test_socket_interface_reaches_every_worker_environment_or_stays_unset():
    cfg = from_dict(TrainConfig, {"scaling": {"socket_ifname": "eth0"}})
    env = trainer.ray_run_config(cfg).worker_runtime_env["env_vars"]
    assert env == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    assert trainer.ray_run_config(TrainConfig()).worker_runtime_env["env_vars"] == {}   # "" = inherited
    assert trainer.worker_env(from_dict(TrainConfig, {"scaling": {"socket_ifname": "eth0,eth1"}})) == {
        "GLOO_SOCKET_IFNAME": "eth0,eth1", "NCCL_SOCKET_IFNAME": "eth0,eth1"}
    for bad in ("eth0 eth1", "eth0;rm", "^docker"):
        with pytest.raises(ConfigError, match="scaling.socket_ifname"):
            from_dict(TrainConfig, {"scaling": {"socket_ifname": bad}})
