"""The end-of-run summary: a dict (returned by `run_job`, asserted on by tests) and the table printed from it."""
from __future__ import annotations

from typing import Any


def build(*, run_id: str, output: str, kind: str, input_uri: str, units_listed: int, units_skipped: int,
          run: dict[str, Any], totals: dict[str, Any], wall_s: float, orphans_removed: list[str],
          took_over: str | None) -> dict[str, Any]:
    inputs = run["inputs_tokenized"] + run["inputs_quarantined"]
    return {
        "run_id": run_id, "output": output, "kind": kind, "input": input_uri,
        "units_listed": units_listed, "units_skipped": units_skipped,
        "inputs_seen": inputs, "inputs_tokenized": run["inputs_tokenized"],
        "inputs_quarantined": run["inputs_quarantined"],
        "quarantined_by_reason": dict(sorted(run["quarantined_by_reason"].items())),
        "samples_written": run["samples_written"],
        "samples_per_task": dict(sorted(run["samples_per_task"].items())),
        "tokens_per_task": dict(sorted(run["tokens_per_task"].items())),
        "tokens": sum(run["tokens_per_task"].values()),
        "shards_written": run["shards"], "bytes_written": run["bytes"], "driver_bytes": run["driver_bytes"],
        "wall_s": round(wall_s, 2), "samples_per_s": round(run["samples_written"] / wall_s, 1) if wall_s > 0 else 0.0,
        "orphans_removed": orphans_removed, "took_over_lock_of": took_over,
        "totals": totals,
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_table(s: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [
        ("run", s["run_id"]),
        ("output", s["output"]),
        ("input", f"{s['input']} ({s['kind']})"),
        ("listed units", f"{s['units_listed']:,} ({s['units_skipped']:,} already done, skipped)"),
        ("inputs", f"{s['inputs_seen']:,} = {s['inputs_tokenized']:,} tokenized + "
                   f"{s['inputs_quarantined']:,} quarantined"),
    ]
    for reason, n in s["quarantined_by_reason"].items():
        rows.append((f"  quarantined: {reason}", f"{n:,}"))
    rows.append(("samples", f"{s['samples_written']:,}"))
    for task, n in s["samples_per_task"].items():
        rows.append((f"  {task}", f"{n:,} samples, {s['tokens_per_task'].get(task, 0):,} tokens"))
    rows += [
        ("tokens", f"{s['tokens']:,}"),
        ("shards", f"{s['shards_written']:,} ({_fmt_bytes(s['bytes_written'])}; the driver received "
                   f"{_fmt_bytes(s['driver_bytes'])})"),
        ("wall time", f"{s['wall_s']:.1f} s"),
        ("samples/s", f"{s['samples_per_s']:,.1f}"),
    ]
    if s["orphans_removed"]:
        rows.append(("orphans removed", f"{len(s['orphans_removed'])} (files of an interrupted run)"))
    if s["took_over_lock_of"]:
        rows.append(("stale lock taken over", s["took_over_lock_of"]))
    t = s["totals"]
    rows.append(("output totals", f"{t['inputs_seen']:,} inputs ({t['inputs_quarantined']:,} quarantined), "
                                  f"{t['samples_written']:,} samples in {t['shards']:,} shards"))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [line])
