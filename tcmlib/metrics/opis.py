"""OPIS and eps-OPIS: exact per-class utility curves, streamed over row blocks of the similarity matrix.

Definitions (our reading of Zhang et al., ICLR 2024; the book, chapter 4 "OPIS and eps-OPIS").
Embeddings ``X`` (N, D), labels ``y`` (N,). Distance ``d(a, b) = 1 - cos(x_a, x_b)``; pairs are
unordered, ``a != b``. A class is *eligible* when it has >= 2 samples; the others are excluded from
every per-class quantity and counted in ``num_excluded`` (their samples still form negative pairs)::

    TAR_i(t) = #{positive pairs of i with d <= t} / #{positive pairs of i}      (both members in i)
    TRR_i(t) = #{negative pairs of i with d >  t} / #{negative pairs of i}      (exactly one member in i)
    U_i(t)   = (1 + b^2) TAR TRR / (b^2 TRR + TAR),   0 where TAR = TRR = 0
    OPIS     = (1/K) sum_k  (1/T) sum_i (U_i(t_k) - mean_i U_i(t_k))^2          (population variance)
    eps-OPIS = (1/K) sum_k  (mean_{i in W} U_i(t_k) - mean_{i in R} U_i(t_k))^2
               W = the ceil(eps T) classes of lowest mean utility over the K thresholds, R = the rest

Thresholds ``t_k = linspace(t_min, t_max, K)``. By default ``[t_min, t_max]`` are the ``far_range``
quantiles (linear interpolation, as ``numpy.quantile``) of the distances of ALL negative pairs, i.e. the
thresholds where the global FAR (share of negative pairs with ``d <= t``) is ``far_range[0]`` and
``far_range[1]``.

Groups ("customers"). With ``groups`` (N,) given, the per-class quantities are computed per group
instead: positive pairs (same label) with at least one member in group g, negative pairs (different
labels) with at least one member in g; a pair whose members lie in two groups counts for both. With
``groups = labels`` this is exactly the class definition above. A group is eligible when it has at
least one positive and one negative pair.

Query / reference (gallery). With ``reference`` (M, D) and ``reference_labels`` (M,), the pairs are
the N M query x reference pairs ``(q, r)``, the deployment reading: a probe is compared against an
enrolled gallery.  A pair counts for its *query's* class (or group; ``groups`` are then per query)
only, so class i's utility uses its queries' pairs with every reference item::

    TAR_i(t) = #{(q, r): y_q = y_r = i, d <= t} / (n_i m_i)          n_i queries, m_i reference items of i
    TRR_i(t) = #{(q, r): y_q = i != y_r, d > t} / (n_i (M - m_i))

and the thresholds are quantiles of the distances of all query x reference negative pairs.  A class
(group) is eligible when it has a query with a same-label reference item and a negative pair; classes
present only in the reference set are distractors, not units.  The two sets are taken as disjoint: an
item present in both meets itself, a positive pair at distance ~0, accepted at every threshold.  So
``reference = embeddings`` gives every per-class TRR of the one-set definition exactly (each negative
pair {a, b} appears once with a and once with b as the query), but TAR over ``n_i^2`` ordered pairs
including the ``n_i`` self-pairs (``n_i^2 TAR' = 2 C(n_i, 2) TAR + n_i``) and thresholds from every
negative distance taken twice; to evaluate one set, pass no reference.

Algorithm (exact, memory O(chunk_size * N), no N x N matrix, no Python loop over pairs or classes).
The samples are sorted by label once (results do not depend on the order). The cosine similarities of
the pairs a < b are computed in tiles of ``chunk_size`` rows by ``TILE_COLS`` columns,
``(B, D) @ (D, W)``; the same-label pairs of a row block lie in one band of columns, so only that band
is compared to split positives from negatives. Two passes over the tiles:

1. Calibration range: each quantile needs two order statistics of the M negative distances. A pilot
   on ~1M / N random rows brackets them; the pass counts the negatives above each bracket and keeps
   only the values inside it, which gives the order statistics exactly (a missed bracket is widened
   and the pass repeated; with M <= ``COLLECT_ALL_MAX`` all values are kept, no pilot).
2. Counting: only the pairs accepted at t_max matter (about ``far_range[1]`` of the negatives plus the
   close positives; the totals per class are known in closed form). For each, the first accepting
   threshold k0 (an arithmetic guess, searched exactly near a boundary) is scatter-added into
   per-class histograms (2, T + 1, K); cumulative sums over k give the counts at every threshold.
   A negative pair is added for both of its classes.

One pass when the pairs fit: pass 1 already visits every pair the counts need (the pairs accepted at
t_max lie above the lower end of t_max's bracket), so it keeps them (similarity, row, column) when
there are at most ``KEEP_MAX`` (a bit more than ``far_range[1]`` of all negatives: N up to ~25k at
the default range), and the counts come from the kept pairs instead of a second pass over the tiles;
it checks that t_max's boundary lies inside what was kept, and falls back to pass 2 otherwise.

Exactness: ``s`` is computed in the working dtype (float32, or float64 for float64 input) and
``d = 1 - s`` is evaluated in float64, which is exact for float32 ``s``. Every comparison ``d <= t`` is
made exactly through a per-threshold similarity boundary, so ties at a threshold are counted as
accepted, and a quantile that lands on a pair's distance accepts that pair.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tcmlib._checks import check_embeddings_labels, check_labels
from tcmlib.metrics._pairs import TILE_COLS, cross_tiles, flat_nonzero, nonzero_rc, unit_rows, upper_tiles

__all__ = ["UtilityCurves", "eps_opis", "opis", "utility", "utility_curves"]

DEFAULT_CHUNK_SIZE = 1024  # rows of the similarity matrix per block; see benchmarks/opis_cost.py
COLLECT_ALL_MAX = 1 << 22  # up to this many negative pairs, pass 1 keeps them all (no pilot)
KEEP_MAX = 1 << 25  # pass 1 keeps up to this many pairs for the counts (12 bytes each in float32: <= 400 MB)


@dataclass
class UtilityCurves:
    """Per-class TAR / TRR / utility curves over K thresholds, for T eligible classes (or groups).

    ``thresholds`` (K,) distances; ``tar``, ``trr``, ``utility`` (K, T) float64; ``class_ids`` (T,) the
    labels (or group ids) of the eligible classes, ascending; ``num_pos`` / ``num_neg`` (T,) their
    pair counts; ``distance_range = (t_min, t_max)``; ``far_range`` the global FAR bounds it came from,
    or ``None`` when an explicit distance range was given.
    """

    thresholds: torch.Tensor  # (K,) float64
    tar: torch.Tensor  # (K, T) float64
    trr: torch.Tensor  # (K, T) float64
    utility: torch.Tensor  # (K, T) float64
    class_ids: torch.Tensor  # (T,) int64
    num_pos: torch.Tensor  # (T,) int64
    num_neg: torch.Tensor  # (T,) int64
    num_eligible: int
    num_excluded: int
    distance_range: tuple[float, float]
    far_range: tuple[float, float] | None
    beta: float

    @property
    def opis(self) -> float:
        """Mean over thresholds of the population variance of utility across classes.

        A float in [0, 0.25] (utilities lie in [0, 1]; 0.25 when half the classes have utility 1 and
        half 0 at every threshold); lower is more consistent, 0 means one utility for every class."""
        return float(self.utility.var(dim=1, unbiased=False).mean())

    @property
    def mean_utility(self) -> torch.Tensor:
        """(T,) mean utility of each class over the K thresholds."""
        return self.utility.mean(dim=0)

    def worst_classes(self, eps: float = 0.1) -> torch.Tensor:
        """Indices (into ``class_ids``) of the ceil(eps T) classes of lowest mean utility, worst first.

        Ties are broken by class order (ascending ``class_ids``). ``eps`` must lie in (0, 1) and leave at
        least one class outside the worst group.
        """
        t = self.num_eligible
        eps = float(eps)
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps = {eps} must lie strictly between 0 and 1 (eps = 0.1 is the 10%-OPIS)")
        w = math.ceil(round(eps * t, 9))  # round: 0.1 * 30 = 3.0000000000000004 must give 3, not 4
        if w >= t:
            raise ValueError(
                f"eps = {eps} puts all {t} eligible classes in the worst group (ceil(eps * T) = {w}); "
                "use a smaller eps or more classes"
            )
        return torch.sort(self.mean_utility, stable=True).indices[:w]

    def eps_opis(self, eps: float = 0.1) -> float:
        """Mean over thresholds of (mean utility of the worst ceil(eps T) classes - mean of the rest)^2.

        A float in [0, 1]; lower is more consistent."""
        worst = torch.zeros(self.num_eligible, dtype=torch.bool)
        worst[self.worst_classes(eps)] = True
        gap = self.utility[:, worst].mean(dim=1) - self.utility[:, ~worst].mean(dim=1)  # (K,)
        return float((gap**2).mean())


def utility(tar: torch.Tensor, trr: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Per-class utility ``U = (1 + b^2) TAR TRR / (b^2 TRR + TAR)``, 0 where TAR = TRR = 0 (any equal shapes).

    The F-beta score of true-accept and true-reject rate (module docstring); ``beta`` weighs TRR.
    """
    b2 = beta * beta
    den = b2 * trr + tar
    return torch.where(den > 0, (1 + b2) * tar * trr / den.clamp_min(1e-300), torch.zeros_like(den))


def utility_curves(
    embeddings: Any,
    labels: Any,
    *,
    far_range: tuple[float, float] = (1e-2, 1e-1),
    distance_range: tuple[float, float] | None = None,
    num_thresholds: int = 100,
    beta: float = 1.0,
    groups: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reference: Any = None,
    reference_labels: Any = None,
) -> UtilityCurves:
    """Exact per-class TAR, TRR and utility curves of ``embeddings`` (N, D) with ``labels`` (N,).

    The thresholds are ``linspace(t_min, t_max, num_thresholds)`` with ``(t_min, t_max)`` the
    ``far_range`` quantiles of all negative-pair distances, or ``distance_range`` when given.
    ``groups`` (N,) optional: compute the curves per group instead of per class (module docstring).
    ``reference`` (M, D) and ``reference_labels`` (M,) optional: the pairs are then all query x
    reference pairs (N M of them), each counted for its query's class (or group), not the pairs
    within ``embeddings``; an item in both sets meets itself (module docstring).  Computed
    ``chunk_size`` rows at a time on the embeddings' device; never forms the N x N matrix.
    """
    return curves_and_extras(
        embeddings, labels, far_range=far_range, distance_range=distance_range, num_thresholds=num_thresholds,
        beta=beta, groups=groups, chunk_size=chunk_size, reference=reference, reference_labels=reference_labels,
    )[0]


@dataclass
class SortedPairs:
    """Both sides of the pairs, unit rows sorted by label (the order every pass uses).

    ``rows`` (N, D), ``lab`` (N,) dense label index, ``order`` (N,) positions in the input; ``cols``,
    ``col_lab``, ``col_order`` the same for a reference set, or None (pairs within ``rows``).
    """

    rows: torch.Tensor
    lab: torch.Tensor
    order: torch.Tensor
    cols: torch.Tensor | None
    col_lab: torch.Tensor | None
    col_order: torch.Tensor | None

    @property
    def symmetric(self) -> bool:
        return self.cols is None

    def tile_kwargs(self) -> dict[str, Any]:
        return {} if self.cols is None else {"cols": self.cols, "col_lab": self.col_lab}


def _sort_pairs(
    x: torch.Tensor, y: torch.Tensor, rx: torch.Tensor | None = None, ry: torch.Tensor | None = None
) -> SortedPairs:
    """The :class:`SortedPairs` of checked ``x`` (N, D), ``y`` (N,) (and a reference ``rx`` (M, D), ``ry`` (M,)).

    Unit rows (:func:`~tcmlib.metrics._pairs.unit_rows`) sorted by label, stably; with a reference, the
    labels of both sides are indexed densely together and both sides are cast to the wider dtype.
    Every pass of :mod:`tcmlib.metrics.opis` and :mod:`tcmlib.report` uses this one order.
    """
    if rx is None or ry is None:
        _, lab = torch.unique(y, return_inverse=True)  # (N,) label index 0..L-1
        order = torch.argsort(lab, stable=True)
        return SortedPairs(unit_rows(x)[order].contiguous(), lab[order], order, None, None, None)
    n = x.shape[0]
    _, both = torch.unique(torch.cat([y, ry]), return_inverse=True)  # dense labels, shared by both sides
    lab, r_lab = both[:n], both[n:]
    order, r_order = torch.argsort(lab, stable=True), torch.argsort(r_lab, stable=True)
    rows, cols = unit_rows(x)[order], unit_rows(rx)[r_order]
    work = torch.promote_types(rows.dtype, cols.dtype)  # float64 when either side is float64
    return SortedPairs(rows.to(work).contiguous(), lab[order], order, cols.to(work).contiguous(), r_lab[r_order],
                       r_order)


def _unit_totals(
    pairs: SortedPairs, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """``(unit_ids (U,), unit (N,), num_pos (U,), num_neg (U,), num_neg_all, num_pos_all)``.

    ``ids`` (N,) in input order: the class labels, or group ids, of the rows; ``unit`` is each sorted
    row's unit index.  Within one set a pair counts for the units of both members (:func:`_pair_totals`);
    with a reference set a query x reference pair counts for its query's unit only: per query q,
    ``#pos_q = #{reference items with q's label}``, ``#neg_q = M - #pos_q``, summed over the unit's queries.
    ``num_neg_all`` / ``num_pos_all``: all negative / positive pairs, each once.
    """
    unit_ids, unit = torch.unique(ids.to(pairs.lab.device), return_inverse=True)  # (U,), (N,)
    unit = unit[pairs.order]
    n = pairs.lab.shape[0]
    if pairs.col_lab is None:
        n_lab = torch.bincount(pairs.lab)  # (L,)
        num_pos_all = int((n_lab * (n_lab - 1) // 2).sum())
        num_pos, num_neg = _pair_totals(pairs.lab, unit, n_lab, len(unit_ids))
        return unit_ids, unit, num_pos, num_neg, n * (n - 1) // 2 - num_pos_all, num_pos_all
    m = pairs.col_lab.shape[0]
    size = max(int(pairs.lab.max()), int(pairs.col_lab.max())) + 1
    pos_q = torch.bincount(pairs.col_lab, minlength=size)[pairs.lab]  # (N,) reference items of q's label
    num_pos = torch.zeros(len(unit_ids), dtype=torch.long, device=unit.device).index_add_(0, unit, pos_q)
    num_neg = torch.bincount(unit, minlength=len(unit_ids)) * m - num_pos
    num_pos_all = int(pos_q.sum())
    return unit_ids, unit, num_pos, num_neg, n * m - num_pos_all, num_pos_all


def _check_range_args(
    far_range: tuple[float, float], distance_range: tuple[float, float] | None, num_thresholds: int, beta: float,
    chunk_size: int,
) -> tuple[float, float, int, float]:
    """Checked (lo, hi) (a FAR or a distance range), K, beta."""
    k_thr = int(num_thresholds)
    if k_thr != num_thresholds or k_thr < 2:
        raise ValueError(f"num_thresholds = {num_thresholds} must be an integer >= 2")
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta = {beta} must be a finite number > 0 (1 gives the F1 / harmonic mean)")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size = {chunk_size} must be >= 1")
    if distance_range is not None:
        lo, hi = (float(v) for v in distance_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"distance_range = {distance_range} must be finite with lo < hi")
        if not 0.0 <= lo < hi <= 2.0:
            raise ValueError(f"distance_range = {distance_range} lies outside [0, 2]: cosine distances "
                             "(1 - cos) of unit vectors range over [0, 2]; pass thresholds inside it")
    else:
        lo, hi = (float(v) for v in far_range)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"far_range = {far_range} must satisfy 0 <= lo < hi <= 1 (global FAR bounds)")
    return lo, hi, k_thr, beta


def curves_and_extras(
    embeddings: Any,
    labels: Any,
    *,
    far_range: tuple[float, float] = (1e-2, 1e-1),
    distance_range: tuple[float, float] | None = None,
    num_thresholds: int = 100,
    beta: float = 1.0,
    groups: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reference: Any = None,
    reference_labels: Any = None,
    extra_quantiles: tuple[float, ...] = (),
    first: Any = None,
    on_sorted: Any = None,
) -> tuple[UtilityCurves, list[float]]:
    """:func:`utility_curves` plus what may ride on its passes (for :func:`tcmlib.metrics.evaluation.evaluate` and
    :func:`tcmlib.report.threshold_report`).

    ``extra_quantiles``: further exact ``numpy.quantile`` values of the negative-pair distances, computed
    in the calibration-range pass (returned second).  Riders (indices into the sorted sides):

    * ``first(pairs: SortedPairs)`` is called before the first pass over the pairs and returns
      ``on_tile(r0, c0, sim)``, which sees every tile of that pass, all pairs of it, before its
      positives are masked (e.g. the running top-k of the retrieval metrics);
    * ``on_sorted(pairs, extras)`` is called after the calibration pass and returns counters of
      accepted pairs (each with ``add(r0, c0, sim)`` for a tile, ``add_pairs(rows, cols, s)`` for
      listed pairs and ``bound``, the lowest similarity it counts): they get the pairs pass 1 kept
      when those include every pair ``s >= bound``, or ride on the counting pass.
    """
    x, y = check_embeddings_labels(embeddings, labels)
    n = x.shape[0]
    g = None if groups is None else check_labels(groups, n, "groups").to(x.device)
    lo, hi, k_thr, beta = _check_range_args(far_range, distance_range, num_thresholds, beta, chunk_size)
    rx = ry = None
    if reference is not None or reference_labels is not None:
        if reference is None or reference_labels is None:
            raise ValueError("pass reference and reference_labels together (or neither)")
        rx, ry = check_embeddings_labels(reference, reference_labels, emb_name="reference",
                                         label_name="reference_labels")
        if rx.shape[1] != x.shape[1]:
            raise ValueError(f"reference has dimension {rx.shape[1]} but the embeddings {x.shape[1]}: both must "
                             "come from the same embedder")
        rx, ry = rx.to(x.device), ry.to(x.device)
    for q in extra_quantiles:
        if not 0.0 <= float(q) <= 1.0:
            raise ValueError(f"quantile {q} must lie in [0, 1]")

    # Unit rows sorted by label (the positives of a row block then form one band of columns), the units
    # (classes, or groups) and their pair totals in closed form.
    pairs = _sort_pairs(x, y, rx, ry)
    unit_ids, unit, num_pos, num_neg, num_neg_all, _ = _unit_totals(pairs, y if g is None else g)  # unit sorted
    if num_neg_all == 0:
        raise ValueError(f"there are no negative {'pairs' if pairs.symmetric else 'query x reference pairs'}: all "
                         "samples share one label; OPIS needs >= 2 classes")
    eligible = (num_pos > 0) & (num_neg > 0)  # (U,)
    t_cls = int(eligible.sum())
    if t_cls < 2:
        need = ">= 2 samples" if pairs.symmetric else "a query with a same-label reference item"
        raise ValueError(
            f"only {t_cls} eligible {'group' if g is not None else 'class'}(es) ({need}, with positive "
            "and negative pairs); OPIS compares classes, so it needs at least 2"
        )
    unit_to_el = torch.full((len(unit_ids),), t_cls, dtype=torch.long, device=x.device)  # T = "excluded"
    unit_to_el[eligible] = torch.arange(t_cls, device=x.device)
    el = unit_to_el[unit]  # (N,) eligible index of each (sorted) query's unit, T if excluded
    el_c = el  # (M,) the columns' units; query x reference: a pair counts for its query's unit only (T: none)
    if pairs.cols is not None:
        el_c = torch.full((pairs.cols.shape[0],), t_cls, dtype=torch.long, device=x.device)
    xn, lab = pairs.rows, pairs.lab

    qs = tuple(float(q) for q in extra_quantiles) + (() if distance_range is not None else (lo, hi))
    rider = None if first is None else first(pairs)  # rides on the first pass over the pairs
    kept = None  # pass 1 keeps the pairs the counts need, when they fit
    if distance_range is None and num_neg_all * hi <= KEEP_MAX:
        kept = _KeptPairs(KEEP_MAX)
    quant = []
    if qs:
        quant = _negative_distance_quantiles(xn, lab, qs, int(chunk_size), num_neg_all, keep=kept, on_tile=rider,
                                             **pairs.tile_kwargs())
        rider = None
    extras = quant[: len(extra_quantiles)]
    if distance_range is None:
        t_lo, t_hi = quant[-2:]
        if not t_lo < t_hi:
            raise ValueError(
                f"the calibration range is empty: the far_range {far_range} quantiles of the negative "
                f"distances are both {t_lo}; pass a wider far_range or an explicit distance_range"
            )
    else:
        t_lo, t_hi = lo, hi
    thresholds = torch.linspace(t_lo, t_hi, k_thr, dtype=torch.float64)  # (K,)

    counters = [] if on_sorted is None else list(on_sorted(pairs, extras))
    bnd = _accept_boundaries(thresholds, xn.dtype).to(x.device)  # (K,) non-increasing
    lowest = min([float(bnd[-1])] + [float(c.bound) for c in counters])  # the lowest similarity counted
    if kept is not None and kept.complete and lowest >= kept.s_min:  # every pair counted was kept
        hist = kept.histograms(el, el_c, bnd, thresholds, t_cls, g is not None)  # (2, T + 1, K)
        for c in counters:
            kept.replay(c.add_pairs)
    else:
        adders = [c.add for c in counters] + ([rider] if rider is not None else [])

        def on_tile(r0: int, c0: int, sim: torch.Tensor) -> None:
            for add in adders:
                add(r0, c0, sim)

        hist = _accept_histograms(xn, lab, el, el_c, t_cls, thresholds, bnd, int(chunk_size), g is not None,
                                  on_tile=on_tile if adders else None, **pairs.tile_kwargs())  # (2, T + 1, K)
    acc = hist.cumsum(dim=2)[:, :t_cls].transpose(1, 2).double().cpu()  # (2, K, T) accepted at t_k
    pos_t = num_pos[eligible].double().cpu()  # (T,)
    neg_t = num_neg[eligible].double().cpu()  # (T,)
    tar = acc[0] / pos_t  # (K, T)
    trr = (neg_t - acc[1]) / neg_t  # (K, T)
    util = utility(tar, trr, beta)  # (K, T)
    curves = UtilityCurves(
        thresholds=thresholds,
        tar=tar,
        trr=trr,
        utility=util,
        class_ids=unit_ids[eligible].cpu(),
        num_pos=num_pos[eligible].cpu(),
        num_neg=num_neg[eligible].cpu(),
        num_eligible=t_cls,
        num_excluded=len(unit_ids) - t_cls,
        distance_range=(float(t_lo), float(t_hi)),
        far_range=None if distance_range is not None else (lo, hi),
        beta=beta,
    )
    return curves, extras


def opis(
    embeddings: Any,
    labels: Any,
    *,
    far_range: tuple[float, float] = (1e-2, 1e-1),
    distance_range: tuple[float, float] | None = None,
    num_thresholds: int = 100,
    beta: float = 1.0,
    groups: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reference: Any = None,
    reference_labels: Any = None,
) -> float:
    """OPIS of ``embeddings`` (N, D) with ``labels`` (N,): the mean over thresholds of the variance of
    per-class utility (Zhang et al., ICLR 2024; the book's chapter 4).  Keywords as :func:`utility_curves`.

    Returns:
        A float in [0, 0.25]: lower is more consistent, 0 means every class has the same utility at every
        threshold of the range; 0.25, the maximum, means half the classes have utility 1 and half 0.
        (Utilities are F-scores in [0, 1], and a variance of values in [0, 1] is at most 1/4.)  The range
        is that of the thresholds whose global FAR lies in ``far_range`` (default 1 % .. 10 %).
    """
    return utility_curves(embeddings, labels, far_range=far_range, distance_range=distance_range,
                          num_thresholds=num_thresholds, beta=beta, groups=groups, chunk_size=chunk_size,
                          reference=reference, reference_labels=reference_labels).opis


def eps_opis(
    embeddings: Any,
    labels: Any,
    *,
    eps: float = 0.1,
    far_range: tuple[float, float] = (1e-2, 1e-1),
    distance_range: tuple[float, float] | None = None,
    num_thresholds: int = 100,
    beta: float = 1.0,
    groups: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reference: Any = None,
    reference_labels: Any = None,
) -> float:
    """eps-OPIS: the mean over thresholds of (mean utility of the worst ceil(eps T) classes - mean of the
    rest)^2.  Keywords as :func:`utility_curves`.

    Returns:
        A float in [0, 1]: lower is more consistent; 1 means the worst classes have utility 0 and the others 1.
    """
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps = {eps} must lie strictly between 0 and 1 (eps = 0.1 is the 10%-OPIS)")
    return utility_curves(embeddings, labels, far_range=far_range, distance_range=distance_range,
                          num_thresholds=num_thresholds, beta=beta, groups=groups, chunk_size=chunk_size,
                          reference=reference, reference_labels=reference_labels).eps_opis(eps)


def _pair_totals(
    lab: torch.Tensor, unit: torch.Tensor, n_lab: torch.Tensor, num_units: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive / negative pair counts (U,) per unit: pairs with at least one member in the unit.

    pos_u = sum_l [C(n_l, 2) - C(n_l - n_ul, 2)]  over labels l present in u (n_ul samples of u with label l)
    neg_u = [C(N, 2) - C(N - n_u, 2)] - pos_u     (all pairs touching u, minus the positive ones)
    """
    n = lab.shape[0]
    num_lab = n_lab.shape[0]
    key, n_ul = torch.unique(unit * num_lab + lab, return_counts=True)  # (P,) present (unit, label) cells
    u_of, l_of = key // num_lab, key % num_lab
    n_l = n_lab[l_of]
    c2 = lambda m: m * (m - 1) // 2
    pos = torch.zeros(num_units, dtype=torch.long, device=lab.device).index_add_(0, u_of, c2(n_l) - c2(n_l - n_ul))
    n_u = torch.bincount(unit, minlength=num_units)  # (U,)
    touching = n * (n - 1) // 2 - c2(n - n_u)  # (U,)
    return pos, touching - pos


def pair_tiles(xn: torch.Tensor, chunk_size: int, cols: torch.Tensor | None = None, want: Any = None
               ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The tiles ``(r0, c0, sim)`` of every pass of this module: the upper triangle of ``xn xn^T``
    (:func:`~tcmlib.metrics._pairs.upper_tiles`) or, with ``cols``, ``xn cols^T``
    (:func:`~tcmlib.metrics._pairs.cross_tiles`), ``min(chunk_size, N)`` rows by ``TILE_COLS`` columns.
    ``want`` (optional) skips tiles; the others are the same, bit for bit (a rider's second pass)."""
    chunk_size = min(int(chunk_size), xn.shape[0])
    if cols is None:
        return upper_tiles(xn, chunk_size, TILE_COLS, want)
    return cross_tiles(xn, cols, chunk_size, TILE_COLS, want)


def _tiles(  # type: ignore[no-untyped-def]
    xn: torch.Tensor, lab: torch.Tensor, chunk_size: int, want_positives: bool, *,
    cols: torch.Tensor | None = None, col_lab: torch.Tensor | None = None, on_tile: Any = None,
):
    """Yield ``(r0, c0, sim, pos)`` over the pairs, ``chunk_size`` rows by ``TILE_COLS`` columns.

    Without ``cols``: the upper triangle of ``xn xn^T`` (:func:`~tcmlib.metrics._pairs.upper_tiles`), the
    pairs with column <= row set to -inf.  With ``cols`` (M, D) and ``col_lab`` (M,): every pair of
    ``xn`` (queries) with ``cols`` (gallery).  ``on_tile(r0, c0, sim)`` (optional) sees each tile first,
    with all its pairs.  Then the positive (same-label) pairs are set to -inf, so ``sim`` holds negative
    pairs only; ``pos`` = (rows, cols, s) of the positive pairs of the tile, global indices, or None
    when ``want_positives`` is False.  Labels must be sorted on both sides: then the positives of a
    row block lie in one band of columns, and only that band is compared.
    """
    n = xn.shape[0]
    symmetric = cols is None
    cols, col_lab = (xn, lab) if cols is None else (cols, col_lab)
    assert col_lab is not None
    assert bool((lab[1:] >= lab[:-1]).all()) and bool((col_lab[1:] >= col_lab[:-1]).all()), \
        "_tiles needs the samples sorted by label"
    chunk_size = min(chunk_size, n)
    tiles = pair_tiles(xn, chunk_size, None if symmetric else cols)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=xn.device).triu(1)  # (B, B) col > row
    # same-label columns of rows r0..r1-1 lie in [band_lo, band_hi) (labels sorted on both sides)
    starts = torch.arange(0, n, chunk_size, device=lab.device)  # first row of each block
    lo_all = torch.searchsorted(col_lab, lab[starts]).tolist()
    hi_all = torch.searchsorted(col_lab, lab[(starts + chunk_size - 1).clamp(max=n - 1)], right=True).tolist()
    for r0, c0, sim in tiles:
        if on_tile is not None:
            on_tile(r0, c0, sim)
        b = sim.shape[0]
        band_lo, band_hi = max(lo_all[r0 // chunk_size], c0), min(hi_all[r0 // chunk_size], c0 + sim.shape[1])
        pos = None
        if band_hi > band_lo:
            same = lab[r0 : r0 + b, None] == col_lab[None, band_lo:band_hi]  # (B, w)
            if symmetric and c0 == r0:  # (band_lo = c0 here, and the band holds the diagonal block)
                same[:, :b] &= upper[:b, :b]
            band = sim[:, band_lo - c0 : band_hi - c0]
            if want_positives:
                pr, pc = torch.nonzero(same, as_tuple=True)
                pos = (pr + r0, pc + band_lo, band[pr, pc])
            band.masked_fill_(same, float("-inf"))
        yield r0, c0, sim, pos


def _accept_boundaries(thresholds: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """(K,) b_k = the smallest similarity s (in ``work``) with float64(1 - s) <= t_k.

    Then ``s >= b_k``  <=>  ``d <= t_k`` exactly, so the counting pass can compare similarities.
    """
    t = thresholds.double().cpu().numpy()
    npdt = np.float32 if work == torch.float32 else np.float64
    b = (1.0 - t).astype(npdt)
    for _ in range(64):  # b not accepted: step up
        bad = (1.0 - b.astype(np.float64)) > t
        if not bad.any():
            break
        b = np.where(bad, np.nextafter(b, npdt(np.inf)), b)
    for _ in range(64):  # the next smaller value also accepted: step down
        prev = np.nextafter(b, npdt(-np.inf))
        ok = (1.0 - prev.astype(np.float64)) <= t
        if not ok.any():
            break
        b = np.where(ok, prev, b)
    return torch.from_numpy(b)


def _first_accepting(s: torch.Tensor, bnd: torch.Tensor, step: float) -> torch.Tensor:
    """(P,) int64 k0 = #{k : b_k > s}, the first threshold accepting each similarity s (P,).

    ``bnd`` (K,) non-increasing, ``b_k ~ b_0 - k * step``: the arithmetic guess ceil((b_0 - s) / step)
    is exact unless s lies within ``tol`` steps of a boundary; those few are searched exactly.
    """
    k_thr = bnd.shape[0]
    asc = bnd.flip(0)  # (K,) ascending; #{b_k <= s} = bucketize(s, asc, right=True)
    tol = 0.01 + 16 * torch.finfo(s.dtype).eps / step  # rounding of s, 1 - t_k and b_k, in steps
    if tol >= 0.5:
        return k_thr - torch.bucketize(s, asc, right=True)
    f = (float(bnd[0]) - s) * (1.0 / step)  # (P,) fractional threshold index
    k = f.ceil().clamp_(0, k_thr - 1).long()
    near = torch.nonzero((f - f.round()).abs_() < tol).squeeze(1)
    k.index_copy_(0, near, k_thr - torch.bucketize(s.index_select(0, near), asc, right=True))
    return k


def _accept_histograms(
    xn: torch.Tensor, lab: torch.Tensor, el: torch.Tensor, el_c: torch.Tensor, t_cls: int, thresholds: torch.Tensor,
    bnd: torch.Tensor, chunk_size: int, grouped: bool, *, cols: torch.Tensor | None = None,
    col_lab: torch.Tensor | None = None, on_tile: Any = None,
) -> torch.Tensor:
    """(2, T + 1, K) int64: [0] positive, [1] negative pairs per eligible unit (T = excluded) by the
    first threshold index k0 that accepts them (``d <= t_k`` for all k >= k0). Pairs with d > t_max
    are not counted (their totals are known in closed form). ``el`` / ``el_c`` (N,) / (M,) the units of
    the sorted rows / columns, ``bnd`` (K,) the thresholds' boundaries (:func:`_accept_boundaries`).
    ``lab`` sorted, as for :func:`_tiles`; ``cols``, ``col_lab``: a separate gallery side (query x
    gallery pairs)."""
    b_last = float(bnd[-1])
    hist = torch.zeros(2, t_cls + 1, thresholds.shape[0], dtype=torch.long, device=xn.device)
    for r0, c0, sim, pos in _tiles(xn, lab, chunk_size, True, cols=cols, col_lab=col_lab, on_tile=on_tile):
        if pos is not None:  # positives: few; a pair in two groups counts for both
            keep = torch.nonzero(pos[2] >= b_last).squeeze(1)
            _count_pairs(hist[0], pos[2].index_select(0, keep), el.index_select(0, pos[0].index_select(0, keep)),
                         el_c.index_select(0, pos[1].index_select(0, keep)), bnd, thresholds, True)
        rows, cc, flat = nonzero_rc(sim >= b_last)  # (P,) negatives accepted at t_max
        # both members in one group: count the pair once (for classes this cannot happen); index_select:
        # on the CPU a gather several times faster than indexing with a tensor
        _count_pairs(hist[1], sim.reshape(-1).index_select(0, flat), el[r0:].index_select(0, rows),
                     el_c[c0:].index_select(0, cc), bnd, thresholds, grouped)
    return hist


def _count_pairs(hist: torch.Tensor, s: torch.Tensor, ur: torch.Tensor, uc: torch.Tensor, bnd: torch.Tensor,
                 thresholds: torch.Tensor, once_in_one_unit: bool) -> None:
    """Add pairs of similarity ``s`` (P,), each accepted at t_max, to ``hist`` (T + 1, K) at the first
    threshold accepting them, for the units of both members ``ur``, ``uc`` (P,); with ``once_in_one_unit``
    a pair whose members share a unit is added once."""
    k_thr = hist.shape[1]
    k = _first_accepting(s, bnd, float(thresholds[1] - thresholds[0]))  # (P,)
    flat, one = hist.view(-1), torch.ones(1, dtype=hist.dtype, device=hist.device)
    flat.index_add_(0, ur * k_thr + k, one.expand(k.shape[0]))
    if once_in_one_unit:
        two = ur != uc
        uc, k = uc[two], k[two]
    flat.index_add_(0, uc * k_thr + k, one.expand(k.shape[0]))


class _KeptPairs:
    """The pairs of pass 1 with similarity ``>= s_min``, so that the counts come from them instead of a
    second pass (``complete`` until more than ``limit`` were offered; then they are dropped).

    Per tile: the similarities and the (global, sorted) row and column of each pair, 4 bytes an index.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.reset(float("-inf"))

    def reset(self, s_min: float) -> None:
        """Start again, keeping the pairs with ``s >= s_min`` (``s > -inf`` for -inf: every pair)."""
        self.s_min, self.size, self.complete = s_min, 0, True
        self.parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (0 pos | 1 neg, s, row, col)

    def add(self, r0: int, c0: int, rows: torch.Tensor, cc: torch.Tensor, s: torch.Tensor,
            pos: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
        """Keep the negatives ``s`` (P,) at tile positions ``(rows, cc)`` and the positives ``pos`` (global
        rows, columns, similarities) of the tile at ``(r0, c0)``, those with ``s >= s_min``; only while
        ``complete``."""
        parts = [(1, s, (rows + r0).int(), (cc + c0).int())]
        if pos is not None:
            keep = torch.nonzero(pos[2] >= self.s_min).squeeze(1)
            parts.append((0, pos[2].index_select(0, keep), pos[0].index_select(0, keep).int(),
                          pos[1].index_select(0, keep).int()))
        self.size += sum(p[1].numel() for p in parts)
        if self.size > self.limit:  # too many: the counts will take a second pass
            self.complete, self.parts = False, []
            return
        self.parts += parts

    def histograms(self, el: torch.Tensor, el_c: torch.Tensor, bnd: torch.Tensor, thresholds: torch.Tensor,
                   t_cls: int, grouped: bool) -> torch.Tensor:
        """(2, T + 1, K) as :func:`_accept_histograms` (``el``, ``el_c`` the units of the sorted rows and
        columns), from the kept pairs; needs ``bnd[-1] >= s_min``."""
        hist = torch.zeros(2, t_cls + 1, thresholds.shape[0], dtype=torch.long, device=el.device)
        b_last = float(bnd[-1])
        for sign, s, rows, cols in self.parts:
            keep = torch.nonzero(s >= b_last).squeeze(1)  # (P,) accepted at t_max
            # (index_select: a gather several times faster on the CPU than indexing with a tensor)
            rows, cols = rows.index_select(0, keep), cols.index_select(0, keep)
            _count_pairs(hist[sign], s.index_select(0, keep), el.index_select(0, rows), el_c.index_select(0, cols),
                         bnd, thresholds, grouped or sign == 0)
        return hist

    def replay(self, add_pairs: Any) -> None:
        """Feed every kept pair to ``add_pairs(rows (P,), cols (P,), s (P,))`` (global sorted indices)."""
        for _, s, rows, cols in self.parts:
            add_pairs(rows.long(), cols.long(), s)


def _negative_distance_quantiles(
    xn: torch.Tensor,
    lab: torch.Tensor,
    qs: tuple[float, ...],
    chunk_size: int,
    num_neg: int,
    *,
    collect_all_max: int | None = None,
    slack: float = 6.0,
    seed: int = 0,
    cols: torch.Tensor | None = None,
    col_lab: torch.Tensor | None = None,
    keep: _KeptPairs | None = None,
    on_tile: Any = None,
) -> list[float]:
    """Exact ``numpy.quantile(d_neg, q, method="linear")`` for each q, d_neg = distances of all M
    negative pairs, without storing them: only the values inside a bracket around the two order
    statistics each quantile needs are kept (all values when ``M <= collect_all_max``).  ``lab`` sorted;
    with ``cols`` / ``col_lab`` (sorted too) the negative pairs are those of ``xn`` x ``cols``.
    ``keep``: also keeps every pair above the lowest bracket there (for the counts); ``on_tile`` sees
    every tile of the first pass.  The one exact quantile of the library: :mod:`tcmlib.report` uses it too."""
    m = num_neg
    need = []  # (j, j + 1 clipped, gamma) per q: value = lerp(d_(j), d_(j+1), gamma), 0-based ascending
    for q in qs:
        h = (m - 1) * q
        j = math.floor(h)
        need.append((j, min(j + 1, m - 1), h - j))
    inf = float("inf")
    if m <= (COLLECT_ALL_MAX if collect_all_max is None else collect_all_max):
        brackets = [(-inf, inf)] * len(qs)  # similarity brackets (s_lo, s_hi), inclusive
    else:
        brackets = _pilot_brackets(xn, lab, qs, slack, seed, cols, col_lab)
    out: list[float | None] = [None] * len(qs)
    pending = list(range(len(qs)))
    while pending:
        s_min = min(brackets[i][0] for i in pending)
        above = {i: 0 for i in pending}  # negatives with s > s_hi (the smallest distances)
        inside: dict[int, list[torch.Tensor]] = {i: [] for i in pending}  # bracket values
        if keep is not None:
            keep.reset(s_min)
        for r0, c0, sim, pos in _tiles(xn, lab, chunk_size, keep is not None, cols=cols, col_lab=col_lab,
                                       on_tile=on_tile):
            above_min = sim > s_min if s_min == -inf else sim >= s_min  # negatives only (the rest is -inf)
            if keep is not None and keep.complete:
                rows, cc, flat = nonzero_rc(above_min)
                s = sim.reshape(-1).index_select(0, flat)  # (P,)
                keep.add(r0, c0, rows, cc, s, pos)
            else:
                s = sim.reshape(-1).index_select(0, flat_nonzero(above_min))  # (P,)
            for i in pending:
                lo, hi = brackets[i]
                if lo == -inf and hi == inf:  # keep everything
                    inside[i].append(s)
                    continue
                above[i] += int((s > hi).sum())
                inside[i].append(s[(s >= lo) & (s <= hi)])
        still = []
        for i in pending:
            vals = torch.cat(inside[i])  # (n_i,) the bracket's similarities
            n_i = vals.shape[0]
            j0, j1, gamma = need[i]
            a, b = j0 - above[i], j1 - above[i]  # ranks inside the bracket (0 = largest s = smallest d)
            if a >= 0 and b < n_i:
                s0 = torch.kthvalue(vals, n_i - a).values  # the a-th largest similarity
                s1 = s0  # the b-th (b = a or a + 1): s0 again, or the next smaller value
                if b > a and int((vals >= s0).sum()) <= b:
                    s1 = vals[vals < s0].max()
                lo_v, hi_v = 1.0 - float(s0), 1.0 - float(s1)  # d_(j0), d_(j1) in float64
                # numpy's _lerp, so that the result matches numpy.quantile to the last bit
                out[i] = lo_v + (hi_v - lo_v) * gamma if gamma < 0.5 else hi_v - (hi_v - lo_v) * (1 - gamma)
            else:
                still.append(i)
        on_tile = None  # a rider sees the first pass only
        if still:  # the pilot missed: widen those brackets and run the pass again
            slack = max(slack, 0.5) * 8.0
            wide = _pilot_brackets(xn, lab, qs, slack, seed, cols, col_lab)
            for i in still:
                # a superset of the old bracket; each miss widens 8x, so it ends at (-inf, inf) at worst
                brackets[i] = (min(brackets[i][0], wide[i][0]), max(brackets[i][1], wide[i][1]))
        pending = still
    return [float(v) for v in out]  # type: ignore[arg-type]


def _pilot_brackets(
    xn: torch.Tensor, lab: torch.Tensor, qs: tuple[float, ...], slack: float, seed: int,
    cols: torch.Tensor | None = None, col_lab: torch.Tensor | None = None,
) -> list[tuple[float, float]]:
    """Similarity brackets (s_lo, s_hi) likely to contain the q-quantile of the negative distances,
    from the negative pairs of ~1M / N random rows; width = slack x the estimated standard error in
    probability (from the spread across 8 groups of rows, at least the binomial one)."""
    cols, col_lab = (xn, lab) if cols is None or col_lab is None else (cols, col_lab)
    n = xn.shape[0]
    r = min(n, max(16, 1_000_000 // cols.shape[0]))
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n, generator=gen)[:r].to(xn.device)  # (r,)
    sim = xn[pick] @ cols.T  # (r, M)
    neg = lab[pick][:, None] != col_lab[None, :]  # (r, M)
    pooled = sim[neg]  # (n_p,)
    n_p = pooled.shape[0]
    groups = min(8, r)
    row_group = torch.arange(r, device=xn.device) % groups  # (r,)
    neg_per_group = torch.zeros(groups, device=xn.device).index_add_(0, row_group, neg.sum(dim=1).float())
    inf = float("inf")

    def s_at(p: float) -> float:  # the pilot's similarity with a share p of negatives at or above it
        idx = min(n_p - 1, max(0, round((1.0 - p) * (n_p - 1))))
        return float(torch.kthvalue(pooled, idx + 1).values)

    out = []
    for q in qs:
        s_hat = s_at(q)
        frac = ((sim >= s_hat) & neg).sum(dim=1).float()  # (r,) per row: negatives with d <= d_hat
        f_g = torch.zeros(groups, device=xn.device).index_add_(0, row_group, frac) / neg_per_group.clamp_min(1)
        se = float(f_g.std()) / math.sqrt(groups) if groups > 1 else 0.0
        se = max(se, math.sqrt(max(q * (1 - q), 1.0 / n_p) / n_p))
        delta = slack * se
        s_hi = inf if q - delta <= 0 else s_at(q - delta)
        s_lo = -inf if q + delta >= 1 else s_at(q + delta)
        out.append((s_lo, s_hi))
    return out
