"""Augmentation that does not depend on the process: sample ``i`` of epoch ``e`` is drawn from a
generator seeded by ``(run seed, e, i)``.

A training run that draws its random crops and jitters from the process's random number generator
sees different images when it runs as 1 or 3 processes (each rank has its own generator) or with
0 or 2 DataLoader workers (each worker has its own): the batches are the same, the pixels are not.
:class:`SeededAugmentation` makes the draws a function of the sample alone, so every process count
and every worker count see the same images, and a resumed run sees the images of an uninterrupted one.

Usage::

    train = SeededAugmentation(train_data, seed=cfg.seed)
    for epoch in range(epochs):
        train.set_epoch(epoch)      # before the DataLoader's iterator is created (workers copy it)
        for x, y in DataLoader(train, batch_sampler=sampler, num_workers=2): ...
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SeededAugmentation", "sample_seed"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in ``epoch`` of a run with ``seed`` (all integers >= 0).

    NumPy's ``SeedSequence`` hashes the three numbers, so nearby samples get unrelated streams.
    """
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, np.uint64)[0] >> 1)


class SeededAugmentation(Dataset):
    """``dataset[i]`` with every random draw of its transform taken from a generator seeded by
    ``sample_seed(seed, epoch, i)``.

    The draws of torch's, Python's and NumPy's global generators inside ``dataset[i]`` (torchvision's
    transforms use torch's) come from that seed; the caller's generators are restored afterwards, so
    nothing else in the process sees a difference.  ``labels`` and ``len`` pass through.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next items as epoch ``epoch`` (call before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    @property
    def labels(self) -> Any:
        return getattr(self.dataset, "labels")

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        s = sample_seed(self.seed, self.epoch, i)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # the CPU generator (transforms run on the CPU)
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            try:
                return self.dataset[i]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __repr__(self) -> str:
        return f"SeededAugmentation({self.dataset!r}, seed={self.seed}, epoch={self.epoch})"
