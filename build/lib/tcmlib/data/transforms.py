"""Image transforms: the standard DML recipe for photos, and light ones for glyphs and digits.

Photos (CUB, Cars, SOP, iNat), as in the RS@k line of work: train ``RandomResizedCrop(224)`` +
horizontal flip, test ``Resize(256)`` + ``CenterCrop(224)``, both with ImageNet normalisation.
Small grayscale images (glyphs, digits) arrive as ``[0, 1]`` tensors ``(1, H, W)`` from
:class:`tcmlib.data.arrays.ImageArrayDataset`; their transforms end with ``(x - 0.5) / 0.5``.
"""

from __future__ import annotations

from torchvision import transforms as T

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "train_transform", "test_transform",
    "small_train_transform", "small_test_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(size: int = 224) -> T.Compose:
    """PIL image -> float tensor (3, size, size): random resized crop, flip, ImageNet normalisation."""
    return T.Compose([
        T.RandomResizedCrop(size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def test_transform(size: int = 224, resize: int = 256) -> T.Compose:
    """PIL image -> float tensor (3, size, size): short side to ``resize``, centre crop, normalise."""
    return T.Compose([
        T.Resize(resize),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
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
