"""Freed tile buffers go back to the system: large blocks get memory maps of their own (glibc).

glibc's ``malloc`` serves a block of at least ``M_MMAP_THRESHOLD`` bytes with its own memory map, unmapped
when it is freed; smaller blocks come from the heap, where freed memory stays resident while anything
above it lives, and a block that fits no freed hole extends the heap.  By default the threshold is
*dynamic*: freeing a mapped block raises it to that block's size (up to 32 MiB on 64-bit).  After the
first tile of a pass, the tile-sized buffers (a 1024 x 4096 float32 similarity tile is 16 MiB; its masks,
index lists and gathered values 4-32 MiB, of sizes that change from tile to tile) therefore come from the
heap, between the small blocks that live on (tensor headers, Python objects, a quantile bracket's
values).  Whether a new buffer finds a hole then depends on the order in which blocks are freed, so the
heap ratchets up in some runs and not in others: ``tcmlib-eval`` on N = 100k, D = 64 peaked at 5-8 GB in
about half the runs on a busy machine (1.2-1.4 GB in the others, the same numbers out), all of it the
main heap growing during the first pass (``benchmarks/eval_memory.py``).

:func:`bound_heap` fixes the threshold at ``MMAP_THRESHOLD`` (1 MiB), which also turns the dynamic
adjustment off: every block of 1 MiB or more is mapped and unmapped on its own, so the heap holds only
small blocks and the peak is what is alive.  The tile loops (:func:`tcmlib.metrics._pairs.pair_tiles`,
sharded evaluation) call it for passes over at least ``LARGE_ROWS`` embeddings, where tile buffers are
what fills memory; it changes no value.  The setting holds for the rest of the process (glibc has no way
back to the dynamic threshold), and a fresh map per large block costs page faults, so smaller passes --
a training run's evaluation after each epoch -- leave the allocator as it is.  It leaves the allocator alone
where the C library is not glibc, or where ``MALLOC_MMAP_THRESHOLD_`` (glibc's own setting) is in the
environment.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["MMAP_THRESHOLD", "LARGE_ROWS", "bound_heap"]

MMAP_THRESHOLD = 1 << 20  # bytes: blocks from this size on get a memory map of their own
LARGE_ROWS = 1 << 15  # passes over this many embeddings (or more) bound the heap
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_done: bool | None = None  # None: not tried yet; then whether the threshold was set


def bound_heap(rows: int | None = None) -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (once per process); whether it is set by us.

    ``rows``: the number of embeddings of the pass about to run; below :data:`LARGE_ROWS` nothing changes.
    """
    global _done
    if rows is not None and rows < LARGE_ROWS:
        return bool(_done)
    if _done is None:
        _done = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" \
                and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            try:
                _done = bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
            except (OSError, AttributeError):
                _done = False
    return _done
