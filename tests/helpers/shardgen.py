"""Write a tokenize job's output by hand: WebDataset shards + manifest.json, in the format tokenize_jobs/writer.py
writes and tokenize_jobs/shards.py reads.

Training tests use this instead of running a tokenize job, which keeps them fast and doubles as an executable
statement of the shard contract: if the real tokenize job and this helper ever disagree, one of them broke it.

Samples are synthetic but learnable: each task has a fixed answer pattern keyed on the prompt, so a few dozen
optimizer steps visibly lower the loss.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import webdataset as wds

from model.tasks import spec
from model.vocab import Modality, Vocab
from tokenize_jobs.shards import SAMPLE_INDEX_SUFFIX, build_sample_index


def small_vocab() -> Vocab:
    """A vocabulary small enough for a debug model to learn in a few steps."""
    return Vocab(text_size=48, text_tokenizer="test", n_q=2, audio_codebook_size=16, image_codebook_size=17,
                 image_tokenizer="pixel-4x4x1-17", speech_tokenizer="test@2q")


def _span(kind: Modality, vocab: Vocab, key: int, length: int) -> list[int]:
    """A deterministic span of `kind` ids keyed on `key` (so answers are predictable from prompts)."""
    pattern = (np.arange(length) + key) % 7
    if kind == Modality.TEXT:
        return (pattern + 2).tolist()
    if kind == Modality.IMAGE:
        return [vocab.boi_id, *vocab.image_ids(pattern % vocab.image_codebook_size).tolist(), vocab.eoi_id]
    codes = np.stack([pattern % vocab.audio_codebook_size] * vocab.n_q)       # (n_q, T)
    return [vocab.boa_id, *vocab.audio_ids(codes).tolist(), vocab.eoa_id]


def make_sample(task: str, vocab: Vocab, key: int, *, media_len: int = 16, text_len: int = 6
                ) -> tuple[np.ndarray, np.ndarray]:
    """<im_start><user> prompt <im_end> <im_start><assistant> answer <im_end> -> (input_ids int32, answer_mask)."""
    t = spec(task)   # the prompt holds the task's media, then text where its template takes {text}
    prompt: list[int] = []
    for kind in (*t.inputs, *((Modality.TEXT,) if t.needs_text or not t.inputs else ())):
        prompt += _span(kind, vocab, key, text_len if kind == Modality.TEXT else media_len)
    answer = _span(t.answer, vocab, key, text_len if t.answer == Modality.TEXT else media_len)
    head = [vocab.im_start_id, vocab.role_id("user"), *prompt, vocab.im_end_id,
            vocab.im_start_id, vocab.role_id("assistant")]
    body = answer + [vocab.im_end_id]
    ids = np.asarray(head + body, dtype=np.int32)
    mask = np.asarray([False] * len(head) + [True] * len(body), dtype=bool)
    return ids, mask


def write_shard_set(out: str | Path, vocab: Vocab, tasks: dict[str, int], *, samples_per_shard: int = 16,
                    seed: int = 0, media_len: int = 16, text_len: int = 6,
                    corrupt: dict[str, int] | None = None, tokenizers_dir: str | Path | None = None,
                    sample_index: bool = True) -> Path:
    """Write `tasks` (task -> number of samples) as shards under `out`; returns `out`.

    corrupt: {"shard": i} puts an out-of-range id (vocab.size) into a sample of shard i (a vocabulary mismatch
    that slipped through tokenization). tokenizers_dir: a saved TokenizerSet to copy into `out/tokenizers`.
    sample_index: write each shard's sample index as the tokenize job does (False: shards as written before
    indexes existed, which the trainer reads whole)."""
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = [(task, i) for task, n in tasks.items() for i in range(n)]
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    shards, per_task = [], {t: n for t, n in tasks.items()}
    for s, start in enumerate(range(0, len(items), samples_per_shard)):
        rel = f"shards/test-{s:05d}.tar"
        buf = io.BytesIO()
        with wds.TarWriter(buf) as tw:
            for j, (task, i) in enumerate(items[start:start + samples_per_shard]):
                ids, mask = make_sample(task, vocab, int(rng.integers(0, 1000)), media_len=media_len,
                                        text_len=text_len)
                if corrupt and corrupt.get("shard") == s and j == 0:
                    ids[len(ids) // 2] = vocab.size
                key = f"{task}_{i:06d}"
                meta = {"task": task, "source": "shardgen", "fingerprint": "test", "n_tokens": int(ids.size),
                        "n_answer": int(mask.sum())}
                tw.write({"__key__": key, "input_ids.npy": ids, "answer_mask.npy": mask, "meta.json": meta})
        data = buf.getvalue()
        (out / rel).write_bytes(data)
        shards.append({"path": rel, "samples": min(samples_per_shard, len(items) - start), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
        if sample_index:
            blob = build_sample_index(data, rel, vocab.eos_id)
            index_rel = f"index/test-{s:05d}{SAMPLE_INDEX_SUFFIX}"   # where the tokenize job puts it
            (out / "index").mkdir(exist_ok=True)
            (out / index_rel).write_bytes(blob)
            shards[-1]["samples_index"] = {"path": index_rel, "bytes": len(blob),
                                           "sha256": hashlib.sha256(blob).hexdigest()}
    if tokenizers_dir is not None:
        import shutil
        shutil.copytree(tokenizers_dir, out / "tokenizers", dirs_exist_ok=True)
    manifest = {
        "format_version": 1, "vocab": vocab.to_dict(), "tokenizers": {}, "job": {"kind": "shardgen"},
        "shards": shards,
        "counts": {"inputs_seen": len(items), "inputs_tokenized": len(items), "inputs_quarantined": 0,
                   "samples_written": len(items), "samples_per_task": per_task},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def tasks_of(shard_sets: Sequence[str | Path]) -> list[str]:
    tasks: set[str] = set()
    for s in shard_sets:
        tasks |= set(json.loads((Path(s) / "manifest.json").read_text())["counts"]["samples_per_task"])
    return sorted(tasks)
