"""Freed tile buffers do not pile up in the C heap (tcmlib._heap): the pattern that grew it, after a tile loop.

The pattern is a pass's: tile-sized buffers of sizes that change from tile to tile, each followed by a
small block that lives on.  Under glibc's default (dynamic) mmap threshold, once one large block has been
freed, each new buffer comes from the heap and fits none of the holes the earlier ones left: the heap
grows by every buffer (~160 MiB here).  Once a streamed metric has run its tile loop, the buffers are
mapped and unmapped on their own and the heap grows only by the small blocks kept (2 MiB).  Each case
runs in a fresh process (the allocator's state is per process); glibc only.
"""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the heap bound is glibc's mmap threshold")

CHILD = r"""
import ctypes, sys, torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] in ("after-tile-loop", "after-small-loop"):
    import tcmlib._heap
    from tcmlib.metrics.opis import utility_curves
    if sys.argv[1] == "after-tile-loop":
        tcmlib._heap.LARGE_ROWS = 300  # stands for a large pass (a real one takes minutes)
    utility_curves(torch.randn(300, 8), torch.arange(300) % 5, chunk_size=64)
big = torch.empty(24 << 20, dtype=torch.uint8).fill_(1)  # one large block freed: glibc raises its threshold
del big
keep, base = [], libc.mallinfo2().arena  # arena: bytes of the main heap
for i in range(32):
    tile = torch.empty((4 << 20) + i * 65536, dtype=torch.uint8).fill_(1)  # a tile-sized buffer, 4-6 MiB
    keep.append(torch.ones(65536, dtype=torch.uint8))  # a small block that lives on (64 KiB)
    del tile
print((libc.mallinfo2().arena - base) / 2**20)
"""

MIB_BUFFERS = sum((4 << 20) + i * 65536 for i in range(32)) / 2**20  # 159.5 MiB: every buffer in the heap


def _heap_growth(mode: str, **env: str) -> float:
    """MiB the main heap grew by in a fresh process running the pattern (``mode``: after a tile loop or not)."""
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    environ.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=environ,
                         timeout=300, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _grows(mode: str, tries: int = 5) -> bool:
    """Whether the heap keeps (nearly) every buffer in one of ``tries`` fresh processes: the ratchet depends on
    where earlier blocks happened to land, so a process shows it in most runs, not all."""
    return any(_heap_growth(mode) > 0.8 * MIB_BUFFERS for _ in range(tries))


def test_default_allocator_grows_the_heap():
    """The pathology itself (so that the next test can fail): without the bound, the buffers stay in the heap."""
    assert _grows("alone")


def test_tile_loop_bounds_the_heap():
    """After a large pass's tile loop, the buffers leave the heap, in every run: it grows by the kept blocks only."""
    # the kept blocks: 32 x 64 KiB = 2 MiB (+ allocator slack)
    assert max(_heap_growth("after-tile-loop") for _ in range(3)) < 8.0


def test_small_pass_leaves_the_allocator_alone():
    """A pass below ``LARGE_ROWS`` (a training run's evaluation) keeps glibc's dynamic threshold."""
    assert _grows("after-small-loop")


def test_user_setting_is_left_alone():
    """``MALLOC_MMAP_THRESHOLD_`` in the environment is glibc's own setting: :func:`bound_heap` keeps it."""
    code = "from tcmlib._heap import bound_heap; print(bound_heap(), bound_heap())"
    for env, want in (({}, "True True"), ({"MALLOC_MMAP_THRESHOLD_": str(64 << 20)}, "False False")):
        environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                             env={**environ, "PYTHONPATH": str(ROOT), **env})
        assert out.stdout.strip() == want
