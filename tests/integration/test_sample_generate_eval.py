"""`generate` and `eval` as Ray Data jobs on a debug export (random weights): files, ids, error reporting and
metric ranges; eval on shards; eval metrics logged to the training run's MLflow run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import ray

from pipelines.eval import evaluate
from pipelines.infer import generate
from pipelines.infer.presets import load_presets
from tests.helpers.export import demo_lines, write_debug_export, write_jsonl, write_media

FAST = load_presets("project", None, ["steps=2", "tts.length_ratio=4", "asr.max_length=8", "text.length=8",
                                      "i2t.length=8", "svqa.length=8", "sqa.length=10", "batch_size=8"])


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return write_debug_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_media(root)
    write_jsonl(root / "test.jsonl", demo_lines())
    return root


def test_generate_on_ray_reports_bad_lines_and_keeps_ids(ray_local, export, corpus, tmp_path):
    lines = [{**demo_lines()[0], "id": "img-7"}, "{not json",
             {"messages": [{"role": "user", "content": "<|image|>"}], "images": ["images/missing.png"]},
             "", demo_lines()[3], demo_lines()[4], {"id": 42, "messages": [{"role": "user", "content": "hi"}]}]
    prompts = write_jsonl(corpus / "prompts.jsonl", lines)
    out = tmp_path / "gen"
    summary = generate.run_generate(str(export), str(prompts), str(out), presets=FAST)
    assert (summary["n_ok"], summary["n_errors"]) == (4, 2)
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [r["line"] for r in results] == [1, 5, 6, 7]            # input order; the blank line 4 is skipped
    assert [r["id"] for r in results] == ["img-7", None, None, 42]
    assert [r["task"] for r in results] == ["t2i", "asr", "tts", "text"]
    assert (out / results[0]["image"]).is_file() and (out / results[2]["audio"]).is_file()
    assert isinstance(results[1]["text"], str) and "image" not in results[1]
    assert [(e["line"], e["reason"]) for e in errors] == [(2, "bad_json"), (3, "missing_file")]
    assert "missing.png" in errors[1]["error"]


def test_generate_cli_local(export, corpus, tmp_path, capsys):
    prompts = write_jsonl(corpus / "one.jsonl", [demo_lines()[2]])
    rc = generate.main(["--checkpoint", str(export), "--input", str(prompts), "--output", str(tmp_path), "--local",
                        "steps=2", "i2t.length=4"])
    assert rc == 0 and "1 answered, 0 errors" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.jsonl").read_text())["task"] == "i2t"
    assert generate.main(["--checkpoint", str(export), "--input", str(tmp_path / "none.jsonl"), "--output",
                          str(tmp_path), "--local"]) == 2


def _check_ranges(results: dict) -> None:
    for task, m in results["tasks"].items():
        assert m["n"] >= 1
        for k, v in m.items():
            if k in ("n", "n_failed"):
                continue
            assert math.isfinite(v) and v >= 0, (task, k, v)
            if k != "wer":          # WER counts insertions: it may exceed 1
                assert v <= 1, (task, k, v)


def test_eval_end_to_end_on_ray_logs_to_mlflow(ray_local, export, corpus, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("train", artifact_location=str(tmp_path / "art"))).info.run_id
    # the trainer's layout: the run's store at <run-dir>/mlflow.db, beside <run-dir>/export
    tracked = write_debug_export(tmp_path / "export", mlflow_run_id=run_id, tokenizers_from=export / "tokenizers")
    out = tmp_path / "eval"
    results = evaluate.evaluate(str(tracked), str(corpus / "test.jsonl"), out=str(out), presets=FAST,
                                classifier_train_data=str(corpus / "test.jsonl"), local=False)
    assert set(results["tasks"]) == {"t2i", "i2t", "asr", "tts", "s2i", "svqa", "sqa"}
    _check_ranges(results)
    t = results["tasks"]
    assert {"class_accuracy", "real_accuracy"} <= set(t["t2i"]) and {"wer", "exact_match"} <= set(t["asr"])
    assert "wer" in t["tts"] and "exact_match" in t["i2t"]
    assert t["t2i"]["real_accuracy"] == 1.0          # fitted on the same real images it scores here
    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"] == results["tasks"] and saved["mlflow_run"] == run_id
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and all(p["ok"] for p in preds)
    assert all("transcript" in p for p in preds if p["task"] == "tts")
    # the spoken QA line (its task inferred): judged on the text of its answer, its speech not transcribed
    sqa = [p for p in preds if p["task"] == "sqa"]
    assert len(sqa) == 1 and "hyp" in sqa[0] and sqa[0]["speech_frames"] >= 0 and "transcript" not in sqa[0]
    assert "exact_match" in t["sqa"]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/asr/wer"] == pytest.approx(t["asr"]["wer"]) and "eval/t2i/class_accuracy" in metrics


def test_eval_on_shards_local(export, tmp_path, capsys):
    from model.tokenizers import TokenizerSet
    from tests.helpers.shardgen import write_shard_set

    vocab = TokenizerSet.load(str(export / "tokenizers")).vocab
    shards = write_shard_set(tmp_path / "shards", vocab, {"i2t": 3, "asr": 2, "t2i": 2, "tts": 1}, media_len=64)
    results = evaluate.evaluate(str(export), str(shards), tasks=["i2t", "asr", "t2i", "tts"], limit=2,
                                presets=FAST, local=True)
    assert {t: m["n"] for t, m in results["tasks"].items()} == {"t2i": 2, "i2t": 2, "asr": 2, "tts": 1}
    _check_ranges(results)
    # prompts end with <im_start><assistant>; the answer span becomes the reference
    tokenizers = TokenizerSet.load(str(export / "tokenizers"))
    items = {it["task"]: it for it in evaluate.load_items(str(shards), tokenizers, tasks=["t2i", "i2t"], limit=1)}
    assert items["t2i"]["prompt_ids"][-2:] == [vocab.im_start_id, vocab.role_id("assistant")]
    assert len(items["t2i"]["ref_image"]) == 64 and max(items["t2i"]["ref_image"]) < vocab.image_codebook_size
    assert items["i2t"]["ref_text"] and vocab.im_end_id not in tokenizers.text.encode(items["i2t"]["ref_text"])
    assert "i2t" in capsys.readouterr().out          # the results table


def test_export_and_generate_through_s3(export, corpus, tmp_path, monkeypatch):
    """An s3:// export is downloaded once into the cache; prompts and outputs may live on S3 too (moto)."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    from common import storage
    from pipelines.infer.predictor import load_export

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "OMNIDIFF_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="runs")
        fs = storage.filesystem("s3://runs")
        fs.put(f"{export}/", "s3://runs/r1/export/", recursive=True)
        fs.put(f"{corpus}/", "s3://runs/corpus/", recursive=True)
        # an image read from S3 (i2t), speech written to S3 (tts)
        fs.pipe_file("s3://runs/corpus/s3.jsonl", "".join(json.dumps(demo_lines()[i]) + "\n" for i in (2, 4)).encode())
        loaded = load_export("s3://runs/r1/export", device="cpu")
        assert Path(loaded.path).is_relative_to(tmp_path / "cache") and (Path(loaded.path) / "tokenizers").is_dir()
        summary = generate.run_generate("s3://runs/r1/export", "s3://runs/corpus/s3.jsonl", "s3://runs/gen",
                                        presets=FAST, local=True)
        assert summary["n_ok"] == 2 and summary["n_errors"] == 0
        assert fs.exists("s3://runs/gen/results.jsonl") and fs.exists("s3://runs/gen/media/000002.wav")
    finally:
        server.stop()


# ---- published benchmarks from their public layouts (pipelines/eval/benchmarks.py) -------------------------

BENCH_FAST = load_presets("reference", None, ["steps=2", "vqa.length=8", "asr.max_length=8",
                                              "tts.length_ratio=4", "tts.max_length=32", "batch_size=8"])


def test_benchmark_pope_on_ray(ray_local, export, tmp_path):
    """POPE through the Ray Data actor pool: one row per split, metrics recomputable from the predictions."""
    from pipelines.eval.benchmarks import pope_answer, pope_metrics
    from tests.helpers.benchmarks import write_pope

    root = write_pope(tmp_path / "pope")
    out = tmp_path / "eval"
    results = evaluate.evaluate(str(export), str(root), benchmark="pope", out=str(out), presets=BENCH_FAST,
                                local=False, mlflow=False)
    t = results["tasks"]
    assert set(t) == {"pope/random", "pope/adversarial"} and results["benchmark"] == "pope"
    assert (t["pope/random"]["n"], t["pope/adversarial"]["n"]) == (3, 2)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(p["split"], p["id"]) for p in preds] == [("random", 1), ("random", 2), ("random", 3),
                                                      ("adversarial", 7), ("adversarial", 8)]
    assert all(p["ok"] and isinstance(p["hyp"], str) for p in preds)
    for split in ("random", "adversarial"):
        rows = [p for p in preds if p["split"] == split]
        expect = pope_metrics([pope_answer(p["hyp"]) for p in rows], [p["ref"] for p in rows])
        assert {k: t[f"pope/{split}"][k] for k in expect} == pytest.approx(expect)


def test_benchmarks_mme_librispeech_libritts_local(export, tmp_path, capsys):
    """MME and LibriSpeech in-process; LibriTTS judged by a tiny local Whisper through the eval worker (decoded
    speech -> 16 kHz -> transcript -> Whisper-normalised WER); the CLI selects a benchmark's protocol."""
    from pipelines.eval import scoring
    from pipelines.eval.whisper import english_normalizer
    from tests.helpers.benchmarks import write_librispeech, write_libritts, write_mme
    from tests.helpers.whisper import write_tiny_whisper

    mme = evaluate.evaluate(str(export), str(write_mme(tmp_path / "MME")), benchmark="mme", presets=BENCH_FAST,
                            local=True, mlflow=False, return_predictions=True)
    t = mme["tasks"]
    assert {t["mme/count"]["n"], t["mme/existence"]["n"]} == {2, 4}
    assert t["mme/perception"]["score"] == pytest.approx(t["mme/count"]["score"] + t["mme/existence"]["score"])
    assert all(0 <= t[k]["score"] <= 200 for k in ("mme/count", "mme/existence"))

    whisper = write_tiny_whisper(tmp_path / "whisper", only_word="hello", max_new_tokens=2)
    tts = evaluate.evaluate(str(export), str(write_libritts(tmp_path / "tts", {"1_2_3_4": "Hello hello.",
                                                                               "1_2_3_5": "Hello world."})),
                            benchmark="libritts", asr_model=str(whisper), presets=BENCH_FAST, local=True,
                            mlflow=False, return_predictions=True)
    row = tts["tasks"]["libritts"]
    preds = tts["predictions"]
    assert all(p["transcript"] == ("hello hello" if p["speech_frames"] else "") for p in preds)
    norm = english_normalizer(str(whisper))
    expect = scoring.corpus_wer([scoring.whisper_english_words(s, norm) for s in ("Hello hello.", "Hello world.")],
                                [scoring.whisper_english_words(p["transcript"], norm) for p in preds])
    assert row["wer"] == pytest.approx(expect["wer"]) and row["n"] == 2
    if all(p["speech_frames"] for p in preds):   # (seeded: it does) both heard as "hello hello": 1 error / 4 words
        assert row["wer"] == pytest.approx(0.25) and row["wer_spoken"] == pytest.approx(0.25)
    with pytest.raises(Exception, match="--asr-model"):
        evaluate.evaluate(str(export), str(tmp_path / "tts"), benchmark="libritts", presets=BENCH_FAST, local=True)

    ls = write_librispeech(tmp_path / "test-clean")
    code = evaluate.main(["--checkpoint", str(export), "--benchmark", "librispeech", "--data", str(ls), "--local",
                          "--no-mlflow", "--out", str(tmp_path / "ls"), "steps=2", "asr.max_length=8"])
    assert code == 0 and "librispeech" in capsys.readouterr().out
    saved = json.loads((tmp_path / "ls" / "results.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "ls" / "predictions.jsonl").read_text().splitlines()]
    refs = [scoring.librispeech_words(p["ref"], hypothesis=False) for p in lines]
    hyps = [scoring.librispeech_words(p.get("hyp", ""), hypothesis=True) for p in lines]
    assert saved["tasks"]["librispeech"]["wer"] == pytest.approx(scoring.corpus_wer(refs, hyps)["wer"])
    assert saved["tasks"]["librispeech"]["words"] == 10
