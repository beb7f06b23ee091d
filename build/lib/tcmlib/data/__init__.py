"""Data: the offline glyph benchmark, digits, CUB / Cars-196 / SOP / iNaturalist loaders, samplers.

* :func:`load_glyphs` -- our offline open-world benchmark (Unicode characters x matplotlib fonts).
* :func:`load_digits_split` / :func:`load_mnist` -- the closed-set MNIST toy (offline / Colab).
* :func:`load_benchmark`, :func:`verify_benchmark`, :func:`download_benchmark` -- the four DML
  benchmarks; :func:`get_dataset` -- any of the above by name.
* :class:`MPerClassBatchSampler` -- deterministic, resumable m-per-class batches.
* :mod:`tcmlib.data.transforms` -- the standard train / test transforms.
"""

from tcmlib.data.arrays import ImageArrayDataset
from tcmlib.data.benchmarks import (
    BENCHMARKS,
    DATASET_NAMES,
    ImageListDataset,
    download_benchmark,
    get_dataset,
    load_benchmark,
    verify_benchmark,
)
from tcmlib.data.digits import load_digits_split, load_mnist
from tcmlib.data.glyphs import GLYPH_PRESETS, GlyphDataset, GlyphPreset, glyph_table, load_glyphs
from tcmlib.data.samplers import MPerClassBatchSampler
from tcmlib.data.transforms import (
    small_test_transform,
    small_train_transform,
    test_transform,
    train_transform,
)

__all__ = [
    "BENCHMARKS", "DATASET_NAMES", "GLYPH_PRESETS", "GlyphDataset", "GlyphPreset", "ImageArrayDataset",
    "ImageListDataset", "MPerClassBatchSampler", "download_benchmark", "get_dataset", "glyph_table",
    "load_benchmark", "load_digits_split", "load_glyphs", "load_mnist", "small_test_transform",
    "small_train_transform", "test_transform", "train_transform", "verify_benchmark",
]
