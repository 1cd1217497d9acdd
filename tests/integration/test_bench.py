"""Smoke test of `omnidiff bench` at tiny sizes: every benchmark's code path runs against the real pipeline
(Ray Data tokenize job, trainer data path, Ray Train fit, sampler), so the suite cannot rot unnoticed.
Speed is never asserted: these sizes measure nothing. What is asserted is what would make the numbers wrong:
both sides of each comparison doing the same work, and the figures being there and finite."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench.cli import BENCHES, main, run_benches
from bench.common import PeakRSS, Plan, bench_vocab, fmt, goal_check, paired_ratio, spread
from bench.fsdp import synthetic_batches

pytestmark = pytest.mark.timeout(900)


def test_spread_and_paired_ratio():
    s = spread([3.0, 1.0, 2.0, float("nan")])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    r = paired_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0])   # pairs, not medians: 2, 3, 1
    assert (r["median"], r["min"], r["max"]) == (2.0, 1.0, 3.0)
    assert goal_check("sample.step_vs_forward", 1.2)["met"] is False
    assert goal_check("read.reader_vs_training", 12.0)["met"] is True
    assert fmt(spread([0.5, 0.25, 1.0])) == "0.500 [0.250-1.00]"


def test_peak_rss_counts_child_processes():
    """Ray workers are descendants of the driver: the sampler must see memory held by a child process."""
    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    with PeakRSS(interval_s=0.02) as rss:
        subprocess.run([sys.executable, "-c", code], check=True)
    assert rss.peak - rss.baseline > 250 * 2**20


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = run_benches(list(BENCHES), Plan.for_mode("tiny"), out)
    return out, summary


def _finite(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def test_all_benches_write_json_and_table(tiny_suite):
    out, summary = tiny_suite
    for name in BENCHES:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["mode"] == "tiny" and len(data["loadavg_before"]) == 3
    all_json = json.loads((out / "all.json").read_text())
    assert set(all_json["results"]) == set(BENCHES)
    assert all_json["meta"]["ray_init_s"] > 0
    for needle in ("tokenize text", "read: trainer stream", "Ray Train 1 worker vs bare", "denoising step",
                   "FSDP2 step vs plain module"):
        assert needle in summary["table"]
    assert summary["markdown"].startswith("| measure |")


def test_tokenize_sides_do_the_same_work(tiny_suite):
    r = json.loads((tiny_suite[0] / "tokenize.json").read_text())
    for mod, e in r["modalities"].items():
        # the bare loop wrote exactly the samples and tokens the job wrote: the ratio compares like with like
        assert e["same_work"], mod
        assert e["quarantined"] == 0, mod
        assert _finite(e["bare_samples_per_s"]["median"]) and _finite(e["job_end_to_end_samples_per_s"]["median"])
    assert set(r["modalities"]) == {"text", "image-pixel", "speech-encodec"}
    for mod, e in r["modalities"].items():   # metadata rows only: under 1 KB per shard, never the tokens
        assert e["shards"] >= 1 and 0 < e["driver_bytes_per_shard"] < 4096, (mod, e["driver_bytes"])
    assert r["writer"]["same_bytes"] and _finite(r["writer"]["writer_vs_tarfile"]["median"])
    assert "text" in r["workers"]
    m = r["memory"]
    assert m["x10"]["inputs"] == 10 * m["x1"]["inputs"] and m["x1"]["peak_rss_mib"] > m["x1"]["baseline_rss_mib"] > 0


def test_read_train_sample_figures(tiny_suite):
    out = tiny_suite[0]
    read = json.loads((out / "read.json").read_text())
    assert read["sources"] >= 4 and read["samples_in_shards"] > 0
    for key in ("reader_samples_per_s", "raw_tar_samples_per_s", "training_samples_per_s"):
        assert _finite(read[key]["median"]), key
    train = json.loads((out / "train.json").read_text())
    assert train["ray_1"]["windows"] >= 1 and train["ray_2"]["workers"] == 2
    for key in ("bare", "ray_1", "ray_2"):
        assert _finite(train[key]["steps_per_s"]["median"]), key
    assert _finite(train["ray_1"]["startup_s"]) and 0 < train["mfu_bare"]["mfu"]
    sample = json.loads((out / "sample.json").read_text())
    assert set(sample["by_batch"]) == {"1", "2"}
    # the subset head is only faster, never different
    assert sample["image_canvas"]["same_canvas"] and _finite(sample["image_canvas"]["subset_vs_full"]["median"])
    assert all(_finite(v["median"]) for v in sample["magvit2_encode"]["images_per_s"].values())


def test_fsdp_sides_start_equal_and_both_learn(tiny_suite):
    """On CPU both sides compute in fp32 from the same weights on the same first batch, so the sharded step's
    loss must equal the plain one's; both must fall over the cycled batches."""
    r = json.loads((tiny_suite[0] / "fsdp.json").read_text())
    first = r["first_loss"]
    assert first["fp32"] == pytest.approx(first["bare"], rel=1e-6) == pytest.approx(first["fsdp"], rel=1e-5)
    for side in ("bare", "fsdp"):
        losses = r[side]["losses"]
        assert len(losses) == r[side]["steps"] + 1 and losses[-1] < losses[0], side
        assert _finite(r[side]["steps_per_s"]["median"]) and r[side]["flops_per_token"] > 0
    assert r["bare"]["losses"] == pytest.approx(r["fsdp"]["losses"], rel=1e-4)
    assert _finite(r["sharded_vs_bare"]["median"]) and 0 < r["mfu_fsdp"]["mfu"]
    assert r["plan_total_gib"] > 0 and r["activation_checkpointing"] is True


def test_synthetic_batches_are_packed_like_the_trainers():
    from model.tasks import TASKS

    vocab = bench_vocab()
    batches = synthetic_batches(vocab, 128, 3, 2, seed=1)
    assert len(batches) == 2
    for b in batches:
        assert b.ids.shape == (3, 128) and b.n_tokens >= 0.9 * 3 * 128
        assert int(b.ids[b.segment_ids > 0].max()) < vocab.text_range()[1]   # padding is the pad id
        assert b.answer_mask.any(1).all() and (b.task_ids < len(TASKS)).all()
        for row in range(3):   # each segment: a prompt quarter, then its answer
            for seg in b.segment_ids[row].unique().tolist():
                if seg:
                    answer = b.answer_mask[row][b.segment_ids[row] == seg]
                    assert not answer[0] and answer[-1]


def test_fsdp_profile_and_overrides(tmp_path):
    """--profile writes the op table; KEY=VALUE overrides reach the benchmark's TrainConfig; overrides are
    refused for the benchmarks they do not apply to."""
    out = tmp_path / "b"
    assert main(["fsdp", "--tiny", "--profile", "--out", str(out), "train.activation_checkpointing=false",
                       "data.seq_len=64"]) == 0
    r = json.loads((out / "fsdp.json").read_text())
    assert r["activation_checkpointing"] is False and r["seq_len"] == 64
    assert "aten::mm" in (out / "fsdp_profile.txt").read_text()
    assert main(["sample", "--tiny", "data.seq_len=64"]) == 2


def test_gpu_sizes_only_on_a_gpu():
    full = Plan.for_mode("full")
    assert full.for_device(False) == full
    gpu = full.for_device(True)
    assert (gpu.fsdp_model, gpu.fsdp_seq_len, gpu.sample_model, gpu.big_vocab) == ("1b", 2048, "1b", True)
    assert Plan.for_mode("tiny").for_device(True) == Plan.for_mode("tiny")
    assert bench_vocab(big=True).size > 150_000


def test_cli_help_and_bad_repeats(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "docs/performance.md" in capsys.readouterr().out
    assert main(["sample", "--repeats", "0"]) == 2
