"""Ray Train + FSDP2 training end to end on CPU (2 workers, gloo): two fit() calls in all.

fit 1: 2 workers, 12 steps over 3 curriculum stages, checkpoints every 4 steps; rank 1 is SIGKILLed after step
       6, Ray restarts the group (max_failures=1) and it resumes from the step-4 checkpoint.
fit 2: the same run name with train.steps=16 and ONE worker: resumes from step 12 (DCP reshards 2 -> 1) and
       continues the data stream and the MLflow run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from common.configlib import from_dict, to_dict
from pipelines.train import trainer
from pipelines.train.budget import TimeBudget
from pipelines.train.config import TrainConfig
from tests.helpers.shardgen import small_vocab, write_shard_set

REPO = Path(__file__).resolve().parents[2]
DEBUG_YAML = REPO / "configs" / "train" / "debug.yaml"


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"   # report() waits for the controller's poll
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """A tokenizer set (BPE + 4x4 pixels + offline EnCodec) and shards in its vocabulary."""
    from model.tokenizers import (
        ImageTokenizerConfig,
        SpeechTokenizerConfig,
        TextTokenizerConfig,
        TokenizerConfig,
        TokenizerSet,
    )

    root = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    cfg = TokenizerConfig(text=TextTokenizerConfig(kind="bpe", vocab_size=300),
                          image=ImageTokenizerConfig(kind="pixel", size=4, channels=1, levels=17),
                          speech=SpeechTokenizerConfig(weights="offline", fit_samples=2))
    tset = TokenizerSet.prepare(cfg, str(root / "tokenizers"), texts=["a small digit", "hello there"] * 4,
                                wavs=[(0.1 * rng.standard_normal(24000)).astype(np.float32) for _ in range(2)])
    # media spans of 16 tokens = one 4x4 image, so generated images decode
    return write_shard_set(root / "set", tset.vocab, {"t2i": 48, "i2t": 48, "asr": 32}, samples_per_shard=16,
                           media_len=16, tokenizers_dir=root / "tokenizers")


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    exp = client.get_experiment_by_name("omni-diffusion-debug")
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def first_fit(ray_local, shard_set, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = trainer.resolve_config(str(DEBUG_YAML), [str(shard_set)], str(run_dir),
                               ["run.name=itest", "train.fail_at_step=6", "train.fail_mode=kill",
                                "scaling.socket_ifname=lo",   # train_func refuses to start if it did not arrive
                                "train.fail_rank=1"])
    # a budget that fits every step: fitted after step 3, kept by the restarted group
    result = trainer.run(cfg, TimeBudget(3600, probe_steps=2))
    return cfg, result, run_dir


@pytest.fixture(scope="module")
def second_fit(first_fit):
    cfg, _, run_dir = first_fit
    d = to_dict(cfg)
    d["train"].update(steps=16, fail_at_step=0)
    d["data"]["stages"][2]["steps"] = 8
    d["scaling"]["num_workers"] = 1
    cfg2 = from_dict(TrainConfig, d)
    return cfg2, trainer.run(cfg2), run_dir


def test_fit_survives_a_killed_worker_and_the_loss_falls(first_fit):
    cfg, result, run_dir = first_fit
    assert result.error is None
    assert (run_dir / "itest" / "fault_injected_at_6").is_file()      # the failure did happen
    client, runs = mlflow_run(run_dir)
    assert len(runs) == 1                                             # the restarted group kept the MLflow run
    run_id = runs[0].info.run_id
    loss = history(client, run_id, "loss")
    assert sorted(loss) == [2, 4, 6, 8, 10, 12]
    assert loss[12] < loss[2] - 0.5
    # the restarted group resumed from the step-4 checkpoint (not from 0) and went on counting
    assert history(client, run_id, "resumed_from_step") == {4: 4.0}
    # the budget was fitted once (all 12 steps fit an hour) and the restarted group kept it instead of refitting
    assert history(client, run_id, "budget/steps") == {3: 12.0}
    # 12 steps x 2 workers x micro_batch 2 x grad_accum 2 rows: the resumed stream neither repeated nor skipped
    assert history(client, run_id, "data/rows")[12] == 12 * 2 * 2 * 2


def test_curriculum_switches_stage_at_the_configured_step(first_fit):
    _, _, run_dir = first_fit
    client, runs = mlflow_run(run_dir)
    run_id = runs[0].info.run_id
    stage = history(client, run_id, "stage")
    assert stage[4] == 0 and stage[6] == 1 and stage[8] == 1 and stage[10] == 2
    asr = history(client, run_id, "loss/asr")   # asr joins in stage 2 (steps 5..8)
    assert asr and min(asr) > 4
    assert history(client, run_id, "loss/t2i")


def test_mlflow_holds_params_metrics_and_sample_artifacts(first_fit):
    cfg, _, run_dir = first_fit
    client, runs = mlflow_run(run_dir)
    run = runs[0]
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)
    assert run.data.params["data.seq_len"] == "256"
    assert {"lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(run.data.metrics)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(p.endswith(".png") for p in images)
    txt = client.download_artifacts(run.info.run_id, "samples/step_00000012/generations.txt", str(run_dir))
    assert "[t2i_" in Path(txt).read_text()
    assert run.info.artifact_uri.startswith((run_dir / "mlartifacts").as_uri())


def test_export_loads_for_sampling(first_fit):
    from model.sampling import generate
    from model.vocab import Modality
    from model.weights import load_native
    from pipelines.infer.predictor import load_export

    _, _, run_dir = first_fit
    export = run_dir / "export"
    state, _ = load_native(export / "model.safetensors")
    emb = state["tok_embeddings.weight"]
    half = emb.shape[0] // 2   # each rank's shard was initialised from its own slice of one seeded draw
    assert abs(torch.corrcoef(torch.stack([emb[:half].flatten(), emb[half:2 * half].flatten()]))[0, 1]) < 0.2
    loaded = load_export(str(export), device="cpu")          # what sample/generate/eval use
    vocab = loaded.vocab
    prompt = torch.tensor([[vocab.im_start_id, vocab.role_id("user"), *loaded.tokenizers.text.encode("a digit"),
                            vocab.im_end_id, vocab.im_start_id, vocab.role_id("assistant"), vocab.boi_id]])
    out = generate(loaded.model, prompt, vocab=vocab, gen_length=16, steps=4, modality=Modality.IMAGE)
    lo, hi = vocab.image_range()
    assert out.shape == (1, 16) and ((out >= lo) & (out < hi)).all()
    config = json.loads((export / "config.json").read_text())
    assert config["step"] == 12 and config["model"]["vocab_size"] == vocab.size


def test_second_fit_with_the_same_name_resumes_on_one_worker(second_fit):
    cfg, result, run_dir = second_fit
    assert result.error is None
    client, runs = mlflow_run(run_dir)
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert history(client, run_id, "resumed_from_step")[12] == 12
    assert history(client, run_id, "world_size")[12] == 1
    # the stream continued: 96 rows from fit 1, then 4 steps x 1 worker x 2 x 2
    assert history(client, run_id, "data/rows")[16] == 96 + 4 * 2 * 2
    assert sorted(history(client, run_id, "loss"))[-2:] == [14, 16]
    kept = sorted(p.name for p in (run_dir / "itest").iterdir() if p.name.startswith("step_"))
    assert len(kept) == cfg.train.keep_last and kept[-1].startswith("step_00000016")


def test_out_of_range_ids_stop_the_cli_before_training(tmp_path, capsys):
    bad = write_shard_set(tmp_path / "bad", small_vocab(), {"t2i": 20}, samples_per_shard=10, corrupt={"shard": 1})
    rc = trainer.main(["--config", str(DEBUG_YAML), "--shards", str(bad), "--run-dir", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "test-00001.tar" in err and "outside the vocabulary" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_one(first_fit, shard_set, tmp_path):
    """Resume is exact: same data rows, same masks, same optimizer state -> the same losses (a third fit)."""
    cfg, _, run_dir = first_fit
    d = to_dict(cfg)
    d["train"]["fail_at_step"] = 0
    d["run"].update(name="uninterrupted", run_dir=str(tmp_path))
    assert trainer.run(from_dict(TrainConfig, d)).error is None
    client, runs = mlflow_run(run_dir)
    resumed = {k: v for k, v in history(client, runs[0].info.run_id, "loss").items() if k <= 12}  # fit 1 only
    client2, runs2 = mlflow_run(tmp_path)
    straight = history(client2, runs2[0].info.run_id, "loss")
    assert straight.keys() == resumed.keys()
    for step in straight:
        assert straight[step] == pytest.approx(resumed[step], rel=1e-4)
