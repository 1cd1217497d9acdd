"""`omnidiff eval`: per-task benchmark numbers for an exported checkpoint.

    omnidiff eval --checkpoint runs/demo/train/export --data runs/demo/corpus/test.jsonl \\
        --classifier-train-data runs/demo/corpus/train.jsonl --out runs/demo/eval [--tasks asr tts] [--limit 50]
    omnidiff eval --checkpoint $CK --benchmark pope|mme|librispeech|libritts --data <public layout> [--out DIR]

--benchmark runs a published benchmark from its public file layout and scores it by its published protocol
(POPE, MME perception, LibriSpeech WER, LibriTTS WER judged by Whisper): pipelines/eval/benchmarks.py.

--data is a messages JSONL (the demo corpus' test.jsonl: a final assistant turn is the reference answer,
"label" / "options" fields optional) or a tokenize output folder (shards + manifest.json; the answer span of each
sample is the reference, meta "label" optional).

Metrics (pipelines/eval/scoring.py; text normalization documented there: lower-case, punctuation stripped, Kaldi-style
word WER with jiwer):
    asr              wer, exact_match
    tts              wer of the generated speech transcribed by a judge: by default this model's own ASR direction
                     applied to the speech TOKENS it generated (the demo's offline EnCodec has an untrained
                     decoder, so re-encoding its audio would judge noise); `--asr-model <whisper dir>` transcribes
                     the decoded waveform with a local Whisper model instead (pipelines/eval/whisper.py);
                     with `--speech-judge-data` also judge_accuracy: a classifier of speech codes fitted on real
                     labelled recordings only names the generated clip's label (pipelines/eval/speech_judge.py),
                     next to judge_real_accuracy, the same classifier on the real held-out recordings
    i2t vqa svqa text  exact_match; option_accuracy for lines with "options" (multiple choice)
    sqa              exact_match of the text of the spoken answer (the text before its <boa>)
    t2i s2i          class_accuracy: generated images classified by an image classifier fitted on real images of
                     --classifier-train-data (lines/samples with a label), next to real_accuracy, the same
                     classifier on the real held-out reference images (the ceiling the generator is judged
                     against); clip_score with `--clip-model <dir>` (needs `transformers`); for answers that
                     write a transcript before the image (`s2i.transcript`), transcript_exact_match

Writes a table (stdout), <out>/results.json ({"tasks": {task: {metric: value, "n": n}}, ...}) and
<out>/predictions.jsonl, and logs `eval/<task>/<metric>` to the training run's MLflow run when the export names
one. Generation runs as a Ray Data actor pool over the eval set (like `omnidiff generate`); small sets, or
`--local`, run in this process.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import traceback
from collections import defaultdict
from typing import Any, Iterator, Sequence

import numpy as np

from common import cli, configlib, storage, tracking
from common.rayutil import init_ray
from model.prompts import TaskTemplates
from model.tasks import TASKS, Judge, spec
from model.tokenizers.base import BadInput
from model.vocab import Modality
from pipelines import export as export_format
from pipelines.eval import benchmarks, scoring
from pipelines.eval.speech_judge import (
    encode_clips,
    fit_speech_classifier,
    speech_training_set,
)
from pipelines.eval.whisper import WhisperJudge
from pipelines.infer.generate import input_base_dir, map_with_actors
from pipelines.infer.predictor import (
    Predictor,
    Request,
    png_bytes,
    read_media,
    request_from_line,
    spoken_text,
    user_text,
)
from pipelines.infer.presets import SamplerPresets, load_presets

LOCAL_MAX_ITEMS = 32   # evaluation sets up to this size run in-process unless local=False


# ---- the eval set -----------------------------------------------------------------------------------------

def is_shards(data: str) -> bool:
    return storage.exists(storage.join(data, "manifest.json"))


def load_items(data: str, tokenizers: Any, *, tasks: Sequence[str] | None = None, limit: int | None = None
               ) -> list[dict]:
    """Eval items (JSON-able dicts): {"idx", "task", "line"? (raw JSONL) | "prompt_ids"? (shards), "ref_text",
    "spoken" (tts: text to read; t2i: caption), "label", "options", "ref_image" (PNG path or image codes)}.
    At most `limit` per task, in file order."""
    items: list[dict] = []
    counts: dict[str, int] = defaultdict(int)

    def keep(task: str) -> bool:
        return (not tasks or task in tasks) and (limit is None or counts[task] < limit)

    templates = TaskTemplates()
    if is_shards(data):
        from tokenize_jobs.shards import iter_samples

        vocab = tokenizers.vocab
        for sample in iter_samples(data):
            meta = sample["meta"]
            task = meta.get("task")
            if task not in TASKS or not keep(task):
                continue
            ids, mask = sample["input_ids"].astype(np.int64), sample["answer_mask"].astype(bool)
            first = int(np.argmax(mask)) if mask.any() else len(ids)
            answer = ids[first:][mask[first:]]
            item = {"idx": len(items), "task": task, "key": sample["key"], "prompt_ids": ids[:first].tolist(),
                    "label": _label(meta.get("label")), "options": meta.get("options"),
                    "spoken": spoken_text(templates.get(task, vocab.prompt_format),
                                          user_text(ids[:first], vocab, tokenizers.text))}
            if spec(task).answer == Modality.TEXT:
                stop = np.flatnonzero(answer == vocab.im_end_id)
                text_ids = answer[: stop[0]] if stop.size else answer
                item["ref_text"] = tokenizers.text.decode([int(t) for t in text_ids if t < vocab.text_size])
            elif spec(task).answer == Modality.IMAGE:
                lo, hi = vocab.image_range()
                item["ref_image"] = (answer[(answer >= lo) & (answer < hi)] - lo).tolist()
                said = answer[: int(np.argmax(answer == vocab.boi_id))] if (answer == vocab.boi_id).any() else []
                if len(said):   # an s2i transcript before the image
                    item["ref_text"] = tokenizers.text.decode([int(t) for t in said if t < vocab.text_size])
            elif spec(task).judge == Judge.SPEECH:
                lo, hi = vocab.audio_range()
                item["ref_audio"] = vocab.audio_codes(answer[(answer >= lo) & (answer < hi)]).tolist()  # (n_q, T)
            counts[task] += 1
            items.append(item)
    else:
        try:
            text = storage.read_text(data)
        except FileNotFoundError:
            raise FileNotFoundError(f"--data {data} is neither a tokenize output folder (no manifest.json) nor a "
                                    f"JSONL file") from None
        base = input_base_dir(data)
        for n, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                req, ref = request_from_line(json.loads(raw), base)
            except (json.JSONDecodeError, BadInput) as e:
                print(f"eval: skipping {data} line {n}: {e}", file=sys.stderr)
                continue
            if not keep(req.task):
                continue
            users = [m.get("content", "") for m in req.messages or [] if m.get("role") == "user"]
            item = {"idx": len(items), "task": req.task, "line_no": n, "line": raw, "ref_text": ref.text,
                    "label": ref.label, "options": ref.options,
                    "spoken": spoken_text(templates.get(req.task, tokenizers.vocab.prompt_format), users[-1]) if users else ""}
            if spec(req.task).judge == Judge.IMAGE and ref.images:
                item["ref_image"] = ref.images[0]
            if spec(req.task).judge == Judge.SPEECH and ref.audios:
                item["ref_audio"] = ref.audios[-1]
            counts[req.task] += 1
            items.append(item)
    return items


def jsonl_objects(data: str, what: str) -> Iterator[dict]:
    """The JSON objects of a JSONL file; a line that does not parse is skipped with a line on stderr."""
    for n, raw in enumerate(storage.read_text(data).splitlines(), start=1):
        try:
            line = json.loads(raw) if raw.strip() else None
        except json.JSONDecodeError as e:
            print(f"eval: {what} {data} line {n} skipped: {e}", file=sys.stderr)
            continue
        if isinstance(line, dict):
            yield line


def _label(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


# ---- generation (in-process or in Ray actors) ------------------------------------------------------------

class EvalWorker:
    """Ray Data UDF: eval items -> predictions (hypothesis text, generated image as PNG, TTS transcript)."""

    def __init__(self, checkpoint: str, presets: dict, base_dir: str = "", device: str = "auto",
                 asr_model: str = ""):
        self.predictor = Predictor.from_export(checkpoint, device, configlib.from_dict(SamplerPresets, presets))
        self.base_dir = base_dir
        self.whisper = WhisperJudge(asr_model, device=str(self.predictor.device)) if asr_model else None

    def request(self, item: dict) -> Request:
        if item.get("request") is not None:   # a benchmark item (pipelines/eval/benchmarks.py)
            return Request(**item["request"])
        if item.get("prompt_ids") is not None:
            return Request(task=item["task"], prompt_ids=np.asarray(item["prompt_ids"], dtype=np.int64))
        req, _ = request_from_line(json.loads(item["line"]), self.base_dir)
        return req

    def predict(self, items: list[dict]) -> list[dict]:
        preds = [{"idx": it["idx"], "task": it["task"], "ok": False} for it in items]
        prepared, where = [], []
        for i, it in enumerate(items):
            try:
                prepared.append(self.predictor.prepare(self.request(it)))
                where.append(i)
            except (BadInput, ValueError) as e:
                preds[i]["error"] = str(e)
        try:
            outputs = self.predictor.run(prepared, decode_audio=self.whisper is not None)
        except Exception as e:  # a failing batch is reported per item, the evaluation goes on
            for i in where:
                preds[i]["error"] = f"{type(e).__name__}: {e}"
                preds[i]["traceback"] = traceback.format_exc(limit=3)
            return preds
        tts = []
        for i, out in zip(where, outputs):
            p = preds[i]
            p["ok"] = True
            if out.text is not None:
                p["hyp"] = out.text
            if out.image is not None:
                p["image_png"] = png_bytes(out.image)
            if out.audio_codes is not None:
                p["speech_frames"] = int(out.audio_codes.shape[1])
                p["audio_codes"] = out.audio_codes.tolist()   # (n_q, T): what the judge heard, replayable
                if spec(p["task"]).judge == Judge.SPEECH:     # spoken answers (sqa) are judged on their text
                    tts.append((p, out))
        if tts:
            self._transcribe(tts)
        return preds

    def _transcribe(self, tts: list[tuple[dict, Any]]) -> None:
        """TTS judge: Whisper on the waveform, or this model's ASR on the generated codes (default)."""
        if self.whisper is not None:
            wavs = [out.wav if out.wav is not None else np.zeros(0, np.float32) for _, out in tts]
            heard = self.whisper.transcribe(wavs, tts[0][1].sample_rate)
            for (p, _), text in zip(tts, heard):
                p["transcript"] = text
            return
        asr = [self.predictor.prepare(Request(task="asr", audios=[out.audio_codes])) for _, out in tts]
        for (p, _), heard in zip(tts, self.predictor.run(asr)):
            p["transcript"] = heard.text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [json.loads(x) for x in batch["item"].tolist()]
        preds = self.predict(items)
        images = [p.pop("image_png", b"") for p in preds]
        return {"idx": np.array([p["idx"] for p in preds], dtype=np.int64),
                "pred": np.array([json.dumps(p) for p in preds], dtype=object),
                "image_png": np.array(images, dtype=object)}


def run_predictions(checkpoint: str, items: list[dict], presets: SamplerPresets, *, base_dir: str = "",
                    device: str = "auto", asr_model: str = "", local: bool | None = None,
                    actors: int | None = None) -> list[dict]:
    """Predictions for `items`, in item order, each with "image" (uint8 array) for image answers."""
    kwargs = {"checkpoint": checkpoint, "presets": configlib.to_dict(presets), "base_dir": base_dir,
              "device": device, "asr_model": asr_model}
    if local is None:
        local = len(items) <= LOCAL_MAX_ITEMS
    rows = []
    if local:
        worker = EvalWorker(**kwargs)
        bs = presets.batch_size
        for start in range(0, len(items), bs):
            out = worker({"item": np.array([json.dumps(x) for x in items[start:start + bs]], dtype=object)})
            rows += [dict(zip(out, vals)) for vals in zip(*out.values())]
    else:
        rows = map_with_actors([{"item": json.dumps(x)} for x in items], EvalWorker, kwargs, actors=actors,
                               batch_size=presets.batch_size)
    preds = []
    for r in rows:
        p = json.loads(r["pred"])
        if r["image_png"]:
            p["image"] = decode_png(r["image_png"])
        preds.append(p)
    return sorted(preds, key=lambda p: p["idx"])


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(bytes(data))))
    return arr[:, :, None] if arr.ndim == 2 else arr  # (H, W) -> (H, W, 1)


# ---- image classifier and CLIP hooks ----------------------------------------------------------------------

def real_image(ref: Any, tokenizers: Any, base_dir: str) -> np.ndarray:
    """A reference image: a media path (loaded as the tokenizer loads it) or image codes (decoded)."""
    if isinstance(ref, str):
        return tokenizers.image.load(read_media(ref, base_dir, "image"), source=ref)
    return tokenizers.image.decode(np.asarray(ref, dtype=np.int64)[None])[0]  # (1, N) -> (H, W, C)


def classifier_training_set(data: str, tokenizers: Any) -> tuple[np.ndarray, np.ndarray]:
    """Real labeled images of a messages JSONL (every image of a line with a "label"; de-duplicated) or of
    shards (image spans of samples whose meta has a "label")."""
    images, labels = [], []
    if is_shards(data):
        from tokenize_jobs.shards import iter_samples

        v = tokenizers.vocab
        n = tokenizers.image.tokens_per_image
        for sample in iter_samples(data):
            label = _label(sample["meta"].get("label"))
            ids = sample["input_ids"].astype(np.int64)
            if label is None:
                continue
            for start in np.flatnonzero(ids == v.boi_id):
                span = ids[start + 1: start + 1 + n]
                if len(span) == n:
                    images.append(tokenizers.image.decode(v.image_codes(span)[None])[0])
                    labels.append(label)
    else:
        base = input_base_dir(data)
        seen: set[str] = set()
        for line in jsonl_objects(data, "classifier data"):
            label = _label(line.get("label", (line.get("meta") or {}).get("label")))
            for ref in line.get("images", []) if label is not None else []:
                if ref not in seen:
                    seen.add(ref)
                    images.append(real_image(ref, tokenizers, base))
                    labels.append(label)
    if len(set(labels)) < 2:
        raise ValueError(f"--classifier-train-data {data}: needs labeled images of at least 2 classes, found "
                         f"{len(images)} images of {len(set(labels))} classes (labels come from \"label\" fields)")
    return np.stack(images), np.asarray(labels)


def clip_score(images: Sequence[np.ndarray], texts: Sequence[str], model_dir: str) -> float:
    """Mean CLIP cosine similarity x 100 (clamped at 0) of image/caption pairs, with a local CLIP model."""
    try:
        import torch
        from transformers import CLIPModel, CLIPProcessor
    except ImportError:
        raise configlib.ConfigError(f"--clip-model {model_dir}: the CLIP score needs the `transformers` package "
                                    f"(pip install transformers)") from None
    if not os.path.isdir(model_dir):   # weights load from a local folder only, never from a hub at run time
        raise configlib.ConfigError(f"--clip-model {model_dir!r}: not a local folder; give the folder a CLIP model "
                                    f"and its processor were saved to (save_pretrained)")
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
    rgb = [np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im for im in images]  # (H, W, 1) -> (H, W, 3)
    with torch.no_grad():
        inputs = proc(text=list(texts), images=rgb, return_tensors="pt", padding=True)
        out = model(**inputs)
        sim = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    return float((100 * sim.clamp(min=0)).mean())


# ---- metrics ----------------------------------------------------------------------------------------------

def task_metrics(task: str, items: list[dict], preds: list[dict], *, classifier: Any = None,
                 real_images: dict[int, np.ndarray] | None = None, clip_model: str = "",
                 speech_judge: Any = None, real_speech: dict[int, np.ndarray] | None = None) -> dict[str, float]:
    """Metrics of one task from its items and their predictions (same order). Items whose generation failed
    count as wrong (empty hypothesis)."""
    out: dict[str, Any] = {"n": len(items), "n_failed": sum(not p["ok"] for p in preds)}
    judge = spec(task).judge
    if judge == Judge.TEXT:
        # references that normalize to nothing ("?!") cannot be scored (WER undefined); they are left out
        scored = [(it, p.get("hyp") or "") for it, p in zip(items, preds)
                  if scoring.normalize_text(it.get("ref_text") or "")]
        if scored:
            refs, hyps = [it["ref_text"] for it, _ in scored], [h for _, h in scored]
            out["exact_match"] = scoring.exact_match(refs, hyps)
            if spec(task).wer:
                out["wer"] = scoring.wer(refs, hyps)
        mc = [(it, p.get("hyp") or "") for it, p in zip(items, preds)
              if it.get("options") and scoring.normalize_text(it.get("ref_text") or "")]
        if mc:
            out["option_accuracy"] = scoring.option_accuracy([it["ref_text"] for it, _ in mc], [h for _, h in mc],
                                                             [it["options"] for it, _ in mc])
    elif judge == Judge.SPEECH:
        scored = [(it["spoken"], p.get("transcript") or "") for it, p in zip(items, preds)
                  if scoring.normalize_text(it.get("spoken") or "")]
        if scored:
            out["wer"] = scoring.wer([r for r, _ in scored], [h for _, h in scored])
            out["exact_match"] = scoring.exact_match([r for r, _ in scored], [h for _, h in scored])
        labeled = [(it, p) for it, p in zip(items, preds) if it.get("label") is not None]
        if speech_judge is not None and labeled:
            # a failed or empty generation is an empty clip: the judge names no label for it
            gen = [np.asarray(p.get("audio_codes") or np.zeros((1, 0)), dtype=np.int64) for _, p in labeled]
            out["judge_accuracy"] = speech_judge.accuracy(gen, [it["label"] for it, _ in labeled])
            reals = [(real_speech[it["idx"]], it["label"]) for it, _ in labeled
                     if real_speech and it["idx"] in real_speech]
            if reals:
                out["judge_real_accuracy"] = speech_judge.accuracy([r for r, _ in reals], [y for _, y in reals])
    elif judge == Judge.IMAGE:
        labeled = [(it, p) for it, p in zip(items, preds) if it.get("label") is not None]
        if classifier is not None and labeled:
            gen = [(p["image"], it["label"]) for it, p in labeled if p.get("image") is not None]
            # a failed generation counts as a wrong class
            hits = classifier.predict(np.stack([g for g, _ in gen])) == np.asarray([y for _, y in gen]) if gen \
                else np.zeros(0, dtype=bool)
            out["class_accuracy"] = float(hits.sum() / len(labeled))
            reals = [(real_images[it["idx"]], it["label"]) for it, _ in labeled
                     if real_images and it["idx"] in real_images]
            if reals:
                out["real_accuracy"] = classifier.accuracy(np.stack([r for r, _ in reals]), [y for _, y in reals])
        said = [(it["ref_text"], p.get("hyp") or "") for it, p in zip(items, preds) if it.get("ref_text")]
        if said and any("hyp" in p for p in preds):   # the transcript a chain-of-modalities answer wrote first
            out["transcript_exact_match"] = scoring.exact_match([r for r, _ in said], [h for _, h in said])
        if clip_model:
            pairs = [(p["image"], it.get("spoken") or "") for it, p in zip(items, preds)
                     if p.get("image") is not None and it.get("spoken")]
            if pairs:
                out["clip_score"] = clip_score([i for i, _ in pairs], [t for _, t in pairs], clip_model)
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    metrics = sorted({k for m in results.values() for k in m if k not in ("n", "n_failed")})
    header = ["task", "n", *metrics]
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731  (counts stay integers)
    rows = [[task, str(m["n"]), *(cell(m[k]) if k in m else "-" for k in metrics)]
            for task, m in results.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


# ---- the job ----------------------------------------------------------------------------------------------

def evaluate(checkpoint: str, data: str, *, tasks: Sequence[str] | None = None, limit: int | None = None,
             out: str | None = None, presets: SamplerPresets | None = None, classifier_train_data: str = "",
             asr_model: str = "", clip_model: str = "", local: bool | None = None, actors: int | None = None,
             device: str = "auto", mlflow: bool = True, mlflow_tracking_uri: str = "", verbose: bool = True,
             return_predictions: bool = False, benchmark: str = "", images: str = "", prompt: str = "reference",
             speech_judge_data: str = "") -> dict:
    """Evaluate `checkpoint` on `data` (messages JSONL or shards folder; with `benchmark`, that benchmark's
    public layout: pipelines/eval/benchmarks.py, `images` and `prompt` as it says). Returns the results dict
    written to <out>/results.json: {"tasks": {row: {metric: value, "n": n, "n_failed": k}}, "checkpoint",
    "data", "benchmark", "step", "sampler", "mlflow_run"}, a row per task (per split / subtask for a
    benchmark); with `return_predictions` the returned dict (not the file) also holds "predictions": one dict
    per item with "task", "label", "ok" and its output ("hyp", "image" (H, W, C) uint8, "audio_codes" +
    "transcript")."""
    t0 = time.time()
    presets = presets or SamplerPresets()
    bad = [t for t in tasks or () if t not in TASKS]
    if bad:
        raise ValueError(f"--tasks {bad}: unknown; tasks: {list(TASKS)}")
    bench = benchmarks.get(benchmark) if benchmark else None
    if bench and bench.needs_asr_model and not asr_model:
        raise configlib.ConfigError(f"--benchmark {benchmark} is judged by an external recognizer: give "
                                    f"--asr-model <local Whisper folder>")
    export = export_format.read(checkpoint)
    tokenizers = export.tokenizers()
    if bench:
        items = bench.load(data, prompt=benchmarks.prompt_for(bench, prompt), limit=limit, images=images)
    else:
        items = load_items(data, tokenizers, tasks=tasks, limit=limit)
    if not items:
        raise ValueError(f"--data {data}: no evaluation items" + (f" for tasks {list(tasks)}" if tasks else ""))
    base = "" if bench or is_shards(data) else input_base_dir(data)

    classifier = None
    real: dict[int, np.ndarray] = {}
    if any(spec(it["task"]).judge == Judge.IMAGE for it in items):
        if classifier_train_data:
            x, y = classifier_training_set(classifier_train_data, tokenizers)
            classifier = scoring.fit_image_classifier(x, y)
        for it in items:
            if spec(it["task"]).judge == Judge.IMAGE and it.get("ref_image") is not None \
                    and it.get("label") is not None:
                real[it["idx"]] = real_image(it["ref_image"], tokenizers, base)

    speech_judge, real_speech = None, {}
    speech_items = [it for it in items if spec(it["task"]).judge == Judge.SPEECH and it.get("label") is not None]
    if speech_judge_data and speech_items:
        clips, labels = speech_training_set(speech_judge_data, tokenizers)
        speech_judge = fit_speech_classifier(clips, labels, tokenizers.vocab.audio_codebook_size)
        refs = [it for it in speech_items if it.get("ref_audio") is not None]
        paths = [it for it in refs if isinstance(it["ref_audio"], str)]
        for it in refs:
            if not isinstance(it["ref_audio"], str):
                real_speech[it["idx"]] = np.asarray(it["ref_audio"], dtype=np.int64)   # (n_q, T) from shards
        wavs = [tokenizers.speech.load(read_media(it["ref_audio"], base, "audio"), source=it["ref_audio"])
                for it in paths]
        real_speech.update(zip([it["idx"] for it in paths], encode_clips(tokenizers.speech, wavs)))
    # actors load the export by its own URI: on another node the local cache path above does not exist
    preds = run_predictions(checkpoint, items, presets, base_dir=base, device=device, asr_model=asr_model,
                            local=local, actors=actors)
    if bench:
        table = bench.score(items, preds, asr_model=asr_model)
    else:
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            by_task[it["task"]].append(i)
        table = {task: task_metrics(task, [items[i] for i in idx], [preds[i] for i in idx], classifier=classifier,
                                    real_images=real, clip_model=clip_model, speech_judge=speech_judge,
                                    real_speech=real_speech)
                 for task, idx in sorted(by_task.items(), key=lambda kv: TASKS.index(kv[0]))}
    run = export_format.mlflow_run(export.config, checkpoint, mlflow_tracking_uri) if mlflow else None
    results = {"tasks": table, "checkpoint": checkpoint, "data": data, "benchmark": benchmark or None,
               "step": export.config.step,
               "sampler": configlib.to_dict(presets), "seconds": round(time.time() - t0, 2),
               "mlflow_run": run[1] if run else None}
    if out:
        storage.write_text_atomic(storage.join(out, "results.json"), json.dumps(results, indent=2))
        storage.write_text_atomic(storage.join(out, "predictions.jsonl"), "".join(
            json.dumps({**{k: v for k, v in p.items() if k != "image"},
                        "ref": items[i].get("ref_text") or items[i].get("spoken"), "label": items[i].get("label"),
                        **{k: items[i][k] for k in ("id", "split", "subtask") if k in items[i]}})
            + "\n" for i, p in enumerate(preds)))
    if run:
        try:
            tracking.log_results(*run, results, export.config.step)
        except Exception as e:  # metrics are in results.json either way; a tracking outage must not lose them
            print(f"eval: could not log to MLflow run {run[1]} at {run[0]}: {e}", file=sys.stderr)
            results["mlflow_run"] = None
    if verbose:
        print(format_table(table))
    if return_predictions:  # in memory only: images as arrays, with each item's label
        return {**results, "predictions": [{**p, "label": items[i].get("label")} for i, p in enumerate(preds)]}
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnidiff eval", description=__doc__, epilog=cli.EXIT_STATUS_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training export folder (local or s3://)")
    p.add_argument("--data", required=True, help="messages JSONL or tokenize output folder (local or s3://); "
                                                 "with --benchmark, the benchmark's public layout")
    p.add_argument("--benchmark", choices=list(benchmarks.BENCHMARKS), default="",
                   help="a published benchmark and its protocol (pipelines/eval/benchmarks.py) instead of --tasks")
    p.add_argument("--images", default="", help="pope: the COCO val2014 image folder (default <data>/val2014); "
                                                "mme: where the images are, if not under --data")
    p.add_argument("--prompt", default="reference", help="benchmark prompt wording: reference (the reference's "
                                                         "evaluation wording), template (this product's task "
                                                         "template), or a wording with {text} and placeholders")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None, help="tasks to evaluate (default: all)")
    p.add_argument("--limit", type=int, default=None, help="at most N items per task (benchmarks: per split for "
                                                           "pope, images per subtask for mme, utterances)")
    p.add_argument("--out", default=None, help="folder for results.json and predictions.jsonl")
    p.add_argument("--classifier-train-data", default="", help="labeled real images (JSONL or shards) to fit "
                                                               "the t2i/s2i image classifier on")
    p.add_argument("--asr-model", default="", help="local Whisper model folder to judge TTS (needs transformers)")
    p.add_argument("--speech-judge-data", default="", help="labelled real TTS recordings (JSONL or shards) to fit "
                                                           "the speech-code classifier that also judges TTS")
    p.add_argument("--clip-model", default="", help="local CLIP model folder for t2i clip_score (needs "
                                                    "transformers)")
    p.add_argument("--preset", default="project", help="sampler preset: project (default) | reference | demo | fast | "
                   "demo-fast (fast sampling: key/value cache, confidence threshold; docs/inference.md)")
    p.add_argument("--sampler-config", default=None, help="YAML file of SamplerPresets overrides")
    p.add_argument("--device", default="auto")
    p.add_argument("--actors", type=int, default=None, help="actor pool size (default: one per GPU, else 1)")
    p.add_argument("--local", action="store_true", default=None, help="run in this process, without Ray")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to the training run's MLflow run")
    p.add_argument("--mlflow-tracking-uri", default="", help="tracking URI of the training run (default: from "
                                                            "the export, $MLFLOW_TRACKING_URI, <run-dir>/mlflow.db)")
    p.add_argument("--ray-address", default=None)
    p.add_argument("overrides", nargs="*", help="sampler overrides: steps=32, tts.length_ratio=60, batch_size=4")
    return p


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.benchmark and args.tasks:
        raise configlib.ConfigError("--benchmark and --tasks: give one (a benchmark decides its task)")
    # a benchmark's own sampler settings (the reference's) come before the command line's overrides
    bench_overrides = list(benchmarks.get(args.benchmark).sampler) if args.benchmark else []
    presets = load_presets(args.preset, args.sampler_config, bench_overrides + list(args.overrides))
    if not args.local and args.ray_address:   # else map_with_actors starts a local Ray if it needs one
        init_ray(args.ray_address)
    evaluate(args.checkpoint, args.data, tasks=args.tasks, limit=args.limit, out=args.out, presets=presets,
             classifier_train_data=args.classifier_train_data, asr_model=args.asr_model, clip_model=args.clip_model,
             speech_judge_data=args.speech_judge_data,
             local=args.local, actors=args.actors, device=args.device, mlflow=not args.no_mlflow,
             benchmark=args.benchmark, images=args.images, prompt=args.prompt,
             mlflow_tracking_uri=args.mlflow_tracking_uri)
    if args.out:
        print(f"wrote {storage.join(args.out, 'results.json')}", file=sys.stderr)
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
