"""Keeping large freed blocks in a worker process instead of returning them to the kernel.

glibc serves blocks above its mmap threshold (128 KiB at first, raised as such blocks are
freed) with fresh ``mmap`` pages, and returns free memory at the top of the heap once it
exceeds the trim threshold. A worker that receives, unpickles, computes and pickles MiB-sized
values then spends most of its CPU on page faults and zeroing new pages (measured: ~3 of its
~4 ms per MiB round trip). :func:`keep_freed_memory` raises both thresholds, so such blocks
come from the heap and are reused: a worker keeps up to :data:`TRIM_THRESHOLD` bytes of freed
memory mapped (its RSS does not shrink below its recent peak minus that much).
"""

from __future__ import annotations

import ctypes

#: Blocks up to this size come from the heap (glibc's upper bound on 64-bit).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of the heap is returned to the kernel only above this.
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds in this process; False where there is no glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
