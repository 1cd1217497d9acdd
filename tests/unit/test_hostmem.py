"""The allocator settings of tokenizer actors (common/hostmem.py), checked in fresh processes: glibc's
`mallinfo2` says whether a 16 MB block got a mapping of its own or came from the heap."""
import ctypes
import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
import numpy as np

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = None
if sys.argv[1] == "keep":
    from common import hostmem
    applied = hostmem.keep_large_blocks()
mapped = libc.mallinfo2().hblkhd
block = np.ones(16 * 2**20, np.uint8)
print(applied, libc.mallinfo2().hblkhd - mapped)
"""


def _glibc_with_mallinfo2() -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")


pytestmark = pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="reads glibc's allocator (mallinfo2)")


def _probe(mode: str) -> tuple[str, int]:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    applied, mapped = r.stdout.split()
    return applied, int(mapped)


def test_a_large_block_comes_from_the_heap_once_the_settings_are_kept():
    applied, mapped = _probe("default")
    assert applied == "None" and mapped >= 16 * 2**20       # glibc's default: a mapping of its own
    assert _probe("keep") == ("True", 0)

