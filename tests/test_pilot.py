"""tcmlib.pilot: the frontier gap with its interval, the best epoch of a curve, the power of a paired design,
and the headline numbers -- each against a hand-made case or an independent computation (scipy's noncentral t,
scipy's bootstrap of a plain mean)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tcmlib import pilot
from tcmlib.study import PAPER_TCM, PRIMARY, variant_name

PAPER = variant_name(PAPER_TCM)


def _run(variant: str, seed: int, r1: list[float], opis: list[float], stage: str = "final") -> dict:
    return {"stage": stage, "backbone": "small_cnn", "loss": "smooth_ap", "variant": variant, "seed": seed,
            "history": [{"val_R@1": a, "val_OPIS": b} for a, b in zip(r1, opis)]}


def _paths(shifts: list[float], first_jump: float = 0.0) -> list[dict]:
    """Base: OPIS = 1 - R@1 on R@1 0.2..0.8; TCM of seed s: the same line + shifts[s] on R@1 0.3..0.9, its first
    epoch a further ``first_jump`` above.  On the shared range 0.3..0.8 the gap is exactly mean(shifts)."""
    rb, rt = [0.2, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7, 0.9]
    runs = []
    for s, c in enumerate(shifts):
        runs.append(_run("base", s, rb, [1 - x for x in rb]))
        runs.append(_run(PAPER, s, rt, [1 - x + c + (first_jump if i == 0 else 0.0) for i, x in enumerate(rt)]))
    return runs


def test_frontier_gap_is_the_shift_between_parallel_paths() -> None:
    out = pilot.frontier_gap_interval(_paths([0.01] * 4), "small_cnn", "smooth_ap")
    assert out["gap"] == pytest.approx(0.01, abs=1e-12)
    assert out["ci_low"] == pytest.approx(0.01, abs=1e-12) and out["ci_high"] == pytest.approx(0.01, abs=1e-12)
    assert out["seeds"] == 4


def test_skipping_the_first_epoch_removes_its_jump() -> None:
    runs = _paths([0.01] * 4, first_jump=0.5)
    with_first = pilot.frontier_gap_interval(runs, "small_cnn", "smooth_ap")["gap"]
    without = pilot.frontier_gap_interval(runs, "small_cnn", "smooth_ap", skip_epochs=1)
    assert with_first > 0.05  # the first epoch's jump dominates the mean over the shared R@1 range
    # without it TCM's path starts at R@1 0.5: shared range 0.5..0.8, still the parallel shift
    assert without["gap"] == pytest.approx(0.01, abs=1e-12)


def test_the_interval_is_the_bootstrap_of_the_seed_pairs() -> None:
    shifts = [0.004, -0.002, 0.010, 0.001, 0.006, -0.003, 0.002]
    out = pilot.frontier_gap_interval(_paths(shifts), "small_cnn", "smooth_ap", n_boot=999, seed=3)
    assert out["gap"] == pytest.approx(np.mean(shifts), abs=1e-12)
    # the gap of resampled pairs is the mean of their shifts: scipy's bootstrap of the mean, same draws
    ref = stats.bootstrap((np.array(shifts),), np.mean, n_resamples=999, method="percentile", random_state=3)
    assert out["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=1e-9)
    assert out["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=1e-9)
    assert out["ci_low"] < np.mean(shifts) < out["ci_high"]


def test_frontier_interval_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="no 'final' runs"):
        pilot.frontier_gap_interval(_paths([0.01] * 3), "small_cnn", "contrastive")
    with pytest.raises(ValueError, match="skip_epochs"):
        pilot.frontier_gap_interval(_paths([0.01] * 3), "small_cnn", "smooth_ap", skip_epochs=-1)
    with pytest.raises(ValueError, match="without epochs"):
        pilot.frontier_gap_interval(_paths([0.01] * 3), "small_cnn", "smooth_ap", skip_epochs=4)
    two = pilot.frontier_gap_interval(_paths([0.01, 0.02]), "small_cnn", "smooth_ap")
    assert two["gap"] == pytest.approx(0.015) and np.isnan(two["ci_low"])  # too few seeds for an interval


def test_frontier_gaps_are_per_seed_pair_with_holm_over_losses() -> None:
    from statsmodels.stats.multitest import multipletests

    runs = []
    shifts = {"smooth_ap": [0.010, 0.012, 0.008], "contrastive": [0.001, -0.002, 0.004]}
    for loss, sh in shifts.items():
        runs += [{**r, "loss": loss} for r in _paths(sh, first_jump=0.5)]
    out = pilot.frontier_gaps(runs, "small_cnn", list(shifts), drop_first=True)
    # without the jump each seed's gap is its shift (parallel paths), so the t-test is scipy's on the shifts
    p = [stats.ttest_1samp(sh, 0.0).pvalue for sh in shifts.values()]
    for (loss, sh), row, ph in zip(shifts.items(), out.values(), multipletests(p, method="holm")[1]):
        assert row["gap"] == pytest.approx(np.mean(sh), abs=1e-12) and row["p_holm"] == pytest.approx(ph)
    assert pilot.frontier_gaps(runs, "small_cnn", ["smooth_ap"])["smooth_ap"]["gap"] > 0.1   # the jump


def test_frontier_gaps_without_a_shared_range_are_nan() -> None:
    one_epoch = [_run(v, s, [0.5], [0.1]) for v in ("base", PAPER) for s in range(3)]
    row = pilot.frontier_gaps(one_epoch, "small_cnn", ["smooth_ap"])["smooth_ap"]
    assert np.isnan(row["gap"]) and np.isnan(row["p_holm"]) and row["seeds"] == 0
    with pytest.raises(KeyError):   # other errors are not hidden (no val_MAP@R in these histories)
        pilot.frontier_gaps(one_epoch, "small_cnn", ["smooth_ap"], accuracy="val_MAP@R")


def test_best_epoch_by_hand() -> None:
    rising = [_run("base", s, [0.5, 0.6, 0.7 + s / 100], [0.0] * 3, stage="curves") for s in range(2)]
    assert pilot.best_epoch(rising, "small_cnn", "smooth_ap") == (3, 3)   # still rising at its last epoch
    peaked = [_run("base", 0, [0.5, 0.8, 0.7], [0.0] * 3, stage="curves"),
              _run("base", 1, [0.5, 0.7, 0.75], [0.0] * 3, stage="curves")]  # means 0.5, 0.75, 0.725
    assert pilot.best_epoch(peaked, "small_cnn", "smooth_ap") == (2, 3)
    with pytest.raises(ValueError, match="no 'curves' runs"):
        pilot.best_epoch(peaked, "small_cnn", "smooth_ap", PAPER)


def _power_by_nct(d: float, n: int, alpha: float = 0.05) -> float:
    """Two-sided paired t-test power from the noncentral t distribution, df = n - 1, noncentrality d sqrt(n)."""
    crit = stats.t.ppf(1 - alpha / 2, n - 1)
    nc = d * np.sqrt(n)
    return float(stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc))


@pytest.mark.parametrize("ratio,n,effect", [(0.2, 34, -0.10), (0.28, 10, -0.10), (0.28, 10, -0.20), (0.5, 63, 0.3)])
def test_paired_power_is_the_noncentral_t(ratio: float, n: int, effect: float) -> None:
    assert pilot.paired_power(ratio, n, effect) == pytest.approx(_power_by_nct(abs(effect) / ratio, n), abs=1e-6)


def test_textbook_sample_size_and_round_trip() -> None:
    # Cohen (1988): d = 0.5 needs 34 pairs for 80 % power (paired t, two-sided, alpha 0.05); 33 fall short
    assert pilot.paired_power(0.2, 34, -0.10) >= 0.80 > pilot.paired_power(0.2, 33, -0.10)
    eff = pilot.detectable_effect(0.2, 34)
    assert eff == pytest.approx(0.1, abs=0.003)
    assert pilot.paired_power(0.2, 34, eff) == pytest.approx(0.80, abs=1e-4)  # solver tolerance
    with pytest.raises(ValueError, match="ratio > 0"):
        pilot.detectable_effect(0.0, 10)


def test_headline_counts_and_picks_the_primary_comparison() -> None:
    def row(b: str, v: str, m: str, delta: float, p: float) -> dict:
        return {"backbone": b, "loss": PRIMARY["loss"], "variant": v, "metric": m, "delta": delta,
                "ci_low": delta - 0.5, "ci_high": delta + 0.5, "base_mean": 2.0, "rel": delta / 2, "p_holm": p}
    comp = [row("small_cnn", PAPER, "OPIS", -0.2, 0.30), row("small_cnn", "other", "OPIS", -0.4, 0.01),
            row("conv_vit_tiny", PAPER, "OPIS", 0.1, 0.60), row("small_cnn", PAPER, "R@1", 0.02, 0.001)]
    h = pilot.headline(comp)
    assert (h["OPIS"]["n"], h["OPIS"]["lower"], h["OPIS"]["higher"]) == (3, 2, 1)
    assert [r["variant"] for r in h["OPIS"]["holm"]] == ["other"]
    prim = h["OPIS"]["primary"]
    assert prim["delta"] == -0.2 and prim["rel_low"] == pytest.approx(-0.35) and prim["rel_high"] == pytest.approx(0.15)
    assert h["eps_OPIS"]["n"] == 0 and h["eps_OPIS"]["primary"] is None
    assert len(h["R@1"]["holm"]) == 1
