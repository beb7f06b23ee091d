"""The first GPU checks of tcmlib in one short run: training steps, evaluation, losses, the data loader.

    python benchmarks/gpu_smoke.py --device cuda --quick        # the sizes below; about 2-3 minutes on an H100
    python benchmarks/gpu_smoke.py --device cpu --dry-run       # tiny sizes, any machine: the code paths only

Five checks, each a row of the table it prints (and a JSON record, ``--json``):

1. ``fit fp16`` / ``fit bf16``: smoke steps of the ResNet-50 CUB recipe (``cub_resnet50_smooth_ap``, B = 400,
   gradient cache of 128, channels-last) on a fabricated CUB copy in the exact on-disk layout (100 + 100
   classes of 500x375 JPEGs), ImageNet weights left out (no download here): seconds per step (median over
   the steps after the first two), peak GPU memory next to ``tcmlib.memory``'s estimate, the GradScaler's
   scale at the end (fp16), and the synchronising CUDA calls per step (``torch.cuda.set_sync_debug_mode
   ("warn")`` over the steps after the first; where they come from goes to the JSON record).  bf16 is
   skipped on a card without native bf16 (``fit`` refuses it there).
2. ``step (GPU alone)``: the same training step on a batch already on the GPU, no loader: the GPU's rate.
3. ``loader``: the recipe's DataLoader (workers and prefetch as ``fit`` sets them on this machine) on
   the fabricated copy, images per second against the GPU's rate: above it, the GPU never waits for data.
4. ``evaluate``: ``tcmlib.metrics.evaluate_embeddings`` of N = 60,000 float32 embeddings (D = 512, SOP-like classes
   of ~5) on the device: time, peak memory, and the metrics against float64 on the same device; at
   ``--eval-cpu-n`` (10,000 in quick mode: the CPU needs minutes at 60,000) the device's float32 and
   float64 results against the CPU's.  Tolerances: float64 = 1e-12 (the same sums); float32 against
   float64: R@k and MAP@R within 10 queries' worth (10 / N: near-tied neighbours may swap), OPIS and
   eps-OPIS within 1e-5 (measured on the CPU: ~1e-7 apart).
5. ``smooth_ap`` / ``rs@k`` / ``tcm`` at B = 4,000 (1,000 classes x 4, D = 512): peak memory, and value
   and gradient in float32 on the device against float64 on the CPU: value within 1e-5 relative,
   gradient within 1e-4 in relative norm (the CPU's own float32 measured at ~1e-7 and ~5e-6).

Expected times on an H100 (estimates from the CPU timings and the card's rates; nothing here has run
on a GPU yet): fabrication 10 s, each fit 20-30 s (model build, cuDNN's first-step search, 8 steps, an
evaluation of 200 images), GPU step 5 s, loader 5 s, evaluate 20-30 s (with the CPU reference at 10,000),
losses 20 s (the CPU's float64): about 2-3 minutes, well inside the 8 minutes a quick check may take.

Needs torch, torchvision and Pillow; pytorch-metric-learning and faiss are not used (the checks that
need them are in tests/test_tcm_loss.py and benchmarks/tcm_vs_pml.py, which ``gpu_check.sh`` skips or
runs without them on a machine that lacks them).  A check whose module is missing is skipped with a line
saying so.  Exit status 1 when a check fails or a comparison is out of tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECIPE = "cub_resnet50_smooth_ap"
CUB_SIZE = (500, 375)  # a typical CUB photo (width, height)
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Sizes:
    fit_steps: int  # training steps per fit (the first two are warm-up)
    batch: int  # images per step (the recipe's 400)
    chunk: int  # gradient-cache chunk (the recipe's 128)
    image: int  # side of the training crops (the recipe's 224)
    jpeg: tuple[int, int]  # fabricated photo size
    eval_n: int
    eval_cpu_n: int
    loss_b: int
    dim: int  # embedding dimension (the recipe's 512), of the fit runs, the evaluation and the losses


QUICK = Sizes(fit_steps=8, batch=400, chunk=128, image=224, jpeg=CUB_SIZE, eval_n=60_000, eval_cpu_n=10_000,
              loss_b=4000, dim=512)
FULL = dataclasses.replace(QUICK, fit_steps=20, eval_cpu_n=60_000)
DRY = Sizes(fit_steps=3, batch=8, chunk=4, image=32, jpeg=(40, 30), eval_n=1500, eval_cpu_n=600, loss_b=64, dim=16)


# ----------------------------------------------------------------------------------------------
# helpers


def peak_bytes(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """``(fn(), peak extra bytes on the CUDA device during it)``; None on other devices."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, float(torch.cuda.max_memory_allocated(device) - base)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt_gb(b: float | None) -> str:
    return "n/a" if b is None else f"{b / GB:.2f} GB"


def fabricate_cub(root: Path, per_class: int, size: tuple[int, int]) -> dict[str, int]:
    """CUB_200_2011/{images.txt, image_class_labels.txt, images/<class>/<file>.jpg}: classes 1-100 with
    ``per_class`` images (the train split), 101-200 with 2 (test).  48 distinct smooth, noisy photos
    are hard-linked (else copied) into place: decoding costs what a real photo of that size costs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = root / "CUB_200_2011"
    protos = []
    for k in range(48):
        low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        path = root / "protos" / f"{k}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, "JPEG", quality=90)
        protos.append(path)
    images, labels, i = [], [], 0
    for c in range(1, 201):
        for _ in range(per_class if c <= 100 else 2):
            i += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{i:05d}.jpg"
            dest = base / "images" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(protos[i % len(protos)], dest)
            except OSError:
                shutil.copyfile(protos[i % len(protos)], dest)
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return {"images": i}


def recipe(sizes: Sizes, data_root: Path, run_dir: Path, device: torch.device, amp: str) -> Any:
    from tcmlib.train import load_config

    cfg = load_config(RECIPE, data_root=str(data_root), run_dir=str(run_dir), device=str(device), amp=amp,
                      pretrained=False, progress=False, epochs=1, steps_per_epoch=sizes.fit_steps,
                      batch_size=sizes.batch, chunk_size=sizes.chunk, image_size=sizes.image, eval_batch_size=256,
                      dim=sizes.dim)
    return cfg


# ----------------------------------------------------------------------------------------------
# 1. fit


class StepProbe:
    """Time each training step of ``fit`` (at the entry of its backward helper, once a step) and count the
    synchronising CUDA calls from the second step's start to the last step's start."""

    def __init__(self, device: torch.device, last: int) -> None:
        self.device, self.last = device, last
        self.starts: list[float] = []
        self.syncs: Counter = Counter()
        self._catch: Any = None

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            self.starts.append(time.perf_counter())
            k = len(self.starts)
            if self.device.type == "cuda" and k == 2:
                self._catch = warnings.catch_warnings(record=True)
                self._log = self._catch.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            if self._catch is not None and k == self.last:
                self.stop()
            return fn(*args, **kwargs)
        return step

    def stop(self) -> None:
        if self._catch is None:
            return
        torch.cuda.set_sync_debug_mode(0)
        self._catch.__exit__(None, None, None)
        self._catch = None
        for w in self._log:
            if "synchroniz" in str(w.message):
                self.syncs[f"{Path(w.filename).name}:{w.lineno}"] += 1

    def seconds_per_step(self) -> float | None:
        gaps = [b - a for a, b in zip(self.starts[1:], self.starts[2:])]  # after the first two (warm-up)
        return statistics.median(gaps) if gaps else None


def check_fit(sizes: Sizes, data_root: Path, work: Path, device: torch.device, amp: str) -> dict[str, Any]:
    import tcmlib.train as train
    from tcmlib.checkpoint import read_checkpoint
    from tcmlib.memory import Target, estimate_memory

    cfg = recipe(sizes, data_root, work / f"run-{amp}", device, amp)
    if device.type == "cuda" and amp == "bf16":
        try:
            train.resolve_amp("bf16", device)
        except ValueError as e:
            return {"skipped": str(e)}
    probe = StepProbe(device, sizes.fit_steps)
    saved = train.direct_backward, train.cached_backward
    train.direct_backward, train.cached_backward = probe.wrap(saved[0]), probe.wrap(saved[1])
    try:
        result, peak = peak_bytes(device, lambda: train.fit(cfg))
    finally:
        probe.stop()
        train.direct_backward, train.cached_backward = saved
    scaler = read_checkpoint(result.checkpoint)["scaler"] if result.checkpoint else None
    rec: dict[str, Any] = {"steps": result.final["step"], "s_per_step": probe.seconds_per_step(), "peak_bytes": peak,
                           "scale": scaler["scale"] if scaler else None, "loss": result.final["loss"]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        here = Target(props.name, None, props.total_memory, os.cpu_count(), (props.major, props.minor))
        rec["estimate_bytes"] = estimate_memory(cfg, here).device_bytes
        counted = max(sizes.fit_steps - 2, 1)  # from the second step's start to the last step's start
        rec["syncs_per_step"] = sum(probe.syncs.values()) / counted
        rec["sync_sites"] = dict(probe.syncs.most_common(12))
    if not math.isfinite(result.final["loss"]):
        rec["failed"] = f"the loss is {result.final['loss']}"
    del result
    free(device)
    return rec


def row_fit(rec: dict[str, Any], sizes: Sizes) -> str:
    sps = rec.get("s_per_step")
    parts = [f"{sps:.3f} s/step ({sizes.batch / sps:.0f} img/s)" if sps else "s/step n/a",
             f"peak {fmt_gb(rec.get('peak_bytes'))}" + (f" (est. {fmt_gb(rec['estimate_bytes'])})"
                                                        if "estimate_bytes" in rec else "")]
    if rec.get("scale") is not None:
        parts.append(f"scale {rec['scale']:g}")
    if "syncs_per_step" in rec:
        parts.append(f"{rec['syncs_per_step']:.1f} syncs/step")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# 2. the step alone, 3. the loader


def check_step(sizes: Sizes, data_root: Path, work: Path, device: torch.device) -> dict[str, Any]:
    from tcmlib.gradcache import cached_backward
    from tcmlib.losses.registry import make_loss
    from tcmlib.models import build_embedder
    from tcmlib.train import resolve_amp

    cfg = recipe(sizes, data_root, work / "step", device, "auto")
    amp_dtype, use_scaler = resolve_amp(cfg.amp, device)
    model = build_embedder(cfg.backbone, cfg.dim, False, 3, image_size=sizes.image, frozen_bn=cfg.frozen_bn).to(device)
    model = model.to(memory_format=torch.channels_last)
    loss = make_loss(cfg.loss).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sizes.batch, 3, sizes.image, sizes.image, generator=gen).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.arange(sizes.batch) // cfg.m).to(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        cached_backward(model, x, y, loss, sizes.chunk, amp_dtype=amp_dtype, scaler=scaler)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    del model, opt, x
    free(device)
    sps = statistics.median(times[2:])
    return {"amp": str(amp_dtype), "s_per_step": sps, "images_per_s": sizes.batch / sps}


def check_loader(sizes: Sizes, data_root: Path, work: Path, device: torch.device) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from tcmlib.data import MPerClassBatchSampler
    from tcmlib.data.seeded import SeededAugmentation
    from tcmlib.memory import machine_loader_settings
    from tcmlib.train import build_splits

    cfg = recipe(sizes, data_root, work / "loader", device, "auto")
    train_data, _, _, _ = build_splits(cfg)
    sampler = MPerClassBatchSampler(torch.as_tensor(getattr(train_data, "labels")), cfg.m, cfg.batch_size, seed=0)
    workers, prefetch = machine_loader_settings(cfg)
    loader = DataLoader(SeededAugmentation(train_data, 0), batch_sampler=sampler, num_workers=workers,
                        prefetch_factor=prefetch or None, pin_memory=device.type == "cuda")
    stamps = []
    for b, (x, _) in enumerate(loader):
        stamps.append(time.perf_counter())
        if b + 1 >= sizes.fit_steps:
            break
    images = sizes.batch * (len(stamps) - 1)  # from the first batch on: the workers are up
    return {"workers": workers, "prefetch": prefetch, "batches": len(stamps),
            "images_per_s": images / (stamps[-1] - stamps[0]) if images else None}


def row_loader(rec: dict[str, Any], gpu_rate: float | None) -> str:
    rate = rec["images_per_s"]
    text = f"{rate:.0f} img/s ({rec['workers']} workers, prefetch {rec['prefetch']})"
    if gpu_rate:
        text += f" = {rate / gpu_rate:.2f}x the GPU's rate" + (": the GPU waits for data" if rate < gpu_rate else "")
    return text


# ----------------------------------------------------------------------------------------------
# 4. evaluate


def clustered(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SOP-like embeddings: classes of ~5, class centres plus noise strong enough that R@1 is far from 1."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, max(n // 5, 2), (n,), generator=gen)
    centres = torch.randn(int(y.max()) + 1, dim, generator=gen)
    return centres[y] + 2.5 * torch.randn(n, dim, generator=gen), y


def _metrics(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    from tcmlib.metrics import evaluate_embeddings

    return evaluate_embeddings(x, y, ks=(1, 10, 100)).as_dict()


def _worst(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """(largest |difference| over R@k and MAP@R, over OPIS and eps-OPIS)."""
    ret = max(abs(a[k] - b[k]) for k in a if k.startswith(("R@", "MAP")))
    cons = max(abs(a[k] - b[k]) for k in a if "OPIS" in k)
    return ret, cons


def check_evaluate(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    x, y = clustered(sizes.eval_n, sizes.dim, seed=1)
    xd, yd = x.to(device), y.to(device)
    t0 = time.perf_counter()
    f32, peak = peak_bytes(device, lambda: _metrics(xd, yd))
    seconds = time.perf_counter() - t0
    f64 = _metrics(xd.double(), yd)
    ret, cons = _worst(f32, f64)
    rec: dict[str, Any] = {"n": sizes.eval_n, "seconds": seconds, "peak_bytes": peak, "metrics": f32,
                           "f32_vs_f64": [ret, cons]}
    bad = []
    if ret > 10 / sizes.eval_n or cons > 1e-5:
        bad.append(f"float32 vs float64 on {device.type}: {ret:.2g} (R@k, MAP@R), {cons:.2g} (OPIS)")
    m = sizes.eval_cpu_n
    xs, ys = x[:m], y[:m]
    dev32, dev64 = _metrics(xs.to(device), ys.to(device)), _metrics(xs.double().to(device), ys.to(device))
    cpu32, cpu64 = _metrics(xs, ys), _metrics(xs.double(), ys)
    rec["cpu_n"] = m
    rec["device_vs_cpu_f64"] = list(_worst(dev64, cpu64))
    rec["device_vs_cpu_f32"] = list(_worst(dev32, cpu32))
    if max(rec["device_vs_cpu_f64"]) > 1e-12:
        bad.append(f"float64 {device.type} vs cpu at N = {m}: {rec['device_vs_cpu_f64']}")
    r32, c32 = rec["device_vs_cpu_f32"]
    if r32 > 10 / m or c32 > 1e-5:
        bad.append(f"float32 {device.type} vs cpu at N = {m}: {r32:.2g} (R@k, MAP@R), {c32:.2g} (OPIS)")
    if bad:
        rec["failed"] = "; ".join(bad)
    del xd
    free(device)
    return rec


# ----------------------------------------------------------------------------------------------
# 5. losses at B = 4,000


def _loss_fns() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    from tcmlib.losses.recall_surrogate import recall_surrogate_loss
    from tcmlib.losses.smooth_ap import smooth_ap_loss
    from tcmlib.losses.tcm import tcm_loss

    return {"smooth_ap": smooth_ap_loss, "rs@k": recall_surrogate_loss, "tcm": tcm_loss}


def _value_grad(fn: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e = x.detach().clone().requires_grad_()
    v = fn(e, y)
    v.backward()
    return v.detach().double().cpu(), e.grad.double().cpu()  # type: ignore[union-attr]


def check_losses(sizes: Sizes, device: torch.device) -> dict[str, dict[str, Any]]:
    b = sizes.loss_b
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(b) // 4  # B / 4 classes x 4, as the recipes' batches
    centres = torch.randn(b // 4, sizes.dim, generator=gen)
    x = centres[y] + 3.0 * torch.randn(b, sizes.dim, generator=gen)
    out = {}
    for name, fn in _loss_fns().items():
        xd, yd = x.to(device), y.to(device)
        (v, g), peak = peak_bytes(device, lambda: _value_grad(fn, xd, yd))
        with torch.autocast(device.type, dtype=torch.bfloat16):  # a caller's autocast: the loss stays float32
            v_auto, _ = _value_grad(fn, xd, yd)
        v64, g64 = _value_grad(fn, x.double(), y)
        rec: dict[str, Any] = {"peak_bytes": peak, "value": float(v), "value_rel": float((v - v64).abs() / v64.abs().clamp_min(1e-30)),
               "grad_rel": float((g - g64).norm() / g64.norm().clamp_min(1e-30)),
               "autocast_rel": float((v_auto - v).abs() / v.abs().clamp_min(1e-30))}
        if rec["value_rel"] > 1e-5 or rec["grad_rel"] > 1e-4 or rec["autocast_rel"] > 1e-5:
            rec["failed"] = "out of tolerance (value 1e-5, gradient 1e-4, autocast 1e-5 relative)"
        out[name] = rec
        del xd
        free(device)
    return out


# ----------------------------------------------------------------------------------------------
# driver


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: --device cuda, but torch sees no CUDA device here (--device cpu --dry-run for a dry run)",
              file=sys.stderr)
        return 2
    sizes = DRY if args.dry_run else QUICK if args.quick else FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    have_pml = importlib.util.find_spec("pytorch_metric_learning") is not None
    print(f"gpu_smoke on {name} (torch {torch.__version__}), {'dry run' if args.dry_run else 'quick' if args.quick else 'full'}"
          f"; pytorch-metric-learning {'present, not needed here' if have_pml else 'absent: not needed here'}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # (the default) float32 products stay float32
    rows: list[tuple[str, str, str]] = []
    records: dict[str, Any] = {"device": name, "sizes": dataclasses.asdict(sizes), "wall_s": {}}
    failed = []
    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))

    def attempt(label: str, setting: str, fn: Callable[[], Any], show: Callable[[Any], str]) -> Any:
        t0 = time.perf_counter()
        try:
            rec = fn()
        except ImportError as e:
            rows.append((label, setting, f"SKIPPED: {e} (not installed here)"))
            records[label] = {"skipped": str(e)}
            return None
        except Exception as e:  # a failed check is reported and the others still run
            traceback.print_exc()
            rows.append((label, setting, f"FAILED: {type(e).__name__}: {' '.join(str(e).split())[:160]}"))
            records[label] = {"failed": f"{type(e).__name__}: {e}"}
            failed.append(label)
            return None
        rec_d = rec if isinstance(rec, dict) else {}
        records[label] = rec
        records["wall_s"][label] = round(time.perf_counter() - t0, 2)
        if "skipped" in rec_d:
            rows.append((label, setting, f"SKIPPED: {rec_d['skipped']}"))
        else:
            rows.append((label, setting, show(rec) + (f"  FAILED: {rec_d['failed']}" if "failed" in rec_d else "")))
            if "failed" in rec_d:
                failed.append(label)
        print(f"  {label}: done in {time.perf_counter() - t0:.1f} s", flush=True)
        return rec

    try:
        data_root = work / "cub"
        per_class = 4 * math.ceil(sizes.fit_steps * sizes.batch / 100 / 4)  # fit_steps batches of B in one epoch
        fab = attempt("fabricate CUB", f"100 x {per_class} + 100 x 2 JPEGs {sizes.jpeg[0]}x{sizes.jpeg[1]}",
                      lambda: fabricate_cub(data_root, per_class, sizes.jpeg), lambda r: f"{r['images']} files")
        shape = f"B={sizes.batch}, chunk {sizes.chunk}, {sizes.image} px, {sizes.fit_steps} steps"
        if fab is not None:
            for amp in ("fp16", "bf16"):
                attempt(f"fit {amp}", shape, functools.partial(check_fit, sizes, data_root, work, device, amp),
                        lambda r: row_fit(r, sizes))
            step = attempt("step (GPU alone)", f"B={sizes.batch}, amp auto, batch on the device",
                           lambda: check_step(sizes, data_root, work, device),
                           lambda r: f"{r['s_per_step']:.3f} s/step ({r['images_per_s']:.0f} img/s)")
            gpu_rate = step["images_per_s"] if step else None
            attempt("loader", "the recipe's transforms, workers as fit sets them",
                    lambda: check_loader(sizes, data_root, work, device), lambda r: row_loader(r, gpu_rate))
        attempt("evaluate", f"N={sizes.eval_n} float32 (CPU reference at N={sizes.eval_cpu_n})",
                lambda: check_evaluate(sizes, device),
                lambda r: f"{r['seconds']:.2f} s, peak {fmt_gb(r['peak_bytes'])}; f32 vs f64 "
                          f"{r['f32_vs_f64'][0]:.1g}/{r['f32_vs_f64'][1]:.1g}, vs cpu f64 {max(r['device_vs_cpu_f64']):.1g}"
                          f", f32 {r['device_vs_cpu_f32'][0]:.1g}/{r['device_vs_cpu_f32'][1]:.1g}")
        losses = attempt("losses", f"B={sizes.loss_b}, D={sizes.dim}", lambda: check_losses(sizes, device),
                         lambda r: "see below")
        if losses:
            rows.pop()
            for lname, r in losses.items():
                rows.append((lname, f"B={sizes.loss_b} vs float64 on the CPU",
                             f"peak {fmt_gb(r['peak_bytes'])}, value {r['value_rel']:.1g}, grad {r['grad_rel']:.1g}, "
                             f"under bf16 autocast {r['autocast_rel']:.1g} (relative)"
                             + (f"  FAILED: {r['failed']}" if "failed" in r else "")))
                if "failed" in r:
                    failed.append(lname)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    swidth = max(len(r[1]) for r in rows)
    print()
    for label, setting, result in rows:
        print(f"{label:<{width}}  {setting:<{swidth}}  {result}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1, default=str))
    if failed:
        print(f"gpu_smoke: FAILED: {', '.join(failed)}")
        return 1
    print("gpu_smoke: all checks passed" + (" (skipped ones said so above)" if any("SKIPPED" in r[2] for r in rows) else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick sizes (8 fit steps, CPU reference at 10,000)")
    size.add_argument("--dry-run", action="store_true", help="tiny sizes: the code paths in seconds, on any device")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON here")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
