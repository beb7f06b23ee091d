"""What the pilot study's recorded runs can carry: the answers chapter 13 and the README give, and their limits.

Every function reads the records of :mod:`tcmlib.study` (``runs.jsonl`` lines) and nothing else.

* :func:`frontier_gap_interval`: the accuracy-consistency frontier gap of :func:`tcmlib.study.frontier_gap`
  (mean ``OPIS_tcm(R@1) - OPIS_base(R@1)`` along the seed-mean validation paths), optionally without the first
  epochs, with a percentile bootstrap interval over seed pairs (``scipy.stats.bootstrap``: a base run and its
  TCM twin of one seed are drawn together).
* :func:`frontier_gaps`: the same question per seed pair (:func:`tcmlib.evidence.frontier`) for several base losses
  at once, with Holm-adjusted p-values over the losses.
* :func:`best_epoch`: at which epoch the seed-mean validation R@1 of a learning curve peaked, and how many epochs
  were tried -- a best epoch equal to the last one means the model was still improving when training stopped.
* :func:`paired_power` and :func:`detectable_effect`: the power of a two-sided paired t-test for a relative change
  ``effect`` when the paired sd is ``ratio`` x the base's mean (Cohen's d = ``abs(effect) / ratio``), and the smallest
  relative change ``n`` pairs detect with a given power (``statsmodels``' ``TTestPower``).
* :func:`headline`: the numbers of the book's answer from a study's paired comparisons
  (:func:`tcmlib.study.comparisons`, Holm-adjusted per metric).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from tcmlib import study

__all__ = ["frontier_gap_interval", "frontier_gaps", "best_epoch", "paired_power", "detectable_effect", "headline"]


def frontier_gap_interval(runs: Sequence[Mapping[str, Any]], backbone: str, loss: str, *, stage: str = "final",
                          skip_epochs: int = 0, confidence: float = 0.95, n_boot: int = 2000,
                          seed: int = 0) -> dict[str, float]:
    """The frontier gap of one backbone and base loss (TCM at the paper's margins vs the base), with an interval.

    ``gap`` is :func:`tcmlib.study.frontier_gap` of the ``stage`` runs whose histories drop their first
    ``skip_epochs`` epochs: > 0 when the TCM path lies *above* the base path (less consistent at equal validation
    R@1), < 0 below it.  ``ci_low`` / ``ci_high``: the percentile
    bootstrap over the seeds that have both runs (``n_boot`` resamples of seed pairs, ``seed`` fixes them); NaN
    with fewer than 3 seeds.  Returns ``{"gap", "ci_low", "ci_high", "seeds"}``.
    """
    from scipy import stats

    if skip_epochs < 0:
        raise ValueError(f"skip_epochs must be >= 0, got {skip_epochs}")
    paper = study.variant_name(study.PAPER_TCM)
    by: dict[tuple[str, int], Mapping[str, Any]] = {}
    for r in runs:
        if (r["stage"], r["backbone"], r["loss"]) == (stage, backbone, loss) and r["variant"] in ("base", paper):
            by[r["variant"], r["seed"]] = {**r, "history": r["history"][skip_epochs:]}
    seeds = sorted({s for v, s in by if v == "base"} & {s for v, s in by if v == paper})
    if not seeds:
        raise ValueError(f"no {stage!r} runs of {backbone} x {loss} with both the base and {paper}")
    if any(len(by[k]["history"]) == 0 for k in by):
        raise ValueError(f"skip_epochs={skip_epochs} leaves a run of {backbone} x {loss} without epochs")

    def gap(idx: Any) -> float:
        chosen = [by[v, seeds[int(i)]] for i in idx for v in ("base", paper)]
        return study.frontier_gap(chosen, backbone, loss, stage=stage)[0]

    point = gap(range(len(seeds)))
    lo = hi = float("nan")
    if len(seeds) >= 3 and np.isfinite(point):
        res = stats.bootstrap((np.arange(len(seeds)),), gap, vectorized=False, n_resamples=n_boot,
                              confidence_level=confidence, method="percentile", random_state=seed)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"gap": point, "ci_low": lo, "ci_high": hi, "seeds": float(len(seeds))}


def frontier_gaps(runs: Sequence[Mapping[str, Any]], backbone: str, losses: Sequence[str], *,
                  drop_first: bool = False, accuracy: str = "val_R@1") -> dict[str, dict[str, float]]:
    """Per base loss, the frontier gap of its final runs per seed pair, Holm-adjusted over ``losses``.

    ``out[loss]`` is :func:`tcmlib.evidence.frontier` (``gap`` = mean over seeds of the mean ``OPIS_tcm - OPIS_base``
    at equal ``accuracy``, its 95 % t interval, ``p`` of the one-sample t-test) plus ``p_holm`` (Holm over the
    losses, :func:`tcmlib.stats.holm`).  A loss with fewer than 2 seeds whose paths share an accuracy range (a run
    of one epoch once ``drop_first`` removes epoch 1) gets NaN everywhere and is left out of the correction.
    """
    from tcmlib.evidence import frontier
    from tcmlib.stats import holm

    nan = float("nan")
    out: dict[str, dict[str, float]] = {}
    for loss in losses:
        try:
            out[loss] = dict(frontier(runs, backbone, loss, accuracy=accuracy, drop_first=drop_first))
        except ValueError as e:
            if "fewer than 2 seeds" not in str(e):
                raise
            out[loss] = {"gap": nan, "ci_low": nan, "ci_high": nan, "p": nan, "seeds": 0, "dropped": nan}
    for row, p in zip(out.values(), holm([row["p"] for row in out.values()])):
        row["p_holm"] = p
    return out


def best_epoch(runs: Sequence[Mapping[str, Any]], backbone: str, loss: str, variant: str = "base", *,
               stage: str = "curves", metric: str = "val_R@1") -> tuple[int, int]:
    """``(best, tried)``: the epoch (1-based) of the highest seed-mean ``metric`` among a variant's ``stage`` runs,
    and the number of epochs they ran.  ``best == tried``: the curve was still rising at its last epoch."""
    hist = [[h[metric] for h in r["history"]] for r in runs
            if (r["stage"], r["backbone"], r["loss"], r["variant"]) == (stage, backbone, loss, variant)]
    if not hist:
        raise ValueError(f"no {stage!r} runs of {backbone} x {loss} ({variant})")
    if len({len(h) for h in hist}) != 1:
        raise ValueError(f"the {stage!r} runs of {backbone} x {loss} ({variant}) have histories of unequal length")
    mean = np.mean(np.array(hist, dtype=np.float64), axis=0)  # (epochs,)
    return int(np.argmax(mean)) + 1, len(mean)


def paired_power(ratio: float, n: int, effect: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs for a relative change ``effect`` (e.g. -0.10) when the
    paired sd is ``ratio`` x the base's mean: Cohen's d = ``abs(effect) / ratio`` (``TTestPower().power``)."""
    from statsmodels.stats.power import TTestPower

    if ratio <= 0 or n < 2:
        raise ValueError(f"need ratio > 0 and n >= 2 pairs, got ratio={ratio}, n={n}")
    return float(TTestPower().power(effect_size=abs(effect) / ratio, nobs=n, alpha=alpha,
                                    alternative="two-sided"))


def detectable_effect(ratio: float, n: int, power: float = 0.80, alpha: float = 0.05) -> float:
    """The smallest relative change (as a positive fraction of the base's mean) that ``n`` pairs detect with
    ``power`` by the two-sided paired t-test, when the paired sd is ``ratio`` x the base's mean."""
    from statsmodels.stats.power import TTestPower

    if ratio <= 0 or n < 2:
        raise ValueError(f"need ratio > 0 and n >= 2 pairs, got ratio={ratio}, n={n}")
    d = TTestPower().solve_power(nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(d) * ratio


def headline(comp: Sequence[Mapping[str, Any]], alpha: float = 0.05) -> dict[str, Any]:
    """The book's answer in numbers, from a study's comparisons (:func:`tcmlib.study.comparisons`).

    Per metric (``OPIS``, ``eps_OPIS``, ``R@1``): ``n`` comparisons, ``lower`` / ``higher`` (mean change below /
    above zero), ``holm`` (the rows whose Holm-adjusted p is below ``alpha``), ``rel`` (the mean relative changes).
    ``primary``: the row of :data:`tcmlib.study.PRIMARY`'s comparison (small CNN, Smooth-AP, the paper's margins)
    per metric, with its interval relative to the base's mean (``rel_low``, ``rel_high``), or None when the study
    lacks it.
    """
    out: dict[str, Any] = {"alpha": alpha}
    for m in ("OPIS", "eps_OPIS", "R@1"):
        rows = [r for r in comp if r["metric"] == m]
        out[m] = {"n": len(rows), "lower": sum(r["delta"] < 0 for r in rows),
                  "higher": sum(r["delta"] > 0 for r in rows),
                  "holm": [r for r in rows if r["p_holm"] < alpha], "rel": [r["rel"] for r in rows], "rows": rows}
        prim = [r for r in rows if (r["backbone"], r["loss"], r["variant"])
                == (study.PRIMARY["backbone"], study.PRIMARY["loss"], study.PRIMARY["variant"])]
        out[m]["primary"] = ({**prim[0], "rel_low": prim[0]["ci_low"] / prim[0]["base_mean"],
                              "rel_high": prim[0]["ci_high"] / prim[0]["base_mean"]} if prim else None)
    return out
