"""What images a data set gives a model: grey or colour, and their side (used by :mod:`tcmlib.train`,
:mod:`tcmlib.experiments` and :mod:`tcmlib.memory`; here so that none of them imports another for it).
``tcmlib.train.SMALL_DATASETS`` and ``tcmlib.train.input_size`` are these.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SMALL_DATASETS", "input_size"]

SMALL_DATASETS = ("glyphs", "digits", "mnist")  # grey images in memory, small transforms


def input_size(cfg: Any) -> int:
    """The image side a run feeds its model: ``cfg.image_size``, else 32 (glyphs), 16 (digits, MNIST), 224.

    ``cfg``: a :class:`tcmlib.train.TrainConfig` (its ``image_size`` and ``dataset``)."""
    if cfg.image_size:
        return cfg.image_size
    return 32 if cfg.dataset == "glyphs" else 16 if cfg.dataset in SMALL_DATASETS else 224
