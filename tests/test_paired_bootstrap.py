"""Tests for tcmlib.report.paired_bootstrap_difference (paired class bootstrap of two models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcmlib.metrics import utility_curves
from tcmlib.report import paired_bootstrap_difference, rates_at_threshold, threshold_for_far

METRICS = ["opis", "eps_opis", "far_spread"]


def two_models(n=240, c=10, d=12, seed=0):
    """Orthogonal class centres. A: every class equally spread (consistent); B: spreads from 0.2 to 1.5."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    centres = 2.0 * torch.eye(c, d, dtype=torch.float64)
    a = centres[y] + 0.6 * torch.randn(n, d, generator=g, dtype=torch.float64)
    spread = torch.linspace(0.2, 1.5, c, dtype=torch.float64)
    b = centres[y] + spread[y, None] * torch.randn(n, d, generator=g, dtype=torch.float64)
    return a, b, y


@pytest.mark.parametrize("metric", METRICS)
def test_identical_models_differ_by_exactly_zero(metric):
    a, _, y = two_models()
    r = paired_bootstrap_difference(a, a.clone(), y, metric, n_boot=50, seed=0)
    assert r.difference == 0.0 and r.lo == 0.0 and r.hi == 0.0
    assert np.all(r.replicates == 0.0) and r.share_other_sign == 1.0


def test_identical_models_in_another_row_order():
    a, _, y = two_models()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    r = paired_bootstrap_difference(a, a[perm], y, "far_spread", n_boot=20, labels_b=y[perm])
    assert r.difference == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("metric", ["opis", "eps_opis"])
def test_known_sign(metric):
    a, b, y = two_models()
    r = paired_bootstrap_difference(a, b, y, metric, n_boot=300, seed=0)
    assert r.difference < 0 and r.hi < 0  # A (equal spreads) is the more consistent model
    assert r.share_other_sign < 0.05
    s = paired_bootstrap_difference(b, a, y, metric, n_boot=300, seed=0)  # swapped: the other sign
    assert s.difference == pytest.approx(-r.difference) and s.lo == pytest.approx(-r.hi)


def test_observed_values_are_the_library_metrics():
    a, b, y = two_models()
    r = paired_bootstrap_difference(a, b, y, "opis", n_boot=10)
    assert r.value_a == pytest.approx(utility_curves(a, y).opis, abs=1e-15)
    assert r.value_b == pytest.approx(utility_curves(b, y).opis, abs=1e-15)
    e = paired_bootstrap_difference(a, b, y, "eps_opis", n_boot=10, eps=0.2)
    assert e.value_a == pytest.approx(utility_curves(a, y).eps_opis(0.2), abs=1e-15)
    f = paired_bootstrap_difference(a, b, y, "far_spread", n_boot=10, far_target=0.05)
    far_a = rates_at_threshold(a, y, threshold_for_far(a, y, 0.05)).far
    assert f.value_a == pytest.approx(float(far_a.std(unbiased=False)), abs=1e-15)


def test_replicates_are_paired_class_resamples():
    a, b, y = two_models()
    r = paired_bootstrap_difference(a, b, y, "opis", n_boot=5, seed=7)
    ua, ub = utility_curves(a, y).utility, utility_curves(b, y).utility  # (K, T)
    rng = np.random.default_rng(7)
    for b_i in range(5):
        idx = torch.from_numpy(rng.integers(0, ua.shape[1], size=ua.shape[1]))
        want = float(ua[:, idx].var(dim=1, unbiased=False).mean() - ub[:, idx].var(dim=1, unbiased=False).mean())
        assert r.replicates[b_i] == pytest.approx(want, abs=1e-14)
    assert r.lo == pytest.approx(np.quantile(r.replicates, 0.025))


def test_reproducible_with_a_seed():
    a, b, y = two_models()
    r1 = paired_bootstrap_difference(a, b, y, "far_spread", n_boot=40, seed=3)
    r2 = paired_bootstrap_difference(a, b, y, "far_spread", n_boot=40, seed=3)
    r3 = paired_bootstrap_difference(a, b, y, "far_spread", n_boot=40, seed=4)
    assert np.array_equal(r1.replicates, r2.replicates) and (r1.lo, r1.hi) == (r2.lo, r2.hi)
    assert not np.array_equal(r1.replicates, r3.replicates)


def test_bad_input():
    a, b, y = two_models()
    with pytest.raises(ValueError, match="same test samples"):
        paired_bootstrap_difference(a, b[:-1], y)
    with pytest.raises(ValueError, match="different classes"):
        paired_bootstrap_difference(a, b, y, labels_b=y + 100)
    with pytest.raises(ValueError, match="entries"):
        paired_bootstrap_difference(a, b, y[:-1])
    with pytest.raises(ValueError, match="metric"):
        paired_bootstrap_difference(a, b, y, "auc")
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap_difference(a, b, y, n_boot=1)
    with pytest.raises(ValueError, match="alpha"):
        paired_bootstrap_difference(a, b, y, alpha=1.0)
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap_difference(a, b * float("nan"), y)
