"""Smooth-AP and RS@k: our chunked, checkpointed losses vs the direct O(B^3) formula.

For each batch size B (4 samples per class, D = --dim) and each loss, one forward + backward:
median wall time and peak extra memory.  "direct" is the formula written with (B, B, B) tensors,
as the authors' code does (label-based here); "ours" is tcmlib (chunks of (c, P, B), each
checkpointed).  Each point runs in a FRESH subprocess so that memory numbers do not mix:

* CPU: peak extra resident memory = VmHWM - VmRSS around one call, after resetting the
  high-water mark through ``/proc/self/clear_refs`` (Linux); glibc's malloc is told to mmap every
  block >= 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave RSS at once.  Without
  clear_refs it falls back to ``ru_maxrss`` minus the RSS before the call (an upper bound).
* CUDA: ``max_memory_allocated`` minus allocated memory before the call.

Usage::

    python benchmarks/base_losses.py                 # CPU, B = 64 .. 1024, plus 400, 4000 for ours
    python benchmarks/base_losses.py --quick         # B = 64 128 256, 2 repeats
    python benchmarks/base_losses.py --device cuda --sizes 256 1024 4000
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads on a shared CPU

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tcmlib.losses.recall_surrogate import recall_surrogate_loss  # noqa: E402
from tcmlib.losses.smooth_ap import smooth_ap_loss  # noqa: E402

KS = (1, 2, 4, 8, 16)


def _sigmoid(t: torch.Tensor, temp: float) -> torch.Tensor:
    return torch.sigmoid((t / temp).clamp(-50.0, 50.0))


def direct_smooth_ap(x: torch.Tensor, labels: torch.Tensor, tau: float = 0.01) -> torch.Tensor:
    """Smooth-AP with (B, B, B) tensors: x (B, D), labels (B,) -> scalar."""
    x = F.normalize(x, dim=1)
    b = x.shape[0]
    s = x @ x.T                                                      # (B, B)
    pos = (labels[:, None] == labels[None, :]).to(x.dtype)           # (B, B) q included
    not_i = 1.0 - torch.eye(b, dtype=x.dtype, device=x.device)       # (B, B) j != i
    sg = _sigmoid(s[:, None, :] - s[:, :, None], tau) * not_i        # (B_q, B_i, B_j)
    r_all = 1.0 + sg.sum(-1)                                         # (B, B)
    r_pos = 1.0 + (sg * pos[:, None, :]).sum(-1)                     # (B, B)
    ap = (pos * r_pos / r_all).sum(1) / pos.sum(1)                   # (B,)
    return 1.0 - ap.mean()


def direct_rs(x: torch.Tensor, labels: torch.Tensor, tau1: float = 0.01, tau2: float = 1.0) -> torch.Tensor:
    """RS@k with (B, B, B) tensors: x (B, D), labels (B,) -> scalar (every query has a positive)."""
    x = F.normalize(x, dim=1)
    b = x.shape[0]
    eye = torch.eye(b, dtype=x.dtype, device=x.device)
    ks = torch.tensor([min(k, b) for k in KS], dtype=x.dtype, device=x.device)  # (K,)
    s = x @ x.T                                                      # (B, B)
    pos = (labels[:, None] == labels[None, :]).to(x.dtype) - eye     # (B, B) q excluded
    sg = _sigmoid(s[:, None, :] - s[:, :, None], tau1) * (1.0 - eye)  # (B_q, B_i, B_j)
    r = 1.0 + sg.sum(-1)                                             # (B, B)
    hits = (_sigmoid(ks - r[:, :, None], tau2) * pos[:, :, None]).sum(1)  # (B, K)
    rho = torch.minimum(hits, ks) / torch.minimum(ks, pos.sum(1, keepdim=True))  # (B, K)
    return (1.0 - rho.mean(1)).mean()


FUNCS = {
    ("smooth_ap", "ours"): smooth_ap_loss,
    ("smooth_ap", "direct"): direct_smooth_ap,
    ("rs@k", "ours"): recall_surrogate_loss,
    ("rs@k", "direct"): direct_rs,
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def worker(loss: str, method: str, b: int, dim: int, device: str, repeats: int) -> dict:
    """One point, in this (fresh) process: peak extra memory of one call, then median time."""
    dev = torch.device(device)
    fn = FUNCS[(loss, method)]
    labels = torch.arange(b, device=dev) // 4                        # 4 samples per class
    g = torch.Generator().manual_seed(0)                             # same batch for ours and direct
    x = torch.randn(b, dim, generator=g).to(dev).requires_grad_(True)

    def step() -> float:
        x.grad = None
        out = fn(x, labels)
        out.backward()
        return float(out)

    fn(x[:8].detach().requires_grad_(), labels[:8]).backward()       # warm-up: lazy imports, kernels
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        value = step()
        torch.cuda.synchronize()
        peak, how = torch.cuda.max_memory_allocated() - before, "cuda max_allocated"
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                          # reset VmHWM to VmRSS
            before = _status_kib("VmRSS")
            value = step()
            peak, how = (_status_kib("VmHWM") - before) * 1024, "VmHWM"
        except OSError:
            before = _status_kib("VmRSS")
            value = step()
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak, how = (maxrss - before) * 1024, "ru_maxrss (upper bound)"
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"value": value, "seconds": statistics.median(times), "peak_bytes": peak, "how": how}


def run_point(loss: str, method: str, b: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", loss, method, str(b), "--dim", str(args.dim),
           "--device", args.device, "--repeats", str(args.repeats)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": os.getcwd()}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def direct_bytes(b: int) -> int:
    """Peak of the direct formula: ~4 live (B, B, B) float32 tensors (measured: 2.0 GiB at B = 512)."""
    return 4 * 4 * b**3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ours-only-sizes", type=int, nargs="*", default=None,
                   help="extra B for ours only (default on CPU: 400 = the CUB batch, 4000 = the paper's)")
    p.add_argument("--quick", action="store_true", help="B = 64 128 256, 2 repeats")
    p.add_argument("--mem-cap-gb", type=float, default=6.0, help="skip the direct formula above this")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--worker", nargs=3, metavar=("LOSS", "METHOD", "B"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        loss, method, b = args.worker
        print(json.dumps(worker(loss, method, int(b), args.dim, args.device, args.repeats)))
        return
    if args.quick:
        args.sizes, args.repeats, args.ours_only_sizes = [64, 128, 256], 2, []
    if args.ours_only_sizes is None:
        args.ours_only_sizes = [400, 4000] if args.device == "cpu" else []
    sizes = sorted(set(args.sizes) | set(args.ours_only_sizes))
    print(f"device={args.device} dim={args.dim} repeats={args.repeats} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} loadavg={os.getloadavg()[0]:.1f}; 4 samples per class; "
          "time = median forward+backward, mem = peak extra memory of one call, fresh process per point")
    print(f"{'loss':10} {'B':>5} | {'ours s':>9} {'ours MiB':>9} | {'direct s':>9} {'direct MiB':>10} | note")
    for loss in ("smooth_ap", "rs@k"):
        for b in sizes:
            ours = run_point(loss, "ours", b, args)
            note = ours.get("error", "")
            if b not in args.sizes:
                direct = {"skip": f"B={b} shown for ours only"}
            elif direct_bytes(b) > args.mem_cap_gb * 2**30:
                direct = {"skip": f"direct skipped: needs ~{direct_bytes(b) / 2**30:.1f} GiB > cap "
                                  f"{args.mem_cap_gb:g} GiB (4 float32 (B,B,B) tensors)"}
            else:
                direct = run_point(loss, "direct", b, args)
            if "value" in ours and "value" in direct:
                note = f"|ours - direct| = {abs(ours['value'] - direct['value']):.1e}"
            note = direct.get("skip", direct.get("error", note))

            def cell(r: dict) -> str:
                if "seconds" not in r:
                    return f"{'-':>9} {'-':>9}"
                return f"{r['seconds']:9.4f} {r['peak_bytes'] / 2**20:9.1f}"

            print(f"{loss:10} {b:5d} | {cell(ours)} | {cell(direct)} {'':>1}| {note}", flush=True)
    print("memory measured by:", ours.get("how", "?"))


if __name__ == "__main__":
    main()
