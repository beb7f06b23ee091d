"""Image transforms: the standard DML recipe for photos, and light ones for glyphs and digits.

Photos (CUB, Cars, SOP, iNat), as in the RS@k line of work: train ``RandomResizedCrop(224)`` +
horizontal flip, test ``Resize(256)`` + ``CenterCrop(224)``, both with ImageNet normalisation.
With ``uint8=True`` the transforms stop at the uint8 tensor and :class:`DeviceNormalize` finishes the
batch where the model runs: a quarter of the bytes cross the loader's queues and the host-to-GPU copy,
and the numbers are the same (``x.float() / 255``, then ``(x - mean) / std``, as ``ToTensor`` and
``Normalize`` compute them).
Small grayscale images (glyphs, digits) arrive as ``[0, 1]`` tensors ``(1, H, W)`` from
:class:`tcmlib.data.arrays.ImageArrayDataset`; their transforms end with ``(x - 0.5) / 0.5``.
"""

from __future__ import annotations

import torch
from torchvision import transforms as T

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DeviceNormalize", "train_transform", "test_transform",
    "small_train_transform", "small_test_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DeviceNormalize:
    """A batch of uint8 images (B, C, H, W) -> float32 ``(x / 255 - mean) / std``, on whatever device it is on.

    The same arithmetic as ``ToTensor`` + ``Normalize`` per image, so ``DeviceNormalize()(uint8 batch)`` equals the
    float batch of the ``uint8=False`` transforms bit for bit.  A float batch passes through unchanged.
    """

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        x = x.to(torch.get_default_dtype()).div(255)  # (B, C, H, W) in [0, 1], as ToTensor
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]  # (C, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return x.sub_(mean).div_(std)  # as Normalize

    def __repr__(self) -> str:
        return f"DeviceNormalize(mean={self.mean}, std={self.std})"


def train_transform(size: int = 224, *, uint8: bool = False) -> T.Compose:
    """PIL image -> tensor (3, size, size): random resized crop, flip; then float32 with ImageNet normalisation,
    or (``uint8=True``) the uint8 pixels, to be finished on the device by :class:`DeviceNormalize`."""
    return T.Compose([
        T.RandomResizedCrop(size),
        T.RandomHorizontalFlip(),
        *((T.PILToTensor(),) if uint8 else (T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD))),
    ])


def test_transform(size: int = 224, resize: int = 256, *, uint8: bool = False) -> T.Compose:
    """PIL image -> tensor (3, size, size): short side to ``resize``, centre crop; float32 normalised, or uint8
    (``uint8=True``, finished by :class:`DeviceNormalize`)."""
    return T.Compose([
        T.Resize(resize),
        T.CenterCrop(size),
        *((T.PILToTensor(),) if uint8 else (T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD))),
    ])


def small_train_transform(degrees: float = 5.0, translate: float = 0.05) -> T.Compose:
    """``[0, 1]`` tensor (1, H, W) -> a small random affine jitter, then ``(x - 0.5) / 0.5``.

    No flips: a mirrored glyph or digit is often another class (``b`` / ``d``, ``2`` / ``S``).
    """
    return T.Compose([
        T.RandomAffine(degrees=degrees, translate=(translate, translate)),
        T.Normalize((0.5,), (0.5,)),
    ])


def small_test_transform() -> T.Normalize:
    """``[0, 1]`` tensor (1, H, W) -> ``(x - 0.5) / 0.5`` (the same as passing no transform)."""
    return T.Normalize((0.5,), (0.5,))
