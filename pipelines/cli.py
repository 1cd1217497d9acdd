"""`omnidiff <command> ...`: one entry point that hands the rest of the command line to the module that owns it.

Each command is also `python -m <module> ...` (what `ray job submit -- python -m ...` runs on a cluster). Every
command exits with the status of one table, common/cli.py.
"""
from __future__ import annotations

import importlib
import sys

from common import cli

COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("model.plan", "memory and FLOP plan of a model preset on N GPUs (meta device, no weights)"),
    "tokenize": ("tokenize_jobs.run", "Ray Data job: raw corpus -> token shards (local or s3://)"),
    "train": ("pipelines.train.trainer", "Ray Train FSDP2 training from token shards, tracked in MLflow"),
    "import": ("pipelines.import_pretrained", "pretrained HF checkpoint (e.g. released Omni-Diffusion) -> export"),
    "sample": ("pipelines.infer.sample", "any-to-any sampling from an exported checkpoint"),
    "generate": ("pipelines.infer.generate", "batch inference over a prompts JSONL on Ray Data"),
    "eval": ("pipelines.eval.evaluate", "per-task evaluation (WER, accuracy, classifier accuracy)"),
    "bench": ("bench.cli", "benchmarks: each stage against its bare floor"),
    "demo": ("demo.run", "the whole pipeline on the built-in digit corpus (what `make demo` runs)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: omnidiff <command> [options]   (omnidiff <command> --help for each)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join([*lines, "", cli.EXIT_STATUS_HELP])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return cli.OK
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"omnidiff: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return cli.BAD_INPUT
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or cli.OK)


if __name__ == "__main__":
    sys.exit(main())
