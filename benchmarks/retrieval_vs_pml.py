"""Recall@1 + MAP@R: tcmlib (one symmetric streamed pass) vs its floor, the naive form and pml.

Contenders, on the same L2-normalised random clustered data (float32), query set = reference set:

* ``gemm``:  the floor a full pass costs, the blocked similarity GEMM ``x[s:s+1024] @ x.T`` for every
  row block, results dropped;
* ``half``:  the floor of one symmetric pass, the bare upper-triangle tiles ours computes
  (:func:`tcmlib.metrics._pairs.upper_tiles`), results dropped;
* ``ours``:  :func:`tcmlib.metrics.recall_and_map_at_r` (only the upper triangle of the symmetric
  similarity matrix, each tile serving its rows and columns: half a full GEMM, plus a running top-k);
* ``naive``: what one writes first (and tcmlib did before): the blocked full GEMM, ``topk`` of every
  block (k = the largest class size), then the same per-query formulas;
* ``pml``:   pytorch-metric-learning's ``AccuracyCalculator(include=("precision_at_1",
  "mean_average_precision_at_r"), k="max_bin_count")`` (its default FaissKNN, exact IndexFlatL2).

Time: the contenders run in turn (round robin) ``--repeats`` times in this process and the medians are
compared, so a changing machine load hits all of them alike.  Values: ours must equal pml's.

    python benchmarks/retrieval_vs_pml.py --quick      # N = 6000: seconds
    python benchmarks/retrieval_vs_pml.py              # N = 20000 (400 classes) and 60000 (1200): minutes
    python benchmarks/retrieval_vs_pml.py --device cuda
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch / faiss: idle OpenMP threads must not spin

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def make_data(n: int, dim: int, classes: int, seed: int, noise: float, device: torch.device):
    """Random clustered data: a Gaussian centre per class, labels uniform (class sizes ~ Poisson(N / C))."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)  # (N,)
    centres = torch.randn(classes, dim, generator=g)  # (C, D)
    x = centres[labels] + noise * torch.randn(n, dim, generator=g)  # (N, D)
    return torch.nn.functional.normalize(x, dim=1).to(device), labels.to(device)


def gemm(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    acc = 0.0
    for s0 in range(0, x.shape[0], 1024):
        acc += float((x[s0 : s0 + 1024] @ x.T)[0, 0])  # touch the result (and synchronise a GPU)
    return acc, acc


def half(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    from tcmlib.metrics._pairs import upper_tiles

    acc = 0.0
    for _, _, sim in upper_tiles(x, 1024):
        acc += float(sim[0, -1])
    return acc, acc


def ours(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    from tcmlib.metrics import recall_and_map_at_r

    recall, map_r = recall_and_map_at_r(x, y, (1,))
    return recall[1], map_r


def naive(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Blocked full GEMM + topk(max class size) per block + the per-query formulas."""
    n = x.shape[0]
    _, inv, counts = torch.unique(y, return_inverse=True, return_counts=True)
    r_all = counts[inv] - 1  # (N,)
    k = max(1, int(r_all.max()))
    rank = torch.arange(1, k + 1, device=x.device, dtype=torch.float64)
    hit1, ap = torch.zeros(n, dtype=torch.bool, device=x.device), torch.zeros(n, dtype=torch.float64, device=x.device)
    for s0 in range(0, n, 1024):
        sim = x[s0 : s0 + 1024] @ x.T  # (B, N)
        sim.diagonal(offset=s0).fill_(float("-inf"))
        rel = y[sim.topk(k, dim=1).indices] == y[s0 : s0 + 1024, None]  # (B, k)
        hit1[s0 : s0 + 1024] = rel[:, 0]
        r = r_all[s0 : s0 + 1024]
        rel_r = rel & (rank <= r[:, None])
        ap[s0 : s0 + 1024] = (rel_r.cumsum(1) / rank * rel_r).sum(1) / r
    valid = r_all > 0
    return float(hit1[valid].double().mean()), float(ap[valid].mean())


def pml(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                              device=x.device)
    acc = calc.get_accuracy(x, y)
    return acc["precision_at_1"], acc["mean_average_precision_at_r"]


def round_robin(fns: dict[str, Callable[[], tuple[float, float]]], repeats: int, device: torch.device):
    """Median wall and CPU seconds per contender, the contenders timed in turn; and each one's last result."""
    times: dict[str, list[float]] = {m: [] for m in fns}
    cpu: dict[str, list[float]] = {m: [] for m in fns}
    results = {}
    for _ in range(repeats):
        for m, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            results[m] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)  # all threads of this process: steadier on a shared machine
    med = lambda d: {m: statistics.median(t) for m, t in d.items()}  # noqa: E731
    return med(times), med(cpu), results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 60000])
    p.add_argument("--per-class", type=int, default=50, help="classes = N // per_class (400 at N = 20000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--noise", type=float, default=2.0, help="per-coordinate noise around the class centre")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-pml", action="store_true", help="skip pml (e.g. without faiss)")
    p.add_argument("--quick", action="store_true", help="N = 6000, one repeat")
    a = p.parse_args()
    if a.quick:
        a.sizes, a.repeats = [6000], 1
    device = torch.device(a.device)
    print(f"R@1 + MAP@R, D = {a.dim}, device = {device}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, median of {a.repeats} round-robin repeats; ratios to the blocked full GEMM; wall seconds, and\n"
          "process CPU seconds (all threads; steadier when other jobs share the machine)")
    print(f"{'N':>6} {'classes':>7} {'time':>4} | {'gemm s':>7} {'half':>5} | {'ours s':>7} {'/gemm':>6} | "
          f"{'naive s':>7} {'/gemm':>6} | "
          f"{'pml s':>7} {'/gemm':>6} | {'pml/ours':>8} {'naive/ours':>10}")
    for n in a.sizes:
        classes = max(2, n // a.per_class)
        x, y = make_data(n, a.dim, classes, 0, a.noise, device)
        fns = {"gemm": lambda: gemm(x, y), "half": lambda: half(x, y), "ours": lambda: ours(x, y),
               "naive": lambda: naive(x, y)}
        if not a.no_pml:
            fns["pml"] = lambda: pml(x, y)
        ours(x[:500], y[:500])  # warm up kernels and imports
        wall, cpu, res = round_robin(fns, a.repeats, device)
        for kind, sec in (("wall", wall), ("cpu", cpu)):
            g = sec["gemm"]
            pml_cols = (f"{sec['pml']:>7.2f} {sec['pml'] / g:>6.2f} | {sec['pml'] / sec['ours']:>8.2f}" if "pml" in sec
                        else f"{'-':>7} {'-':>6} | {'-':>8}")
            print(f"{n:>6} {classes:>7} {kind:>4} | {g:>7.2f} {sec['half'] / g:>5.2f} | "
                  f"{sec['ours']:>7.2f} {sec['ours'] / g:>6.2f} | "
                  f"{sec['naive']:>7.2f} {sec['naive'] / g:>6.2f} | {pml_cols} {sec['naive'] / sec['ours']:>10.2f}",
                  flush=True)
        for other in ("naive", "pml"):  # (gemm and half return no metrics)
            if other in res:
                d1, dm = abs(res["ours"][0] - res[other][0]), abs(res["ours"][1] - res[other][1])
                assert d1 <= 1e-4 and dm <= 1e-4, f"ours and {other} disagree: {res['ours']} vs {res[other]}"
        print(f"       values: ours R@1 {res['ours'][0]:.6f} MAP@R {res['ours'][1]:.6f}"
              + (f"; pml {res['pml'][0]:.6f} / {res['pml'][1]:.6f}" if "pml" in res else ""))


if __name__ == "__main__":
    main()
