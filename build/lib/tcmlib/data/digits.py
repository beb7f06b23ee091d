"""Handwritten digits for the MNIST toy: scikit-learn's 8x8 digits offline, torchvision's MNIST on Colab.

The toy is *closed-set* (as in the authors' blog): both splits hold all 10 digit classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tcmlib.data.arrays import ImageArrayDataset, Transform

__all__ = ["load_digits_split", "load_mnist", "MNIST_FILES"]

DIGIT_NAMES = [str(d) for d in range(10)]
MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


def load_digits_split(
    split: str = "train",
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    image_size: int = 8,
    transform: Optional[Transform] = None,
) -> ImageArrayDataset:
    """scikit-learn's 1,797 real handwritten digits (8x8, 10 classes), split per class with ``seed``.

    Each class contributes ``round(test_fraction * n_class)`` images to the test split and the
    rest to the train split; the two splits are disjoint and together hold every image.
    Pixels (0..16) are scaled to uint8 0..255; ``image_size != 8`` resizes bilinearly.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx)))
        chosen.append(idx[:n_test] if split == "test" else idx[n_test:])
    keep = np.sort(np.concatenate(chosen))
    x = torch.from_numpy(images[keep])
    if image_size != 8:
        x = torch.nn.functional.interpolate(x[:, None].float(), size=(image_size, image_size),
                                            mode="bilinear")
        x = x[:, 0].round().clamp(0, 255).to(torch.uint8)
    return ImageArrayDataset(x, torch.from_numpy(labels[keep]), DIGIT_NAMES, transform)


def load_mnist(
    root: str | os.PathLike,
    split: str = "train",
    *,
    download: bool = False,
    transform: Optional[Transform] = None,
) -> ImageArrayDataset:
    """torchvision's MNIST (28x28, 60,000 train / 10,000 test, 10 classes) from ``root/MNIST/raw``.

    Downloads only when ``download=True`` (for Colab).  Without the files, raises
    ``FileNotFoundError`` naming what is missing and how to get it.
    """
    from torchvision.datasets import MNIST

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    raw = Path(root) / "MNIST" / "raw"
    if not download:
        missing = [str(raw / f) for f in MNIST_FILES if not (raw / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"MNIST files missing: {', '.join(missing)}. Call load_mnist({str(root)!r}, download=True) "
                "(needs internet), or put the four unzipped idx files from "
                "https://ossci-datasets.s3.amazonaws.com/mnist/ (train-images-idx3-ubyte.gz etc.) into "
                f"{raw}"
            )
    try:
        ds = MNIST(str(root), train=(split == "train"), download=download)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ValueError(f"cannot read MNIST from {raw}: {e}; delete the files and download again") from e
    return ImageArrayDataset(ds.data.to(torch.uint8), ds.targets.long(), DIGIT_NAMES, transform)
