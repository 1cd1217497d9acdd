"""`omnidiff import`: a pretrained HF-layout checkpoint + a tokenizer set -> an export that `sample`, `generate`
and `eval` read, without training.

    omnidiff import --weights /models/Omni-Diffusion --tokenizers s3://bucket/tok/omni-sft/tokenizers \
        --out s3://bucket/exports/omni-diffusion --model dream-7b \
        --skip-module speech_encoder --skip-module speech_projector

The released Omni-Diffusion checkpoint and the tokenizers of `configs/tokenize/omni-diffusion.yaml` fit each
other row for row (176,264 ids), so its weights are read as they are: the checkpoint must have exactly as many
embedding rows as the tokenizer set's vocabulary (no row is initialised here). Its speech encoder and projector
are not part of this model (speech enters as codes): name them with --skip-module (model/weights.py).
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import cli, configlib
from model.config import ModelConfig
from model.tokenizers import TokenizerSet
from model.weights import EXTRA_MODULES, CheckpointError, read_pretrained
from pipelines import export


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnidiff import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="HF safetensors dir (model.safetensors[.index.json]) or file, local or s3://")
    p.add_argument("--tokenizers", required=True,
                   help="tokenizer set folder (a tokenize output's tokenizers/, local or s3://); its vocabulary must "
                        "match the checkpoint's rows")
    p.add_argument("--out", required=True, help="export folder to write (local or s3://)")
    p.add_argument("--model", default="dream-7b", help=f"model preset, one of {ModelConfig.preset_names()}")
    p.add_argument("--layout", default="dream", choices=["dream", "llada"], help="the checkpoint's key names")
    p.add_argument("--skip-module", action="append", default=[], choices=sorted(EXTRA_MODULES),
                   help="a checkpoint module this model does not have, left out (repeat for each)")
    p.add_argument("overrides", nargs="*", help="model settings as key=value, e.g. seq_len=8192")
    return p


def import_pretrained(weights: str, tokenizers: str, out: str, *, model: str = "dream-7b",
                      layout: str = "dream", skip_modules: list[str] | tuple[str, ...] = (),
                      overrides: list[str] | tuple[str, ...] = ()) -> export.ExportConfig:
    """Write the export; returns its config. Raises CheckpointError when weights and vocabulary disagree."""
    vocab = TokenizerSet.read_vocab(tokenizers)
    cfg = configlib.from_dict(ModelConfig, {"preset": model, **configlib.parse_overrides(overrides),
                                            "vocab_size": vocab.size, "weights_layout": layout})
    # fp32: the export format's dtype; "error": the checkpoint's rows must be the vocabulary's, none invented
    state = read_pretrained(weights, cfg, layout, vocab.size, vocab_extension="error", dtype=torch.float32,
                            skip_modules=skip_modules)
    return export.write(out, state, model_config=cfg, vocab=vocab, tokenizers_uri=tokenizers, step=0,
                        run_name=f"import:{weights}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = import_pretrained(args.weights, args.tokenizers, args.out, model=args.model, layout=args.layout,
                                   skip_modules=args.skip_module, overrides=args.overrides)
    except (CheckpointError, configlib.ConfigError, FileNotFoundError) as e:
        print(f"omnidiff import: error: {e}", file=sys.stderr)
        return cli.BAD_INPUT
    print(f"wrote {args.out} ({', '.join(config.files)})")
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
