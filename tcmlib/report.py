"""Deploying one threshold: choose it on held-out data, then see what it does to every class and group.

A deployed embedder accepts a pair ``(a, b)`` as "same" when ``d(a, b) = 1 - cos(x_a, x_b) <= t``
for ONE global threshold ``t``. This module answers the deployment questions in one call::

    from tcmlib.report import threshold_report, load_embeddings_npy
    emb, labels = load_embeddings_npy("test_emb.npy", "test_labels.npy")
    rep = threshold_report(emb, labels, far_target=1e-2, calibration=(cal_emb, cal_labels))
    print(rep.to_text()); rep.plot()

Definitions (those of :mod:`tcmlib.metrics.opis`; pairs are unordered, ``a != b``):

- :func:`threshold_for_far`: the ``far_target`` quantile (linear interpolation, exactly
  ``numpy.quantile``) of the distances of ALL negative pairs, i.e. the threshold where the global
  false-accept rate is ``far_target`` (up to ties and 1 / #negatives). Computed exactly by the
  streamed order-statistic search of :mod:`tcmlib.metrics.opis` (the library's one exact quantile);
  never forms the N x N matrix. Distances are ``1 - s`` in float64 with ``s`` in the working dtype, as in
  :mod:`tcmlib.metrics.opis`, so both modules agree on every pair.
- :func:`rates_at_threshold`: per class (or per group), with the pairs that touch it,
  ``FAR_i = #{negative pairs of i with d <= t} / #{negative pairs of i}`` and
  ``FRR_i = #{positive pairs of i with d > t} / #{positive pairs of i}``, i.e. ``1 - TRR_i(t)`` and
  ``1 - TAR_i(t)`` of :func:`~tcmlib.metrics.opis.utility_curves`. A pair is accepted when ``d <= t``
  (ties accepted). Only eligible units (>= 1 positive and >= 1 negative pair) are reported.
- :func:`opis_bootstrap_ci`: a percentile bootstrap over classes (or groups) of OPIS: the utility
  curves are computed once, then the eligible classes are resampled with replacement.
- :func:`threshold_report` -> :class:`ThresholdReport`: all of the above plus eps-OPIS and R@1,
  with ``.to_text()`` and ``.plot()``; :func:`compare_reports` puts several side by side.
- :func:`paired_bootstrap_difference`: two models on the same test set, the difference in OPIS,
  eps-OPIS or per-class FAR spread with a paired bootstrap over the shared classes.

Query / gallery: :func:`threshold_for_far`, :func:`rates_at_threshold` and :func:`threshold_report` take
``reference`` (M, D) and ``reference_labels`` (M,): then the pairs are the query x gallery pairs, each
counted for its query's class (or group), as in :mod:`tcmlib.metrics.opis` ("Query / reference"): a
class's FAR is the share of its queries' pairs with other-class gallery items that are accepted, its FRR
the share of its queries' pairs with its own gallery items that are rejected.

Inputs may be torch tensors or NumPy arrays; bad input raises ``ValueError`` with what to do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from tcmlib._checks import check_embeddings, check_embeddings_labels, check_labels
from tcmlib.metrics._pairs import Pairs, SortedPairs, Tile, pair_tiles, sort_pairs, unit_rows
from tcmlib.metrics.opis import (  # the one exact quantile, sorted order and closed-form pair counts are shared
    ClassCounts,
    UtilityCurves,
    _negative_distance_quantiles,
    _unit_totals,
    calibrate,
    check_inputs,
    count_pass,
    curve_setup,
    utility_curves,
)
from tcmlib.metrics.retrieval import RetrievalTopK, _check_reference

__all__ = [
    "BootstrapCI",
    "PairedDifference",
    "ReportComparison",
    "ThresholdRates",
    "ThresholdReport",
    "compare_reports",
    "load_embeddings_npy",
    "opis_bootstrap_ci",
    "paired_bootstrap_difference",
    "rates_at_threshold",
    "threshold_for_far",
    "threshold_report",
]


DEFAULT_CHUNK_SIZE = 1024  # rows of the similarity matrix per block (as tcmlib.metrics.opis)
OPIS_SCALE = ("OPIS is a variance of per-class utilities in [0, 1], so at most 0.25; eps-OPIS a squared gap "
              "of mean utilities, at most 1; lower is more consistent")


def _accept_boundary(threshold: float, work: torch.dtype) -> float:
    """The smallest similarity s (in ``work``) with float64(1 - s) <= threshold, so that
    ``s >= boundary``  <=>  ``d <= threshold`` exactly (ties at the threshold are accepted).

    Found by bisection over the ordered bit patterns of the floats in [-3, 3] (``1 - s`` is monotone in
    s); returns -3 when every cosine is accepted and 3 when none is (cosines lie in [-1, 1] up to rounding).
    """
    npdt, uint, nbits = (np.float32, np.uint32, 32) if work == torch.float32 else (np.float64, np.uint64, 64)
    sign = 1 << (nbits - 1)

    def key(v: float) -> int:  # order-preserving integer of a float (-0.0 and 0.0 both map to 0)
        bits = int(np.array(v, dtype=npdt).view(uint))
        return bits if bits < sign else -(bits - sign)

    def val(k: int) -> float:
        bits = k if k >= 0 else sign + (-k)
        return float(np.array(bits, dtype=uint).view(npdt))

    def accepted(k: int) -> bool:
        return bool((1.0 - np.float64(val(k))) <= threshold)

    lo, hi = key(-3.0), key(3.0)
    if accepted(lo):
        return val(lo)
    if not accepted(hi):
        return val(hi)
    while hi - lo > 1:  # invariant: not accepted(lo), accepted(hi)
        mid = (lo + hi) // 2
        if accepted(mid):
            hi = mid
        else:
            lo = mid
    return val(hi)


def _prepare(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Unit rows in the working dtype (as utility_curves does), dense labels (N,), label sizes (L,), #negatives."""
    xn = unit_rows(x).contiguous()  # (N, D), the rows every metric compares
    _, lab = torch.unique(y, return_inverse=True)  # (N,)
    n_lab = torch.bincount(lab)  # (L,)
    n = y.shape[0]
    num_neg = n * (n - 1) // 2 - int((n_lab * (n_lab - 1) // 2).sum())
    return xn, lab, n_lab, num_neg


def _sorted_sides(x: torch.Tensor, reference: Any, reference_labels: Any, y: torch.Tensor) -> SortedPairs:
    """The pairs' sorted sides (:func:`~tcmlib.metrics._pairs.sort_pairs`); with ``reference`` (M, D) and
    ``reference_labels`` (M,), checked, the query x reference pairs."""
    if reference is None and reference_labels is None:
        return sort_pairs(x, y)
    rx, ry = _check_reference(x, reference, reference_labels)
    return sort_pairs(x, y, rx, ry)


def _check_far(far_target: float) -> float:
    far = float(far_target)
    if not (math.isfinite(far) and 0.0 <= far <= 1.0):
        raise ValueError(f"far_target = {far_target} must lie in [0, 1] (a false-accept rate, e.g. 1e-2 for 1 %)")
    return far


MAX_FAR_TARGET = 0.5  # a deployed threshold accepting more than half of all impostor pairs is a typo


def _check_far_target(far_target: float, name: str = "far_target") -> float:
    """A deployment's false-accept target: a fraction in [0, MAX_FAR_TARGET], e.g. 1e-2 for 1 %.

    1 or more would accept (nearly) every negative pair, and anything above 0.5 more than half of
    them: such a value is almost surely a percentage typed as a number, so it is refused with the
    fraction it probably meant, instead of a report at 100 % FAR.  ``name``: how the caller spells
    the argument (``"--far"`` on the command line)."""
    far = float(far_target)
    if math.isfinite(far) and MAX_FAR_TARGET < far <= 100.0:
        sep = "=" if name.isidentifier() else " "
        raise ValueError(
            f"{name} {far_target:g} would accept {min(far, 1.0):.0%} of all negative pairs; it is a fraction, "
            f"not a percentage: for {far:g} % pass {name}{sep}{far / 100:g} (targets above {MAX_FAR_TARGET} "
            "are refused)")
    return _check_far(far)


def _check_chunk(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size = {chunk_size} must be >= 1")
    return int(chunk_size)


# ----------------------------------------------------------------------------- the threshold
def threshold_for_far(
    embeddings: Any, labels: Any, far_target: float, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
    reference: Any = None, reference_labels: Any = None,
) -> float:
    """The global distance threshold with false-accept rate ``far_target`` on ``embeddings`` (N, D).

    Exactly ``numpy.quantile(d_neg, far_target)`` (linear interpolation) over the distances
    ``d = 1 - cos`` of all negative pairs (different labels), streamed ``chunk_size`` rows at a time.
    Accepting ``d <= t`` then accepts a share of the negatives that is ``far_target`` up to ties and
    one pair in #negatives. Pick it on held-out (calibration) data, deploy it on new data.
    With ``reference`` (M, D) and ``reference_labels`` (M,): the negative query x reference pairs
    (:mod:`tcmlib.metrics.opis`, "Query / reference").

    Raises ``ValueError`` for bad input, a ``far_target`` outside [0, 1], or no negative pairs.
    """
    x, y = check_embeddings_labels(embeddings, labels)
    far = _check_far(far_target)
    chunk = _check_chunk(chunk_size)
    pairs = _sorted_sides(x, reference, reference_labels, y)
    num_neg = _unit_totals(pairs, y)[4]
    if num_neg == 0:
        raise ValueError("there are no negative pairs: all samples share one label; a FAR needs >= 2 classes")
    return _negative_distance_quantiles(pairs, (far,), chunk, num_neg)[0]


# ----------------------------------------------------------------------------- rates at one threshold
@dataclass
class ThresholdRates:
    """False-accept and false-reject rates at one threshold, globally and per eligible class (or group).

    Rates are fractions in [0, 1] (the text reports print them in %).  ``unit_ids`` (T,) the eligible class labels (or group ids), ascending; ``far``, ``frr`` (T,) float64;
    ``false_accepts`` / ``num_neg`` and ``false_rejects`` / ``num_pos`` (T,) int64 the counts behind them
    (pairs touching the unit). ``global_far`` / ``global_frr`` over all pairs (each pair counted once).
    """

    threshold: float
    unit_ids: torch.Tensor  # (T,)
    far: torch.Tensor  # (T,) float64
    frr: torch.Tensor  # (T,) float64
    false_accepts: torch.Tensor  # (T,) int64
    false_rejects: torch.Tensor  # (T,) int64
    num_neg: torch.Tensor  # (T,) int64
    num_pos: torch.Tensor  # (T,) int64
    global_far: float
    global_frr: float
    total_neg: int
    total_pos: int
    num_excluded: int
    by: str  # "class" or "group"

    def summary(self, far_target: float | None = None) -> dict[str, float]:
        """min / median / max of per-unit FAR and FRR (keys ``"FAR_min"`` ... ``"FRR_max"``, fractions);
        with ``far_target``, ``"share_FAR_over_2x"``: the share of units over 2x it."""
        out: dict[str, float] = {}
        for name, v in (("FAR", self.far), ("FRR", self.frr)):
            out[f"{name}_min"] = float(v.min())
            out[f"{name}_median"] = float(v.median()) if v.numel() % 2 else float(v.quantile(0.5))
            out[f"{name}_max"] = float(v.max())
        if far_target is not None:
            out["share_FAR_over_2x"] = float((self.far > 2 * float(far_target)).double().mean())
        return out


def rates_at_threshold(
    embeddings: Any, labels: Any, threshold: float, *, groups: Any = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
    reference: Any = None, reference_labels: Any = None,
) -> ThresholdRates:
    """Global and per-class (per-group with ``groups`` (N,)) FAR and FRR when ``d <= threshold`` is accepted.

    Exact and streamed: the accepted pairs (``d <= t``, compared exactly through the float boundary of
    :mod:`tcmlib.metrics.opis`) are counted block by block; the totals per unit are known in closed form.
    With ``groups``, a unit's pairs are those with at least one member in it (a pair spanning two groups
    counts for both), as in :func:`~tcmlib.metrics.opis.utility_curves`. Eligible units only (>= 1 positive
    and >= 1 negative pair); ``FRR_i = 1 - TAR_i(t)``, ``FAR_i = 1 - TRR_i(t)``.

    With ``reference`` (M, D) and ``reference_labels`` (M,): the query x reference pairs, each counted for
    its query's class (or group: ``groups`` are per query), e.g. ``FAR_i`` = the share of class i's
    queries' pairs with other-class reference items that are accepted (:mod:`tcmlib.metrics.opis`,
    "Query / reference"; an item in both sets meets itself, an accepted positive pair).
    """
    x, y = check_embeddings_labels(embeddings, labels)
    chunk = _check_chunk(chunk_size)
    ids = y if groups is None else check_labels(groups, x.shape[0], "groups")
    pairs = _sorted_sides(x, reference, reference_labels, y)
    counter = AcceptedCounts(pairs, ids, threshold, "class" if groups is None else "group")
    for tile in pair_tiles(pairs, chunk):
        counter.add(tile)
    return counter.result()


class AcceptedCounts:
    """The accepted pairs (``d <= t``) per unit, tile by tile: ``result()`` the :class:`ThresholdRates`.

    Works on the sides of ``pairs`` (sorted by label, :func:`~tcmlib.metrics._pairs.sort_pairs`); ``ids``
    (N,) the rows' class labels or group ids in input order.  :meth:`add` reads ``tile.pairs(bound)`` of a
    :class:`~tcmlib.metrics._pairs.Tile`, or of the pairs the curves' first pass kept
    (:func:`~tcmlib.metrics.opis.count_pass`).
    """

    def __init__(self, pairs: SortedPairs, ids: Any, threshold: float, by: str) -> None:
        t = float(threshold)
        if not math.isfinite(t):
            raise ValueError(f"threshold = {threshold} must be a finite distance (1 - cosine, in [0, 2])")
        ids = torch.as_tensor(ids)
        unit_ids, unit, num_pos, num_neg, num_neg_all, num_pos_all = _unit_totals(pairs, ids)
        if num_neg_all == 0:
            raise ValueError("there are no negative pairs: all samples share one label; a FAR needs >= 2 classes")
        self.unit, self.num_pos, self.num_neg = unit, num_pos, num_neg  # unit: sorted like the rows
        self.eligible = (self.num_pos > 0) & (self.num_neg > 0)
        if int(self.eligible.sum()) == 0:
            raise ValueError(
                f"no eligible {by}: each needs a positive pair (>= 2 samples of one label; with a reference "
                "set, a query with a same-label reference item) and a negative pair"
            )
        self.symmetric = pairs.symmetric
        self.lab = pairs.lab
        self.col_lab = pairs.lab if pairs.col_lab is None else pairs.col_lab
        self.unit_ids, self.t, self.by = unit_ids, t, by
        self.num_pos_all, self.num_neg_all = num_pos_all, num_neg_all
        self.bnd = _accept_boundary(t, pairs.rows.dtype)
        self.acc = torch.zeros(2, len(unit_ids), dtype=torch.long, device=unit.device)  # [0] pos, [1] neg accepted
        self.acc_neg = self.acc_all = 0  # accepted negative / all pairs, each pair once

    @property
    def bound(self) -> float:
        """The lowest similarity accepted (``s >= bound``  <=>  ``d <= t``)."""
        return float(self.bnd)

    def add(self, tile: Tile) -> None:
        """Count the tile's accepted pairs."""
        neg, pos = tile.pairs(self.bound)
        self._count(pos, 0)
        self._count(neg, 1)

    def _count(self, p: Pairs, sign: int) -> None:
        """Count accepted pairs ``p``, positive (``sign`` 0) or negative (1), per unit (index_select: on the
        CPU a gather several times faster than indexing with a tensor)."""
        u = self.acc.shape[1]
        ur = self.unit.index_select(0, p.rows)
        self.acc[sign] += torch.bincount(ur, minlength=u)
        if self.symmetric:  # within one set a pair counts for both members' units (query x reference: the query's)
            uc = self.unit.index_select(0, p.cols)
            self.acc[sign] += torch.bincount(uc[ur != uc], minlength=u)  # the pair touches two units: both count
        if sign:
            self.acc_neg += p.rows.shape[0]
        self.acc_all += p.rows.shape[0]

    def result(self) -> ThresholdRates:
        acc, el = self.acc.cpu(), self.eligible.cpu()
        acc_neg, acc_pos = self.acc_neg, self.acc_all - self.acc_neg
        pos_t, neg_t = self.num_pos[self.eligible].cpu(), self.num_neg[self.eligible].cpu()
        fa = acc[1][el]
        fr = pos_t - acc[0][el]
        return ThresholdRates(
            threshold=self.t,
            unit_ids=self.unit_ids[self.eligible].cpu(),
            far=fa.double() / neg_t.double(),
            frr=fr.double() / pos_t.double(),
            false_accepts=fa,
            false_rejects=fr,
            num_neg=neg_t,
            num_pos=pos_t,
            global_far=acc_neg / self.num_neg_all,
            global_frr=(self.num_pos_all - acc_pos) / self.num_pos_all if self.num_pos_all else math.nan,
            total_neg=self.num_neg_all,
            total_pos=self.num_pos_all,
            num_excluded=len(self.unit_ids) - int(self.eligible.sum()),
            by=self.by,
        )


# ----------------------------------------------------------------------------- bootstrap CI of OPIS
class BootstrapCI(NamedTuple):
    """``(opis, lo, hi)``: the OPIS of all classes and the percentile interval of its bootstrap."""

    opis: float
    lo: float
    hi: float


def _bootstrap_opis_values(utility: torch.Tensor, n_boot: int, seed: int, block: int = 256) -> np.ndarray:
    """(n_boot,) OPIS of class-resampled utility curves ``utility`` (K, T).

    Replicate b draws ``idx = rng.integers(0, T, size=T)`` (rng = numpy default_rng(seed), one call per
    replicate, in order); its OPIS is the mean over thresholds of the population variance of
    ``utility[:, idx]`` across the T drawn columns, computed from the draw counts (weights).
    """
    u = utility.double().cpu().numpy()  # (K, T)
    _, t_cls = u.shape  # (K, T)
    u = u - u.mean(axis=1, keepdims=True)  # shift per threshold: variance unchanged, no cancellation
    u2 = u * u
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for b0 in range(0, n_boot, block):
        nb = min(block, n_boot - b0)
        w = np.empty((nb, t_cls))  # (nb, T) draw counts / T
        for i in range(nb):
            w[i] = np.bincount(rng.integers(0, t_cls, size=t_cls), minlength=t_cls)
        w /= t_cls
        mean = u @ w.T  # (K, nb)
        second = u2 @ w.T  # (K, nb)
        out[b0 : b0 + nb] = np.maximum(second - mean * mean, 0.0).mean(axis=0)
    return out


def opis_bootstrap_ci(
    curves_or_embeddings: UtilityCurves | Any,
    labels: Any = None,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    far_range: tuple[float, float] | None = None,
    distance_range: tuple[float, float] | None = None,
    num_thresholds: int | None = None,
    beta: float | None = None,
    groups: Any = None,
    chunk_size: int | None = None,
    reference: Any = None,
    reference_labels: Any = None,
) -> BootstrapCI:
    """OPIS with a percentile bootstrap interval over classes (or groups): ``(opis, lo, hi)``.

    Pass :class:`~tcmlib.metrics.UtilityCurves` (computed once, reused), or embeddings (N, D) and
    ``labels`` (N,) plus any :func:`~tcmlib.metrics.opis.utility_curves` keyword (``far_range`` ...
    ``reference_labels``; None: its default). Each of ``n_boot`` replicates draws T of the T eligible classes with replacement and
    recomputes OPIS from their curves (the thresholds stay fixed: the interval is about which
    classes the test set happened to contain, not about the pairs within a class). ``lo`` / ``hi``
    are the ``alpha / 2`` and ``1 - alpha / 2`` quantiles of the replicates (``numpy.quantile``).
    """
    given = {"far_range": far_range, "distance_range": distance_range, "num_thresholds": num_thresholds,
             "beta": beta, "groups": groups, "chunk_size": chunk_size, "reference": reference,
             "reference_labels": reference_labels}
    curve_kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if isinstance(curves_or_embeddings, UtilityCurves):
        if labels is not None or curve_kwargs:
            raise ValueError("pass either UtilityCurves alone, or embeddings with labels (and utility_curves keywords)")
        curves = curves_or_embeddings
    else:
        if labels is None:
            raise ValueError("labels are required when embeddings (not UtilityCurves) are passed")
        curves = utility_curves(curves_or_embeddings, labels, **curve_kwargs)
    nb = int(n_boot)
    if nb != n_boot or nb < 2:
        raise ValueError(f"n_boot = {n_boot} must be an integer >= 2 (1000 is a usual choice)")
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha = {alpha} must lie strictly between 0 and 1 (0.05 gives a 95 % interval)")
    boots = _bootstrap_opis_values(curves.utility, nb, int(seed))
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(curves.opis, float(lo), float(hi))


# ----------------------------------------------------------------------------- two models, paired
PAIRED_METRICS = ("opis", "eps_opis", "far_spread")


class PairedDifference(NamedTuple):
    """``difference = value_a - value_b`` with its paired percentile interval ``(lo, hi)`` and
    ``share_other_sign``, the share of replicates whose difference does not have the observed sign."""

    metric: str
    value_a: float
    value_b: float
    difference: float
    lo: float
    hi: float
    share_other_sign: float
    replicates: np.ndarray  # (n_boot,) the bootstrap differences


def _class_metric(x: torch.Tensor, y: torch.Tensor, metric: str, far_range: tuple[float, float], eps: float,
                  far_target: float, chunk: int) -> tuple[torch.Tensor, Any]:
    """``(class_ids (T,), f)``: the eligible classes and ``f(idx)``, the metric over the classes ``idx`` (T,)
    (indices into class_ids, repeats allowed), from per-class quantities computed once."""
    if metric == "far_spread":
        r = rates_at_threshold(x, y, threshold_for_far(x, y, far_target, chunk_size=chunk), chunk_size=chunk)
        return r.unit_ids, lambda idx: float(r.far[idx].std(unbiased=False))
    c = utility_curves(x, y, far_range=far_range, chunk_size=chunk)

    def on(idx: torch.Tensor) -> UtilityCurves:  # the same curves, restricted to (and repeating) classes idx
        return replace(c, tar=c.tar[:, idx], trr=c.trr[:, idx], utility=c.utility[:, idx], class_ids=c.class_ids[idx],
                       num_pos=c.num_pos[idx], num_neg=c.num_neg[idx], num_eligible=int(idx.numel()))

    if metric == "opis":
        return c.class_ids, lambda idx: on(idx).opis
    return c.class_ids, lambda idx: on(idx).eps_opis(eps)


def paired_bootstrap_difference(
    emb_a: Any,
    emb_b: Any,
    labels: Any,
    metric: str = "opis",
    n_boot: int = 1000,
    seed: int = 0,
    *,
    labels_b: Any = None,
    alpha: float = 0.05,
    far_range: tuple[float, float] = (1e-2, 1e-1),
    eps: float = 0.1,
    far_target: float = 1e-2,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PairedDifference:
    """Is model A more consistent than model B on the same test set? ``M(A) - M(B)`` with a paired bootstrap.

    ``emb_a`` (N, D_a) and ``emb_b`` (N, D_b) embed the same N test samples with ``labels`` (N,)
    (``labels_b`` (N,) when B's rows come in another order; it must hold the same classes). ``metric``:

    - ``"opis"``: OPIS over ``far_range`` (:func:`~tcmlib.metrics.opis.utility_curves`);
    - ``"eps_opis"``: eps-OPIS with ``eps`` (:meth:`~tcmlib.metrics.opis.UtilityCurves.eps_opis`);
    - ``"far_spread"``: population std over classes of the per-class FAR at the threshold meeting
      ``far_target`` globally (:func:`threshold_for_far` and :func:`rates_at_threshold`, on the test set).

    The per-class quantities (utility curves on each model's own threshold grid, per-class FAR at each
    model's own threshold) are computed once on all data. Replicate b draws T classes with replacement
    from the T shared eligible classes, ``idx_b = rng.integers(0, T, size=T)`` (``rng =
    numpy.random.default_rng(seed)``), ONCE, and evaluates ``D*_b = M_A(idx_b) - M_B(idx_b)`` on those
    same classes for both models: class-to-class variation common to both cancels, which an unpaired
    comparison of two intervals ignores. ``lo`` / ``hi`` = the ``alpha / 2`` and ``1 - alpha / 2``
    quantiles of ``D*``; ``share_other_sign`` = ``mean(D* <= 0)`` if ``D > 0``, ``mean(D* >= 0)`` if
    ``D < 0`` and 1 if ``D == 0`` (a p-value-like number: small means the sign is stable under
    resampling classes). Identical inputs give ``D = 0`` exactly.
    """
    if metric not in PAIRED_METRICS:
        raise ValueError(f"metric = {metric!r} must be one of {PAIRED_METRICS}")
    xa = check_embeddings(emb_a, "emb_a")
    xb = check_embeddings(emb_b, "emb_b")
    if xa.shape[0] != xb.shape[0]:
        raise ValueError(f"emb_a has {xa.shape[0]} rows, emb_b {xb.shape[0]}: a paired comparison needs both "
                         "models' embeddings of the same test samples")
    xa, ya = check_embeddings_labels(xa, labels, emb_name="emb_a")
    xb, yb = check_embeddings_labels(xb, labels if labels_b is None else labels_b, emb_name="emb_b",
                                     label_name="labels" if labels_b is None else "labels_b")
    if not torch.equal(torch.unique(ya).cpu(), torch.unique(yb).cpu()):
        raise ValueError("labels and labels_b hold different classes: the models must be compared on the same "
                         "test classes (and samples)")
    nb = int(n_boot)
    if nb != n_boot or nb < 2:
        raise ValueError(f"n_boot = {n_boot} must be an integer >= 2 (1000 is a usual choice)")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha = {alpha} must lie strictly between 0 and 1 (0.05 gives a 95 % interval)")
    far, chunk = _check_far_target(far_target), _check_chunk(chunk_size)
    ids_a, fa = _class_metric(xa, ya, metric, far_range, eps, far, chunk)
    ids_b, fb = _class_metric(xb, yb, metric, far_range, eps, far, chunk)
    if not torch.equal(ids_a, ids_b):  # pragma: no cover - same labels give the same eligible classes
        raise ValueError("the two models have different eligible classes")
    t_cls = ids_a.numel()
    every = torch.arange(t_cls)
    va, vb = fa(every), fb(every)
    rng = np.random.default_rng(int(seed))
    reps = np.empty(nb)
    for b in range(nb):
        idx = torch.from_numpy(rng.integers(0, t_cls, size=t_cls))
        reps[b] = fa(idx) - fb(idx)
    d = va - vb
    lo, hi = np.quantile(reps, [float(alpha) / 2, 1 - float(alpha) / 2])
    other = float(np.mean(reps <= 0)) if d > 0 else float(np.mean(reps >= 0)) if d < 0 else 1.0
    return PairedDifference(metric, va, vb, d, float(lo), float(hi), other, reps)


# ----------------------------------------------------------------------------- the one-call report
@dataclass
class ThresholdReport:
    """What one global threshold does on a test set; build it with :func:`threshold_report`."""

    name: str
    threshold: float
    far_target: float
    threshold_source: str  # "calibration set" or "evaluation set itself"
    calibration_far: float | None  # global FAR on the calibration set at the threshold (None: no calibration set)
    class_rates: ThresholdRates
    group_rates: ThresholdRates | None
    curves: UtilityCurves
    opis_ci: BootstrapCI
    alpha: float
    eps: float
    eps_opis: float
    recall_at_1: float
    num_samples: int
    num_classes: int
    extra: dict[str, Any] = field(default_factory=dict)
    num_reference: int | None = None  # gallery size when the pairs are query x gallery (None: pairs of one set)

    @property
    def global_far(self) -> float:
        return self.class_rates.global_far

    @property
    def global_frr(self) -> float:
        return self.class_rates.global_frr

    @property
    def opis(self) -> float:
        return self.opis_ci.opis

    def row(self) -> dict[str, Any]:
        """One flat row (a dict) for tables: the numbers of :meth:`to_text`, rates and R@1 as fractions.

        Keys follow the library's scheme (:mod:`tcmlib.metrics.evaluation`): the metric's own name
        (``"R@1"``, ``"OPIS"``, ``"eps_OPIS"``, ``"FAR"``, ``"FRR"``) with snake_case qualifiers
        (``"global_FAR"``, ``"class_FAR_median"``, ``"OPIS_lo"``)."""
        s = self.class_rates.summary(self.far_target)
        row: dict[str, Any] = {
            "name": self.name, "threshold": self.threshold, "FAR_target": self.far_target,
            "global_FAR": self.global_far, "global_FRR": self.global_frr,
            "class_FAR_median": s["FAR_median"], "class_FAR_max": s["FAR_max"],
            "classes_FAR_over_2x": s["share_FAR_over_2x"],
            "class_FRR_median": s["FRR_median"], "class_FRR_max": s["FRR_max"],
            "OPIS": self.opis, "OPIS_lo": self.opis_ci.lo, "OPIS_hi": self.opis_ci.hi,
            "eps_OPIS": self.eps_opis, "R@1": self.recall_at_1,
        }
        if self.group_rates is not None:
            gs = self.group_rates.summary(self.far_target)
            row.update({"group_FAR_min": gs["FAR_min"], "group_FAR_max": gs["FAR_max"],
                        "group_FRR_min": gs["FRR_min"], "group_FRR_max": gs["FRR_max"]})
        return row

    def to_text(self) -> str:
        """A plain-text summary a reader can paste into a ticket."""
        c = self.class_rates
        s = c.summary(self.far_target)
        pct = lambda v: f"{100 * v:.2f} %"
        lines = [
            f"Threshold report: {self.name}",
            (f"  data: {self.num_samples} samples, {self.num_classes} classes ({c.far.numel()} with positive pairs)"
             if self.num_reference is None else
             f"  data: {self.num_samples} queries x a gallery of {self.num_reference} (each pair counted for its "
             f"query's class), {self.num_classes} query classes ({c.far.numel()} with positive pairs)"),
            f"  threshold d <= {self.threshold:.4f} (1 - cosine), chosen for global FAR {pct(self.far_target)} "
            f"on the {self.threshold_source}"
            + (f" (FAR there: {pct(self.calibration_far)})" if self.calibration_far is not None else ""),
            f"  global at this threshold: FAR {pct(c.global_far)}, FRR {pct(c.global_frr)}",
            (f"  per class FAR: min {pct(s['FAR_min'])}, median {pct(s['FAR_median'])}, max {pct(s['FAR_max'])}; "
            f"{pct(s['share_FAR_over_2x'])} of classes above 2x the target"),
            f"  per class FRR: min {pct(s['FRR_min'])}, median {pct(s['FRR_median'])}, max {pct(s['FRR_max'])}",
        ]
        if self.group_rates is not None:
            gs = self.group_rates.summary(self.far_target)
            lines.append(
                f"  per group ({self.group_rates.far.numel()}): FAR {pct(gs['FAR_min'])} .. {pct(gs['FAR_max'])}, "
                f"FRR {pct(gs['FRR_min'])} .. {pct(gs['FRR_max'])}; {pct(gs['share_FAR_over_2x'])} above 2x the target"
            )
        lines += [
            (f"  OPIS {self.opis:.3g} (at most 0.25; lower is more consistent), {100 * (1 - self.alpha):.0f} % "
             f"bootstrap CI over classes {self.opis_ci.lo:.3g} .. {self.opis_ci.hi:.3g}; "
             f"{100 * self.eps:.0f}%-OPIS {self.eps_opis:.3g} (at most 1; lower is more consistent)"),
            "  " + self.far_range_note(),
            f"  R@1 {pct(self.recall_at_1)}",
        ]
        return "\n".join(lines)

    def far_range_note(self) -> str:
        """One line on the report's two FARs: the threshold's target, and the range OPIS averages over."""
        lo, hi = self.curves.far_range or (math.nan, math.nan)
        target = f"{100 * self.far_target:.2f} %"
        where = (f"the threshold above (FAR {target}) is one of them" if lo <= self.far_target <= hi else
                 f"not at the threshold above: its FAR {target} lies outside that range")
        return (f"OPIS and eps-OPIS average over the thresholds at global FAR {100 * lo:g} % .. {100 * hi:g} %, "
                f"{where} (set the range with far_range=, or tcmlib-eval --opis-far LO HI)")

    def __str__(self) -> str:
        return self.to_text()

    def plot(self, axes: Sequence[Any] | None = None, *, color: str = "tab:blue", title: str | None = None) -> Any:
        """Two panels: per-class FAR vs FRR at the threshold (groups as large markers), and the
        per-class utility curves with the threshold marked. Returns the matplotlib Figure."""
        import matplotlib.pyplot as plt

        if axes is None:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        else:
            fig = axes[0].figure
        ax0, ax1 = axes
        c = self.class_rates
        ax0.scatter(100 * c.far.numpy(), 100 * c.frr.numpy(), s=10, alpha=0.5, color=color, label="classes")
        if self.group_rates is not None:
            gr = self.group_rates
            ax0.scatter(100 * gr.far.numpy(), 100 * gr.frr.numpy(), s=70, marker="D", edgecolor="k",
                        color=color, label="groups")
        ax0.scatter([100 * c.global_far], [100 * c.global_frr], s=160, marker="*", color="k", zorder=5,
                    label="global")
        ax0.axvline(100 * self.far_target, color="grey", ls="--", lw=1, label="FAR target")
        ax0.axvline(200 * self.far_target, color="grey", ls=":", lw=1, label="2x target")
        ax0.set(xlabel="false-accept rate at the threshold (%)", ylabel="false-reject rate (%)",
                title=title or f"{self.name}: d <= {self.threshold:.3f}")
        ax0.legend(fontsize=8)
        cv = self.curves
        ax1.plot(cv.thresholds.numpy(), cv.utility.numpy(), color=color, alpha=0.15, lw=0.8)
        ax1.plot(cv.thresholds.numpy(), cv.utility.mean(dim=1).numpy(), color="k", lw=2, label="mean over classes")
        ax1.axvline(self.threshold, color="tab:red", lw=1.5, label="deployed threshold")  # may lie outside the range
        ax1.set(xlabel="distance threshold (1 - cosine)", ylabel="per-class utility",
                title=f"OPIS {self.opis:.3g} [{self.opis_ci.lo:.3g}, {self.opis_ci.hi:.3g}]", ylim=(0, 1.02))
        ax1.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        return fig


def _check_calibration(calibration: Any, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out ``(embeddings (M, dim), labels (M,))``, checked; the evaluation data has dimension ``dim``."""
    if not (isinstance(calibration, (tuple, list)) and len(calibration) == 2):
        raise ValueError("calibration must be a pair (embeddings, labels) of held-out data")
    cx, cy = check_embeddings_labels(*calibration, emb_name="calibration embeddings",
                                     label_name="calibration labels")
    if cx.shape[1] != dim:
        raise ValueError(f"calibration embeddings have dimension {cx.shape[1]}, the evaluation ones "
                         f"{dim}: both must come from the same model")
    return cx, cy


def threshold_report(
    embeddings: Any,
    labels: Any,
    *,
    far_target: float = 1e-2,
    groups: Any = None,
    calibration: tuple[Any, Any] | None = None,
    far_range: tuple[float, float] = (1e-2, 1e-1),
    num_thresholds: int = 100,
    n_boot: int = 1000,
    alpha: float = 0.05,
    eps: float = 0.1,
    seed: int = 0,
    name: str = "model",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reference: Any = None,
    reference_labels: Any = None,
) -> ThresholdReport:
    """Everything about deploying one threshold on ``embeddings`` (N, D) with ``labels`` (N,), in one call.

    ``far_target`` is a fraction in [0, 0.5] (1e-2 for 1 %); 1 or more, or above 0.5, raises ``ValueError``
    (a percentage typed as a number would otherwise give a report at 100 % FAR).

    The threshold meets ``far_target`` (global FAR) on ``calibration = (emb, labels)`` when given (the
    honest choice: held-out data), else on the evaluation data itself. Then, on the evaluation data:
    global / per-class (and per-group with ``groups`` (N,)) FAR and FRR at that threshold, OPIS over
    ``far_range`` (``num_thresholds`` thresholds) with a bootstrap CI over classes (``n_boot``,
    ``alpha``, ``seed``), eps-OPIS and R@1.

    With ``reference`` (M, D) and ``reference_labels`` (M,), a gallery: every pair-based number uses the
    query x gallery pairs, each counted for its query's class (or group; ``groups`` are per query), the
    threshold without ``calibration`` too, and R@1 ranks the gallery (:func:`rates_at_threshold`,
    :func:`~tcmlib.metrics.opis.utility_curves`).  A calibration set still chooses the threshold on its
    own pairs.  An item in both sets meets itself (an accepted positive pair, its own nearest neighbour):
    to evaluate one set, pass no reference.
    """
    x, y, g, reference, reference_labels = check_inputs(embeddings, labels, groups, reference, reference_labels)
    far = _check_far_target(far_target)
    chunk = _check_chunk(chunk_size)
    if calibration is not None:
        cx, cy = _check_calibration(calibration, x.shape[1])
        t_cal = threshold_for_far(cx, cy, far, chunk_size=chunk)
        cal_far: float | None = rates_at_threshold(cx, cy, t_cal, chunk_size=chunk).global_far
        source = "calibration set"
    else:
        t_cal, cal_far, source = math.nan, None, "evaluation set itself"
    setup = curve_setup(x, y, None, reference, reference_labels, far_range=far_range, distance_range=None,
                        num_thresholds=num_thresholds, beta=1.0, chunk_size=chunk)
    r_at_1 = RetrievalTopK(setup.pairs, [1], chunk, to_r=False)  # R@1 rides on the curves' first pass
    # pass 1: the curves' range and, without calibration data, the threshold
    cal = calibrate(setup, extra_quantiles=(far,) if calibration is None else (), riders=[r_at_1])
    t = t_cal if calibration is not None else cal.extras[0]
    rates = [AcceptedCounts(setup.pairs, ids, t, by) for ids, by in ((y, "class"), (g, "group")) if ids is not None]
    counts = ClassCounts(setup, cal.thresholds)
    count_pass(setup, cal, [counts, *rates])  # pass 2, or the pairs pass 1 kept
    curves = setup.curves(cal.thresholds, counts.result())
    class_rates = rates[0].result()
    group_rates = rates[1].result() if g is not None else None

    ci = opis_bootstrap_ci(curves, n_boot=n_boot, alpha=alpha, seed=seed)
    return ThresholdReport(
        name=str(name), threshold=class_rates.threshold, far_target=far, threshold_source=source,
        calibration_far=cal_far, class_rates=class_rates, group_rates=group_rates, curves=curves, opis_ci=ci,
        alpha=float(alpha), eps=float(eps), eps_opis=curves.eps_opis(eps),
        recall_at_1=r_at_1.recall()[1],
        num_samples=int(x.shape[0]), num_classes=int(torch.unique(y).numel()),
        num_reference=None if reference is None else int(reference.shape[0]),
    )


# ----------------------------------------------------------------------------- several models
@dataclass
class ReportComparison:
    """Several :class:`ThresholdReport` side by side: ``rows`` (one dict each), ``to_text()``, ``plot()``."""

    reports: dict[str, ThresholdReport]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [{**r.row(), "name": name} for name, r in self.reports.items()]

    def to_text(self) -> str:
        """A Markdown table: one column per model, one line per quantity."""
        names = list(self.reports)
        rows = self.rows
        fmt_pct = lambda v: f"{100 * v:.2f} %"
        lines_spec: list[tuple[str, Any, Any]] = [
            ("threshold (1 - cos)", "threshold", lambda v: f"{v:.4f}"),
            ("global FAR", "global_FAR", fmt_pct),
            ("global FRR", "global_FRR", fmt_pct),
            ("per-class FAR, median", "class_FAR_median", fmt_pct),
            ("per-class FAR, max", "class_FAR_max", fmt_pct),
            ("classes with FAR > 2x target", "classes_FAR_over_2x", fmt_pct),
            ("per-class FRR, median", "class_FRR_median", fmt_pct),
            ("per-class FRR, max", "class_FRR_max", fmt_pct),
            ("group FAR, min .. max", ("group_FAR_min", "group_FAR_max"), None),
            ("group FRR, min .. max", ("group_FRR_min", "group_FRR_max"), None),
            ("OPIS (at most 0.25, lower is better)", "OPIS", lambda v: f"{v:.3g}"),
            ("OPIS, bootstrap CI", ("OPIS_lo", "OPIS_hi"), None),
            ("eps-OPIS (in [0, 1], lower is better)", "eps_OPIS", lambda v: f"{v:.3g}"),
            ("R@1", "R@1", fmt_pct),
        ]
        out = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for label, key, fmt in lines_spec:
            cells = []
            for r in rows:
                if isinstance(key, tuple):
                    if key[0] not in r:
                        cells.append("")
                        continue
                    f = fmt_pct if key[0].startswith("group") else (lambda v: f"{v:.3g}")
                    cells.append(f"{f(r[key[0]])} .. {f(r[key[1]])}")
                else:
                    cells.append(fmt(r[key]))
            if any(cells):
                out.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(out)

    def _repr_markdown_(self) -> str:
        return self.to_text()

    def plot(self, colors: Sequence[str] | None = None) -> Any:
        """One row of two panels per report (as :meth:`ThresholdReport.plot`), sharing axes. Returns the Figure."""
        import matplotlib.pyplot as plt

        n = len(self.reports)
        colors = list(colors or plt.rcParams["axes.prop_cycle"].by_key()["color"])
        fig, axes = plt.subplots(n, 2, figsize=(11, 3.6 * n), squeeze=False, sharex="col", sharey="col")
        for i, (name, rep) in enumerate(self.reports.items()):
            rep.plot(axes[i], color=colors[i % len(colors)], title=f"{name}: d <= {rep.threshold:.3f}")
        fig.tight_layout()
        return fig


def compare_reports(reports: Mapping[str, ThresholdReport]) -> ReportComparison:
    """Put ``{name: ThresholdReport}`` side by side (``.to_text()`` table, ``.plot()`` panels)."""
    if not reports:
        raise ValueError("pass at least one report: {name: threshold_report(...)}")
    for name, rep in reports.items():
        if not isinstance(rep, ThresholdReport):
            raise ValueError(f"{name!r} is a {type(rep).__name__}, not a ThresholdReport (use threshold_report)")  # noqa: TRY004
    return ReportComparison(dict(reports))


# ----------------------------------------------------------------------------- files
def load_embeddings_npy(emb_path: str | Path, labels_path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``(embeddings (N, D) float, labels (N,) int64)`` from two ``.npy`` files (``numpy.save``).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for anything that is not one
    float row per sample and one integer label per row (wrong shapes, NaN, a pickled object array).
    """
    arrays = []
    for path, what in ((Path(emb_path), "embeddings"), (Path(labels_path), "labels")):
        if not path.exists():
            raise FileNotFoundError(f"{what} file {path} does not exist; save it with numpy.save(path, array)")
        if path.suffix == ".npz":
            raise ValueError(f"{path} is an .npz archive; pass .npy files (numpy.save), or load the archive and "
                             "pass its arrays to threshold_report directly")
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"could not read {what} from {path} as a plain .npy array ({e}); save a numeric "
                             "array with numpy.save, not a list of objects") from None
        arrays.append(arr)
    emb, lab = arrays
    if lab.ndim == 2 and lab.shape[1] == 1:
        lab = lab[:, 0]
    if not np.issubdtype(emb.dtype, np.number) or np.issubdtype(emb.dtype, np.complexfloating):
        raise ValueError(f"embeddings in {emb_path} have dtype {emb.dtype}; expected floats (N, D)")
    x, y = check_embeddings_labels(torch.from_numpy(np.ascontiguousarray(emb)), torch.from_numpy(np.ascontiguousarray(lab)),
                                   emb_name=f"embeddings ({emb_path})", label_name=f"labels ({labels_path})")
    return x, y
