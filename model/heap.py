"""glibc heap settings for the diagonal executor on a CPU.

A diagonal step allocates a few MB of temporaries and frees them at its end (with 4 lanes of the small preset, the
FFN's [L, lanes * T', 2 ff] alone is 5 MB). glibc returns free memory at the top of its heap to the OS once more
than its trim threshold is free, and gives blocks above its mmap threshold their own mapping, unmapped on free; both
thresholds start low (128 KB, 256 KB) and only grow as large blocks are freed. Until they have grown, every step
page-faults its temporaries in again. Measured in fresh processes (small preset, 2-core CPU, 8 runs each of 8
sessions x 4 segments through the shared pipeline): 8,600 minor faults and 137 ms per run on average with glibc's
defaults, 2,600 and 111 ms with these settings; after a few thousand steps the defaults catch up. Fixing both high
from the first pipeline gives a fresh process (a benchmark, a new replica) that steady state at once; setting
either stops glibc adapting both, hence both. Peak RSS unchanged (420 MB).

Process-wide, set once, on the first diagonal pipeline on a CPU. ARMT_KEEP_HEAP=0 leaves glibc's defaults; other C
libraries (musl) are left alone.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
TRIM_BYTES = 256 << 20  # free heap kept before returning any of it to the OS
MMAP_BYTES = 32 << 20  # allocations from this size get their own mapping (glibc's adaptive ceiling)


@functools.cache
def keep_freed_heap() -> bool:
    """Apply the settings once per process; True when they are in effect."""
    if not sys.platform.startswith("linux") or os.environ.get("ARMT_KEEP_HEAP", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc only
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES))
