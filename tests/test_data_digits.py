"""Digits (scikit-learn, offline) and MNIST (torchvision, from fabricated raw idx files)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from tcmlib.data.digits import MNIST_FILES, load_digits_split, load_mnist


def test_digits_split():
    train, test = load_digits_split("train"), load_digits_split("test")
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.3 * 1797) < 10
    for ds in (train, test):
        assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (8, 8)
        assert set(ds.labels.tolist()) == set(range(10))  # closed set: every digit in both splits
        assert int(ds.images.max()) == 255
        x, y = ds[0]
        assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= y <= 9
    # disjoint, and together every image once: compare the raw pixel rows as a multiset
    from sklearn.datasets import load_digits

    pixels = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    all_rows = sorted(map(bytes, pixels.reshape(-1, 64)))
    split_rows = sorted(map(bytes, torch.cat([train.images, test.images]).reshape(-1, 64).numpy()))
    assert all_rows == split_rows


def test_digits_deterministic_and_resized():
    a, b = load_digits_split("test", seed=1), load_digits_split("test", seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, load_digits_split("test", seed=2).images)
    big = load_digits_split("train", image_size=16)
    assert big.images.shape[1:] == (16, 16) and big.images.dtype == torch.uint8
    with pytest.raises(ValueError, match="split"):
        load_digits_split("val")


def write_idx(path, array: np.ndarray) -> None:
    """An MNIST idx file: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, then the bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_mnist_from_raw_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    write_idx(raw / "train-images-idx3-ubyte", train_x)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(12) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([3, 1, 4, 1, 5]))
    train = load_mnist(tmp_path, "train")
    assert train.images.shape == (12, 28, 28) and train.images.dtype == torch.uint8
    assert np.array_equal(train.images.numpy(), train_x) and train.labels.tolist() == list(np.arange(12) % 10)
    test = load_mnist(tmp_path, "test")
    assert test.labels.tolist() == [3, 1, 4, 1, 5]
    x, y = test[2]
    assert x.shape == (1, 28, 28) and y == 4


def test_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(tmp_path)
    msg = str(e.value)
    assert all(f in msg for f in MNIST_FILES) and "download=True" in msg
