"""Peak resident memory of ``tcmlib-eval`` at large N: streamed means bounded.

Each run is a fresh ``python -m tcmlib.evaluate emb.npy labels.npy --json`` process (the command line a
user runs), measured by the kernel's high-water mark of its resident memory (``ru_maxrss`` of the
finished child, from ``os.wait4``: short peaks count too).  The same is measured for a process that only
imports ``tcmlib.evaluate`` and loads the two arrays: the *base*.  The claim (``tcmlib.metrics.opis``,
"Memory") is that the evaluation adds at most a few copies of the embeddings (the unit rows, sorted by
label) plus a fixed budget, whatever N, in every run (the largest peak is checked, not the median)::

    max peak - base <= 4 x embedding bytes + budget        (budget: --budget-gb, default 1 GB)

Why every run: before the tile loop fixed glibc's mmap threshold (:mod:`tcmlib._heap`), the main heap
ratcheted up during the first pass in some runs and not in others (same data, same numbers out): at the
defaults below, on the shared 2-core machine, 12 runs peaked at 1.24-1.35 GB and 6 at 5.0-7.7 GB (two
earlier single runs: 5.8 and 6.2, one of three: 8.2).  With it, 5 of 5 runs peaked at 1.105-1.110 GB
(``benchmarks/README.md``).

Data: ``--classes`` clusters in D dimensions whose spreads differ by a factor of ~30 from class to class
(uneven spread: what made the quantile bracket of the calibration range grow before it was bounded).
Few thresholds and bootstrap replicates, so one run takes minutes on one core.  ``--repeats`` runs:
each run's peak, their median and the largest.  ``OMP_WAIT_POLICY=PASSIVE`` and, unless set, ``OMP_NUM_THREADS=1``.

    python benchmarks/eval_memory.py                      # N = 100k, D = 64
    python benchmarks/eval_memory.py --quick              # N = 20k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def uneven_clusters(n: int, classes: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x (n, dim) float32, y (n,) int64)``: class centres on the sphere, per-class noise scales log-uniform
    over [0.1, 3] (some classes tight, some spread over much of the sphere)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scale = np.exp(rng.uniform(np.log(0.1), np.log(3.0), classes)) / np.sqrt(dim)
    x = centres[y] + scale[y, None] * rng.standard_normal((n, dim))
    return x.astype(np.float32), y.astype(np.int64)


def child_peak(cmd: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """``(peak resident bytes, wall seconds, stdout)`` of one fresh process running ``cmd``: its own
    ``ru_maxrss``, read by reaping it with ``os.wait4``."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, cwd=tempfile.gettempdir())
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(), fe.read().decode()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{err[-2000:]}")
    return usage.ru_maxrss * 1024, wall, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-gb", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="N = 20k, one repeat")
    ap.add_argument("--keep", metavar="DIR", help="write the arrays here (default: a temporary directory)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = 20_000, 1
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=os.environ.get("PYTHONPATH", str(ROOT)))
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.keep or tmp)
        d.mkdir(parents=True, exist_ok=True)
        x, y = uneven_clusters(args.n, args.classes, args.dim, seed=0)
        np.save(d / "emb.npy", x)
        np.save(d / "labels.npy", y)
        emb_bytes = x.nbytes
        del x, y
        py = sys.executable
        base_cmd = [py, "-c", "import sys, numpy as np, tcmlib.evaluate; "
                    "a, b = np.load(sys.argv[1]), np.load(sys.argv[2])", str(d / "emb.npy"), str(d / "labels.npy")]
        eval_cmd = [py, "-m", "tcmlib.evaluate", str(d / "emb.npy"), str(d / "labels.npy"), "--json",
                    "--thresholds", "20", "--n-boot", "50", "--no-progress"]
        bases, peaks, walls = [], [], []
        for _ in range(args.repeats):
            bases.append(child_peak(base_cmd, env)[0])
            peak, wall, out = child_peak(eval_cmd, env)
            peaks.append(peak)
            walls.append(wall)
            print(f"  run: peak {peak / 1e9:.3f} GB, {wall:.0f} s", flush=True)
        report = json.loads(out)
    base, peak, worst = statistics.median(bases), statistics.median(peaks), max(peaks)
    budget = args.budget_gb * 1e9
    bound = 4 * emb_bytes + budget
    extra = worst - base
    print(f"tcmlib-eval, N = {args.n}, D = {args.dim}, {args.classes} classes of uneven spread, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, {args.repeats} run(s)")
    print(f"  embeddings {emb_bytes / 1e9:.3f} GB; base (imports + arrays, median) {base / 1e9:.3f} GB")
    print(f"  peak RSS: median {peak / 1e9:.3f} GB, largest {worst / 1e9:.3f} GB "
          f"(runs: {', '.join(f'{p / 1e9:.2f}' for p in peaks)}); largest above the base {extra / 1e9:.3f} GB; "
          f"bound 4 x embeddings + budget = {bound / 1e9:.3f} GB ({'within' if extra <= bound else 'OVER'}); "
          f"wall {statistics.median(walls):.0f} s (median)")
    print(f"  OPIS {report.get('OPIS', report.get('opis'))}")
    print(json.dumps({"n": args.n, "dim": args.dim, "peak_bytes": peak, "max_peak_bytes": worst,
                      "peaks_bytes": peaks, "base_bytes": base, "embedding_bytes": emb_bytes,
                      "budget_bytes": budget, "within": extra <= bound}))


if __name__ == "__main__":
    main()
