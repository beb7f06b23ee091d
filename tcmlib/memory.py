"""How much host and GPU memory a training config needs, and loader settings that fit a host.

:func:`estimate_memory` adds up, for one process of a :class:`tcmlib.train.TrainConfig` run on a
CUDA card, with ``b`` = images per step and process, ``s`` = bytes of one image as the loader hands it
over (photos: uint8, ``C x H x W``, normalised on the card; the in-memory sets: float32, ``C x H x W x 4``)
and ``f`` = bytes of one float32 image on the card (``C x H x W x 4``)::

    host   = HOST_BASE + workers x WORKER_BASE
             + s b x (workers x prefetch       batches ready or being read by the workers
                      + max(workers, 1)        a worker's sample list while it stacks them (collate)
                      + 1 + 1)                 the batch in the step, its pinned copy
    device = 16 P (+ 2 P under AMP)            weights, gradients, Adam's two moments (+ autocast's copies)
             + (s + f) b  (f b in memory)      the batch on the card as it arrives, and normalised
             + ACT_MARGIN x a x c              saved activations of one chunk of c images (c = chunk_size,
                                               else b; the gradient cache re-embeds one chunk at a time)
             + LOSS_BYTES(b)                   the loss's (b, b) matrices and chunked intermediates

``P`` is the number of model parameters and ``a`` the bytes autograd saves per image in a forward
pass: both come from building the model on PyTorch's ``meta`` device (no memory, no compute) and
recording the tensors autograd saves (``torch.autograd.graph.saved_tensors_hooks``), in the
dtype the card's ``amp: auto`` picks.  The constants are assumptions, stated below; a GPU run's
``torch.cuda.max_memory_allocated`` is what checks them.

:func:`loader_settings` caps a config's ``num_workers`` by the CPUs and chooses the largest
``prefetch_factor`` (2, PyTorch's default, or 1) so that the host estimate stays within a share
of the machine's memory; :func:`tcmlib.train.fit` builds its training loader with it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Target", "TARGETS", "MemoryEstimate", "estimate_memory", "loader_settings", "host_memory_bytes",
           "declared_target", "fit_to_target", "machine_loader_settings"]

GB = 10**9
HOST_BASE = 3 * GB  # the training process: Python, torch, the CUDA libraries, the data set index (assumed)
WORKER_BASE = GB // 4  # one loader worker process beyond the pages it shares with its parent (assumed)
ACT_MARGIN = 1.25  # backward's transient gradients, cuDNN / cuBLAS workspaces, allocator slack (assumed)
HOST_SHARE = 0.75  # loader_settings keeps the host estimate within this share of the machine's memory


@dataclass(frozen=True)
class Target:
    """A machine a config is meant to run on: memory in bytes (``None``: not bounded), CPUs, CUDA capability."""

    name: str
    host_bytes: int | None
    device_bytes: int
    cpus: int | None
    capability: tuple[int, int]


TARGETS = {
    "colab_t4": Target("Colab T4", host_bytes=12 * GB, device_bytes=15 * GB, cpus=2, capability=(7, 5)),
    "h100": Target("H100", host_bytes=None, device_bytes=80 * GB, cpus=None, capability=(9, 0)),
}
# Which machine each shipped recipe declares: the B = 4,000 recipes (SOP, iNat) need a large GPU;
# CUB, Cars and the offline sets are meant to run on a free Colab T4.
_DATASET_TARGET = {"sop": "h100", "inat": "h100"}


def declared_target(cfg: Any) -> Target:
    """The :data:`TARGETS` entry a config declares: ``h100`` for SOP and iNat, ``colab_t4`` otherwise."""
    return TARGETS[_DATASET_TARGET.get(cfg.dataset, "colab_t4")]


@dataclass(frozen=True)
class MemoryEstimate:
    """What :func:`estimate_memory` returns; every ``*_bytes`` field in bytes."""

    images_per_step: int  # b: the batch of one process
    image_bytes: int  # s: one image as the loader hands it over (uint8 photos, float32 in-memory sets)
    num_workers: int
    prefetch_factor: int  # batches each worker reads ahead (1 or 2; 0 with no workers)
    batches_on_host: int  # batches in host memory at once (the bracket of the formula)
    host_bytes: int
    parameters: int  # P
    state_bytes: int  # weights, gradients, Adam moments (+ autocast copies)
    activation_bytes: int  # ACT_MARGIN x a x c
    loss_bytes: int
    device_bytes: int
    amp_dtype: torch.dtype | None


def host_memory_bytes() -> int | None:
    """This machine's physical memory in bytes, or ``None`` where the OS does not say (then nothing is capped)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _image_shape(cfg: Any) -> tuple[int, int]:
    """(channels, side) of the images a config's model sees."""
    from tcmlib.data.shapes import SMALL_DATASETS, input_size

    return (1 if cfg.dataset in SMALL_DATASETS else 3), input_size(cfg)


@functools.lru_cache(maxsize=None)
def _model_profile(backbone: str, dim: int, channels: int, side: int, small_input: bool, frozen_bn: bool | None,
                   dtype: torch.dtype) -> tuple[int, int]:
    """``(parameters, bytes autograd saves per image)`` of an embedder, measured on the meta device."""
    from tcmlib.models import build_embedder

    with torch.device("meta"):
        model = build_embedder(backbone, dim, False, channels, small_input=small_input, image_size=side,
                               frozen_bn=frozen_bn).to(dtype).train()

    def saved_bytes(n: int) -> int:
        saved: dict[int, torch.Tensor] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[id(t)] = t  # a tensor saved by two operations counts once
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.empty(n, channels, side, side, dtype=dtype, device="meta"))
        return sum(t.numel() * t.element_size() for t in saved.values())

    # the difference of 4 and 2 images: what grows with the batch (the weights autograd saves do not)
    # (2 at least: BatchNorm in train mode needs more than one value per channel)
    per_image = (saved_bytes(4) - saved_bytes(2)) // 2
    return sum(p.numel() for p in model.parameters()), per_image


def _loss_bytes(b: int) -> int:
    """The loss's memory for b embeddings: ~4 float32 (b, b) matrices (similarities, their gradient, TCM's W and
    masks) and ~6 chunk intermediates of 2^22 float32 elements (Smooth-AP / RS@k's (c, P, B) blocks)."""
    return 4 * 4 * b * b + 6 * 4 * 2**22


def _host(batch_bytes: int, workers: int, prefetch: int) -> tuple[int, int]:
    batches = workers * prefetch + max(workers, 1) + 2
    return batches, HOST_BASE + workers * WORKER_BASE + batches * batch_bytes


def loader_settings(cfg: Any, *, cpus: int | None, host_bytes: int | None, world_size: int = 1) -> tuple[int, int]:
    """``(num_workers, prefetch_factor)`` for the training loader: workers <= ``cpus``, host memory within budget.

    The host estimate (module doc) must stay within ``HOST_SHARE`` of ``host_bytes`` (``None``:
    unbounded; ``cpus`` ``None``: uncapped).  More workers are preferred over more prefetching; if
    even one worker's batches do not fit, 0 workers (the main process reads the data);
    ``prefetch_factor`` is 0 when there are no workers.  :func:`machine_loader_settings` asks this machine.
    """
    workers = min(cfg.num_workers, cpus) if cpus else cfg.num_workers
    channels, side = _image_shape(cfg)
    batch_bytes = cfg.batch_size // world_size * channels * side * side * _loader_bytes_per_value(cfg)
    for w in range(workers, 0, -1):
        for prefetch in (2, 1):
            if host_bytes is None or _host(batch_bytes, w, prefetch)[1] <= HOST_SHARE * host_bytes:
                return w, prefetch
    return 0, 0


def _loader_bytes_per_value(cfg: Any) -> int:
    """1 for photos (uint8 batches, normalised on the card), 4 for the in-memory sets (float32 from the loader)."""
    from tcmlib.data.shapes import SMALL_DATASETS

    return 4 if cfg.dataset in SMALL_DATASETS else 1


def machine_loader_settings(cfg: Any, world_size: int = 1) -> tuple[int, int]:
    """:func:`loader_settings` for this machine: ``os.cpu_count()`` CPUs, :func:`host_memory_bytes` of memory."""
    return loader_settings(cfg, cpus=os.cpu_count(), host_bytes=host_memory_bytes(), world_size=world_size)


def estimate_memory(cfg: Any, target: Target | None = None, *, world_size: int = 1) -> MemoryEstimate:
    """Host and GPU memory (bytes) of one process of ``cfg`` on ``target`` (default: its declared one).

    ``cfg`` is a :class:`tcmlib.train.TrainConfig`.  The loader runs as :func:`loader_settings`
    would set it on that target (its CPUs and host memory); ``amp`` resolves for its CUDA
    capability (``auto``: bf16 from 8.0, else fp16).  Formula and assumptions: the module doc.
    """
    from tcmlib.embedding import AMP_DTYPES

    target = declared_target(cfg) if target is None else target
    if cfg.amp == "auto":
        amp: torch.dtype | None = torch.bfloat16 if target.capability >= (8, 0) else torch.float16
    else:
        amp = AMP_DTYPES.get(cfg.amp) if cfg.amp else None
    channels, side = _image_shape(cfg)
    b = cfg.batch_size // world_size
    image = channels * side * side * _loader_bytes_per_value(cfg)  # as the loader hands it over
    on_card = channels * side * side * 4 + (image if image != channels * side * side * 4 else 0)
    workers, prefetch = loader_settings(cfg, cpus=target.cpus, host_bytes=target.host_bytes, world_size=world_size)
    batches, host = _host(b * image, workers, prefetch)
    params, per_image = _model_profile(cfg.backbone, cfg.dim, channels, side, cfg.small_input, cfg.frozen_bn,
                                       amp or torch.float32)
    state = 16 * params + (2 * params if amp is not None else 0)
    chunk = cfg.chunk_size if cfg.chunk_size is not None and cfg.chunk_size < b else b
    activations = int(ACT_MARGIN * per_image * chunk)
    loss = _loss_bytes(cfg.batch_size)  # the loss sees the global batch (gathered under DDP)
    device = state + b * on_card + activations + loss
    return MemoryEstimate(images_per_step=b, image_bytes=image, num_workers=workers, prefetch_factor=prefetch,
                          batches_on_host=batches, host_bytes=host, parameters=params, state_bytes=state,
                          activation_bytes=activations, loss_bytes=loss, device_bytes=device, amp_dtype=amp)


def fits(est: MemoryEstimate, target: Target) -> bool:
    """Whether an estimate stays within a target's host (if bounded) and device memory."""
    return est.device_bytes <= target.device_bytes and (target.host_bytes is None or est.host_bytes <= target.host_bytes)


def fit_to_target(cfg: Any, target: Target) -> dict[str, Any]:
    """The config changes that make ``cfg`` fit ``target``: ``{}`` if it fits as it is.

    Halves ``chunk_size`` (the gradient is the same, only the passes multiply) down to 8 while the
    device estimate is too big, then halves ``batch_size`` (this changes the training recipe) while
    the host or device estimate is; the loader's workers and prefetching are chosen by
    :func:`loader_settings` on the target.  Returns the changed keys, with ``num_workers`` and
    ``prefetch_factor`` as they would run there when they differ from the config's.
    """
    changed = cfg
    while not fits(estimate_memory(changed, target), target):
        b = changed.batch_size
        chunk = changed.chunk_size if changed.chunk_size is not None and changed.chunk_size < b else b
        if chunk > 8 and estimate_memory(changed, target).device_bytes > target.device_bytes:
            changed = dataclasses.replace(changed, chunk_size=chunk // 2)
        elif b // 2 >= 2 * changed.m and (b // 2) % changed.m == 0:
            changed = dataclasses.replace(changed, batch_size=b // 2)
        else:
            raise ValueError(f"no chunk_size or batch_size makes {cfg.backbone} fit {target.name}")
    out = {k: getattr(changed, k) for k in ("chunk_size", "batch_size") if getattr(changed, k) != getattr(cfg, k)}
    est = estimate_memory(changed, target)
    if est.num_workers != cfg.num_workers:
        out.update(num_workers=est.num_workers, prefetch_factor=est.prefetch_factor)
    return out
