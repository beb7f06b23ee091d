"""tcmlib.stats against hand-computed values."""

from __future__ import annotations

import math

import pytest

from tcmlib.stats import holm, paired_comparison


def test_paired_comparison_hand_computed() -> None:
    # differences d = treat - base = (-1, -2, -3): mean -2, sd 1, t_{0.975, 2} = 4.302652729911275
    c = paired_comparison([10.0, 20.0, 30.0], [9.0, 18.0, 27.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert c["n"] == 3 and c["delta"] == pytest.approx(-2.0)
    assert c["ci_low"] == pytest.approx(-2.0 - half) and c["ci_high"] == pytest.approx(-2.0 + half)
    assert c["rel"] == pytest.approx(-2.0 / 20.0)
    assert c["n_lower"] == 3 and c["n_higher"] == 0
    # paired t: t = -2 / (1 / sqrt 3) = -3.4641, 2 dof -> two-sided p = 0.07418
    assert c["p_t"] == pytest.approx(0.0741799, abs=1e-6)
    # exact signed-rank, all 3 differences negative: p = 2 / 2^3
    assert c["p_wilcoxon"] == pytest.approx(0.25)


def test_five_pairs_cannot_reach_5_percent_by_wilcoxon() -> None:
    c = paired_comparison([1, 2, 3, 4, 5], [0.5, 1.4, 2.3, 3.2, 4.1])
    assert c["p_wilcoxon"] == pytest.approx(2 / 2**5)


def test_paired_comparison_bad_input() -> None:
    with pytest.raises(ValueError, match="equal length"):
        paired_comparison([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=">= 2 pairs"):
        paired_comparison([1], [2])
    with pytest.raises(ValueError, match="finite"):
        paired_comparison([1, float("nan")], [1, 2])


def test_paired_comparison_identical_runs_has_undefined_p() -> None:
    c = paired_comparison([1.0, 2.0], [1.0, 2.0])
    assert c["delta"] == 0 and math.isnan(c["p_t"]) and math.isnan(c["p_wilcoxon"])


def test_holm_hand_computed() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = holm([0.01, float("nan")])
    assert out[0] == pytest.approx(0.01) and math.isnan(out[1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([1.5])
