"""TCM loss, forward + backward: tcmlib (one similarity GEMM) vs pytorch-metric-learning (gathers every pair).

For each batch size B: median time of loss + backward and peak extra memory of
* ``ours``: ``tcmlib.losses.tcm_loss``;
* ``naive``: the ~12-line masked matrix form differentiated by autograd (what a reader would write);
* ``pml``:  ``pytorch_metric_learning.losses.ThresholdConsistentMarginLoss`` (O(B^2 D) memory, so
  skipped above ``--pml-max-b`` or when its estimated memory passes ``--pml-max-gb``);
* ``gemm``: the floor of autograd, ``(xn @ xn.T).sum()`` + backward with ``xn = F.normalize(x)``
  (the three B x B x D GEMMs of a similarity matrix differentiated by autograd; ``ours`` gets
  below it because its gradient needs one GEMM, not two).

Memory: every (method, B) runs once in a fresh subprocess, so the CPU peak (ru_maxrss, see
``_common.py``) is that call's own.  Time: in this process, the methods of one B timed in turn
(round robin), median over repeats, so a shared machine's changing load hits them alike.  Labels: 4 samples per class, shuffled (the paper's batch layout).

    python benchmarks/tcm_vs_pml.py                 # CPU, B = 64 ... 4096
    python benchmarks/tcm_vs_pml.py --quick
    python benchmarks/tcm_vs_pml.py --device cuda --pml-max-b 2048
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_bytes, median_seconds, peak_extra_bytes, run_worker  # noqa: E402

PML_BYTES_PER_PAIR_ELEMENT = 4 * 5  # float32; pml holds ~5 (pairs x D) tensors at its peak (measured)


def pml_estimate_bytes(b: int, d: int) -> float:
    """pml gathers both members of all B^2 ordered pairs: ~5 float32 tensors of shape (B^2, D)."""
    return PML_BYTES_PER_PAIR_ELEMENT * b * b * d


def make_step(method: str, b: int, d: int, device: torch.device):
    """Return ``step()``: one forward + backward of ``method`` on a fixed (b, d) batch."""
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, d, generator=g).to(device).requires_grad_()  # (B, D)
    y = (torch.arange(b) // 4)[torch.randperm(b, generator=g)].to(device)  # (B,), 4 per class

    if method == "ours":
        from tcmlib.losses import tcm_loss

        def step() -> None:
            x.grad = None
            tcm_loss(x, y).backward()

    elif method == "naive":

        def naive_tcm(x, y, m_pos=0.9, m_neg=0.5):
            xn = F.normalize(x, dim=1)
            sim = xn @ xn.T  # (B, B)
            same = y[:, None] == y[None, :]
            hp = same & ~torch.eye(len(y), dtype=torch.bool, device=x.device) & (sim <= m_pos)
            hn = ~same & (sim >= m_neg)
            pos = torch.where(hp, m_pos - sim, 0).sum() / hp.sum().clamp(min=1)
            return pos + torch.where(hn, sim - m_neg, 0).sum() / hn.sum().clamp(min=1)

        def step() -> None:
            x.grad = None
            naive_tcm(x, y).backward()

    elif method == "pml":
        from pytorch_metric_learning.losses import ThresholdConsistentMarginLoss

        loss = ThresholdConsistentMarginLoss()

        def step() -> None:
            x.grad = None
            loss(x, y).backward()

    elif method == "gemm":

        def step() -> None:
            x.grad = None
            xn = F.normalize(x, dim=1)  # (B, D)
            (xn @ xn.T).sum().backward()  # (B, B) similarity, then its backward GEMMs

    else:
        raise ValueError(f"unknown method {method!r}")
    return step


def worker(method: str, b: int, d: int, device_name: str) -> dict:
    """Peak extra memory of the first call of one (method, B), in this fresh process."""
    device = torch.device(device_name)
    make_step(method, 8, d, device)()  # load kernels and lazy imports before the baseline
    peak, exact = peak_extra_bytes(make_step(method, b, d, device), device)
    return {"peak_bytes": peak, "exact": exact}


def interleaved_medians(steps: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per method, the methods timed in turn (round robin) so that a change of
    machine load hits all of them alike; one warm-up call each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(repeats):
        for m, step in steps.items():
            times[m].append(median_seconds(step, repeats=1, device=device, warmup=0))
    return {m: statistics.median(t) for m, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pml-max-b", type=int, default=512, help="largest B for pml (B=1024 needs ~10 GB)")
    ap.add_argument("--pml-max-gb", type=float, default=6.0, help="skip pml when its estimate exceeds this")
    ap.add_argument("--quick", action="store_true", help="B = 64 256 1024, 3 repeats")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        method, b = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(method, b, args.dim, args.device)))
        return

    sizes, repeats = (([64, 256, 1024], 3) if args.quick else (args.sizes, args.repeats))
    print(f"TCM forward+backward, D = {args.dim}, device = {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print("peak = extra memory at the peak of the first call (CPU: resident, '<=' = upper bound)")
    header = (f"{'B':>5} | {'gemm ms':>9} {'peak':>9} | {'ours ms':>9} {'peak':>9} | {'naive ms':>9} {'peak':>9} | "
              f"{'pml ms':>9} {'peak':>9} | {'ours/gemm':>9} {'ours/naive':>10} {'pml/ours':>9}")
    print(header)
    print("-" * len(header))

    def cell(r: dict) -> tuple[str, str]:
        mem = "error" if "error" in r else ("" if r["exact"] else "<=") + fmt_bytes(r["peak_bytes"])
        return f"{1e3 * r['seconds']:.2f}", mem

    me = str(Path(__file__).resolve())
    device = torch.device(args.device)
    for b in sizes:
        need = pml_estimate_bytes(b, args.dim)
        run_pml = b <= args.pml_max_b and need <= args.pml_max_gb * 1e9
        methods = ["gemm", "ours", "naive"] + (["pml"] if run_pml else [])
        common = ["--dim", str(args.dim), "--device", args.device]
        res = {m: run_worker([me, "--worker", m, str(b), *common], timeout=600) for m in methods}
        secs = interleaved_medians({m: make_step(m, b, args.dim, device) for m in methods}, repeats, device)
        for m in methods:
            res[m]["seconds"] = secs[m]
        g, o = res["gemm"], res["ours"]
        gt, gm = cell(g)
        ot, om = cell(o)
        nt, nm = cell(res["naive"])
        ratio_g = f"{o['seconds'] / g['seconds']:.2f}"
        ratio_n = f"{o['seconds'] / res['naive']['seconds']:.2f}"
        if run_pml:
            pt, pm = cell(res["pml"])
            pml_cols, ratio_p = f"{pt:>9} {pm:>9}", f"{res['pml']['seconds'] / o['seconds']:.0f}x"
        else:
            pml_cols, ratio_p = f"{'skipped (needs ~' + format(need / 1e9, '.1f') + ' GB)':>19}", "-"
        print(f"{b:>5} | {gt:>9} {gm:>9} | {ot:>9} {om:>9} | {nt:>9} {nm:>9} | {pml_cols} | {ratio_g:>9} "
              f"{ratio_n:>10} {ratio_p:>9}", flush=True)
        for m, r in res.items():
            if "error" in r:
                print(f"      {m} memory: {r['error']}")


if __name__ == "__main__":
    main()
