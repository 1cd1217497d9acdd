"""What the first run of a job fits its tokenizers on (driver): the corpus text for the BPE and the first audio
files for EnCodec's offline k-means, read through the same listing and expansion as the job (sources.py)."""
from __future__ import annotations

import json
from typing import Any, Iterator

from common import storage
from model.prompts import TaskTemplates
from model.tasks import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, TASKS
from model.tokenizers.base import BadInput
from tokenize_jobs.config import InputConfig
from tokenize_jobs.sources import expand_unit, full_path, read_media


def fit_texts(ctx: dict[str, Any], units: list[dict[str, Any]], cfg: InputConfig, max_texts: int,
              templates: TaskTemplates) -> Iterator[str]:
    """Corpus text for the BPE: message contents (placeholders removed), captions, transcripts, texts, and the
    task templates' own wording (every sample contains it)."""
    n = 0
    for task in TASKS:
        tpl = templates.get(task)
        for t in (tpl.user, tpl.system):
            t = t.replace(IMAGE_PLACEHOLDER, " ").replace(AUDIO_PLACEHOLDER, " ").replace("{text}", " ")
            if t.strip():
                yield t
    for unit in units:
        for text in _unit_texts(ctx, unit, cfg):
            yield text
            n += 1
            if n >= max_texts:
                return


def _unit_texts(ctx: dict[str, Any], unit: dict[str, Any], cfg: InputConfig) -> Iterator[str]:
    try:
        if unit["type"] == "pair":
            yield storage.read_bytes(full_path(ctx, unit["files"][1]["rel"])).decode("utf-8").strip()
        elif unit["type"] == "txt":
            yield storage.read_bytes(full_path(ctx, unit["files"][0]["rel"]))[: cfg.max_text_file_bytes].decode("utf-8")
        elif unit["type"] in ("jsonl", "chapter", "parquet"):
            for row in expand_unit(ctx, unit, cfg, set()):
                if row["status"] != "pending":
                    continue
                spec = json.loads(row["spec"])
                if "line" in spec:
                    rec = json.loads(spec["line"])
                    if not isinstance(rec, dict):
                        continue
                    for m in rec.get("messages") or []:
                        c = m.get("content") if isinstance(m, dict) else None
                        if isinstance(c, str):
                            yield c.replace(IMAGE_PLACEHOLDER, " ").replace(AUDIO_PLACEHOLDER, " ")
                    for key in ("text", "prompt"):
                        if isinstance(rec.get(key), str):
                            yield rec[key]
                elif "text" in spec:
                    yield spec["text"]
                elif "caption_text" in spec:
                    yield spec["caption_text"]
    except storage.StorageError:
        raise   # a fit on the part of the corpus that happened to be readable would differ from run to run
    except Exception:  # noqa: BLE001 - a bad file is quarantined later; it just does not join the fit
        return


def fit_audio_refs(ctx: dict[str, Any], units: list[dict[str, Any]], cfg: InputConfig) -> Iterator[bytes]:
    """Raw bytes of the corpus' first audio files (for the EnCodec k-means when speech.weights=offline)."""
    for unit in units:
        try:
            if unit["type"] == "chapter":
                for ref in unit["files"][1:]:
                    yield storage.read_bytes(full_path(ctx, ref["rel"]))
            elif unit["type"] == "jsonl":
                for row in expand_unit(ctx, unit, cfg, set()):
                    if row["status"] != "pending":
                        continue
                    spec = json.loads(row["spec"])
                    try:
                        rec = json.loads(spec["line"])
                        paths = rec.get("audios") or ([rec["audio"]] if "audio" in rec else [])
                        for p in paths:
                            yield read_media(ctx, spec["dir"], p, cfg)
                    except (ValueError, KeyError, TypeError, AttributeError, BadInput):
                        continue
        except storage.StorageError:
            raise
        except Exception:  # noqa: BLE001 - as in _unit_texts
            continue
