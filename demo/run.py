"""`make demo` / `omnidiff demo`: the whole product on one CPU machine, in minutes, with no network.

    python -m demo [--out runs/demo] [--small] [--steps N] [train.key=value ...]

Stages, all in this process's one Ray instance (started once: Ray start-ups cost 5-12 s each):

    corpus     demo/corpus.py   sklearn digits + committed espeak-ng clips -> messages JSONL
    tokenize   tokenize_jobs/run.py       Ray Data: BPE text, 8x8 pixel images, EnCodec speech -> shards
    train      pipelines/train/trainer.py         Ray Train, 2 workers, FSDP2 over gloo, MLflow (sqlite in the run dir)
    eval       pipelines/eval/evaluate.py      held-out images and voices, judged independently of the model
    gallery    this module                PNG grids of generated digits (t2i, s2i), WAVs for TTS

Every run starts fresh: `<out>` is deleted first (the stages are minutes long and a half-finished run is not
worth reasoning about). Settings: configs/demo/demo.yaml (corpus size, tokenize job, sampler, gallery),
which names the training run config (configs/train/demo.yaml).

Outputs under <out>: corpus/, tok/ (shards + manifest), train/ (checkpoints, mlflow.db, export/), eval/
(results.json of `omnidiff eval`, predictions.jsonl), gallery/, and results.json:
    {"wall_seconds", "tasks": {task: {"accuracy", ...}}, "classifier_accuracy_on_real_heldout", ...}
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common import cli, configlib
from common.configlib import ConfigError
from common.tracking import resolve_tracking_uri
from model.tasks import spec
from pipelines.infer.presets import SamplerPresets
from pipelines.train.budget import TimeBudget
from tokenize_jobs.config import TokenizeJobConfig

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "configs" / "demo" / "demo.yaml"
TASK_ORDER = ("i2t", "asr", "t2i", "s2i", "tts", "svqa")
# TTS is scored by the speech-code judge fitted on real recordings (pipelines/eval/speech_judge.py); the model's
# own ASR on its generated codes is the second row, `tts_asr` (not independent: one model on both sides).
OWN_ASR_ROW = "tts_asr"
# The quality bar of the demo, as fractions; each task's "accuracy" is checked against it.
QUALITY_BAR = {"i2t": 0.95, "asr": 0.90, "t2i": 0.85, "s2i": 0.85, "tts": 0.80}
ACCURACY_MEANING = {"i2t": "exact digit word", "asr": "exact transcript", "svqa": "exact digit word",
                    "tts": "speech-code classifier (fitted on training voices) on generated codes",
                    OWN_ASR_ROW: "the model's own ASR on its generated speech codes",
                    "t2i": "digit classifier on generated image",
                    "s2i": "digit classifier on generated image"}


# ---- configuration ------------------------------------------------------------------------------------------

@dataclass
class CorpusSection:
    n_train_images: int = 0       # training image slots, one line per task each; 0 = the whole train split
    n_test_images: int = 0        # held-out image slots; 0 = the corpus builder's default (120)
    seed: int = 0
    # Training lines tokenized per speech task (asr, tts, s2i, svqa); 0 = all. The tokenize job runs EnCodec on
    # every line's audio (~50 ms of CPU per clip) although the ~1,440 lines of a task reuse ~480 clips, so the
    # full corpus costs ~390 CPU-s to tokenize; the cap keeps the stage near a minute. Lines are shuffled, so the
    # first N of a task are a random sample of it (every voice, speed and pitch stays represented).
    speech_lines_per_task: int = 0
    # Speech-to-image answers as the spoken word, then the image (a chain of modalities, demo/corpus.py);
    # the sampler must then write that one-token transcript first (sampler.s2i.transcript=1).
    s2i_transcript: bool = False


@dataclass
class GallerySection:
    samples: int = 8              # columns per digit row


@dataclass
class SmallSection:
    """--small: the CI variant. Same stages and code, a 10-image corpus, a short run, fewer eval items."""
    steps: int = 30
    eval_limit: int = 10
    gallery_samples: int = 2


@dataclass
class TimeSection:
    """The wall-clock target. Training gets what the other stages leave: at the train stage the demo hands the
    trainer a TimeBudget (pipelines/train/budget.py) of target_s - elapsed - train_overhead_s seconds with
    after_train_steps steps' worth of it reserved, and the trainer fits its step count to it (train.steps stays
    the maximum). The eval is reserved in steps, not seconds, because it slows down with the host as a
    training step does."""
    target_s: float = 0.0         # 0 = no target: train.steps as configured
    budget_s: float = 0.0         # > 0: this training budget instead of the one derived from target_s
    probe_steps: int = 20         # steps the trainer times before it fits the run's length
    train_overhead_s: float = 45.0   # Ray Train start-up, shard loading, export (measured 30-52 s)
    # eval + gallery + summary in training steps of the same host: 52-71 s = ~300 steps of 0.17-0.24 s on quiet
    # hosts, 117 s = 320 steps with a competing process; the rest is margin for a probe that reads the step time
    # up to 12% fast on a contended host (0.326 s measured, 0.365 s over the run): docs/demo.md.
    after_train_steps: int = 550
    min_train_s: float = 60.0        # never give the loop less than this


@dataclass
class DemoConfig:
    train_config: str = "configs/train/demo.yaml"   # relative to the repository root
    corpus: CorpusSection = field(default_factory=CorpusSection)
    tokenize: TokenizeJobConfig = field(default_factory=TokenizeJobConfig)
    sampler: SamplerPresets = field(default_factory=lambda: SamplerPresets.preset("demo"))
    gallery: GallerySection = field(default_factory=GallerySection)
    small: SmallSection = field(default_factory=SmallSection)
    eval_actors: int = 2          # Ray Data actors generating for the eval (one per core)
    eval_limit: int = 0           # items per task; 0 = the whole held-out split
    time: TimeSection = field(default_factory=TimeSection)

    def __post_init__(self) -> None:
        if self.corpus.s2i_transcript != bool(self.sampler.s2i.transcript):
            raise ConfigError(f"corpus.s2i_transcript={self.corpus.s2i_transcript} with sampler.s2i.transcript="
                              f"{self.sampler.s2i.transcript}: a model trained on transcript-then-image s2i answers "
                              f"samples them with sampler.s2i.transcript=1 (a digit word is one text token), one "
                              f"trained on image answers with 0")


def time_budget(t: TimeSection, elapsed_s: float) -> TimeBudget | None:
    """The training loop's time budget for a demo that has used `elapsed_s` so far (see TimeSection); None
    when there is neither a target nor a set budget."""
    if t.budget_s > 0:
        return TimeBudget(t.budget_s, probe_steps=t.probe_steps, reserve_steps=t.after_train_steps)
    if t.target_s <= 0:
        return None
    seconds = max(t.min_train_s, t.target_s - elapsed_s - t.train_overhead_s)
    return TimeBudget(round(seconds, 1), probe_steps=t.probe_steps, reserve_steps=t.after_train_steps)


def train_config(demo: DemoConfig, shards: str, run_dir: str, steps: int | None, overrides: Sequence[str]):
    """The TrainConfig of the demo run: configs/train/demo.yaml <- --steps (stages rescaled) <- overrides."""
    from pipelines.train.trainer import resolve_config

    cfg = resolve_config(str(REPO / demo.train_config), [shards], run_dir, list(overrides))
    if steps is not None:
        cfg = cfg.with_steps(steps)
        cfg = replace(cfg, train=replace(cfg.train, checkpoint_every=min(cfg.train.checkpoint_every, steps)))
    return cfg


# ---- load average while the demo runs ------------------------------------------------------------------------

class LoadSampler:
    """The 1-minute load average every few seconds: timings on a shared machine mean little without it."""

    def __init__(self, every_s: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every_s)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        s = self.samples or [os.getloadavg()[0]]
        return {"mean_1min": round(float(np.mean(s)), 2), "max_1min": round(float(np.max(s)), 2),
                "cpus": os.cpu_count() or 0}


# ---- Ray -----------------------------------------------------------------------------------------------------

def start_ray() -> bool:
    """One Ray for every stage. True if this call started it (and the demo must shut it down)."""
    from common.rayutil import init_ray

    # ray.train.report() blocks until the controller polls (default every 2 s); a short poll keeps the few
    # checkpoint reports of the demo from idling.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # joins $RAY_ADDRESS; else a fresh loopback-only local Ray, even when another Ray runs on this machine
    return init_ray(logging_level="WARNING")


# ---- stages --------------------------------------------------------------------------------------------------

def stage(name: str, timings: dict[str, float]):
    class _Stage:
        def __enter__(self):
            self.t0 = time.perf_counter()
            print(f"\n==> {name}", flush=True)

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.t0, 1)
            if exc[0] is None:
                print(f"<== {name}: {timings[name]:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    return _Stage()


def build_corpus(demo: DemoConfig, out: Path, small: bool) -> dict:
    """The corpus, plus `tokenize_input`: train.jsonl itself, or (corpus.speech_lines_per_task) a copy beside
    it with the speech tasks' lines capped, so media paths still resolve against the same folder."""
    from demo.corpus import build_demo_corpus

    c = demo.corpus
    result = build_demo_corpus(out / "corpus", small=small, seed=c.seed,
                               n_train_images=None if small or not c.n_train_images else c.n_train_images,
                               n_test_images=None if small or not c.n_test_images else c.n_test_images,
                               s2i_transcript=c.s2i_transcript)
    n = result["counts"]
    print(f"corpus: {sum(n['train'].values())} training lines, {sum(n['test'].values())} held-out lines "
          f"({n['images']} images, {n['audio']} clips; held-out voices {', '.join(result['held_out_voices'])})")
    result["tokenize_input"] = result["train"]
    cap = c.speech_lines_per_task
    if cap and not small:
        kept, seen = [], defaultdict(int)
        for raw in Path(result["train"]).read_text().splitlines():
            task = json.loads(raw)["task"]
            seen[task] += 1
            if not spec(task).speech or seen[task] <= cap:
                kept.append(raw)
        capped = Path(result["root"]) / "train_tokenize.jsonl"
        capped.write_text("\n".join(kept) + "\n")
        result["tokenize_input"] = str(capped)
        print(f"tokenizing {len(kept)} of them: speech tasks capped at {cap} lines each "
              f"(corpus.speech_lines_per_task)")
    return result


def tokenize(demo: DemoConfig, corpus: dict, out: Path, tracking_uri: str = "") -> dict:
    """The tokenize job, tracked in `tracking_uri` (the training run's store, so the dashboard links the two)
    unless the demo config names a store of its own."""
    from tokenize_jobs.run import run_job

    job = demo.tokenize
    if tracking_uri and not job.mlflow.tracking_uri:
        job = replace(job, mlflow=replace(job.mlflow, tracking_uri=tracking_uri))
    return run_job(job, "messages", corpus["tokenize_input"], str(out / "tok"), print_summary=False)


def train(cfg, budget: TimeBudget | None = None) -> dict:
    from pipelines.train import trainer

    result = trainer.run(cfg, budget)
    if getattr(result, "error", None):
        raise cli.Failed(f"training failed: {result.error}")
    from pipelines import export

    path = str(Path(cfg.run.run_dir) / "export")
    config = export.read_config(path)
    return {"export": path, "step": config.step, "mlflow_run_id": config.mlflow_run_id}


def loss_history(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """The training loss as MLflow recorded it: first and last logged values (the demo's 'it learned' check)."""
    from common.tracking import latest_metrics, metric_history

    hist = metric_history(tracking_uri, run_id, "loss")
    out: dict[str, Any] = {"logged": len(hist)}
    if hist:
        out.update(first_step=hist[0][0], first=round(hist[0][1], 4), last_step=hist[-1][0],
                   last=round(hist[-1][1], 4))
        tps = [v for _, v, _ in metric_history(tracking_uri, run_id, "tokens_per_s")]
        if tps:
            out["tokens_per_s"] = round(float(np.median(tps)), 1)
    run = latest_metrics(tracking_uri, run_id)
    out["task_loss"] = {k.split("/", 1)[1]: round(v, 4) for k, v in sorted(run.items()) if k.startswith("loss/")}
    return out


def evaluate(demo: DemoConfig, export: str, corpus: dict, out: Path, eval_limit: int, folder: str = "eval",
             mlflow: bool = True) -> dict:
    """The held-out evaluation of a run in `out`, written to <out>/<folder> (and to the training run's MLflow run
    with `mlflow`)."""
    from pipelines.eval import evaluate as ev

    return ev.evaluate(export, corpus["test"], out=str(out / folder), presets=demo.sampler,
                       classifier_train_data=corpus["train"], limit=eval_limit or None, local=False,
                       actors=demo.eval_actors, device="cpu", verbose=False, return_predictions=True,
                       mlflow=mlflow,
                       speech_judge_data=str(out / "tok"))   # the training voices' clips, already as codes


# ---- gallery -------------------------------------------------------------------------------------------------

def image_grid(rows: list[list[np.ndarray]], labels: Sequence[str], scale: int = 4, pad: int = 2) -> np.ndarray:
    """Rows of (H, W, 1) uint8 images -> one (H', W') uint8 grid with a label cell in front of each row."""
    from PIL import Image, ImageDraw

    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    label_w = 3 * cell_w // 2
    grid = Image.new("L", (label_w + cols * cell_w + pad, len(rows) * cell_h + pad), color=64)
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels)):
        draw.text((4, r * cell_h + cell_h // 2 - 6), label, fill=255)
        for c, img in enumerate(row):
            tile = Image.fromarray(np.asarray(img, dtype=np.uint8)[:, :, 0]).resize((w * scale, h * scale),
                                                                                    Image.NEAREST)
            grid.paste(tile, (label_w + pad + c * cell_w, pad + r * cell_h))
    return np.asarray(grid)


def write_gallery(demo: DemoConfig, export: str, corpus: dict, out: Path, samples: int,
                  judged: Sequence[dict] = ()) -> dict[str, str]:
    import torch

    # One thread: a few hundred small generate calls gain little from a second one, and on a busy machine
    # intra-op threads waiting for each other made this stage 5x slower (measured with load 10 on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _write_gallery(demo, export, corpus, out, samples, judged)
    finally:
        torch.set_num_threads(threads)


def _write_gallery(demo: DemoConfig, export: str, corpus: dict, out: Path, samples: int,
                   judged: Sequence[dict]) -> dict[str, str]:
    """t2i.png (rows: the ten captions), s2i.png (rows: the ten digits, spoken by held-out voices),
    real_heldout.png (real held-out images, for comparison) and tts/<digit>.wav with what the model's own ASR
    hears in them (tts/heard.json). The cells are the evaluation's own generations (`judged`, the predictions
    evaluate returns), so the gallery shows what was scored; only digits the evaluation did not cover (--small,
    eval_limit) are generated here, with the same sampler."""
    from PIL import Image

    from demo.corpus import DIGIT_WORDS, caption
    from pipelines.infer.predictor import Predictor, Request, request_from_line, wav_bytes

    gallery = out / "gallery"
    (gallery / "tts").mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_export(export, "cpu", demo.sampler)
    labels = [f"{d} {w}" for d, w in enumerate(DIGIT_WORDS)]
    scored: dict[tuple[str, int], list[dict]] = defaultdict(list)   # (task, digit) -> the eval's outputs
    for p in judged:
        if p.get("ok") and p.get("label") is not None:
            scored[(p["task"], int(p["label"]))].append(p)

    # test lines per digit: s2i prompts to fill gaps, and the real held-out images they show
    base = corpus["root"]
    lines: dict[int, list[dict]] = defaultdict(list)
    for raw in Path(corpus["test"]).read_text().splitlines():
        line = json.loads(raw)
        if line["task"] == "s2i" and len(lines[line["label"]]) < samples:
            lines[line["label"]].append(line)

    def fill(task: str, request: Callable[[int, int], Request]) -> list[list[np.ndarray]]:
        """`samples` images per digit: the eval's first, then generated for the rest (one batch)."""
        rows = [[p["image"] for p in scored[(task, d)][:samples]] for d in range(10)]
        need = [(d, k) for d in range(10) for k in range(len(rows[d]), samples)]
        need = [(d, k) for d, k in need if not spec(task).inputs or k < len(lines[d])]
        for (d, _), o in zip(need, predictor.predict([request(d, k) for d, k in need])):
            rows[d].append(o.image)
        return rows

    t2i = fill("t2i", lambda d, k: Request(task="t2i", text=caption(d)))
    Image.fromarray(image_grid(t2i, labels)).save(gallery / "t2i.png")
    s2i = fill("s2i", lambda d, k: request_from_line(lines[d][k], base)[0])
    Image.fromarray(image_grid(s2i, labels)).save(gallery / "s2i.png")
    real = [[predictor.tokenizers.image.load((Path(base) / line["images"][0]).read_bytes()) for line in lines[d]]
            for d in range(10)]
    Image.fromarray(image_grid(real, labels)).save(gallery / "real_heldout.png")

    # TTS: waveforms through the offline codec's decoder (untrained: it renders the tokens, it does not make
    # them intelligible), and the model's own ASR on the generated tokens, which is what the eval scores
    codes: dict[int, np.ndarray] = {}
    heard: dict[int, str] = {}
    for d in range(10):
        done = [p for p in scored[("tts", d)] if "audio_codes" in p]
        if done:
            codes[d], heard[d] = np.asarray(done[0]["audio_codes"], dtype=np.int64), done[0].get("transcript", "")
    missing = [d for d in range(10) if d not in codes]
    tts = predictor.predict([Request(task="tts", text=DIGIT_WORDS[d]) for d in missing], decode_audio=False)
    asr = predictor.predict([Request(task="asr", audios=[o.audio_codes]) for o in tts], decode_audio=False)
    for d, o, h in zip(missing, tts, asr):
        codes[d], heard[d] = o.audio_codes, h.text
    speech = predictor.tokenizers.speech
    record = {}
    for d in range(10):
        wav = speech.decode(codes[d]) if codes[d].shape[1] else np.zeros(0, dtype=np.float32)
        (gallery / "tts" / f"{d}_{DIGIT_WORDS[d]}.wav").write_bytes(wav_bytes(wav, speech.sample_rate))
        record[DIGIT_WORDS[d]] = {"frames": int(codes[d].shape[1]), "asr_hears": heard[d]}
    (gallery / "tts" / "heard.json").write_text(json.dumps(record, indent=1) + "\n")
    return {"t2i": str(gallery / "t2i.png"), "s2i": str(gallery / "s2i.png"),
            "real_heldout": str(gallery / "real_heldout.png"), "tts": str(gallery / "tts")}


# ---- results -------------------------------------------------------------------------------------------------

def summarize(eval_results: dict) -> tuple[dict[str, dict], float | None, float | None]:
    """`omnidiff eval`'s per-task metrics -> the demo's tasks table (each with "accuracy"), the image
    classifier's accuracy on the real held-out images and the speech judge's on the real held-out clips. TTS
    reads the judge's accuracy; its own-ASR accuracy is the row OWN_ASR_ROW."""
    tasks, real, real_speech = {}, [], None
    for task in TASK_ORDER:
        m = eval_results["tasks"].get(task)
        if m is None:
            continue
        acc = m.get("judge_accuracy", m.get(spec(task).metric))
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}
        tasks[task] = {"accuracy": None if acc is None else round(float(acc), 4), **row}
        if "judge_accuracy" in m:
            own = m.get(spec(task).metric)
            tasks[OWN_ASR_ROW] = {"accuracy": None if own is None else round(float(own), 4), **row}
            real_speech = round(float(m["judge_real_accuracy"]), 4) if "judge_real_accuracy" in m else None
        if "real_accuracy" in m:
            real.append(m["real_accuracy"])
    return tasks, (round(float(np.mean(real)), 4) if real else None), real_speech


def format_results(results: dict) -> str:
    lines = [f"{'task':<7} {'accuracy':>8} {'bar':>6}  {'n':>4}  judged by", "-" * 70]
    for task, m in results["tasks"].items():
        acc = m["accuracy"]
        bar = QUALITY_BAR.get(task)
        mark = "" if bar is None or acc is None else ("  ok" if acc >= bar else "  BELOW")
        lines.append(f"{task:<7}{'-' if acc is None else f'{100 * acc:8.1f}%'} "
                     f"{'' if bar is None else f'{100 * bar:5.0f}%'}{mark:<6} {m.get('n', 0):>4}  "
                     f"{ACCURACY_MEANING[task]}"
                     + (f" (its transcript, written first: {100 * m['transcript_exact_match']:.1f}% right)"
                        if m.get("transcript_exact_match") is not None else ""))
    real = results["classifier_accuracy_on_real_heldout"]
    if real is not None:
        lines.append(f"digit classifier (fitted on training images) on REAL held-out images: {100 * real:.1f}%")
    real = results.get("tts_judge_real")
    if real is not None:
        lines.append(f"speech-code classifier (fitted on training voices) on REAL held-out clips: {100 * real:.1f}%")
    return "\n".join(lines)


# ---- the demo ------------------------------------------------------------------------------------------------

def run_demo(demo: DemoConfig, out: Path, *, small: bool = False, steps: int | None = None,
             overrides: Sequence[str] = ()) -> dict:
    """All stages; returns the results dict also written to <out>/results.json."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if small and steps is None:
        steps = demo.small.steps
    eval_limit = demo.small.eval_limit if small else demo.eval_limit
    samples = demo.gallery.samples if not small else demo.small.gallery_samples
    out = out.resolve()
    shutil.rmtree(out, ignore_errors=True)   # always a fresh run (see the module docstring)
    out.mkdir(parents=True)
    # Fail on a bad config before minutes of work.
    cfg = train_config(demo, str(out / "tok"), str(out / "train"), steps, overrides)

    started_ray = False
    with LoadSampler() as load:
        try:
            with stage("corpus", timings):
                corpus = build_corpus(demo, out, small)
            with stage("ray", timings):
                started_ray = start_ray()
            with stage("tokenize", timings):
                tok = tokenize(demo, corpus, out, resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.run.run_dir))
                print(f"tokenize: {tok['samples_written']:,} samples, {tok['tokens']:,} tokens, "
                      f"{tok['inputs_quarantined']} quarantined")
            budget = time_budget(demo.time, time.perf_counter() - t0)
            if budget:
                print(f"train: time budget {budget.seconds:.0f}s for at most {cfg.train.steps} steps, "
                      f"{budget.reserve_steps} steps' worth of it kept for the eval")
            with stage("train", timings):
                trained = train(cfg, budget)
            with stage("eval", timings):
                ev = evaluate(demo, trained["export"], corpus, out, eval_limit)
            with stage("gallery", timings):
                gallery = write_gallery(demo, trained["export"], corpus, out, samples, ev.pop("predictions"))
        finally:
            if started_ray:
                import ray

                ray.shutdown()

    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.run.run_dir)
    tasks, real, real_speech = summarize(ev)
    results = {
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "tasks": tasks,
        "classifier_accuracy_on_real_heldout": real,
        "tts_judge_real": real_speech,
        "quality_bar": {t: {"bar": b, "passed": tasks.get(t, {}).get("accuracy") is not None
                            and tasks[t]["accuracy"] >= b} for t, b in QUALITY_BAR.items()},
        "stage_seconds": timings,
        "load_average": load.summary(),
        "small": small,
        "train": {"steps": trained["step"], "max_steps": cfg.train.steps,
                  "time_budget_s": budget.seconds if budget else 0.0,
                  "budget_reserve_steps": budget.reserve_steps if budget else 0,
                  "model": configlib.to_dict(cfg.model),
                  "loss": loss_history(tracking_uri, trained["mlflow_run_id"]) if trained["mlflow_run_id"] else {}},
        "mlflow": {"tracking_uri": tracking_uri, "run_id": trained["mlflow_run_id"],
                   "experiment": cfg.mlflow.experiment,
                   "ui": f"mlflow ui --backend-store-uri {tracking_uri}"},
        "gallery": gallery,
        "export": trained["export"],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omnidiff demo",
        description="Train an any-to-any model on the embedded digit corpus (handwritten digits + spoken digit "
                    "words) on this machine's CPUs, evaluate every direction on held-out images and voices, and "
                    "write a gallery. Deletes and rewrites --out. About 10 minutes on 2 CPU cores.",
        epilog="examples:\n"
               "  python -m demo                      # the full demo (make demo)\n"
               "  python -m demo --small --out /tmp/d # the CI variant: tiny corpus, 30 steps\n"
               "  python -m demo --steps 300 optim.lr=3e-3\n"
               "outputs: <out>/results.json, <out>/gallery/, <out>/train/mlflow.db (open with the printed "
               "`mlflow ui` command), <out>/eval/predictions.jsonl\n" + cli.EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder, deleted and rewritten (default runs/demo)")
    p.add_argument("--small", action="store_true", help="CI variant: 10-image corpus, small.steps training "
                                                        "steps, small.eval_limit items per task")
    p.add_argument("--steps", type=int, default=None, help="training steps (curriculum stages rescaled)")
    p.add_argument("--config", default=str(DEMO_YAML), help=f"demo config (default {DEMO_YAML.relative_to(REPO)})")
    p.add_argument("--set", dest="demo_overrides", action="append", default=[], metavar="key=value",
                   help="demo config override, e.g. --set corpus.n_train_images=500 --set sampler.t2i.steps=8")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training config overrides (configs/train/demo.yaml keys), e.g. optim.lr=3e-3")
    return p


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    demo = configlib.load(DemoConfig, args.config, args.demo_overrides)
    results = run_demo(demo, Path(args.out), small=args.small, steps=args.steps, overrides=args.overrides)
    out = Path(args.out).resolve()
    print("\n" + "=" * 70)
    print(f"Omni-Diffusion demo: {results['train']['steps']} training steps, "
          f"{results['wall_seconds'] / 60:.1f} min wall on {results['load_average']['cpus']} CPUs "
          f"(mean load {results['load_average']['mean_1min']})")
    print("stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in results["stage_seconds"].items()))
    print(format_results(results))
    print(f"\ngallery:  {results['gallery']['t2i']}, {results['gallery']['s2i']}, {results['gallery']['tts']}/")
    print(f"results:  {out / 'results.json'}")
    print(f"MLflow:   {results['mlflow']['ui']}   (then open http://127.0.0.1:5000)")
    return cli.OK


if __name__ == "__main__":
    raise SystemExit(main())
