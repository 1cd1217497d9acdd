"""`omnidiff generate`: batch inference over a prompts JSONL on Ray Data.

    omnidiff generate --checkpoint s3://bucket/run/export --input s3://bucket/prompts.jsonl \\
        --output s3://bucket/generated/ [--actors 4] [--preset demo] [steps=32 ...]

Input: one messages-format prompt per line, as the tokenize job reads (`{"messages": [...], "images": [...],
"audios": [...], "task"?, "id"?}`); a final assistant turn, if any, is dropped (it is the reference answer).
"task" names the answer's direction; without it the task is inferred from the placeholders (prompts without
an assistant turn then get text answers). Media paths are relative to the JSONL's folder (or absolute, or
s3://).

Each Ray actor loads the export once (one GPU per actor when the cluster has GPUs, half a CPU otherwise) and
samples its batches with `pipelines.infer.predictor.Predictor`. Output folder:

    results.jsonl   one line per answered prompt, in input order: {"line", "id", "task", "text"?, "image"?,
                    "audio"?, "n_tokens"}; "line" is the 1-based input line number, "id" the line's own "id"
    errors.jsonl    one line per prompt that could not be answered: {"line", "id", "reason", "error"}
    media/<line>.png / .wav   generated images and speech (written by the actors: on a multi-node cluster use
                    an s3:// output so every actor writes to the same place)
"""
from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
import time
import traceback
from typing import Any

import numpy as np

from common import cli, configlib, storage
from common.rayutil import init_ray
from model.tokenizers.base import BadInput
from pipelines.infer.predictor import Predictor, request_from_line
from pipelines.infer.presets import SamplerPresets, load_presets


def input_base_dir(uri: str) -> str:
    """Folder that relative media paths in a JSONL file are resolved against."""
    if storage.is_s3(uri):
        return posixpath.dirname(uri)
    return os.path.dirname(os.path.abspath(uri))


def read_lines(uri: str) -> list[dict[str, Any]]:
    """Non-blank lines of a JSONL file as {"line": 1-based number, "text": raw line}."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"--input {uri} does not exist") from None
    return [{"line": i + 1, "text": raw} for i, raw in enumerate(text.splitlines()) if raw.strip()]


class GenerateWorker:
    """Ray Data UDF (one instance per actor): raw JSONL lines -> one JSON record per line (result or error)."""

    def __init__(self, checkpoint: str, presets: dict, output: str, base_dir: str, device: str = "auto"):
        self.predictor = Predictor.from_export(checkpoint, device, configlib.from_dict(SamplerPresets, presets))
        self.output, self.base_dir = output, base_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records: list[dict] = []
        prepared, where = [], []
        for line_no, raw in zip(batch["line"].tolist(), batch["text"].tolist()):
            rec: dict[str, Any] = {"line": int(line_no), "id": None}
            try:
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise BadInput("bad_json", f"not valid JSON: {e}") from None
                if isinstance(obj, dict):
                    rec["id"] = obj.get("id")
                req, _ = request_from_line(obj, self.base_dir, id=rec["id"])
                rec["task"] = req.task
                prepared.append(self.predictor.prepare(req))
                where.append(len(records))
            except (BadInput, ValueError) as e:
                rec.update(ok=False, reason=getattr(e, "reason", "bad_input"), error=str(e))
            records.append(rec)
        if prepared:
            try:
                outputs = self.predictor.run(prepared)
            except Exception as e:  # one failing generate call fails its batch's rows, not the job
                outputs = None
                for i in where:
                    records[i].update(ok=False, reason="generation_failed", error=f"{type(e).__name__}: {e}",
                                      traceback=traceback.format_exc(limit=3))
            for i, out in zip(where, outputs or []):
                rec = records[i]
                files = out.save(storage.join(self.output, "media"), stem=f"{rec['line']:06d}")
                rec.update(ok=True, n_tokens=int(out.canvas.shape[0]))
                if out.text is not None:
                    rec["text"] = out.text
                for kind, uri in files.items():
                    rec[kind] = posixpath.join("media", uri.replace("\\", "/").rsplit("/", 1)[-1])
        return {"line": np.array([r["line"] for r in records], dtype=np.int64),
                "record": np.array([json.dumps(r) for r in records], dtype=object)}


def actor_resources() -> tuple[dict[str, float], int]:
    """Per-actor resources and the number of GPUs in the cluster (0 = CPU actors at half a CPU each, which
    leaves room for Ray Data's own tasks on small machines)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    return ({"num_gpus": 1} if gpus else {"num_cpus": 0.5}), gpus


def map_with_actors(items: list[dict], udf: type, kwargs: dict, *, actors: int | None, batch_size: int
                    ) -> list[dict]:
    """Run `udf` over `items` on a Ray Data actor pool; returns the output rows."""
    import ray

    init_ray()   # joins $RAY_ADDRESS, else a local Ray bound to 127.0.0.1 (common/rayutil.py)
    resources, gpus = actor_resources()
    n = actors or max(1, gpus)
    ds = ray.data.from_items(items)
    ds = ds.map_batches(udf, fn_constructor_kwargs=kwargs, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=n), **resources)
    return ds.take_all()


def run_generate(checkpoint: str, input_uri: str, output: str, *, presets: SamplerPresets | None = None,
                 device: str = "auto", actors: int | None = None, local: bool = False) -> dict:
    """Generate an answer for every line of `input_uri`; writes results.jsonl / errors.jsonl / media under
    `output`. `local` runs in this process without Ray. Returns {"results", "errors", "n_ok", "n_errors"}."""
    presets = presets or SamplerPresets()
    items = read_lines(input_uri)
    kwargs = {"checkpoint": checkpoint, "presets": configlib.to_dict(presets), "output": output,
              "base_dir": input_base_dir(input_uri), "device": device}
    if local:
        worker = GenerateWorker(**kwargs)
        rows = []
        for start in range(0, len(items), presets.batch_size):
            chunk = items[start:start + presets.batch_size]
            out = worker({"line": np.array([x["line"] for x in chunk]), "text": np.array([x["text"] for x in chunk],
                                                                                      dtype=object)})
            rows += [{"line": ln, "record": rec} for ln, rec in zip(out["line"], out["record"])]
    else:
        rows = map_with_actors(items, GenerateWorker, kwargs, actors=actors, batch_size=presets.batch_size)
    records = sorted((json.loads(r["record"]) for r in rows), key=lambda r: r["line"])
    ok = [{k: v for k, v in r.items() if k != "ok"} for r in records if r.get("ok")]
    bad = [{k: v for k, v in r.items() if k not in ("ok", "task")} for r in records if not r.get("ok")]
    results_uri, errors_uri = storage.join(output, "results.jsonl"), storage.join(output, "errors.jsonl")
    storage.write_text_atomic(results_uri, "".join(json.dumps(r) + "\n" for r in ok))
    storage.write_text_atomic(errors_uri, "".join(json.dumps(r) + "\n" for r in bad))
    return {"results": results_uri, "errors": errors_uri, "n_ok": len(ok), "n_errors": len(bad)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnidiff generate", description=__doc__, epilog=cli.EXIT_STATUS_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training export folder (local or s3://)")
    p.add_argument("--input", required=True, help="prompts JSONL, messages format (local or s3://)")
    p.add_argument("--output", required=True, help="output folder (local or s3://)")
    p.add_argument("--actors", type=int, default=None, help="actor pool size (default: one per GPU, else 1)")
    p.add_argument("--device", default="auto", help="device inside each actor: auto, cpu, cuda")
    p.add_argument("--preset", default="project", help="sampler preset: project (default) | reference | demo | fast | "
                   "demo-fast (fast sampling: key/value cache, confidence threshold; docs/inference.md)")
    p.add_argument("--sampler-config", default=None, help="YAML file of SamplerPresets overrides")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS or a local one)")
    p.add_argument("overrides", nargs="*", help="sampler overrides: steps=32, t2i.temperature=1.0, batch_size=4")
    return p


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    presets = load_presets(args.preset, args.sampler_config, args.overrides)
    if not args.local:
        init_ray(args.ray_address)
    t0 = time.time()
    summary = run_generate(args.checkpoint, args.input, args.output, presets=presets, device=args.device,
                           actors=args.actors, local=args.local)
    print(f"{summary['n_ok']} answered, {summary['n_errors']} errors in {time.time() - t0:.1f}s: "
          f"{summary['results']} {summary['errors']}")
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
