"""How much of a training step does TCM cost?  ("at no added computational cost", says the blog.)

One full step = forward + loss + backward + Adam step, timed with the base loss alone and with
base + TCM; TCM's share = (t_with - t_without) / t_with.  Because a difference of two noisy medians
can be lost in the noise, we also time TCM's own forward + backward on the batch's embeddings and
report it as a share of the step (``isolated``).

    python benchmarks/tcm_share.py                      # CPU: small_cnn 32x32 and resnet50 224x224, B = 128
    python benchmarks/tcm_share.py --quick              # CPU: resnet50 at B = 32, fewer repeats
    python benchmarks/tcm_share.py --device cuda        # + bf16 autocast, channels_last, gradient cache

On CUDA it also reports images/s and peak GPU memory of a gradient-cache step (``--big-batch``
images in chunks of ``--chunk``), with and without TCM.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from tcmlib.gradcache import cached_backward, direct_backward  # noqa: E402
from tcmlib.losses.registry import make_loss  # noqa: E402
from tcmlib.losses.tcm import tcm_loss  # noqa: E402
from tcmlib.models import build_embedder  # noqa: E402

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_model(backbone: str, batch: int, size: int, in_ch: int, loss_name: str, repeats: int,
                device: torch.device, amp: torch.dtype | None, channels_last: bool) -> dict:
    """Median step times without / with TCM (interleaved, so drifting load hits both alike)."""
    torch.manual_seed(0)
    model = build_embedder(backbone, dim=512, pretrained=False, in_channels=in_ch, small_input=False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randn(batch, in_ch, size, size, device=device)  # (B, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch // 4, device=device).repeat_interleave(4)  # (B,) 4 images a class
    losses = {"base": make_loss(loss_name).to(device), "tcm": make_loss(loss_name, tcm=True).to(device)}

    def step(loss_fn: torch.nn.Module) -> None:
        opt.zero_grad(set_to_none=True)
        direct_backward(model, x, y, loss_fn, amp_dtype=amp)
        opt.step()

    emb = torch.nn.functional.normalize(torch.randn(batch, 512, device=device), dim=1).requires_grad_(True)

    def tcm_alone() -> None:  # TCM's own forward + backward on (B, 512) embeddings
        emb.grad = None
        tcm_loss(emb, y).backward()

    for fn in (lambda: step(losses["base"]), lambda: step(losses["tcm"]), tcm_alone):  # warm-up
        fn()
    t = {"base": [], "tcm": [], "alone": []}
    for _ in range(repeats):
        t["base"].append(timed(lambda: step(losses["base"]), device))
        t["tcm"].append(timed(lambda: step(losses["tcm"]), device))
        t["alone"].append(timed(tcm_alone, device))
    med = {k: statistics.median(v) for k, v in t.items()}
    return {
        "backbone": backbone, "batch": batch, "image": f"{in_ch}x{size}x{size}", "loss": loss_name,
        "repeats": repeats, "step_s": med["base"], "step_tcm_s": med["tcm"], "tcm_alone_s": med["alone"],
        "share_diff_pct": 100 * (med["tcm"] - med["base"]) / med["tcm"],
        "share_isolated_pct": 100 * med["alone"] / med["tcm"],
    }


def bench_gradcache(backbone: str, batch: int, chunk: int, size: int, loss_name: str, repeats: int,
                    device: torch.device, amp: torch.dtype | None) -> list[dict]:
    """CUDA: images/s and peak memory of a gradient-cache step of ``batch`` images, without / with TCM."""
    torch.manual_seed(0)
    model = build_embedder(backbone, dim=512, pretrained=False).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch // 4, device=device).repeat_interleave(4)
    out = []
    for tcm in (False, True):
        loss_fn = make_loss(loss_name, tcm=tcm).to(device)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            cached_backward(model, x, y, loss_fn, chunk, amp_dtype=amp)
            opt.step()

        step()
        torch.cuda.reset_peak_memory_stats(device)
        times = [timed(step, device) for _ in range(repeats)]
        med = statistics.median(times)
        out.append({"backbone": backbone, "batch": batch, "chunk": chunk, "tcm": tcm, "step_s": med,
                    "images_per_s": batch / med, "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="CPU: resnet50 at B = 32 and 3 repeats")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loss", default="smooth_ap", help="base loss (registry name)")
    p.add_argument("--amp", default=None, choices=list(AMP), help="default: bf16 on cuda, none on cpu")
    p.add_argument("--big-batch", type=int, default=1024, help="cuda: gradient-cache batch")
    p.add_argument("--chunk", type=int, default=128, help="cuda: gradient-cache chunk")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    amp = AMP[args.amp or ("bf16" if device.type == "cuda" else "none")]
    cl = device.type == "cuda"
    r50_batch, r50_repeats = (32, 3) if args.quick else (args.batch, args.repeats)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, amp {amp}, "
          f"channels_last {cl}, base loss {args.loss}")
    rows = [
        bench_model("small_cnn", args.batch, 32, 1, args.loss, args.repeats, device, amp, cl),
        bench_model("resnet50", r50_batch, 224, 3, args.loss, r50_repeats, device, amp, cl),
    ]
    print(f"{'backbone':<10} {'B':>5} {'image':>11} {'step s':>9} {'+TCM s':>9} {'TCM alone s':>12} "
          f"{'share (diff)':>13} {'share (isolated)':>17}")
    for r in rows:
        print(f"{r['backbone']:<10} {r['batch']:>5} {r['image']:>11} {r['step_s']:>9.4f} {r['step_tcm_s']:>9.4f} "
              f"{r['tcm_alone_s']:>12.5f} {r['share_diff_pct']:>12.2f}% {r['share_isolated_pct']:>16.3f}%")
    result = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    if device.type == "cuda":
        gc = bench_gradcache("resnet50", args.big_batch, args.chunk, 224, args.loss, args.repeats, device, amp)
        for r in gc:
            print(f"gradcache resnet50 B={r['batch']} chunk={r['chunk']} tcm={r['tcm']}: {r['images_per_s']:.0f} "
                  f"images/s, peak {r['peak_gib']:.2f} GiB")
        result["gradcache"] = gc
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
