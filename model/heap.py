"""glibc heap settings for the diagonal executor on a CPU.

A diagonal step allocates a few MB of temporaries and frees them at its end (with 4 lanes of the small preset, the
FFN's [L, lanes * T', 2 ff] alone is 5 MB). Under glibc's default, adaptive thresholds, freeing that much trims the
top of the heap back to the OS, and the next step page-faults it all in again: ~70 minor faults a step, 4,800 per
64-segment document, against ~10 for the sequential executor, whose per-layer temporaries stay under the threshold.
A higher trim threshold keeps the memory for reuse; the mmap threshold must be fixed along with it, because setting
either stops glibc adapting both. Measured (alternating processes, 3 pairs, small preset, 2-core CPU): 8 sessions x
4 segments through the shared pipeline 2.41x one-by-one sequential against 2.06x, one document within noise, peak
RSS unchanged (420 MB).

Process-wide, set once, on the first diagonal pipeline on a CPU. ARMT_KEEP_HEAP=0 leaves glibc's defaults; other C
libraries (musl) are left alone.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
TRIM_BYTES = 256 << 20  # free heap kept before returning any of it to the OS
MMAP_BYTES = 32 << 20  # allocations from this size get their own mapping (glibc's adaptive ceiling)

_state: dict[str, bool] = {}


def keep_freed_heap() -> bool:
    """Apply the settings once per process; True when they are in effect."""
    if "applied" not in _state:
        _state["applied"] = _apply()
    return _state["applied"]


def _apply() -> bool:
    if not sys.platform.startswith("linux") or os.environ.get("ARMT_KEEP_HEAP", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc only
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES))
