"""A data set of small grayscale images held in memory: the shared base of glyphs, digits and MNIST."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

__all__ = ["ImageArrayDataset", "hold_out_classes"]

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


def hold_out_classes(dataset: ImageArrayDataset, fraction: float, seed: int = 0
                     ) -> tuple[ImageArrayDataset, ImageArrayDataset]:
    """Split the *classes* of ``dataset`` into ``(kept, held_out)``: disjoint, fixed by ``seed``.

    ``round(fraction * C)`` classes (at least 2, and at least 2 left over) are drawn without
    replacement by a ``torch.Generator`` seeded with ``seed`` and held out, e.g. as validation
    classes for choosing margins and training length without touching the test classes.  Each part
    keeps all images of its classes, relabelled ``0..C_part-1`` in the order of the original class
    ids; ``class_names`` and the transform follow.  Returns new datasets that share no state.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction = {fraction}: the held-out share of the classes must lie in (0, 1)")
    n_classes = int(dataset.labels.max()) + 1 if len(dataset) else 0
    n_out = int(round(fraction * n_classes))
    if n_out < 2 or n_classes - n_out < 2:
        raise ValueError(f"holding out {fraction:g} of {n_classes} classes leaves {n_out} held out and "
                         f"{n_classes - n_out} kept; each part needs >= 2 classes (change fraction)")
    perm = torch.randperm(n_classes, generator=torch.Generator().manual_seed(int(seed)))
    out_mask = torch.zeros(n_classes, dtype=torch.bool)
    out_mask[perm[:n_out]] = True
    return _subset_classes(dataset, ~out_mask), _subset_classes(dataset, out_mask)


def _subset_classes(dataset: ImageArrayDataset, class_mask: torch.Tensor) -> ImageArrayDataset:
    """The images whose class is in ``class_mask`` (C,) bool, relabelled ``0..C'-1``."""
    classes = class_mask.nonzero().flatten()  # (C',) original ids, ascending
    new_id = torch.full((class_mask.numel(),), -1, dtype=torch.long)
    new_id[classes] = torch.arange(classes.numel())
    rows = class_mask[dataset.labels]  # (N,) bool
    names = [dataset.class_names[int(c)] for c in classes] if len(dataset.class_names) == class_mask.numel() \
        else [str(int(c)) for c in classes]
    return ImageArrayDataset(dataset.images[rows], new_id[dataset.labels[rows]], names, dataset.transform)
