"""A data set of small grayscale images held in memory: the shared base of glyphs, digits and MNIST."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

__all__ = ["ImageArrayDataset"]

Transform = Callable[[torch.Tensor], torch.Tensor]


class ImageArrayDataset(Dataset):
    """Images ``uint8 (N, H, W)`` and labels ``int64 (N,)`` in ``0..C-1``, all in memory.

    ``dataset[i]`` returns ``(x, label)``: ``x`` is a float tensor ``(1, H, W)``.  Without a
    ``transform``, ``x = (pixels / 255 - 0.5) / 0.5`` lies in ``[-1, 1]``.  With one, the
    transform receives the ``[0, 1]`` tensor ``(1, H, W)`` and must normalise itself (the
    transforms in :mod:`tcmlib.data.transforms` do).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: list[str],
        transform: Optional[Transform] = None,
    ) -> None:
        if images.ndim != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be (N,) with N = {images.shape[0]}, got {tuple(labels.shape)}")
        self.images = images  # uint8 (N, H, W)
        self.labels = labels.long()  # int64 (N,), values in 0..C-1
        self.class_names = list(class_names)  # (C,)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """Number of classes ``C`` (labels run over ``0..C-1``)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div(255.0).unsqueeze(0)  # (1, H, W) in [0, 1]
        x = self.transform(x) if self.transform is not None else (x - 0.5) / 0.5
        return x, int(self.labels[i])

    def __repr__(self) -> str:
        h, w = self.images.shape[1:]
        return f"{type(self).__name__}({len(self)} images {h}x{w}, {self.num_classes} classes)"
