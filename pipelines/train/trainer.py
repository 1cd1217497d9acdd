"""Train the masked-diffusion transformer with Ray Train + FSDP2, tracked in MLflow.

    python -m pipelines.train --config configs/train/debug.yaml --shards <tokenize output> --run-dir runs/debug
    omnidiff train --config configs/train/dream-7b.yaml --shards s3://bucket/tok --run-dir s3://bucket/runs

Without RAY_ADDRESS a local Ray starts; with it (or under `ray job submit`) the run joins that cluster.
A second run with the same run.name and run_dir resumes from its last checkpoint (model, optimizer, scheduler,
step, curriculum stage, data position, MLflow run). See docs/training.md.

The Ray layer is thin: the driver (`run`) checks the data and starts a TorchTrainer; each worker runs
`train_func`: build the model, shard it, restore state, then loop `train_step -> maybe checkpoint -> maybe eval
-> maybe log`, and export a single-file model at the end.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from common import cli, storage, tracking
from common.configlib import ConfigError, from_dict, load, to_dict
from common.rayutil import init_ray
from model.diffusion import (
    drop_prompts,
    global_count,
    loss_weights,
    mask_answer_tokens,
    masked_diffusion_loss,
    per_task,
    task_position_weights,
)
from model.tasks import TASKS, spec
from model.vocab import Modality, Vocab
from pipelines.train import checkpoint as ckpt
from pipelines.train.budget import BudgetProbe, TimeBudget
from pipelines.train.config import TrainConfig
from pipelines.train.data import (Batch, Sample, StreamState, eval_prompts, load_data, step_batches,
                                  step_generator)
from pipelines.train.feed import StepFeeder

# ---- model and optimizer ------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, vocab: Vocab, device: torch.device, mesh) -> torch.nn.Module:
    """Build, (optionally) load pretrained weights, and shard with FSDP2 (model/parallelize.py)."""
    from model.parallelize import parallelize

    # The full model is built (and initialised or loaded) on every rank, then sharded: initialising the shards
    # of a meta-device model would draw each rank's shard from the same CPU RNG stream (DTensor's offset RNG
    # does not cover CPU meshes), so e.g. the two halves of the embedding would start identical. Costs the full
    # model in host memory once per rank during start-up; large models come from pretrained weights anyway,
    # which load_pretrained reads one tensor at a time.
    model = init_model(cfg, vocab)
    parallelize(model, mesh, activation_checkpointing=cfg.train.activation_checkpointing,
                mixed_precision=cfg.train.mixed_precision, shard_unit=cfg.train.fsdp_unit)
    return model.to(device)


def init_model(cfg: TrainConfig, vocab: Vocab) -> torch.nn.Module:
    """The unsharded model on the host, seeded from train.seed and (optionally) loaded from pretrained weights:
    what `build_model` shards, and what the benchmarks' single-process floor trains as it is."""
    from model.transformer import Transformer

    init = cfg.train.init
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model, vocab_size=vocab.size, media_markers=vocab.media_markers)
    if init.kind == "pretrained":
        from model.weights import load_pretrained

        if not init.path:
            raise ConfigError("train.init.kind=pretrained needs train.init.path (a safetensors dir or file, local "
                              "or s3://)")
        load_pretrained(model, init.path, init.layout, vocab_extension=init.vocab_extension, seed=cfg.train.seed,
                        skip_modules=init.skip_modules)
    return model


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    o = cfg.optim
    # Weight decay on matrices only: decaying norm gains and biases pulls them toward 0, which is not a prior
    # anyone wants (GPT-2 / nanoGPT practice).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    cuda = any(p.device.type == "cuda" for p in decay)
    fused = o.impl == "fused" or (o.impl == "auto" and cuda)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  fused=fused or None, foreach=True if o.impl == "foreach" else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return optimizer, scheduler


def refit_schedule(scheduler, cfg: TrainConfig) -> None:
    """Point the LR schedule at `cfg`'s run length (after a time budget changed train.steps): LambdaLR
    evaluates its lambda at every step, so the remaining steps follow the new cosine."""
    scheduler.lr_lambdas = [lambda s: lr_factor(s, cfg)] * len(scheduler.optimizer.param_groups)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.lr * min_lr_ratio at train.steps."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- one optimizer step -------------------------------------------------------------------------------------

@dataclass
class StepStats:
    loss: float
    task_loss: dict[str, float]
    grad_norm: float
    tokens: int            # real tokens over all ranks
    masked: int            # loss normalizer over all ranks


def task_table(values: dict[str, float], default: float, device: torch.device) -> torch.Tensor | None:
    """A per-task config dict as a (num_tasks,) table in task-id order; None when every task has the default,
    so the knob costs nothing (and draws no randomness) when off."""
    if all(v == default for v in values.values()):
        return None
    return torch.tensor([float(values.get(t, default)) for t in TASKS], device=device)


def per_position(values: dict[str, float], task_ids: torch.Tensor) -> torch.Tensor | None:
    """A per-task value ({task: value}, 0 for the others and for padding) at every position of task_ids (B, L)
    -> (B, L) float; None when every value is 0."""
    table = task_table(values, 0.0, task_ids.device)
    return None if table is None else per_task(table, task_ids)


def media_floor(task_min_t: dict[str, float], batch: Batch, vocab: Vocab) -> torch.Tensor | None:
    """(B, L) floor on the masking rate: `diffusion.task_min_t` of each position's task, at non-text positions
    only. The floor is for media answers; the text of an answer (an s2i transcript written before its image)
    trains at every rate, so the image is also learned with the transcript visible. None when no task has one."""
    floor = per_position(task_min_t, batch.task_ids)
    if floor is None:
        return None
    return floor * (vocab.modality_of(batch.ids) != int(Modality.TEXT))


def shared_t_positions(task_scheme: dict[str, str], task_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, L) bool: positions of the tasks that `diffusion.task_scheme` masks per sample; None when none do."""
    rate = per_position({t: 1.0 for t, s in task_scheme.items() if s == "per_sample"}, task_ids)
    return None if rate is None else rate > 0


def train_step(model: torch.nn.Module, optimizer, scheduler, micro_batches: Sequence[Batch], *, vocab: Vocab,
               cfg: TrainConfig, step: int, rank: int, world: int, device: torch.device) -> StepStats:
    """One optimizer step over `grad_accum` micro-batches, loss normalized by the GLOBAL masked-token count.

    `model` is the FSDP2 model of a worker, or a plain module with no process group (world 1): the benchmarks'
    floor runs this same step, so its ratio measures only what sharding and Ray add."""
    d = cfg.diffusion
    # 1. Mask every micro-batch first: the normalizer (summed over micro-batches and ranks) must be known
    #    before any backward (model/diffusion.py explains why a per-micro-batch mean would be biased).
    prepared = []
    for m, batch in enumerate(micro_batches):
        batch = batch.to(device)
        gen = step_generator(cfg.train.seed, step, rank, m, device)
        masked = mask_answer_tokens(batch.ids, batch.answer_mask, batch.tail_mask, gen, mask_id=vocab.mask_id,
                                    eps=d.eps, tail_factor=d.tail_factor, scheme=d.scheme,
                                    t_min=media_floor(d.task_min_t, batch, vocab), segment_ids=batch.segment_ids,
                                    shared_t=shared_t_positions(d.task_scheme, batch.task_ids))
        rate = per_position(d.prompt_dropout, batch.task_ids)
        if rate is not None:
            masked = masked._replace(noisy_ids=drop_prompts(masked.noisy_ids, batch.answer_mask,
                                                            batch.segment_ids, rate, gen, mask_id=vocab.mask_id))
        weights, row_count = loss_weights(masked.is_masked, batch.answer_mask, masked.t, scheme=d.scheme)
        prepared.append((batch, masked, weights, row_count))
    count = global_count(sum(rc.sum() for *_, rc in prepared).to(device))

    # 2. Forward/backward per micro-batch (gradient accumulation); FSDP reduces gradients on the last one only.
    #    A plain module (the benchmarks' single-process floor) has no gradient sync to defer.
    set_gradient_sync = getattr(model, "set_requires_gradient_sync", None)
    task_sum = torch.zeros(len(TASKS), device=device)
    task_count = torch.zeros(len(TASKS), device=device)
    # the per-task loss knobs as (num_tasks,) tables, read per position: one loss call, no host sync
    task_w, text_w = task_table(d.task_weights, 1.0, device), task_table(d.task_text_weights, 1.0, device)
    ones = torch.ones(len(TASKS), device=device)
    for m, (batch, masked, weights, row_count) in enumerate(prepared):
        if set_gradient_sync is not None:
            set_gradient_sync(m == len(prepared) - 1)
        # the head runs at masked positions only: (N_masked, V), rows in is_masked.nonzero() order
        logits = model(masked.noisy_ids, batch.segment_ids, only=masked.is_masked)
        multipliers = None
        if task_w is not None or text_w is not None:
            is_text = vocab.modality_of(batch.ids) == int(Modality.TEXT)                           # (B, L)
            multipliers = task_position_weights(batch.task_ids, is_text, task_w if task_w is not None else ones,
                                                text_w if text_w is not None else ones)
        terms = masked_diffusion_loss(logits, batch.ids, masked.is_masked, weights=weights,
                                      row_count=row_count if d.scheme == "per_sequence" else None,
                                      multipliers=multipliers, task_ids=batch.task_ids, num_tasks=len(TASKS))
        # + zero-valued but connected to the graph: every rank must run backward (FSDP's collectives) even with
        # no masked token in its micro-batch
        loss_sum = terms.loss_sum + logits[..., :1].sum() * 0.0
        task_sum += terms.task_sum
        task_count += terms.task_count
        # FSDP averages gradients over ranks; * world makes the result the gradient of sum(loss) / global count
        (loss_sum * world / count).backward()

    # 3. Clip (the global norm over all shards) and step.
    clip = cfg.optim.clip if cfg.optim.clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    tokens = torch.tensor([float(sum(b.n_tokens for b in micro_batches))], device=device)
    stats = torch.cat([task_sum, task_count, tokens])
    if dist.is_initialized():
        dist.all_reduce(stats)
    task_sum, task_count, tokens = stats[:len(TASKS)], stats[len(TASKS):2 * len(TASKS)], stats[-1]
    return StepStats(
        loss=float(task_sum.sum() / count), grad_norm=float(grad_norm),
        task_loss={TASKS[i]: float(task_sum[i] / task_count[i]) for i in range(len(TASKS)) if task_count[i] > 0},
        tokens=int(tokens), masked=int(count))


# ---- eval: a few generations as MLflow artifacts ------------------------------------------------------------

def generation_request(sample: Sample, vocab: Vocab) -> dict[str, Any] | None:
    """Prompt (up to the answer; a media answer's opening bracket included) and canvas for one sample."""
    answer_pos = np.flatnonzero(sample.answer_mask)
    if answer_pos.size == 0:
        return None
    a0 = int(answer_pos[0])
    answer = sample.ids[a0:int(answer_pos[-1]) + 1]
    modality = spec(sample.task).answer if sample.task in TASKS else Modality.TEXT
    if modality == Modality.IMAGE:
        lo, hi = vocab.image_range()
        return {"prompt": sample.ids[:a0 + 1], "length": int(((answer >= lo) & (answer < hi)).sum()),
                "modality": modality, "name": "image"}
    if modality == Modality.AUDIO:
        lo, hi = vocab.audio_range()
        return {"prompt": sample.ids[:a0 + 1], "length": int(((answer >= lo) & (answer < hi)).sum()),
                "modality": modality, "name": "audio"}
    return {"prompt": sample.ids[:a0], "length": int(answer.size), "modality": modality, "name": "text"}


def run_eval(model, prompts: Sequence[Sample], vocab: Vocab, cfg: TrainConfig, device) -> list[dict[str, Any]]:
    """Generate for each prompt. Every rank runs it (FSDP forward is collective) on the same prompts."""
    from model.sampling import generate

    model.eval()
    out = []
    try:
        for s in prompts:
            req = generation_request(s, vocab)
            if req is None or req["length"] < 1:
                continue
            prompt = torch.as_tensor(req["prompt"], dtype=torch.long, device=device)[None]   # (1, P)
            canvas = generate(model, prompt, vocab=vocab, gen_length=req["length"],
                              steps=min(cfg.train.eval_steps, req["length"]), modality=req["modality"])
            out.append({"task": s.task, "key": s.key, "modality": req["name"], "prompt": req["prompt"],
                        "output": canvas[0].cpu().numpy()})
    finally:
        model.train()
    return out


def load_tokenizers(data, say):
    """The shards' tokenizer set, to decode generations; None (ids only) when the shard set has none."""
    uri = storage.join(data.first_set().uri, "tokenizers")
    try:
        from model.tokenizers import TokenizerSet

        return TokenizerSet.load(uri)
    except Exception as e:  # noqa: BLE001 - decoding samples is a nicety, never a reason to stop training
        say(f"[eval] no usable tokenizer set at {uri} ({type(e).__name__}: {e}); samples are logged as ids")
        return None


# ---- the per-worker training function -----------------------------------------------------------------------

def _say(msg: str) -> None:
    # Ray Train patches print() into its logger and also tees it to a wrapped stdout (two copies of each line);
    # writing to the stream directly gives one.
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def maybe_fail(cfg: TrainConfig, step: int, rank: int, run_uri: str) -> None:
    """Fault injection for tests: rank `train.fail_rank` dies once at `train.fail_at_step` (a marker in the
    run dir remembers it fired, so the restarted group goes on)."""
    t = cfg.train
    if not t.fail_at_step or step != t.fail_at_step or rank != t.fail_rank:
        return
    marker = storage.join(run_uri, f"fault_injected_at_{step}")
    if storage.exists(marker):
        return
    storage.write_text_atomic(marker, f"rank {rank} failed on purpose at step {step}\n")
    print(f"[fault] rank {rank}: injected failure at step {step}", flush=True)
    if t.fail_mode == "kill":
        os.kill(os.getpid(), 9)
    raise RuntimeError(f"injected failure at step {step} on rank {rank} (train.fail_at_step)")


def train_func(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker. `config` = {"config": resolved TrainConfig dict, "vocab": Vocab dict,
    "budget": TimeBudget dict or None}."""
    import ray.train
    from torch.distributed.device_mesh import init_device_mesh

    cfg = from_dict(TrainConfig, config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    say = _say if rank == 0 else (lambda msg: None)
    for key, value in worker_env(cfg).items():   # Ray applied them before the process group started
        if os.environ.get(key) != value:
            raise RuntimeError(f"scaling.socket_ifname={cfg.scaling.socket_ifname!r} did not reach this worker "
                               f"({key}={os.environ.get(key)!r}); the launcher dropped RunConfig.worker_runtime_env")
    say(f"[train] process group sockets: GLOO_SOCKET_IFNAME={os.environ.get('GLOO_SOCKET_IFNAME', '')!r} "
        f"NCCL_SOCKET_IFNAME={os.environ.get('NCCL_SOCKET_IFNAME', '')!r} ('' = chosen from the hostname)")
    if cfg.scaling.use_gpu:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))

    vocab = Vocab.from_dict(config["vocab"])
    data = load_data(cfg, model_vocab=vocab, warn=False)   # the driver already warned
    model = build_model(cfg, vocab, device, mesh)
    optimizer, scheduler = build_optimizer(model, cfg)
    state = ckpt.TrainState(model, optimizer, scheduler)
    run_uri = storage.join(cfg.run.run_dir, cfg.run.name)

    latest = ray.train.get_checkpoint()
    latest_uri = None
    if latest is not None:
        latest_uri = latest.path
        if storage.is_s3(cfg.run.run_dir) and not latest_uri.startswith("s3://"):
            latest_uri = "s3://" + latest_uri.lstrip("/")
    restored = ckpt.restore(state, run_uri, latest_uri, say=say)
    step = int(state.extra.get("step", 0))
    position = state.extra["data"] if restored is not None else None   # StreamState.to_dict()
    # a unique suffix per attempt: after a fallback to an older checkpoint, step numbers are reached again
    attempt = _broadcast(f"{int(time.time() * 1000):013x}")

    tracker = tracking.Tracker(tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.run.run_dir),
                              cfg.mlflow.experiment, cfg.run.name, enabled=rank == 0, say=say,
                              system_metrics_s=cfg.mlflow.system_metrics_s if cfg.mlflow.system_metrics else 0.0)
    # The run id travels in checkpoints; a file in the run dir also covers a restart before the first one.
    run_id_file = storage.join(run_uri, "mlflow_run_id")
    run_id = state.extra.get("mlflow_run_id")
    if rank == 0 and run_id is None and storage.exists(run_id_file):
        run_id = storage.read_text(run_id_file).strip() or None
    if tracker.start(run_id, cfg, tags=config.get("provenance")) and not storage.exists(run_id_file):
        storage.write_text_atomic(run_id_file, tracker.run_id)
    tracker.log_shard_sets([(s.uri, s.manifest) for s in data.sets.values()], cfg.mlflow.tokenize_experiment)
    if restored is not None:
        tracker.log_metrics({"resumed_from_step": step, "world_size": world}, step)
        say(f"[train] resumed from step {step} (stage {position['stage'] + 1}, {position['rows']} rows "
            f"consumed) on {world} worker(s)")
    else:
        say(f"[train] starting: {model.num_params() / 1e6:.2f}M parameters, {world} worker(s), "
            f"{cfg.train.steps} steps, stages {[s.name for s in data.stages]}")
    prompts = eval_prompts(data, cfg.train.eval_samples)
    tokenizers = load_tokenizers(data, say) if rank == 0 else None

    budget, max_steps = TimeBudget.from_dict(config.get("budget")), cfg.train.steps
    kept = state.extra.get("budget") if restored is not None and budget else None
    fitted = kept["steps"] if kept and kept["max_steps"] == max_steps else None
    if fitted:   # a resumed budgeted run keeps the length it fitted, and so its LR schedule (unless steps changed)
        cfg = cfg.with_steps(fitted)
        refit_schedule(scheduler, cfg)
        say(f"[train] time budget: keeping the fitted {fitted} of {max_steps} steps")
    total, bounds = cfg.train.steps, cfg.stage_bounds()
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    peak = tracking.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    window_t, window_tokens, window_steps, started = time.perf_counter(), 0, 0, time.perf_counter()
    window_wait = window_data = 0.0
    probe = BudgetProbe(budget, step, started) if budget and not fitted else None
    last = None
    feeder = StepFeeder(lambda st: data.stream(cfg, None if st is None else StreamState.from_dict(st)),
                        lambda stream, s, stage: step_batches(stream, stage, cfg, world, rank),
                        cfg.stage_at, start_step=step, state=position, depth=cfg.data.prefetch)
    try:
        while step < total:
            fed = feeder.next(step, cfg.stage_at)
            last = train_step(model, optimizer, scheduler, fed.micro, vocab=vocab, cfg=cfg, step=step, rank=rank,
                              world=world, device=device)
            window_wait += fed.wait_s
            window_data += fed.data_s
            step += 1
            window_tokens += last.tokens
            window_steps += 1
            maybe_fail(cfg, step, rank, run_uri)
            probed = probe.after_step(step, time.perf_counter(), total) if probe else None
            if probed:
                probe = None
                # rank 0's measurement for every rank: all must stop at the same step
                fitted, step_s = _broadcast((max(len(bounds), probed[0]), probed[1]))
                say(f"[train] time budget {budget.seconds:.0f}s: {step_s:.3f}s a step -> {fitted} of {total} steps")
                tracker.log_metrics({"budget/steps": fitted, "budget/step_time_s": step_s}, step)
                cfg = cfg.with_steps(fitted)
                refit_schedule(scheduler, cfg)
                total, bounds = cfg.train.steps, cfg.stage_bounds()

            if step % cfg.train.log_every == 0 or step == total:
                elapsed = time.perf_counter() - window_t
                tps = window_tokens / max(elapsed, 1e-9)
                stage, pos = fed.stage, fed.state
                values = {"loss": last.loss, "lr": scheduler.get_last_lr()[0], "grad_norm": last.grad_norm,
                          "tokens_per_s": tps, "step_time_s": elapsed / window_steps, "stage": stage,
                          "masked_tokens": last.masked, "data/rows": pos["rows"],
                          "data/samples": pos["samples"], "data/dropped": pos["dropped"],
                          # the loop's wait for data (~0 when the feeder keeps ahead) and the feeder's work per step
                          "data/wait_s": window_wait / window_steps, "data/time_s": window_data / window_steps,
                          **{f"loss/{t}": v for t, v in last.task_loss.items()}}
                if peak:
                    values["mfu"] = flops_per_token * tps / (peak * world)
                tracker.log_metrics(values, step)
                eta = (total - step) * elapsed / window_steps
                say(tracking.progress_line(step, total, stage, len(bounds), data.stages[stage].name, last.loss, tps, eta))
                window_t, window_tokens, window_steps, window_wait, window_data = time.perf_counter(), 0, 0, 0.0, 0.0

            if step % cfg.train.checkpoint_every == 0 or step == total:
                # the position after the step just trained (the feeder may have planned further)
                state.extra = {"step": step, "stage": fed.stage, "data": fed.state,
                               "mlflow_run_id": _broadcast(tracker.run_id), "world_size": world}
                if fitted:
                    state.extra["budget"] = {"steps": fitted, "max_steps": max_steps}
                ckpt.report(state, {"step": step, "loss": last.loss, "stage": fed.stage}, rank=rank,
                            world_size=world, attempt=attempt)

            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total:
                gens = run_eval(model, prompts, vocab, cfg, device)
                if rank == 0:
                    tracking.log_generations(tracker, gens, tokenizers, step)
    finally:
        feeder.close()

    export_uri = storage.join(cfg.run.run_dir, "export")
    ckpt.export(model, export_uri, rank=rank, model_cfg=cfg.model, vocab=vocab,
                tokenizers_uri=storage.join(data.first_set().uri, "tokenizers"), step=step, run_name=cfg.run.name,
                mlflow_run_id=tracker.run_id)
    say(f"[train] done: {step} steps in {tracking.format_duration(time.perf_counter() - started)}; "
        f"model exported to {export_uri}")
    if rank == 0 and cfg.mlflow.registered_model:
        from pipelines.export import localize
        from pipelines.infer.pyfunc import OmniDiffusionModel

        tracker.log_model(str(localize(export_uri)), cfg.mlflow.registered_model, OmniDiffusionModel())
    tracker.end()


# ---- driver -------------------------------------------------------------------------------------------------

def resolve_config(config_path: str | None, shards: Sequence[str] = (), run_dir: str | None = None,
                   overrides: Sequence[str] = ()) -> TrainConfig:
    extra: list[str] = []
    if shards:
        extra.append("data.shards=[" + ",".join(f'"{s}"' for s in shards) + "]")
    if run_dir:
        extra.append(f"run.run_dir={run_dir}")
    cfg = load(TrainConfig, config_path, list(extra) + list(overrides))
    if not storage.is_s3(cfg.run.run_dir):
        cfg.run.run_dir = str(Path(cfg.run.run_dir).resolve())  # Ray changes workers' working directory
    cfg.data.shards = [s if storage.is_s3(s) else str(Path(s).resolve()) for s in cfg.data.shards]
    for src in cfg.data.sources:
        src.shards = [s if storage.is_s3(s) else str(Path(s).resolve()) for s in src.shards]
    if cfg.diffusion.scheme == "per_sequence" and cfg.data.packing == "pack":
        raise ConfigError("diffusion.scheme=per_sequence weighs each row as one sequence; it needs "
                          "data.packing=pad (or use scheme=per_token with packing)")
    return cfg


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    """Environment variables every Ray Train worker gets before its process group starts."""
    name = cfg.scaling.socket_ifname
    return {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name} if name else {}


def ray_run_config(cfg: TrainConfig):
    """Ray Train's RunConfig for `cfg`: the run's name and storage, restarts, checkpoints kept, worker env."""
    import ray.train

    return ray.train.RunConfig(
        name=cfg.run.name, storage_path=cfg.run.run_dir,
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,
                                               controller_failure_limit=cfg.run.max_start_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_last),
        worker_runtime_env={"env_vars": worker_env(cfg)})


def run(cfg: TrainConfig, budget: TimeBudget | None = None):
    """Check the data (vocabulary, ids) on the driver, then fit (within `budget`, if given: budget.py).
    Returns Ray's Result."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    data = load_data(cfg, validate=True)   # a bad shard fails here, before any worker starts
    if cfg.train.init.kind == "pretrained" and cfg.train.init.path:   # so do shards of another text tokenizer
        from model.weights import check_text_tokenizer

        check_text_tokenizer(data.vocab, cfg.train.init.path, data.first_set().uri)
    init_ray()   # joins $RAY_ADDRESS, else a local Ray bound to 127.0.0.1 (common/rayutil.py)
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": to_dict(cfg), "vocab": data.vocab.to_dict(),
                           "budget": budget.to_dict() if budget else None,
                           # what produced the run, read here: the driver runs in the checkout / job's env
                           "provenance": tracking.provenance(to_dict(cfg), source="omnidiff train")},
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray_run_config(cfg),
    )
    return trainer.fit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omnidiff train",
        description="Train the masked-diffusion transformer on tokenized shards with Ray Train (FSDP2), tracked "
                    "in MLflow. Rerunning with the same run.name and --run-dir resumes from the last checkpoint.",
        epilog="examples:\n"
               "  omnidiff train --config configs/train/debug.yaml --shards runs/tok --run-dir runs/debug\n"
               "  omnidiff train --config configs/train/demo.yaml --shards runs/tok train.steps=500 optim.lr=1e-3\n"
               "outputs in the run dir: mlflow.db + mlartifacts/ (unless MLFLOW_TRACKING_URI is set), <name>/ "
               "(checkpoints), export/ (model.safetensors, vocab.json, tokenizers/, config.json)\n"
               + cli.EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (configs/train/*.yaml); defaults are the debug model")
    p.add_argument("--shards", nargs="+", default=[], metavar="URI",
                   help="tokenize output(s) holding manifest.json (local or s3://); sets data.shards")
    p.add_argument("--run-dir", help="where checkpoints, the MLflow store and the export go; sets run.run_dir")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="fit the run's length to this wall-clock time after timing its first steps (lowers "
                        "train.steps, never raises it; pipelines/train/budget.py)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.steps=20 data.micro_batch=8 scaling.num_workers=1")
    return p


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)   # key=value overrides may sit between options
    cfg = resolve_config(args.config, args.shards, args.run_dir, args.overrides)
    import ray.train

    try:
        result = run(cfg, TimeBudget(args.time_budget) if args.time_budget else None)
    except ray.train.TrainingFailedError as e:   # restarts used up, or a group that could not start
        raise cli.Failed(f"training failed: {e}") from None
    if getattr(result, "error", None):
        raise cli.Failed(f"training failed: {result.error}")
    print(f"omnidiff train: finished; checkpoints in {storage.join(cfg.run.run_dir, cfg.run.name)}, "
          f"model in {storage.join(cfg.run.run_dir, 'export')}")
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
