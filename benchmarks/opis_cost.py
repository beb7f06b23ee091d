"""Cost of exact OPIS, of the one-call evaluation and of the threshold report, against their floor.

The floor is the bare blocked similarity GEMM over the same N: ``x[s0:s0+1024] @ x.T`` for every row
block, nothing else (one *full* GEMM).  Contenders, ratios to it, side by side:

* ``opis``:     :func:`utility_curves` with the data-dependent range: the range's quantiles need a
  pass over the pairs a < b (half a full GEMM) before the counts; the counts take a second pass, or
  come from the pairs the first one kept when they fit (``KEEP_MAX``: N up to ~25k);
* ``given``:    the same with ``distance_range`` given: one pass, floor 0.5;
* ``evaluate``: :func:`tcmlib.metrics.evaluate_embeddings` (R@1..8, MAP@R, OPIS, eps-OPIS; retrieval rides on
  OPIS's first pass);
* ``separate``: what ``train.evaluate_model`` did before: ``recall_and_map_at_r`` then ``utility_curves``;
* ``report``:   :func:`tcmlib.report.threshold_report` (threshold, per-class rates, OPIS + bootstrap,
  R@1), compared with ``opis`` (goal: at most 1.5x).

Time: the contenders run in turn (round robin) ``--repeats`` times in this process; medians of wall
seconds.  Data: clustered, class noise levels differ by class.

    python benchmarks/opis_cost.py --quick
    python benchmarks/opis_cost.py --sizes 5000 20000 --classes 400
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from tcmlib.metrics import evaluate_embeddings, recall_and_map_at_r, utility_curves
from tcmlib.metrics.opis import DEFAULT_CHUNK_SIZE
from tcmlib.report import threshold_report


def make_embeddings(n: int, dim: int, classes: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 clustered embeddings, (N,) labels: class centres plus per-class noise levels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)  # (N,)
    centres = torch.randn(classes, dim, generator=g)  # (C, D)
    noise = 1.5 + 3.0 * torch.rand(classes, generator=g)  # (C,) within-class spread differs by class
    x = centres[labels] + noise[labels, None] * torch.randn(n, dim, generator=g)  # (N, D)
    return x.to(device), labels.to(device)


def blocked_gemm(x: torch.Tensor, chunk_size: int) -> float:
    """The floor: every row block times the whole matrix, results discarded."""
    xn = torch.nn.functional.normalize(x, dim=1)
    acc = 0.0
    for s0 in range(0, x.shape[0], chunk_size):
        sim = xn[s0 : s0 + chunk_size] @ xn.T  # (B, N)
        acc += float(sim[0, 0])  # touch the result (and synchronise on a GPU)
    return acc


def round_robin(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process-CPU seconds per contender, timed in turn after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {m: [] for m in fns}
    cpu: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(repeats):
        for m, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)  # all threads of this process: steadier on a shared machine
    return ({m: statistics.median(t) for m, t in times.items()}, {m: statistics.median(t) for m, t in cpu.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=None, help="default: N // 50 (400 at N = 20000)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--no-report", action="store_true", help="skip threshold_report")
    p.add_argument("--quick", action="store_true", help="sizes 2000 5000, one repeat")
    a = p.parse_args()
    if a.quick:
        a.sizes, a.repeats = [2000, 5000], 1
    device = torch.device(a.device)
    print(f"device={device} threads={torch.get_num_threads()} dim={a.dim} chunk_size={a.chunk_size} "
          f"median of {a.repeats} round-robin repeats; ratios to the blocked full GEMM (report: to opis);\n"
          "wall seconds, and process CPU seconds (all threads; steadier when other jobs share the machine)")
    print(f"{'N':>6} {'cls':>5} {'time':>4} | {'gemm s':>7} | {'opis':>5} {'given':>5} {'evaluate':>8} {'separate':>8} | "
          f"{'report/opis':>11} | OPIS, 10%-OPIS")
    for n in a.sizes:
        classes = a.classes or max(2, n // 50)
        x, y = make_embeddings(n, a.dim, classes, device)
        rng = utility_curves(x, y, chunk_size=a.chunk_size).distance_range
        out: dict[str, float] = {}

        def run_opis() -> None:
            c = utility_curves(x, y, chunk_size=a.chunk_size)
            out["opis"], out["eps"] = c.opis, c.eps_opis(0.1)

        fns: dict[str, Callable[[], object]] = {
            "gemm": lambda: blocked_gemm(x, a.chunk_size),
            "opis": run_opis,
            "given": lambda: utility_curves(x, y, distance_range=rng, chunk_size=a.chunk_size),
            "evaluate": lambda: evaluate_embeddings(x, y, chunk_size=a.chunk_size),
            "separate": lambda: (recall_and_map_at_r(x, y, (1, 2, 4, 8), chunk_size=a.chunk_size),
                                 utility_curves(x, y, chunk_size=a.chunk_size)),
        }
        if not a.no_report:
            fns["report"] = lambda: threshold_report(x, y, n_boot=200, chunk_size=a.chunk_size)
        wall, cpu = round_robin(fns, a.repeats, device)
        ev = evaluate_embeddings(x, y, chunk_size=a.chunk_size)
        assert ev.opis == out["opis"] and ev.eps_opis == out["eps"], "evaluate and utility_curves disagree"
        for kind, sec in (("wall", wall), ("cpu", cpu)):
            g = sec["gemm"]
            rep = f"{sec['report'] / sec['opis']:>11.2f}" if "report" in sec else f"{'-':>11}"
            print(f"{n:>6} {classes:>5} {kind:>4} | {g:>7.2f} | {sec['opis'] / g:>5.2f} {sec['given'] / g:>5.2f} "
                  f"{sec['evaluate'] / g:>8.2f} {sec['separate'] / g:>8.2f} | {rep} | "
                  f"{out['opis']:.3e}, {out['eps']:.3e}", flush=True)


if __name__ == "__main__":
    main()
