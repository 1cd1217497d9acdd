"""Published benchmarks in their public on-disk layouts, scored by their published protocols.

    omnidiff eval --checkpoint $CK --benchmark pope        --data /data/pope --images /data/coco/val2014
    omnidiff eval --checkpoint $CK --benchmark mme         --data /data/MME
    omnidiff eval --checkpoint $CK --benchmark librispeech --data /data/LibriSpeech/test-clean
    omnidiff eval --checkpoint $CK --benchmark libritts    --data /data/LibriTTS/test-clean --asr-model /models/whisper-large-v3

Each benchmark reads its layout into eval items (the dicts `pipelines/eval/evaluate.py` sends through the Ray
Data actor pool: {"idx", "task", "request", "ref_text" | "spoken", ...}) and scores the predictions:

pope         coco_pope_{random,popular,adversarial}.json under --data (one JSON object a line: question_id,
             image, text, label yes/no); images under --images (default <data>/val2014). The answer is read as
             POPE's evaluation reads it: the first sentence (up to the first '.'), commas dropped, split on
             spaces; "No", "no" or "not" among the words is no, anything else yes (an empty answer is yes).
             Per split: accuracy, precision, recall, f1 (the positive class is yes), yes_ratio.
mme          eval_tool/Your_Results/<subtask>.txt under --data (image TAB question TAB yes/no, two questions
             per image on consecutive lines); images at images/<subtask>/ (the reference's layout) or in the
             release folder (MME_Benchmark_release_version/<subtask>/[images/]). The answer is read as the MME
             eval tool reads it: lower-cased; "yes"/"no" as is, else "yes" or "no" within its first 4
             characters, else other (wrong). Per subtask acc and acc_plus (both questions of an image right),
             score = 100 (acc + acc_plus); mme/perception = the sum over the perception subtasks present (10 in
             the full set, max 2000), mme/cognition likewise.
librispeech  a LibriSpeech split (test-clean): <spk>/<chapter>/<spk>-<chapter>.trans.txt and the .flac files
             beside it. WER as the reference computes it (scoring.librispeech_words, scoring.corpus_wer).
libritts     a LibriTTS split (test-clean): <spk>/<chapter>/<utt>.normalized.txt, the text to read. The
             generated speech is transcribed by a local Whisper model (--asr-model) and scored with Whisper's
             English normaliser (scoring.whisper_english_words); `wer` counts a prompt that produced no speech
             as all words deleted, `wer_spoken` leaves such prompts out as the reference does.

The prompt wording is the reference's (`Benchmark.prompt`); `prompt="template"` uses this product's task
template instead (what a model trained on template-built corpora saw), or give any wording with {text}.
"""
from __future__ import annotations

import json
import os
import posixpath
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from common import configlib, storage
from model.tasks import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER
from pipelines.eval import scoring

POPE_SPLITS = ("random", "popular", "adversarial")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


# ---- answer parsing and metrics (pure) -------------------------------------------------------------------

def pope_answer(text: str) -> str:
    """'yes' or 'no' as POPE's evaluation reads a generated answer."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_metrics(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """accuracy, precision, recall, f1 (positive class: yes) and yes_ratio of parsed answers vs labels."""
    if len(answers) != len(labels) or not answers:
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels: need as many, at least one")
    pairs = list(zip((a == "yes" for a in answers), (lab == "yes" for lab in labels)))
    tp = sum(p and y for p, y in pairs)
    fp = sum(p and not y for p, y in pairs)
    tn = sum(not p and not y for p, y in pairs)
    fn = sum(not p and y for p, y in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / len(pairs)}


def mme_answer(text: str) -> str:
    """'yes', 'no' or 'other' as the MME eval tool reads a generated answer."""
    t = text.lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_subtask_metrics(answers: Sequence[str], truths: Sequence[str]) -> dict[str, float]:
    """acc, acc_plus and score of one subtask; answers and truths in file order, two questions per image."""
    if len(answers) != len(truths) or not answers or len(answers) % 2:
        raise ValueError(f"{len(answers)} answers for {len(truths)} truths: need as many, an even number")
    right = [mme_answer(a) == t.lower() for a, t in zip(answers, truths)]
    acc = sum(right) / len(right)
    acc_plus = sum(right[i] and right[i + 1] for i in range(0, len(right), 2)) / (len(right) // 2)
    return {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus)}


# ---- layouts -> eval items ------------------------------------------------------------------------------

def _absolute(uri: str) -> str:
    """s3:// URIs as they are, local paths made absolute: Ray actors do not share the driver's working folder."""
    return uri if storage.is_s3(uri) else os.path.abspath(uri)


def _files(root: str) -> dict[str, str]:
    """Every file under `root`: path relative to root -> full URI (absolute local path or s3://...)."""
    root = _absolute(root)
    try:
        found = storage.find(root)
    except FileNotFoundError:
        found = []
    if not found:
        raise configlib.ConfigError(f"--data {root}: no files there")
    bare = root.split("://", 1)[-1].rstrip("/")
    out = {}
    for f in found:
        if not f.startswith(bare + "/"):
            raise RuntimeError(f"listing {root} returned {f}, which is not under it")
        rel = f[len(bare) + 1:].replace("\\", "/")
        out[rel] = storage.join(root, rel)
    return out


def _request(task: str, prompt: str, text: str, *, images: Sequence[str] = (), audios: Sequence[str] = ()
             ) -> dict:
    """A Request as a JSON-able dict: the benchmark's wording, or the task template (prompt == "template")."""
    req: dict[str, Any] = {"task": task, "text": text, "images": list(images), "audios": list(audios)}
    if prompt != "template":
        req["messages"] = [{"role": "user", "content": prompt.replace("{text}", text)}]
    return req


def load_pope(data: str, *, prompt: str, limit: int | None = None, images: str = "") -> list[dict]:
    files = _files(data)
    image_root = _absolute(images or storage.join(data, "val2014"))
    items: list[dict] = []
    for split in POPE_SPLITS:
        rel = next((r for r in sorted(files) if posixpath.basename(r) == f"coco_pope_{split}.json"), None)
        if rel is None:
            continue
        lines = [(n, raw) for n, raw in enumerate(storage.read_text(files[rel]).splitlines(), start=1)
                 if raw.strip()]
        for n, raw in lines[:limit]:
            try:
                q = json.loads(raw)
                label = str(q["label"]).strip().lower()
                image, text = str(q["image"]), str(q["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise configlib.ConfigError(f"{files[rel]} line {n}: expected a JSON object with question_id, "
                                            f"image, text, label ({type(e).__name__}: {e})") from None
            if label not in ("yes", "no"):
                raise configlib.ConfigError(f"{files[rel]} line {n}: label {q['label']!r} is not yes/no")
            items.append({"idx": len(items), "task": "vqa", "split": split, "id": q.get("question_id"),
                          "ref_text": label, "question": text,
                          "request": _request("vqa", prompt, text, images=[storage.join(image_root, image)])})
    if not items:
        raise configlib.ConfigError(f"--data {data}: no coco_pope_{{{','.join(POPE_SPLITS)}}}.json found")
    return items


def load_mme(data: str, *, prompt: str, limit: int | None = None, images: str = "") -> list[dict]:
    questions = _files(data)
    files = _files(images) if images else questions   # image lookup: --images, else the same tree
    results = sorted(r for r in questions if posixpath.dirname(r).endswith("eval_tool/Your_Results")
                     and r.endswith(".txt"))
    if not results:
        raise configlib.ConfigError(f"--data {data}: no eval_tool/Your_Results/<subtask>.txt (the MME eval "
                                    f"tool's question lists)")
    items: list[dict] = []
    for rel in results:
        subtask = posixpath.basename(rel)[: -len(".txt")]
        lines = [ln for ln in storage.read_text(questions[rel]).splitlines() if ln.strip()]
        if limit is not None:
            lines = lines[: 2 * limit]
        if len(lines) % 2:
            raise configlib.ConfigError(f"{questions[rel]}: {len(lines)} lines; MME lists two questions per image")
        for n, raw in enumerate(lines, start=1):
            parts = raw.split("\t")
            if len(parts) < 3 or parts[2].strip().lower() not in ("yes", "no"):
                raise configlib.ConfigError(f"{questions[rel]} line {n}: expected image TAB question TAB yes/no")
            name, question, truth = parts[0], parts[1], parts[2].strip()
            if n % 2 == 0 and lines[n - 2].split("\t")[0] != name:
                raise configlib.ConfigError(f"{questions[rel]} lines {n - 1}-{n}: the two questions of a pair name "
                                            f"different images")
            candidates = [f"images/{subtask}/{name}", f"MME_Benchmark_release_version/{subtask}/images/{name}",
                          f"MME_Benchmark_release_version/{subtask}/{name}", f"{subtask}/images/{name}",
                          f"{subtask}/{name}"]
            found = next((files[c] for c in candidates if c in files), None)
            if found is None:
                raise configlib.ConfigError(f"MME image {name} of {subtask} not found under {images or data} (looked "
                                            f"for {', '.join(candidates)})")
            items.append({"idx": len(items), "task": "vqa", "subtask": subtask, "id": name, "ref_text": truth,
                          "question": question, "request": _request("vqa", prompt, question, images=[found])})
    return items


def load_librispeech(data: str, *, prompt: str, limit: int | None = None, images: str = "") -> list[dict]:
    files = _files(data)
    items: list[dict] = []
    for rel in sorted(r for r in files if r.endswith(".trans.txt")):
        folder = posixpath.dirname(rel)
        for n, raw in enumerate(storage.read_text(files[rel]).splitlines(), start=1):
            utt, _, text = raw.strip().partition(" ")
            if not utt:
                continue
            audio = posixpath.join(folder, utt + ".flac") if folder else utt + ".flac"
            if audio not in files:
                raise configlib.ConfigError(f"{files[rel]} line {n}: {utt}.flac is not beside it")
            if limit is not None and len(items) >= limit:
                return items
            items.append({"idx": len(items), "task": "asr", "id": utt, "ref_text": text,
                          "request": _request("asr", prompt, "", audios=[files[audio]])})
    if not items:
        raise configlib.ConfigError(f"--data {data}: no LibriSpeech <spk>-<chapter>.trans.txt found")
    return items


def load_libritts(data: str, *, prompt: str, limit: int | None = None, images: str = "") -> list[dict]:
    files = _files(data)
    texts = sorted(r for r in files if r.endswith(".normalized.txt"))
    if not texts:
        raise configlib.ConfigError(f"--data {data}: no LibriTTS <utt>.normalized.txt found")
    items: list[dict] = []
    for rel in texts[:limit]:
        text = storage.read_text(files[rel]).strip()
        if text:
            utt = posixpath.basename(rel)[: -len(".normalized.txt")]
            items.append({"idx": len(items), "task": "tts", "id": utt, "spoken": text,
                          "request": _request("tts", prompt, text)})
    return items


# ---- predictions -> metrics --------------------------------------------------------------------------------

def score_pope(items: list[dict], preds: list[dict], **_: Any) -> dict[str, dict]:
    out = {}
    for split in POPE_SPLITS:
        rows = [(it, p) for it, p in zip(items, preds) if it["split"] == split]
        if rows:
            m = pope_metrics([pope_answer(p.get("hyp") or "") for _, p in rows], [it["ref_text"] for it, _ in rows])
            out[f"pope/{split}"] = {**m, "n": len(rows), "n_failed": sum(not p["ok"] for _, p in rows)}
    return out


def score_mme(items: list[dict], preds: list[dict], **_: Any) -> dict[str, dict]:
    by_task: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for it, p in zip(items, preds):
        by_task[it["subtask"]].append((it, p))
    out = {}
    for subtask, rows in by_task.items():
        m = mme_subtask_metrics([p.get("hyp") or "" for _, p in rows], [it["ref_text"] for it, _ in rows])
        out[f"mme/{subtask}"] = {**m, "n": len(rows), "n_failed": sum(not p["ok"] for _, p in rows)}
    for group, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [out[f"mme/{s}"] for s in names if f"mme/{s}" in out]
        if present:
            out[f"mme/{group}"] = {"score": sum(m["score"] for m in present), "subtasks": len(present),
                                   "n": sum(m["n"] for m in present)}
    return out


def score_librispeech(items: list[dict], preds: list[dict], **_: Any) -> dict[str, dict]:
    refs = [scoring.librispeech_words(it["ref_text"], hypothesis=False) for it in items]
    hyps = [scoring.librispeech_words(p.get("hyp") or "", hypothesis=True) for p in preds]
    return {"librispeech": {**scoring.corpus_wer(refs, hyps), "n": len(items),
                            "n_failed": sum(not p["ok"] for p in preds)}}


def score_libritts(items: list[dict], preds: list[dict], *, asr_model: str = "", **_: Any) -> dict[str, dict]:
    from pipelines.eval.whisper import english_normalizer

    norm = english_normalizer(asr_model)
    refs = [scoring.whisper_english_words(it["spoken"], norm) for it in items]
    hyps = [scoring.whisper_english_words(p.get("transcript") or "", norm) for p in preds]
    spoken = [i for i, p in enumerate(preds) if p.get("speech_frames")]
    out = {**scoring.corpus_wer(refs, hyps), "n": len(items), "n_failed": sum(not p["ok"] for p in preds),
           "n_no_speech": len(items) - len(spoken)}
    if spoken:
        out["wer_spoken"] = scoring.corpus_wer([refs[i] for i in spoken], [hyps[i] for i in spoken])["wer"]
    return {"libritts": out}


@dataclass(frozen=True)
class Benchmark:
    name: str
    prompt: str                       # the reference's wording: {text} and media placeholders
    sampler: tuple[str, ...]          # sampler overrides applied before the user's (the reference's settings)
    load: Callable[..., list[dict]]   # (data, prompt=, limit=, images=) -> eval items
    score: Callable[..., dict[str, dict]]   # (items, preds, asr_model=) -> {row: {metric: value, "n": n}}
    needs_asr_model: bool = False


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    # MME in the reference: question then image, 8-token canvas, 8 steps (tools/evaluate_imageqa_mme.py);
    # POPE asks the same kind of yes/no question and is run the same way.
    Benchmark("pope", f"{{text}}\n{IMAGE_PLACEHOLDER}", ("vqa.length=8", "vqa.steps=8"), load_pope, score_pope),
    Benchmark("mme", f"{{text}}\n{IMAGE_PLACEHOLDER}", ("vqa.length=8", "vqa.steps=8"), load_mme, score_mme),
    # tools/evaluate_asr.py: canvas 0.2 x the prompt, steps half of it (the asr task's own sizing)
    Benchmark("librispeech", f"Convert the speech to text.\n{AUDIO_PLACEHOLDER}", (), load_librispeech,
              score_librispeech),
    # tools/evaluate_libritts.py: canvas 3.5 x the text's tokens, steps half of it, repetition penalty 1.2
    Benchmark("libritts", "Convert the text to speech.\n{text}", ("tts.repetition_penalty=1.2",), load_libritts,
              score_libritts, needs_asr_model=True),
)}


def get(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise configlib.ConfigError(f"--benchmark {name!r}: unknown; benchmarks: {list(BENCHMARKS)}") from None


def prompt_for(bench: Benchmark, prompt: str) -> str:
    """"reference" -> the benchmark's wording; "template" as is; any other wording must hold {text} where the
    task reads text (pope, mme, libritts)."""
    if prompt in ("", "reference"):
        return bench.prompt
    if prompt != "template" and "{text}" in bench.prompt and "{text}" not in prompt:
        raise configlib.ConfigError(f"--prompt {prompt!r}: must contain {{text}} (where the question or the text "
                                    f"to read goes), or be 'reference' or 'template'")
    return prompt
