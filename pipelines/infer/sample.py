"""`omnidiff sample`: ask an exported checkpoint one thing, in any direction.

    omnidiff sample --checkpoint runs/demo/train/export --task t2i --text "a handwritten seven" --out out/
    omnidiff sample --checkpoint s3://bucket/run/export --task asr --audio seven.wav steps=16
    omnidiff sample --checkpoint ... --task tts --text seven tts.length_ratio=60 temperature=0.5

Writes answer.txt / image.png / speech.wav to --out (when given) and prints the text answer (or the files).
Trailing `key=value` words override the task's sampler settings (pipelines/infer/predictor.py SamplerPresets).
"""
from __future__ import annotations

import argparse
import sys

from common import cli
from model.tasks import TASKS, all_tasks
from model.tokenizers.base import BadInput
from pipelines.infer.predictor import Predictor, Request
from pipelines.infer.presets import SAMPLER_KEYS, load_presets

NEEDS = {t.name: (("text",) if t.needs_text else ()) + tuple(m.name.lower() for m in t.inputs)
         for t in all_tasks()}


def build_parser() -> argparse.ArgumentParser:
    needs = "; ".join(f"{t}: {'+'.join(n) or '-'}" for t, n in NEEDS.items())
    p = argparse.ArgumentParser(
        prog="omnidiff sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"inputs each task needs: {needs}. Sampler keys: {', '.join(SAMPLER_KEYS)}, batch_size, seed.\n"
               f"{cli.EXIT_STATUS_HELP}")
    p.add_argument("--checkpoint", required=True, help="training export folder (local or s3://)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--text", default="", help="text input (t2i caption, tts text, vqa question, text prompt)")
    p.add_argument("--image", default=None, help="image file (i2t, vqa, svqa)")
    p.add_argument("--audio", default=None, help="audio file (asr, s2i, svqa, sqa)")
    p.add_argument("--out", default=None, help="folder (local or s3://) for answer.txt / image.png / speech.wav")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--preset", default="project", help="sampler preset: project (default) | reference | demo | fast | "
                   "demo-fast (fast sampling: key/value cache, confidence threshold; docs/inference.md)")
    p.add_argument("--sampler-config", default=None, help="YAML file of SamplerPresets overrides")
    p.add_argument("overrides", nargs="*", help="sampler overrides, e.g. steps=32 temperature=0.5")
    return p


def check_inputs(task: str, text: str, image: str | None, audio: str | None) -> None:
    given = {"text": bool(text.strip()), "image": image is not None, "audio": audio is not None}
    missing = [k for k in NEEDS[task] if not given[k]]
    if missing:
        raise BadInput("missing_input", f"--task {task} needs {' and '.join('--' + m for m in missing)}")
    extra = [k for k in ("image", "audio") if given[k] and k not in NEEDS[task]]
    if extra:
        raise BadInput("unused_input", f"--task {task} takes no {' or '.join('--' + e for e in extra)}")


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_inputs(args.task, args.text, args.image, args.audio)
    presets = load_presets(args.preset, args.sampler_config, args.overrides, tasks=[args.task])
    predictor = Predictor.from_export(args.checkpoint, args.device, presets)
    request = Request(task=args.task, text=args.text, images=[args.image] if args.image else [],
                      audios=[args.audio] if args.audio else [])
    out = predictor.predict([request])[0]
    written = out.save(args.out) if args.out else {}
    if out.text is not None:
        print(out.text)
    for kind, uri in written.items():
        print(f"wrote {kind}: {uri}", file=sys.stderr)
    if out.audio_codes is not None:
        print(f"speech: {out.audio_codes.shape[1]} frames ({len(out.wav) / out.sample_rate:.2f} s)", file=sys.stderr)
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
