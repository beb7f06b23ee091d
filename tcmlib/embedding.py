"""Run a model over a whole data set: :func:`embed` and the mixed-precision choice :func:`resolve_amp`.

The step that training, evaluation and the sharded evaluation of :mod:`tcmlib.distributed` share,
here so that both :mod:`tcmlib.train` and :mod:`tcmlib.distributed` import it without importing each
other.  ``tcmlib.train.embed`` and ``tcmlib.train.resolve_amp`` are the same functions.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["AMP_DTYPES", "embed", "resolve_amp"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # TrainConfig.amp -> autocast dtype


def _usable_device(device: str | torch.device, caller: str) -> torch.device:
    """``torch.device(device)`` if this machine has it, else ``ValueError`` saying what to pass instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{caller}(device={device!r}): not a device name; pass 'cpu', 'cuda', 'cuda:<index>' "
                         "or 'mps'") from None
    fix = "pass device='cpu', or tcmlib.runtime.default_device() for the best one this machine has"
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{caller}(device={device!r}): torch sees no CUDA GPU on this machine; {fix}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{caller}(device={device!r}): this machine has only {torch.cuda.device_count()} CUDA "
                         f"device(s), numbered from 0; {fix}")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{caller}(device={device!r}): MPS is not available on this machine; {fix}")
    return dev


@torch.no_grad()
def embed(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str | torch.device = "cpu",
    amp: str | None = None, num_workers: int = 0, channels_last: bool = False,
    out_device: str | torch.device | None = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed a whole data set in eval mode: ``(embeddings (N, D) float32, labels (N,) int64)``.

    ``out_device``: where both go, ``"cpu"`` by default; ``None`` keeps them on ``device``, where the model ran, so
    that scoring them (``tcmlib.metrics.evaluate_embeddings``) runs there too and N x D never crosses to the host.
    """
    device = _usable_device(device, "embed")
    target = device if out_device is None else torch.device(out_device)
    amp_dtype = resolve_amp(amp, device)[0]
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    batch_transform = getattr(dataset, "batch_transform", None)  # e.g. uint8 photos -> normalised, on the device
    embs, labels = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if batch_transform is not None:
            x = batch_transform(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
            e = model(x)  # (b, D)
        embs.append(e.float().to(target))
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(embs), torch.cat(labels).long().to(target)


def _native_bf16(device: torch.device) -> bool:
    """Whether the CUDA card ``device`` computes bf16 in hardware (not emulated): compute capability >= 8.0."""
    return (torch.cuda.get_device_capability(device) >= (8, 0)
            or torch.cuda.is_bf16_supported(including_emulation=False))  # (ROCm: by its own rule)


def resolve_amp(amp: str | None, device: str | torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, whether to use a GradScaler)`` for config key ``amp`` on ``device``.

    * ``None``: no autocast.
    * ``"auto"``: on CUDA, bf16 where the card computes it natively (compute capability >= 8.0:
      A100, H100, RTX 30xx+), else fp16 with a GradScaler (T4, V100); off on a CPU or MPS.
    * ``"bf16"``: bf16.  On a CUDA card without native bf16 this raises ``ValueError``: emulated
      bf16 runs on slow paths (or fails), so we refuse rather than silently run slowly.
      On a CPU it is allowed (the CPU kernels support it; tests run the GPU path this way).
    * ``"fp16"``: fp16 with a GradScaler (fp16's range is too narrow for unscaled gradients).
    """
    device = torch.device(device)
    if amp is None or amp == "auto" and device.type != "cuda":
        return None, False
    if amp == "auto":
        return (torch.bfloat16, False) if _native_bf16(device) else (torch.float16, True)
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, 'auto', 'bf16' or 'fp16', got {amp!r}")
    if amp == "bf16" and device.type == "cuda" and not _native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"config key 'amp' = 'bf16', but this GPU ({torch.cuda.get_device_name(device)}, compute "
                         f"capability {major}.{minor}) has no native bf16 (needs >= 8.0): use amp: auto (fp16 with "
                         "a GradScaler here) or fp16")
    return AMP_DTYPES[amp], amp == "fp16"
