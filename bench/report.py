"""The result table: one row per figure, (measure, value, ratio, goal, met), as aligned text for the terminal
and as Markdown for docs; each benchmark's rows come from its result dict (the JSON it writes)."""
from __future__ import annotations

from typing import Any

from bench.common import fmt, goal_check

Row = tuple[str, str, str, str, str]


def _met(r: dict[str, Any]) -> str:
    return {True: "yes", False: "NO", None: "-"}[r.get("met")]


def _tokenize_rows(r: dict[str, Any]) -> list[Row]:
    """Tokenize: job vs bare per modality, 2 actors vs 1, peak memory on 1x vs 10x the inputs."""
    rows: list[Row] = []
    for mod, e in r["modalities"].items():
        rows.append((f"tokenize {mod}: job vs bare samples/s (1 actor = 1 core)",
                     f"{fmt(e['job_samples_per_s'])} vs {fmt(e['bare_samples_per_s'])}",
                     fmt(e["job_vs_bare_per_core"]), e["goal"], _met(e)))
        rows.append((f"  {mod}: end-to-end job samples/s (with {fmt(e['job_startup_s'], 2)} s start-up)",
                     fmt(e["job_end_to_end_samples_per_s"]), fmt(e["end_to_end_vs_bare"]), "", ""))
        rows.append((f"  {mod}: bytes received by the driver ({e['shards']} shards), per shard",
                     f"{e['driver_bytes']:,}", fmt(e["driver_bytes_per_shard"]), "O(shards)", ""))
    for mod, w in r["workers"].items():
        rows.append((f"tokenize {mod}: 2 actors vs 1 (samples/s)",
                     f"{fmt(w['actors_2'])} vs {fmt(w['actors_1'])}", fmt(w["speedup_2_vs_1"]), w["goal"], _met(w)))
        rows.append((f"  {mod}: 2 bare loops at once vs 1 (the machine's ceiling)",
                     fmt(w["bare_2_processes"]), fmt(w["bare_2_vs_1"]), "", ""))
        rows.append((f"  {mod}: 2 actors vs 1, end to end", "", fmt(w["speedup_2_vs_1_end_to_end"]), "", ""))
        rows.append((f"  {mod}: 2 actors vs 2 bare loops at once",
                     f"{fmt(w['actors_2'])} vs {fmt(w['bare_2_processes'])}", fmt(w["job_vs_bare_2"]),
                     w["job_vs_bare_2_goal"]["goal"], _met(w["job_vs_bare_2_goal"])))
    w = r["writer"]
    rows.append((f"tokenize shard writer vs raw tarfile, same bytes ({w['samples']} samples, MB/s)",
                 f"{fmt(w['writer_mb_per_s'])} vs {fmt(w['tarfile_mb_per_s'])}", fmt(w["writer_vs_tarfile"]),
                 "", "" if w["same_bytes"] else "NOT SAME BYTES"))
    m = r["memory"]
    rows.append((f"tokenize memory peak RSS (MiB), {m['x1']['inputs']} vs {m['x10']['inputs']} inputs",
                 f"{m['x1']['peak_rss_mib']:.0f} -> {m['x10']['peak_rss_mib']:.0f}",
                 fmt(m["peak_ratio_10x"]), m["goal"], _met(m)))
    return rows


def _read_rows(r: dict[str, Any]) -> list[Row]:
    """Read: the trainer's stream vs raw tar reading and vs what training consumes."""
    rows: list[Row] = []
    rows.append(("read: trainer stream vs raw tar (samples/s)",
                 f"{fmt(r['reader_samples_per_s'])} vs {fmt(r['raw_tar_samples_per_s'])}",
                 fmt(r["reader_vs_raw_tar"]), "", ""))
    rows.append(("read: trainer stream vs raw tar (MB/s)",
                 f"{fmt(r['reader_mb_per_s'])} vs {fmt(r['raw_tar_mb_per_s'])}", "", "", ""))
    rows.append((f"read: stream vs {r['training_model']} model training (samples/s)",
                 f"{fmt(r['reader_samples_per_s'])} vs {fmt(r['training_samples_per_s'])}",
                 fmt(r["reader_vs_training"]), r["goal"], _met(r)))
    return rows


def _train_rows(r: dict[str, Any]) -> list[Row]:
    """Train: Ray Train vs the floor, 2 workers vs 1, MFU."""
    rows: list[Row] = []
    b, one, two = r["bare"], r["ray_1"], r["ray_2"]
    rows.append((f"train {r['model']}: Ray Train 1 worker vs bare (steps/s)",
                 f"{fmt(one['steps_per_s'])} vs {fmt(b['steps_per_s'])}", fmt(r["ray_vs_bare"]),
                 r["goal"], _met(r)))
    rows.append(("  tokens/s (real, packed): Ray 1 worker vs bare",
                 f"{fmt(one['tokens_per_s'])} vs {fmt(b['tokens_per_s'])}", "", "", ""))
    rows.append(("  Ray Train start-up (fit() -> first steady step), s", fmt(one["startup_s"]), "", "", ""))
    if two:
        rows.append(("train: 2 workers vs 1 (tokens/s, same cores)",
                     f"{fmt(two['tokens_per_s'])} vs {fmt(one['tokens_per_s'])}",
                     fmt(r["two_vs_one_tokens_per_s"]), "", ""))
    rows.append((f"train MFU vs measured {r['matmul_peak']['dtype']} matmul peak "
                 f"{fmt(r['matmul_peak']['gflops']['max'])} GFLOP/s per worker",
                 f"bare {r['mfu_bare']['gflops']:.1f}, Ray {r['mfu_ray_1']['gflops']:.1f} GFLOP/s",
                 f"{r['mfu_bare']['mfu']:.2f} / {r['mfu_ray_1']['mfu']:.2f}", "", ""))
    return rows


def _sample_rows(r: dict[str, Any]) -> list[Row]:
    """Sample: denoising step vs plain forward per batch, the image canvas head, MAGVIT-v2 encoding."""
    rows: list[Row] = []
    for B, e in r["by_batch"].items():
        g = goal_check("sample.step_vs_forward", e["step_vs_forward"]["median"])
        rows.append((f"sample B={B}: denoising step vs plain forward (s)",
                     f"{fmt(e['step_s'])} vs {fmt(e['forward_s'])}", fmt(e["step_vs_forward"]), g["goal"],
                     _met(g)))
        rows.append((f"  B={B}: generated tokens/s", fmt(e["tokens_per_s"]), "", "", ""))
    im = r["image_canvas"]
    rows.append((f"sample B={im['batch']} image canvas: head over {im['image_ids']:,} image ids vs all "
                 f"{im['vocab_rows']:,} rows (s per step)",
                 f"{fmt(im['subset_step_s'])} vs {fmt(im['full_step_s'])}", fmt(im["subset_vs_full"]), "", ""))
    rows += _fast_rows(r.get("fast"))
    m = r["magvit2_encode"]
    for bs, v in m["images_per_s"].items():
        rows.append((f"MAGVIT-v2 {m['preset']} encode 256x256, batch {bs} (images/s)", fmt(v), "", "", ""))
    return rows


def _fast_rows(f: dict[str, Any] | None) -> list[Row]:
    """Fast sampling per canvas: tokens/s of the cache and cache + threshold vs the plain sampler, and each
    one's cost in full forwards per generated token."""
    rows: list[Row] = []
    for name, c in (f or {}).get("canvases", {}).items():
        plain = c["plain"]
        for setting in ("cache", "cache+threshold"):
            e = c[setting]
            g = (goal_check("sample.fast_media_speedup", e["speedup"]["median"]) if name != "text"
                 else {"goal": "", "met": None})
            label = (f"sample fast, {name} canvas {c['gen_length']} after {c['prompt_len']}, B={f['batch']}: "
                     f"{setting} vs plain (tokens/s)")
            rows.append((label, f"{fmt(e['tokens_per_s'])} vs {fmt(plain['tokens_per_s'])}",
                         fmt(e["speedup"]), g["goal"], _met(g) if g["met"] is not None else ""))
        rows.append((f"  {name}: full forwards per token, plain / cache / cache+threshold",
                     " / ".join(f"{c[k]['forwards_per_token']:.3f}" for k in ("plain", "cache", "cache+threshold")),
                     "", "", ""))
    return rows


def _fsdp_rows(r: dict[str, Any]) -> list[Row]:
    """FSDP: the FSDP2 step vs the plain module, MFU, first-step losses, memory vs `omnidiff plan`."""
    rows: list[Row] = []
    b, f = r["bare"], r["fsdp"]
    size = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e9 else f"{r['params'] / 1e6:.2f}M"
    ac = "AC" if r["activation_checkpointing"] else "no AC"
    rows.append((f"fsdp {r['model']} ({size} params, {r['micro_batch']} x {r['seq_len']}, "
                 f"{r['compute_dtype']}, {ac}, {r['device']}): FSDP2 step vs plain module (steps/s)",
                 f"{fmt(f['steps_per_s'])} vs {fmt(b['steps_per_s'])}", fmt(r["sharded_vs_bare"]),
                 r["goal"], _met(r)))
    rows.append((f"  MFU vs measured {r['matmul_peak']['dtype']} matmul peak "
                 f"{fmt(r['matmul_peak']['gflops']['max'])} GFLOP/s",
                 f"plain {r['mfu_bare']['gflops']:,.1f}, FSDP2 {r['mfu_fsdp']['gflops']:,.1f} GFLOP/s",
                 f"{r['mfu_bare']['mfu']:.2f} / {r['mfu_fsdp']['mfu']:.2f}", "", ""))
    fl = r["first_loss"]
    rows.append(("  first-step loss, same weights and batch: fp32 / plain / FSDP2",
                 f"{fl['fp32']:.4f} / {fl['bare']:.4f} / {fl['fsdp']:.4f}",
                 f"{abs(fl['fsdp'] - fl['fp32']) / fl['fp32']:.1e}", "", ""))
    rows.append((f"  loss, first -> last of {len(f['losses'])} steps cycling {r['distinct_batches']} batches: "
                 "plain / FSDP2",
                 f"{b['losses'][0]:.3f} -> {b['losses'][-1]:.3f} / {f['losses'][0]:.3f} -> {f['losses'][-1]:.3f}",
                 "", "", ""))
    if "allocated_vs_plan" in r:
        rows.append(("  FSDP2 peak memory allocated / reserved vs `omnidiff plan` total (GiB)",
                     f"{f['peak_allocated_gib']:.1f} / {f['peak_reserved_gib']:.1f} vs {r['plan_total_gib']:.1f}",
                     fmt(r["allocated_vs_plan"]), "", ""))
    return rows


def _ranks_rows(r: dict[str, Any]) -> list[Row]:
    """Ranks: bytes and data time per rank per step against the world size."""
    rows: list[Row] = []
    for e in r["table"]:
        rows.append((f"ranks: world {e['world']} ({e['grad_accum']} x {e['seq_len']} rows per rank): MB / data ms "
                     f"per rank per step (x its 1/world share)",
                     f"{e['bytes_per_rank'] / 1e6:.3f} / {e['seconds_per_rank'] * 1e3:.1f}",
                     f"{e['bytes_vs_share']:.2f} / {e['seconds_vs_share']:.2f}", "~1 / ~1", ""))
        rows.append((f"  world {e['world']}: plan ms (every rank plans the global step) / read + collate ms "
                     f"(x share)", f"{e['plan_s_per_rank'] * 1e3:.1f} / {e['read_collate_s_per_rank'] * 1e3:.1f}",
                     f"{e['read_collate_vs_share']:.2f}", "~1", ""))
        rows.append((f"  world {e['world']}: data time / estimated step ({e['step_s_estimate']:.2f} s); "
                     f"whole-shard reads MB", f"{e['whole_shard_bytes_rank0'] / 1e6:.3f}",
                     f"{e['data_fraction_of_step']:.3f}", "< 0.05", _met({"met": e["data_fraction_of_step"] < 0.05})))
    return rows


ROWS = {"tokenize": _tokenize_rows, "read": _read_rows, "train": _train_rows, "sample": _sample_rows,
        "fsdp": _fsdp_rows, "ranks": _ranks_rows}


def table_rows(name: str, r: dict[str, Any]) -> list[Row]:
    """(measure, value, ratio, goal, met) rows of one benchmark's result."""
    return ROWS[name](r)


def _all_rows(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    if meta.get("ray_init_s") is not None:
        rows.append(("Ray start-up (once per suite), s", fmt(meta["ray_init_s"]), "", "", ""))
    for name, r in results.items():
        rows += table_rows(name, r)
    return rows


def format_table(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """Aligned text columns, for the terminal."""
    rows = [("measure", "value (median [min-max])", "ratio", "goal", "met"), *_all_rows(results, meta)]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """A Markdown table, for docs."""
    out = ["| measure | value (median [min-max]) | ratio | goal | met |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(c.strip() or " " for c in row) + " |" for row in _all_rows(results, meta)]
    return "\n".join(out)
