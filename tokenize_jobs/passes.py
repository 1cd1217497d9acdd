"""`python -m tokenize_jobs.passes`: one tokenize pass per input kind over a data root, each on its own.

    python -m tokenize_jobs.passes --root s3://omnidiff-data --config configs/tokenize/default.yaml

For each kind, the pass reads `<root>/raw/<kind>/` and writes `<root>/tokens/<kind>/` (tokenize_jobs/run.py).
A kind whose raw prefix is missing or empty is skipped with a log line; a pass that fails (a storage outage, a
locked output, a bad config) is reported and the next kind still runs. This is what the RayJob and the
scheduled RayCronJob run: one missing or failing input kind never stops the others.

Exit status: 0 when every kind is done or skipped; otherwise 16 + the sum of the failed kinds' bits
(text 1, image-text 2, speech-text 4, messages 8), so the status alone says which kinds failed; the summary's
last line names them with each one's own exit status (common/cli.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from common import cli, configlib, storage
from tokenize_jobs.config import KINDS, TokenizeJobConfig
from tokenize_jobs.run import run_job

# The bit of each kind in the exit status: a fixed order, independent of --kinds.
KIND_BITS = {"text": 1, "image-text": 2, "speech-text": 4, "messages": 8}
FAILED_BASE = 16


@dataclass
class PassResult:
    kind: str
    status: str                 # "done" | "skipped" | "failed"
    detail: str = ""
    exit_code: int = cli.OK
    seconds: float = 0.0


def raw_uri(root: str, kind: str) -> str:
    return storage.join(root, "raw", kind) + "/"


def tokens_uri(root: str, kind: str) -> str:
    return storage.join(root, "tokens", kind) + "/"


def _has_inputs(uri: str) -> bool:
    try:
        return bool(storage.find(uri))   # a missing prefix lists as nothing
    except FileNotFoundError:
        return False


def run_passes(cfg: TokenizeJobConfig, root: str, kinds: Sequence[str] = tuple(KIND_BITS)) -> list[PassResult]:
    """Every kind's pass in turn; a failure is recorded and the next kind runs."""
    storage.set_policy(cfg.storage.policy())
    results = []
    for kind in kinds:
        t0 = time.perf_counter()
        src, dst = raw_uri(root, kind), tokens_uri(root, kind)
        try:
            if not _has_inputs(src):
                print(f"[passes] {kind}: skipped, no inputs under {src}", flush=True)
                results.append(PassResult(kind, "skipped", f"no inputs under {src}"))
                continue
            print(f"[passes] {kind}: {src} -> {dst}", flush=True)
            s = run_job(cfg, kind, src, dst)
            results.append(PassResult(kind, "done", f"{s['inputs_tokenized']} tokenized, "
                                                    f"{s['inputs_quarantined']} quarantined",
                                      seconds=time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - one kind's failure must not stop the others
            code = cli.exit_code(e)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"[passes] {kind}: failed (exit status {code}): {type(e).__name__}: {first}", flush=True)
            results.append(PassResult(kind, "failed", f"{type(e).__name__}: {first}", code,
                                      time.perf_counter() - t0))
    return results


def exit_status(results: Sequence[PassResult]) -> int:
    failed = [r for r in results if r.status == "failed"]
    return FAILED_BASE + sum(KIND_BITS[r.kind] for r in failed) if failed else cli.OK


def summary(results: Sequence[PassResult]) -> str:
    width = max(len(r.kind) for r in results)
    lines = [f"{r.kind:<{width}}  {r.status:<7}  {r.seconds:6.0f}s  {r.detail}" for r in results]
    failed = [f"{r.kind} (exit {r.exit_code})" for r in results if r.status == "failed"]
    lines.append(f"failed: {', '.join(failed)}" if failed else "every kind done or skipped")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tokenize_jobs.passes",
        description="Tokenize <root>/raw/<kind>/ into <root>/tokens/<kind>/ for each input kind, independently: a "
                    "missing raw prefix is skipped, a failed kind does not stop the others.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 every kind done or skipped; 16 + bits of the failed kinds (text 1, image-text 2, "
               "speech-text 4, messages 8)\n  e.g. 20 = speech-text failed; 2 bad arguments or config")
    p.add_argument("--root", required=True, help="data root holding raw/<kind>/ (local path or s3://bucket/prefix)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KIND_BITS), help="kinds to run, in order")
    p.add_argument("--config", default=None, help="YAML job config for every pass (configs/tokenize/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every pass")
    return p


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = configlib.load(TokenizeJobConfig, args.config, args.overrides)
    results = run_passes(cfg, args.root.rstrip("/"), args.kinds)
    print(summary(results), flush=True)
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
