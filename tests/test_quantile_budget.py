"""The exact quantiles of the negative distances keep a bounded number of values, whatever N.

``tcmlib.metrics.opis.Quantiles`` keeps the similarities inside a bracket around each order statistic.
The bracket's share of all negatives is roughly constant, so its size once grew with N^2.  Past
``QUANTILE_BUDGET`` values a bracket now counts a histogram of its values' bit patterns and the next pass
keeps only the one or two bins that hold the order statistics.  Here the budget is tiny: the largest
buffer stays within it, and every quantile is the same, bit for bit, as with an unbounded buffer and as
``numpy.quantile`` over all negatives (the oracle: the dense distance matrix).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from tcmlib.metrics import utility_curves
from tcmlib.metrics._pairs import sort_pairs

opis_module = importlib.import_module("tcmlib.metrics.opis")
QS = (0.0, 1e-3, 0.01, 0.1, 0.5, 1.0)


def uneven(n: int, classes: int, dim: int, seed: int, dtype: torch.dtype = torch.float32):
    """Clusters whose spreads differ 100-fold from class to class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    spread = torch.logspace(-2, 0, classes, dtype=torch.float64)[torch.randperm(classes, generator=g)]
    x = torch.randn(classes, dim, generator=g, dtype=torch.float64)[y] + spread[y, None] * torch.randn(
        n, dim, generator=g, dtype=torch.float64)
    return x.to(dtype), y


def negative_distances(pairs) -> np.ndarray:
    """All negative-pair distances ``1 - s`` (float64 of the working dtype's s), densely."""
    xn = pairs.rows
    s = (xn @ xn.T).double().numpy()
    iu = np.triu_indices(xn.shape[0], 1)
    lab = pairs.lab.numpy()
    return 1.0 - s[iu][(lab[:, None] != lab[None, :])[iu]]


class Largest:
    """Records the most values the brackets held at once, over every pass."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.largest, self.passes = 0, 0
        real = opis_module.Quantiles.result

        def result(quant, need):
            self.largest = max(self.largest, quant.peak)
            self.passes += 1
            return real(quant, need)

        monkeypatch.setattr(opis_module.Quantiles, "result", result)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("collect_all", [False, True])  # the pilot's brackets, or (-inf, inf)
def test_a_tiny_budget_bounds_the_brackets_and_changes_no_bit(monkeypatch, dtype, collect_all) -> None:
    x, y = uneven(500, 12, 8, seed=4, dtype=dtype)
    pairs = sort_pairs(x, y)
    neg = negative_distances(pairs)
    kw = {"collect_all_max": len(neg) if collect_all else 0}
    free = Largest(monkeypatch)
    want = opis_module._negative_distance_quantiles(pairs, QS, 64, len(neg), **kw)
    assert free.largest > 3000  # unbounded, the brackets hold far more than the budget below
    free_passes = free.passes
    budget = 100 * len(QS)  # 100 values a bracket, in all
    monkeypatch.setattr(opis_module, "QUANTILE_BUDGET", budget)
    held = Largest(monkeypatch)
    got = opis_module._negative_distance_quantiles(pairs, QS, 64, len(neg), **kw)
    assert held.largest <= budget, f"the brackets held {held.largest} values, over their budget of {budget}"
    assert held.passes > free_passes  # the narrower brackets took more passes
    assert got == want  # bit for bit
    np.testing.assert_allclose(got, np.quantile(neg, QS), rtol=0, atol=1e-12)


def test_tied_similarities_end_in_one_value_bins(monkeypatch) -> None:
    """Four kinds of identical embeddings: few distinct similarities, each shared by many pairs."""
    g = torch.Generator().manual_seed(2)
    x = torch.eye(4)[torch.randint(0, 4, (300,), generator=g)] + 0.5
    y = torch.randint(0, 7, (300,), generator=g)
    pairs = sort_pairs(x, y)
    neg = negative_distances(pairs)
    want = opis_module._negative_distance_quantiles(pairs, QS, 64, len(neg), collect_all_max=0)
    monkeypatch.setattr(opis_module, "QUANTILE_BUDGET", 60)
    got = opis_module._negative_distance_quantiles(pairs, QS, 64, len(neg), collect_all_max=0)
    assert got == want
    np.testing.assert_allclose(got, np.quantile(neg, QS), rtol=0, atol=1e-12)


def test_utility_curves_under_a_tiny_budget_are_unchanged(monkeypatch) -> None:
    x, y = uneven(600, 10, 6, seed=7)
    monkeypatch.setattr(opis_module, "COLLECT_ALL_MAX", 0)
    want = utility_curves(x, y, num_thresholds=7, chunk_size=50)
    monkeypatch.setattr(opis_module, "QUANTILE_BUDGET", 80)
    monkeypatch.setattr(opis_module, "KEEP_MAX", 500)  # the kept pairs overflow too: a second pass counts
    got = utility_curves(x, y, num_thresholds=7, chunk_size=50)
    assert torch.equal(got.thresholds, want.thresholds)
    assert torch.equal(got.utility, want.utility)
