"""Cost of exact OPIS + eps-OPIS against its floor, the bare blocked similarity GEMM.

One ``utility_curves`` call gives both OPIS and eps-OPIS (read off the same curves). The floor is the
matrix product alone over the same N, with the same row blocks: ``x[s0:s0+B] @ x.T`` for every block,
nothing else. ``utility_curves`` computes only the upper triangle (columns >= block start), twice
(pass 1: negative-distance quantiles for the calibration range; pass 2: per-class histograms), so its
GEMM work equals the floor's; everything above a ratio of 1 is counting.

Reports the median over ``--repeats`` of wall-clock seconds and of process CPU seconds (the latter is
steadier on a shared machine). Goal: ratio <= 2 at N = 20k on CPU.

    python benchmarks/opis_cost.py --quick
    python benchmarks/opis_cost.py --sizes 5000 20000 60000 --device cpu
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from tcmlib.metrics.opis import DEFAULT_CHUNK_SIZE, utility_curves


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


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of ``fn()`` after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 60000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=None, help="default: N // 5 (5 samples a class, like SOP)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--quick", action="store_true", help="sizes 2000 5000, one repeat")
    a = p.parse_args()
    if a.quick:
        a.sizes, a.repeats = [2000, 5000], 1
    device = torch.device(a.device)
    print(f"device={device} threads={torch.get_num_threads()} dim={a.dim} chunk_size={a.chunk_size} repeats={a.repeats}")
    print(f"{'N':>7} {'classes':>7} {'gemm wall':>10} {'opis wall':>10} {'ratio':>6} {'gemm cpu':>9} {'opis cpu':>9} {'ratio':>6}  opis / 10%-opis")
    for n in a.sizes:
        classes = a.classes or max(2, n // 5)
        x, y = make_embeddings(n, a.dim, classes, device)
        out = {}

        def curves(x: torch.Tensor = x, y: torch.Tensor = y, out: dict = out) -> None:
            res = utility_curves(x, y, chunk_size=a.chunk_size)
            out["values"] = (res.opis, res.eps_opis(0.1))

        gw, gc = timed(lambda x=x: blocked_gemm(x, a.chunk_size), a.repeats, device)
        ow, oc = timed(curves, a.repeats, device)
        o, e = out["values"]
        print(f"{n:>7} {classes:>7} {gw:>10.3f} {ow:>10.3f} {ow / gw:>6.2f} {gc:>9.3f} {oc:>9.3f} {oc / gc:>6.2f}  {o:.3e} / {e:.3e}")


if __name__ == "__main__":
    main()
