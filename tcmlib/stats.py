"""Paired comparisons of two training recipes over seeds, as a reviewer expects them.

A baseline and its +TCM twin trained with the same seed share their initial weights and batch
order, so their difference per seed is the quantity of interest.  For ``n`` seed pairs with
differences ``d_i = treat_i - base_i``:

* mean paired change ``mean(d)`` with a 95 % interval ``mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)``
  (``scipy.stats.t``), and the paired t-test p (``scipy.stats.ttest_rel``);
* the Wilcoxon signed-rank p (``scipy.stats.wilcoxon``, exact for small n).  With n = 5 pairs its
  smallest two-sided p is 2 / 2^5 = 0.0625: five seeds can never pass p < 0.05 by this test, which
  is why the book reports the t interval beside it and uses 10 seeds where runs are cheap;
* the relative change ``mean(d) / mean(base)``;
* across a family of comparisons, Holm's step-down adjustment of the p-values (:func:`holm`).

    from tcmlib.stats import paired_comparison, holm
    c = paired_comparison(base_opis, tcm_opis)      # two sequences, one value per seed
    c["delta"], c["ci_low"], c["ci_high"], c["p_wilcoxon"]
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import stats

__all__ = ["paired_comparison", "holm"]


def paired_comparison(base: Sequence[float] | np.ndarray, treat: Sequence[float] | np.ndarray, *,
                      confidence: float = 0.95) -> dict[str, Any]:
    """Summarise ``treat - base`` over paired runs (same seed in both lists, same order).

    Returns a dict: ``n``, ``base_mean``, ``treat_mean``, ``delta`` (mean paired change), ``ci_low`` /
    ``ci_high`` (t interval, n - 1 degrees of freedom), ``rel`` (delta / base_mean), ``p_t`` (paired
    t-test), ``p_wilcoxon`` (signed-rank, two-sided), ``n_lower`` (pairs with treat < base) and
    ``n_higher`` (treat > base).  p-values are NaN when they are undefined (n < 2, all differences 0).
    """
    b = np.asarray(base, dtype=np.float64)
    t = np.asarray(treat, dtype=np.float64)
    if b.ndim != 1 or b.shape != t.shape:
        raise ValueError(f"base and treat must be 1-D of equal length (one value per seed), got {b.shape} and {t.shape}")
    if b.size < 2:
        raise ValueError(f"a paired comparison needs >= 2 pairs, got {b.size}")
    if not (np.isfinite(b).all() and np.isfinite(t).all()):
        raise ValueError("base and treat must be finite numbers")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    d = t - b
    n = d.size
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    nan = float("nan")
    p_t = float(stats.ttest_rel(t, b).pvalue) if sd > 0 else nan
    p_w = float(stats.wilcoxon(t, b).pvalue) if np.any(d != 0) else nan
    base_mean = float(b.mean())
    return {"n": n, "base_mean": base_mean, "treat_mean": float(t.mean()), "delta": mean,
            "ci_low": mean - half, "ci_high": mean + half, "rel": mean / base_mean if base_mean else nan,
            "p_t": p_t, "p_wilcoxon": p_w, "n_lower": int((d < 0).sum()), "n_higher": int((d > 0).sum())}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given; NaN stays NaN, counted out of m).

    With the m finite p-values sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``
    (Holm 1979): reject where the adjusted p is below alpha, controlling the family-wise error rate.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError("pvalues must be a flat sequence")
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out.tolist()
