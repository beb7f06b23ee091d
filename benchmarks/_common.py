"""Timing and peak-memory helpers shared by the benchmark scripts.

Time: median wall-clock seconds of ``repeats`` calls after ``warmup`` calls, with a CUDA
synchronise around each call.

Peak extra memory of one call ``fn()``:
* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` measured before the
  call, after ``reset_peak_memory_stats`` (exact for the caching allocator's tensors).
* CPU: the kernel's high-water mark of resident memory minus the resident size just before the
  call.  On Linux we reset the mark first (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and
  read ``VmHWM`` / ``VmRSS`` from ``/proc/self/status``: exact.  Elsewhere we fall back on
  ``getrusage(RUSAGE_SELF).ru_maxrss``, which cannot be reset: if the process had been larger
  earlier (imports, freed set-up tensors), the mark already stood ``slack`` bytes above the
  current size, and a result ``<= slack`` is only an upper bound (``exact`` is False).  Either
  way, measure in a FRESH process (:func:`run_worker`) after a tiny warm-up, so the allocator
  state is the same for every method.  Sampling RSS in a thread would miss short peaks; the
  kernel's mark cannot.  Freed pages that the allocator still holds and reuses do not count:
  this is extra *resident* memory, the number that decides whether a batch fits.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

__all__ = ["sync", "median_seconds", "rss_bytes", "maxrss_bytes", "reset_peak_rss", "peak_extra_bytes", "run_worker", "fmt_bytes"]


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], *, repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_bytes() -> int:
    """High-water mark of resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, bool]:
    """Peak memory of one call of ``fn()`` above what is in use before it; returns (bytes, exact).

    On CPU call this once per fresh process (see the module docstring).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before, True
    if reset_peak_rss():
        before = _proc_status_kb("VmRSS")
        fn()
        return max(0, _proc_status_kb("VmHWM") - before), True
    before = rss_bytes()
    slack = maxrss_bytes() - before
    fn()
    extra = max(0, maxrss_bytes() - before)
    return extra, extra > slack


def run_worker(args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process; parse the last stdout line as JSON.

    Returns ``{"error": ...}`` when the process fails or times out.
    """
    try:
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit code {p.returncode}"]
        return {"error": tail[0]}
    return json.loads(lines[-1])


def fmt_bytes(n: float) -> str:
    """``1536 -> '1.5 KB'``, decimal units up to GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
