"""The C allocator's settings for a process that runs torch models on CPU (tokenizer actors).

glibc serves each allocation above its mmap threshold (128 KB at start) with a fresh mmap, and unmaps it on free.
A conv model's activations are such allocations, so every forward on CPU page-faults its working memory afresh.
glibc raises the threshold by itself once the process frees a large mapped block, so a process's speed depends on
what it happened to free before: MAGVIT-v2 tiny encodes its images 2x faster once EnCodec has been built and
dropped in the same process. Fixing the thresholds makes the fast case the rule.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1            # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20      # glibc's largest on 64-bit hosts: blocks up to 32 MB come from the heap
TRIM_THRESHOLD = 64 * 2**20      # freed heap kept mapped before it is returned to the system

_applied: bool | None = None


def keep_large_blocks() -> bool:
    """Serve blocks up to 32 MB from the heap and keep up to 64 MB of freed heap, once per process (the settings
    glibc would reach itself after freeing a 32 MB block). False where the C library has no `mallopt` (not
    glibc): its allocator is left as it is."""
    global _applied
    if _applied is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _applied = False
        else:
            _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                          TRIM_THRESHOLD))
    return _applied
