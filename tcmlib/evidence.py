"""What the converged study shows: its primary test, the secondary comparisons, a pooled estimate, intervals over
seeds *and* test classes, and the comparisons along training.

Every function reads recorded runs (``tcmlib.study.load_runs``); none trains.  The study's design is in
``tcmlib.study`` (the comment above ``PRIMARY``): this module only carries out the analysis it declared.

* :func:`primary_test` -- the one declared test: small CNN x Smooth-AP, base vs base + TCM at the paper's margins,
  test OPIS, paired t-test, two-sided, alpha 0.05.
* :func:`secondary_tests` -- every other paired comparison of the final runs, Holm-adjusted as one family.
* :func:`pooled_change` -- a random-effects meta-analysis (``statsmodels``) of the relative change of a metric
  over every loss and backbone the study compares: what the whole study shows.
* :func:`two_level_bootstrap` -- an interval for the relative change of OPIS that covers which seeds *and* which
  test classes the study happened to draw (from the per-class utility curves each final run kept).
* :func:`along_training` and :func:`frontier` -- does TCM only train faster?  The paired difference at every
  epoch, and OPIS at equal validation MAP@R (with and without the first epoch).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as sps

from tcmlib.stats import holm, paired_comparison
from tcmlib.study import PAPER_TCM, PRIMARY, class_utility, variant_name

__all__ = ["paired_values", "primary_test", "secondary_tests", "pooled_change", "two_level_bootstrap",
           "along_training", "frontier"]

PAPER = variant_name(PAPER_TCM)
METRICS = ("OPIS", "eps_OPIS", "R@1", "MAP@R")


def _final(runs: Sequence[Mapping[str, Any]], backbone: str, loss: str) -> dict[tuple[str, int], Mapping[str, Any]]:
    return {(r["variant"], r["seed"]): r for r in runs
            if (r["stage"], r["backbone"], r["loss"]) == ("final", backbone, loss)}


def paired_values(runs: Sequence[Mapping[str, Any]], backbone: str, loss: str, variant: str, metric: str
                  ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """``(seeds, base (n,), treat (n,))``: a test metric of the final runs, paired by seed (seeds with both arms)."""
    by = _final(runs, backbone, loss)
    seeds = sorted(s for v, s in by if v == variant and ("base", s) in by)
    return (seeds, np.array([by["base", s]["final"][metric] for s in seeds], dtype=np.float64),
            np.array([by[variant, s]["final"][metric] for s in seeds], dtype=np.float64))


def _row(runs: Sequence[Mapping[str, Any]], backbone: str, loss: str, variant: str, metric: str) -> dict[str, Any]:
    _, base, treat = paired_values(runs, backbone, loss, variant, metric)
    row = paired_comparison(base, treat)
    m = row["base_mean"]
    return {"backbone": backbone, "loss": loss, "variant": variant, "metric": metric, **row,
            "rel_low": row["ci_low"] / m if m else math.nan, "rel_high": row["ci_high"] / m if m else math.nan}


def primary_test(runs: Sequence[Mapping[str, Any]], *, planned_pairs: int | None = None) -> dict[str, Any]:
    """The declared primary comparison (``tcmlib.study.PRIMARY``) on the recorded final runs.

    Returns :func:`tcmlib.stats.paired_comparison`'s dict (``delta``, t interval, ``p_t`` ...) plus ``rel``,
    ``rel_low`` / ``rel_high`` (the change and its t interval relative to the base mean), ``reject`` (p_t <
    alpha) and ``complete`` (all ``planned_pairs`` recorded; the test is read only then).
    """
    row = _row(runs, PRIMARY["backbone"], PRIMARY["loss"], PRIMARY["variant"], PRIMARY["metric"])
    row["alpha"] = PRIMARY["alpha"]
    row["reject"] = bool(row["p_t"] < PRIMARY["alpha"])
    row["complete"] = planned_pairs is None or row["n"] >= planned_pairs
    return row


def secondary_tests(runs: Sequence[Mapping[str, Any]], cells: Sequence[tuple[str, str]],
                    metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """Every paired comparison of a TCM variant with its base but the primary one, ``p_holm`` over all of them.

    One family (Holm's step-down over every row, all metrics), so that any row whose ``p_holm`` < 0.05 may be
    reported as a finding whatever else was looked at.  The paired t-test's p (the study's declared test).
    """
    rows = []
    for backbone, loss in cells:
        variants = sorted({v for v, _ in _final(runs, backbone, loss)} - {"base"})
        for v in variants:
            for m in metrics:
                if (backbone, loss, v, m) == (PRIMARY["backbone"], PRIMARY["loss"], PRIMARY["variant"],
                                              PRIMARY["metric"]):
                    continue
                if len(paired_values(runs, backbone, loss, v, m)[0]) >= 2:
                    rows.append(_row(runs, backbone, loss, v, m))
    for r, adj in zip(rows, holm([r["p_t"] for r in rows])):
        r["p_holm"] = adj
    return rows


def pooled_change(runs: Sequence[Mapping[str, Any]], cells: Sequence[tuple[str, str]], metric: str = "OPIS",
                  variant: str = PAPER) -> dict[str, Any]:
    """A random-effects meta-analysis of the relative change ``mean(treat - base) / mean(base)`` over ``cells``.

    Per loss and backbone: the relative change and its variance (the paired mean's standard error over the base
    mean, squared); combined by ``statsmodels.stats.meta_analysis.combine_effects`` (Paule-Mandel between-cell
    variance, Hartung-Knapp t intervals).  Returns ``estimate``, ``ci_low`` / ``ci_high``, ``tau2`` (between-cell
    variance), ``k`` (cells) and ``per_cell``.
    """
    from statsmodels.stats.meta_analysis import combine_effects

    eff, var, names = [], [], []
    for backbone, loss in cells:
        _, base, treat = paired_values(runs, backbone, loss, variant, metric)
        if base.size < 2:
            continue
        d = treat - base
        eff.append(d.mean() / base.mean())
        var.append((d.std(ddof=1) / math.sqrt(d.size) / base.mean()) ** 2)
        names.append(f"{backbone}/{loss}")
    if not eff:
        raise ValueError(f"no loss and backbone has >= 2 recorded pairs of base and {variant}")
    if len(eff) == 1:  # one cell: its own estimate and t interval
        _, base, treat = paired_values(runs, *cells[0], variant, metric)
        r = paired_comparison(base, treat)
        return {"estimate": r["rel"], "ci_low": r["ci_low"] / r["base_mean"], "ci_high": r["ci_high"] / r["base_mean"],
                "tau2": 0.0, "k": 1, "per_cell": dict(zip(names, eff))}
    res = combine_effects(np.array(eff), np.array(var), method_re="pm", use_t=True, row_names=names)
    lo, hi = res.conf_int(use_t=True)[1]  # (fixed, random) rows: take the random-effects one
    return {"estimate": float(res.mean_effect_re), "ci_low": float(lo), "ci_high": float(hi),
            "tau2": float(res.tau2), "k": len(eff), "per_cell": dict(zip(names, eff))}


def two_level_bootstrap(path: str | Path, runs: Sequence[Mapping[str, Any]], backbone: str, loss: str,
                        variant: str = PAPER, *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
                        ) -> dict[str, float]:
    """A percentile interval for the relative change of OPIS over seeds *and* test classes.

    Each replicate draws the seed pairs with replacement, then, for each drawn pair, the test classes with
    replacement (the same classes for the base run and its TCM twin: both were scored on the same classes), and
    recomputes both runs' OPIS from their kept per-class utility curves (``U`` (K', T): OPIS = mean over
    thresholds of the population variance over classes).  The statistic is ``mean(OPIS_tcm) / mean(OPIS_base) - 1``
    over the drawn pairs.  Returns ``estimate`` (on the data as recorded), ``ci_low``, ``ci_high``.
    """
    by = _final(runs, backbone, loss)
    seeds = sorted(s for v, s in by if v == variant and ("base", s) in by)
    if len(seeds) < 2:
        raise ValueError(f"{backbone}/{loss}: a bootstrap needs >= 2 recorded pairs of base and {variant}")
    base = [class_utility(path, by["base", s]) for s in seeds]  # (K', T) each
    treat = [class_utility(path, by[variant, s]) for s in seeds]
    t = base[0].shape[1]

    def opis(u: np.ndarray) -> np.ndarray:  # (..., K', T) -> (...,)
        return u.var(axis=-1).mean(axis=-1)

    b_all, t_all = np.stack(base), np.stack(treat)  # (n, K', T)
    estimate = float(opis(t_all).mean() / opis(b_all).mean() - 1)
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for i in range(n_boot):
        pick = rng.integers(0, len(seeds), len(seeds))  # (n,) seed pairs
        cls = rng.integers(0, t, (len(seeds), t))  # (n, T) classes, one draw per pair
        bb = np.take_along_axis(b_all[pick], cls[:, None, :], axis=2)  # (n, K', T)
        tt = np.take_along_axis(t_all[pick], cls[:, None, :], axis=2)
        reps[i] = opis(tt).mean() / opis(bb).mean() - 1
    lo, hi = np.quantile(reps, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"estimate": estimate, "ci_low": float(lo), "ci_high": float(hi), "pairs": len(seeds)}


def along_training(runs: Sequence[Mapping[str, Any]], backbone: str, loss: str, variant: str = PAPER,
                   metric: str = "val_MAP@R", *, confidence: float = 0.95) -> list[dict[str, float]]:
    """The paired change ``treat - base`` of a validation metric at every epoch of the final runs, with t intervals.

    One row per epoch: ``epoch``, ``base_mean``, ``treat_mean``, ``delta``, ``ci_low``, ``ci_high``, ``n``.  If TCM only
    trained faster, its advantage would shrink to nothing by the last epoch.
    """
    by = _final(runs, backbone, loss)
    seeds = sorted(s for v, s in by if v == variant and ("base", s) in by)
    if len(seeds) < 2:
        raise ValueError(f"{backbone}/{loss}: >= 2 recorded pairs of base and {variant} are needed")
    b = np.array([[h[metric] for h in by["base", s]["history"]] for s in seeds])  # (n, E)
    t = np.array([[h[metric] for h in by[variant, s]["history"]] for s in seeds])
    out = []
    for e in range(b.shape[1]):
        r = paired_comparison(b[:, e], t[:, e], confidence=confidence)
        out.append({"epoch": e + 1, "n": r["n"], "base_mean": r["base_mean"], "treat_mean": r["treat_mean"],
                    "delta": r["delta"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]})
    return out


def frontier(runs: Sequence[Mapping[str, Any]], backbone: str, loss: str, variant: str = PAPER, *,
             accuracy: str = "val_MAP@R", consistency: str = "val_OPIS", drop_first: bool = False,
             points: int = 50, confidence: float = 0.95) -> dict[str, float]:
    """Does TCM move the accuracy-consistency frontier?  OPIS at equal validation MAP@R, with a t interval.

    For each seed, the base run's and its TCM twin's per-epoch paths (accuracy, consistency) are sorted by accuracy
    and compared over the accuracy range both cover (``points`` evenly spaced values, linear interpolation): the
    mean of ``OPIS_tcm - OPIS_base``, negative when TCM is more consistent at equal accuracy.  The study's answer is
    the mean over seeds with its t interval and ``p``, the two-sided one-sample t-test of the per-seed gaps against
    zero (NaN when they are all equal), for a Holm correction over several losses (seeds whose paths share no range
    are left out, counted in ``dropped``).  ``drop_first``: leave out epoch 1 (one noisy segment from an untrained
    model can dominate).
    """
    by = _final(runs, backbone, loss)
    seeds = sorted(s for v, s in by if v == variant and ("base", s) in by)
    gaps, dropped = [], 0
    for s in seeds:
        paths = []
        for v in ("base", variant):
            h = by[v, s]["history"][1 if drop_first else 0:]
            x = np.array([e[accuracy] for e in h])
            y = np.array([e[consistency] for e in h])
            order = np.argsort(x, kind="stable")
            paths.append((x[order], y[order]))
        (xb, yb), (xt, yt) = paths
        lo, hi = max(xb[0], xt[0]), min(xb[-1], xt[-1])
        if hi <= lo:
            dropped += 1
            continue
        grid = np.linspace(lo, hi, points)
        gaps.append(float(np.mean(np.interp(grid, xt, yt) - np.interp(grid, xb, yb))))
    if len(gaps) < 2:
        raise ValueError(f"{backbone}/{loss}: fewer than 2 seeds whose paths share an accuracy range")
    g = np.array(gaps)
    half = float(sps.t.ppf(0.5 + confidence / 2, g.size - 1)) * g.std(ddof=1) / math.sqrt(g.size)
    p = float(sps.ttest_1samp(g, 0.0).pvalue) if g.std() > 0 else math.nan
    return {"gap": float(g.mean()), "ci_low": float(g.mean() - half), "ci_high": float(g.mean() + half),
            "p": p, "seeds": int(g.size), "dropped": dropped}
