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

Algorithm (exact, no N x N matrix, no Python loop over pairs or classes; memory: below).
The samples are sorted by label once (results do not depend on the order). The cosine similarities of
the pairs a < b are computed in tiles of ``chunk_size`` rows by ``TILE_COLS`` columns,
``(B, D) @ (D, W)``; the same-label pairs of a row block lie in one band of columns, so only that band
is compared to split positives from negatives. Two passes over the tiles:

1. Calibration range: each quantile needs two order statistics of the M negative distances. A pilot
   on ``PILOT_SIDE`` random rows x ``PILOT_SIDE`` random columns brackets them; the pass counts the negatives above each bracket and
   keeps only the values inside it (about 2 x 6 standard errors of the pilot: under 1 % of the
   negatives at any N), which gives the order statistics exactly (a missed bracket is widened and the
   pass repeated; with M <= ``COLLECT_ALL_MAX`` all values are kept, no pilot).
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

Memory (CPU; peak beyond the inputs, whatever N): the unit rows sorted by label (N x D, the working
dtype), one tile and its masks (``chunk_size`` x ``TILE_COLS``: 16 MiB of float32 at the defaults), at most
``QUANTILE_BUDGET`` bracket values (128 MiB of float32; the select may copy them once) and at most
``KEEP_MAX`` kept pairs (400 MiB): under 1 GB in all.  A bracket that would hold more than its share of
``QUANTILE_BUDGET`` keeps a histogram of its values' bit patterns instead and the next pass keeps only the
one or two bins that hold the order statistics (a constant-memory radix select; the values found are the
same).  The histograms are (2, T + 1, K).  :func:`tcmlib.metrics.evaluation.evaluate_embeddings` adds the
running top-k of the retrieval, N x (max(ks, largest R) + 66) entries.  On a GPU the counting pass bins
every entry of a tile densely (a few (chunk_size x ``GPU_TILE_COLS``) int64 temporaries on the device) and
never waits for the device; pass 1 then keeps no pairs.  From 32k embeddings on, a freed tile buffer goes
back to the system (``tcmlib._heap``: glibc's heap otherwise kept them in some runs, 5-8 GB at N = 100k).
``benchmarks/eval_memory.py`` measures ``tcmlib-eval``'s peak at N = 100k, the largest of several runs.

Exactness: ``s`` is computed in the working dtype (float32, or float64 for float64 input) and
``d = 1 - s`` is evaluated in float64, which is exact for float32 ``s``. Every comparison ``d <= t`` is
made exactly through a per-threshold similarity boundary, so ties at a threshold are counted as
accepted, and a quantile that lands on a pair's distance accepts that pair.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tcmlib._checks import check_embeddings_labels, check_labels
from tcmlib.metrics import _pairs
from tcmlib.metrics._pairs import Pairs, SortedPairs, pair_tiles, sort_pairs
from tcmlib.metrics.retrieval import _check_reference

__all__ = ["ClassCounts", "Quantiles", "UtilityCurves", "eps_opis", "opis", "utility", "utility_curves"]

DEFAULT_CHUNK_SIZE = 1024  # rows of the similarity matrix per block; see benchmarks/opis_cost.py
COLLECT_ALL_MAX = 1 << 22  # up to this many negative pairs, pass 1 keeps them all (no pilot)
PILOT_SIDE = 1024  # the quantile pilot: this many random rows x as many random columns (above COLLECT_ALL_MAX)
KEEP_MAX = 1 << 25  # pass 1 keeps up to this many pairs for the counts (12 bytes each in float32: <= 400 MB)
QUANTILE_BUDGET = 1 << 25  # negative similarities the quantile brackets keep at once, in all (float32: 128 MB)


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


def check_inputs(
    embeddings: Any, labels: Any, groups: Any = None, reference: Any = None, reference_labels: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(x (N, D), y (N,), groups (N,) or None, reference (M, D) or None, reference labels (M,) or None)``,
    checked once at a public entry (bad input: ``ValueError`` saying what to do), all on ``x``'s device."""
    x, y = check_embeddings_labels(embeddings, labels)
    g = None if groups is None else check_labels(groups, x.shape[0], "groups").to(x.device)
    rx = ry = None
    if reference is not None or reference_labels is not None:
        rx, ry = _check_reference(x, reference, reference_labels)
    return x, y, g, rx, ry


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
    setup = curve_setup(*check_inputs(embeddings, labels, groups, reference, reference_labels), far_range=far_range,
                        distance_range=distance_range, num_thresholds=num_thresholds, beta=beta, chunk_size=chunk_size)
    cal = calibrate(setup)  # pass 1: the thresholds (none with a given distance range)
    counts = ClassCounts(setup, cal.thresholds)
    count_pass(setup, cal, [counts])  # pass 2, or the pairs pass 1 kept
    return setup.curves(cal.thresholds, counts.result())


@dataclass
class CurveSetup:
    """What the passes of the utility curves share (:func:`curve_setup`): the sorted ``pairs``, ``chunk`` rows
    per tile, the range ``(lo, hi)`` (a FAR range, or the distances when ``given_range``), K thresholds and
    beta; the units (classes or groups): ``unit_ids``, ``eligible``, ``num_pos``, ``num_neg`` (U,), the
    eligible index of each sorted row ``el`` (N,) and column ``el_c`` (M,) (T = excluded, or with a
    reference set: not counted for the column), ``t_cls`` = T eligible units; ``num_neg_all`` negative pairs."""

    pairs: SortedPairs
    chunk: int
    lo: float
    hi: float
    num_thresholds: int
    beta: float
    given_range: bool
    grouped: bool
    unit_ids: torch.Tensor
    eligible: torch.Tensor
    num_pos: torch.Tensor
    num_neg: torch.Tensor
    num_neg_all: int
    el: torch.Tensor
    el_c: torch.Tensor
    t_cls: int

    def curves(self, thresholds: torch.Tensor, hist: torch.Tensor) -> UtilityCurves:
        """The :class:`UtilityCurves` from the histograms (2, T + 1, K) of :class:`ClassCounts`."""
        t_cls = self.t_cls
        acc = hist.cumsum(dim=2)[:, :t_cls].transpose(1, 2).double().cpu()  # (2, K, T) accepted at t_k
        pos_t, neg_t = self.num_pos[self.eligible].double().cpu(), self.num_neg[self.eligible].double().cpu()  # (T,)
        tar = acc[0] / pos_t  # (K, T)
        trr = (neg_t - acc[1]) / neg_t  # (K, T)
        return UtilityCurves(
            thresholds=thresholds, tar=tar, trr=trr, utility=utility(tar, trr, self.beta),
            class_ids=self.unit_ids[self.eligible].cpu(), num_pos=self.num_pos[self.eligible].cpu(),
            num_neg=self.num_neg[self.eligible].cpu(), num_eligible=t_cls, num_excluded=len(self.unit_ids) - t_cls,
            distance_range=(float(thresholds[0]), float(thresholds[-1])),
            far_range=None if self.given_range else (self.lo, self.hi), beta=self.beta,
        )


def curve_setup(
    x: torch.Tensor, y: torch.Tensor, g: torch.Tensor | None, rx: torch.Tensor | None, ry: torch.Tensor | None, *,
    far_range: tuple[float, float], distance_range: tuple[float, float] | None, num_thresholds: int, beta: float,
    chunk_size: int,
) -> CurveSetup:
    """The :class:`CurveSetup` of checked inputs (:func:`check_inputs`): unit rows sorted by label (the
    positives of a row block then form one band of columns), the units and their pair totals in closed form."""
    lo, hi, k_thr, beta = _check_range_args(far_range, distance_range, num_thresholds, beta, chunk_size)
    pairs = sort_pairs(x, y, rx, ry)
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
    return CurveSetup(pairs, int(chunk_size), lo, hi, k_thr, beta, distance_range is not None, g is not None,
                      unit_ids, eligible, num_pos, num_neg, num_neg_all, el, el_c, t_cls)


@dataclass
class Calibration:
    """Pass 1's results: ``thresholds`` (K,) distances, the ``extras`` quantiles asked for, the pairs it
    ``kept`` for the counts (or None), and the ``pending`` riders it never fed (no pass 1 ran)."""

    thresholds: torch.Tensor
    extras: list[float]
    kept: _KeptPairs | None
    pending: list[Any]


def calibrate(setup: CurveSetup, *, extra_quantiles: tuple[float, ...] = (), riders: Sequence[Any] = ()) -> Calibration:
    """Pass 1: the thresholds, from the ``far_range`` quantiles of the negative distances (none with a given
    distance range), and the exact ``extra_quantiles`` (``numpy.quantile``) in the same pass.  ``riders``
    (consumers with ``add(tile)`` reading ``tile.sim``, e.g. :class:`~tcmlib.metrics.retrieval.RetrievalTopK`)
    see every tile of it; with no pass they are ``pending``, for the counting pass."""
    for q in extra_quantiles:
        if not 0.0 <= float(q) <= 1.0:
            raise ValueError(f"quantile {q} must lie in [0, 1]")
    qs = tuple(float(q) for q in extra_quantiles) + (() if setup.given_range else (setup.lo, setup.hi))
    kept = None  # pass 1 keeps the pairs the counts need, when they fit (not on a GPU: listing them syncs)
    if not setup.given_range and setup.num_neg_all * setup.hi <= KEEP_MAX and not _pairs._dense(setup.el.device):
        kept = _KeptPairs(KEEP_MAX)
    quant = []
    if qs:
        quant = _negative_distance_quantiles(setup.pairs, qs, setup.chunk, setup.num_neg_all, keep=kept,
                                             riders=riders)
    t_lo, t_hi = (setup.lo, setup.hi) if setup.given_range else quant[-2:]
    if not t_lo < t_hi:
        raise ValueError(
            f"the calibration range is empty: the far_range {(setup.lo, setup.hi)} quantiles of the negative "
            f"distances are both {t_lo}; pass a wider far_range or an explicit distance_range"
        )
    thresholds = torch.linspace(t_lo, t_hi, setup.num_thresholds, dtype=torch.float64)  # (K,)
    return Calibration(thresholds, quant[: len(extra_quantiles)], kept, [] if qs else list(riders))


def count_pass(setup: CurveSetup, cal: Calibration, counters: Sequence[Any]) -> None:
    """Feed ``counters`` (consumers with ``add(tile)`` reading ``tile.pairs(bound)`` and ``bound``, the lowest
    similarity each counts) every pair: from the pairs pass 1 kept when those hold every pair
    ``s >= bound``, else one pass over the tiles (:func:`_counting_pass`, with the pending riders first)."""
    kept = cal.kept
    if kept is not None and kept.complete and not cal.pending and min(c.bound for c in counters) >= kept.s_min:
        for tile in kept.tiles():
            for c in counters:
                c.add(tile)
    else:
        _counting_pass(setup.pairs, setup.chunk, [*cal.pending, *counters])


def _counting_pass(pairs: SortedPairs, chunk_size: int, consumers: Sequence[Any]) -> None:
    """One pass over the tiles, each fed to every consumer in turn."""
    for tile in pair_tiles(pairs, chunk_size):
        for c in consumers:
            c.add(tile)


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


class ClassCounts:
    """The pairs each eligible unit accepts, by the first threshold accepting them, tile by tile.

    ``result()`` (2, T + 1, K) int64: [0] positive, [1] negative pairs per eligible unit (T = excluded) by
    the first threshold index k0 that accepts them (``d <= t_k`` for all k >= k0); cumulative sums over k
    give the counts at every threshold.  Pairs with d > t_max are not counted (their totals are known in
    closed form): ``bound``, the lowest similarity counted, is t_max's boundary.  A pair counts for the units
    of both members (once when both lie in one group; with a reference set, the column's unit is T)."""

    def __init__(self, setup: CurveSetup, thresholds: torch.Tensor) -> None:
        bnd = _accept_boundaries(thresholds, setup.pairs.rows.dtype)  # (K,) non-increasing, on the host
        self.bnd = bnd.to(setup.el.device)
        self.bound = float(bnd[-1])
        self.step = float(thresholds[1] - thresholds[0])
        self.el, self.el_c, self.grouped = setup.el, setup.el_c, setup.grouped
        self.k_thr = thresholds.shape[0]
        self.dense = _pairs._dense(setup.el.device)  # a GPU: every entry of a tile binned, nothing listed
        # (dense: one more column, k = K, for the pairs no threshold accepts)
        self.hist = torch.zeros(2, setup.t_cls + 1, self.k_thr + self.dense, dtype=torch.long, device=setup.el.device)

    def add(self, tile: Any) -> None:
        if self.dense and hasattr(tile, "dense"):
            self._add_dense(tile)
            return
        neg, pos = tile.pairs(self.bound)
        self._count(self.hist[0], pos, True)  # positives: few; a pair in two groups counts for both
        self._count(self.hist[1], neg, self.grouped)  # both members in one group: once (not for classes)

    def result(self) -> torch.Tensor:
        return self.hist[:, :, : self.k_thr]

    def _add_dense(self, tile: Any) -> None:
        """Bin every entry of the tile by ``k0 = #{k : b_k > s}`` (K: not accepted), for the units of both
        members, with no host synchronisation: the counts of :meth:`_count`, found without listing the pairs."""
        neg, lo, same, band = tile.dense()  # (B, W); (B, w), (B, w)
        b, w = neg.shape
        asc, k1 = self.bnd.flip(0), self.k_thr + 1  # (K,) ascending
        ur = self.el[tile.r0 : tile.r0 + b, None]  # (B, 1) the rows' units
        for hist, sim, uc, weight, once in ((self.hist[1].view(-1), neg, self.el_c[tile.c0 : tile.c0 + w], None,
                                             self.grouped),
                                            (self.hist[0].view(-1), band, self.el_c[lo : lo + band.shape[1]], same,
                                             True)):
            k = self.k_thr - torch.bucketize(sim, asc, right=True)  # (B, W) first accepting threshold, K: none
            ones = torch.ones_like(k) if weight is None else weight.long()
            hist.index_add_(0, (ur * k1 + k).view(-1), ones.view(-1))
            col = ones & (ur != uc[None, :]).long() if once else ones  # a pair inside one unit counts once
            hist.index_add_(0, (uc[None, :] * k1 + k).view(-1), col.view(-1))

    def _count(self, hist: torch.Tensor, p: Pairs, once_in_one_unit: bool) -> None:
        """Add pairs ``p`` (each accepted at t_max) to ``hist`` (T + 1, K) at the first threshold accepting
        them, for the units of both members; with ``once_in_one_unit`` a pair within one unit is added once."""
        if not p.s.numel():
            return
        k_thr = hist.shape[1]
        k = _first_accepting(p.s, self.bnd, self.step)  # (P,)
        ur, uc = self.el.index_select(0, p.rows), self.el_c.index_select(0, p.cols)
        flat, one = hist.view(-1), torch.ones(1, dtype=hist.dtype, device=hist.device)
        flat.index_add_(0, ur * k_thr + k, one.expand(k.shape[0]))
        if once_in_one_unit:
            two = ur != uc
            uc, k = uc[two], k[two]
        flat.index_add_(0, uc * k_thr + k, one.expand(k.shape[0]))


class _KeptPairs:
    """The pairs of pass 1 with similarity ``>= s_min``, so that the counts come from them instead of a
    second pass (``complete`` until more than ``limit`` were offered; then they are dropped).  Per tile:
    its negatives and positives, 4 bytes an index; :meth:`tiles` gives them back as tiles to count."""

    def __init__(self, limit: int):
        self.limit = limit
        self.reset(float("-inf"))

    def reset(self, s_min: float) -> None:
        """Start again, keeping the pairs with ``s >= s_min`` (``s > -inf`` for -inf: every pair)."""
        self.s_min, self.size, self.complete = s_min, 0, True
        self.parts: list[tuple[Pairs, Pairs]] = []  # (negatives, positives) per tile

    def add(self, neg: Pairs, pos: Pairs) -> None:
        """Keep a tile's pairs with ``s >= s_min`` (global sorted indices); only while ``complete``."""
        self.size += neg.s.numel() + pos.s.numel()
        if self.size > self.limit:  # too many: the counts will take a second pass
            self.complete, self.parts = False, []
            return
        self.parts.append(tuple(Pairs(p.rows.int(), p.cols.int(), p.s) for p in (neg, pos)))  # type: ignore[arg-type]

    def tiles(self) -> Iterator[_KeptTile]:
        """The kept pairs, tile by tile, as :meth:`~tcmlib.metrics._pairs.Tile.pairs` gives them."""
        return (_KeptTile(neg, pos) for neg, pos in self.parts)


class _KeptTile:
    """A tile's kept pairs, read as a :class:`~tcmlib.metrics._pairs.Tile`'s ``pairs(s_min)``."""

    def __init__(self, neg: Pairs, pos: Pairs) -> None:
        self.neg, self.pos = neg, pos

    def pairs(self, s_min: float) -> tuple[Pairs, Pairs]:
        """``(negatives, positives)`` with ``s >= s_min`` (at least the ``s_min`` they were kept with)."""
        out = []
        for p in (self.neg, self.pos):
            keep = torch.nonzero(p.s >= s_min).squeeze(1)  # (index_select: a fast gather on the CPU)
            out.append(Pairs(p.rows.index_select(0, keep).long(), p.cols.index_select(0, keep).long(),
                             p.s.index_select(0, keep)))
        return out[0], out[1]


class Quantiles:
    """The negative pairs' similarities inside a bracket ``(s_lo, s_hi)`` per quantile, and how many lie above
    it, tile by tile: from them :meth:`result` reads the order statistics each quantile needs.  With ``keep``
    (:class:`_KeptPairs`) every pair above the lowest bracket is kept too (for the counts).

    Memory is bounded: a bracket keeps at most ``budget // len(brackets)`` values (``QUANTILE_BUDGET`` in
    all).  One that would hold more keeps a histogram instead (:class:`_KeyHistogram`: 2^``HIST_BITS`` bins
    of the values' order-preserving bit patterns); :meth:`result` then gives None for it and, in
    ``refined``, the one or two adjacent bins that hold its order statistics, a bracket 2^(HIST_BITS - 1)
    times narrower for the next pass (or the values themselves, when a bin is a single value).  The values
    are the same whichever way they are found."""

    def __init__(self, brackets: dict[int, tuple[float, float]], keep: _KeptPairs | None,
                 budget: int | None = None) -> None:
        self.brackets, self.keep = brackets, keep
        self.s_min = min(lo for lo, _ in brackets.values())
        self.above = {i: 0 for i in brackets}  # negatives with s > s_hi (the smallest distances)
        self.inside: dict[int, list[torch.Tensor]] = {i: [] for i in brackets}  # bracket values
        self.size = {i: 0 for i in brackets}  # values offered to each bracket
        self.limit = max(1, (QUANTILE_BUDGET if budget is None else budget) // len(brackets))  # per bracket
        self.hist: dict[int, _KeyHistogram] = {}  # brackets over their limit
        self.refined: dict[int, tuple[float, float]] = {}  # narrower brackets for the next pass
        self.peak = 0  # the most values held at once, all brackets together (a test reads it)
        if keep is not None:
            keep.reset(self.s_min)

    def add(self, tile: Any) -> None:
        if self.keep is not None and self.keep.complete:
            neg, pos = tile.pairs(self.s_min)
            self.keep.add(neg, pos)
            s = neg.s  # (P,)
        else:
            s = tile.values(self.s_min)  # (P,)
        for i, (lo, hi) in self.brackets.items():
            if lo == -math.inf and hi == math.inf:  # keep everything
                inside = s
            else:
                self.above[i] += int((s > hi).sum())
                inside = s[(s >= lo) & (s <= hi)]
            if i not in self.hist and self.size[i] + inside.numel() > self.limit:  # too many to keep: count
                self.hist[i] = _KeyHistogram(lo, hi, s.dtype, s.device)  # them in a histogram from here on
                while self.inside[i]:
                    self.hist[i].add(self.inside[i].pop())
            if i in self.hist:
                self.hist[i].add(inside)
                continue
            self.inside[i].append(inside)
            self.size[i] += inside.numel()
            self.peak = max(self.peak, sum(self.size[j] for j in self.size if j not in self.hist))

    def result(self, need: list[tuple[int, int, float]]) -> dict[int, float | None]:
        """Per bracket, ``lerp(d_(j0), d_(j1), gamma)`` for ``need[i] = (j0, j1, gamma)`` (0-based ascending
        distance ranks), or None where the bracket missed them or held too many (then ``refined``
        has a narrower bracket for it)."""
        out: dict[int, float | None] = {}
        for i in self.brackets:
            j0, j1, gamma = need[i]
            a, b = j0 - self.above[i], j1 - self.above[i]  # ranks inside the bracket (0 = largest s)
            out[i] = None
            if i in self.hist:
                found = self.hist[i].select(a, b)
                if found is None:
                    continue
                exact, s0, s1 = found
                if not exact:
                    self.refined[i] = (s0, s1)
                    continue
            else:
                vals = _concat(self.inside[i])  # (n_i,) the bracket's similarities
                n_i = vals.shape[0]
                if not (a >= 0 and b < n_i):
                    continue
                t0 = torch.kthvalue(vals, n_i - a).values  # the a-th largest similarity
                t1 = t0  # the b-th (b = a or a + 1): t0 again, or the next smaller value
                if b > a and int((vals >= t0).sum()) <= b:
                    t1 = vals[vals < t0].max()
                s0, s1 = float(t0), float(t1)
            lo_v, hi_v = 1.0 - s0, 1.0 - s1  # d_(j0), d_(j1) in float64
            # numpy's _lerp, so that the result matches numpy.quantile to the last bit
            out[i] = lo_v + (hi_v - lo_v) * gamma if gamma < 0.5 else hi_v - (hi_v - lo_v) * (1 - gamma)
        return out


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``, emptying ``parts`` as it copies (the peak: the result and one part, not twice all)."""
    if not parts:
        return torch.empty(0)
    out = parts[0].new_empty(sum(p.numel() for p in parts))
    at = 0
    parts.reverse()
    while parts:
        p = parts.pop()
        out[at : at + p.numel()] = p
        at += p.numel()
    return out


HIST_BITS = 12  # a bracket over its budget is counted in 2^12 bins (its next pass: ~2^11 times narrower)
_KEY_CLAMP = 1.25  # unit rows' cosines lie in [-1 - 1e-6, 1 + 1e-6]: keys are taken within +-1.25


def _float_keys(s: torch.Tensor) -> torch.Tensor:
    """(P,) int64 keys ordered as the float32 / float64 values ``s`` (P,) (their bit patterns, the negative
    ones reversed; -0.0 is read as +0.0, which it equals)."""
    s = s + 0.0  # -0.0 + 0.0 = +0.0
    if s.dtype == torch.float64:
        u = s.view(torch.int64)
        return torch.where(u < 0, u ^ 0x7FFFFFFFFFFFFFFF, u)
    u = s.float().view(torch.int32).long()
    return torch.where(u < 0, u ^ 0x7FFFFFFF, u)


def _key_value(key: int, dtype: torch.dtype) -> float:
    """The float (of ``dtype``) whose :func:`_float_keys` key is ``key``."""
    if dtype == torch.float64:
        u = key ^ 0x7FFFFFFFFFFFFFFF if key < 0 else key
        return float(torch.tensor([u], dtype=torch.int64).view(torch.float64))
    u = key ^ 0x7FFFFFFF if key < 0 else key
    return float(torch.tensor([u], dtype=torch.int32).view(torch.float32))


class _KeyHistogram:
    """Counts of the values of a bracket ``[lo, hi]`` in 2^``HIST_BITS`` bins of consecutive float keys
    (:func:`_float_keys`; a constant-memory radix select, as ``tcmlib.distributed`` uses across ranks)."""

    def __init__(self, lo: float, hi: float, dtype: torch.dtype, device: torch.device) -> None:
        self.lo, self.hi, self.dtype = lo, hi, dtype
        ends = torch.tensor([max(lo, -_KEY_CLAMP), min(hi, _KEY_CLAMP)], dtype=dtype)
        self.k_lo, self.k_hi = (int(k) for k in _float_keys(ends))
        self.shift = max(0, (self.k_hi - self.k_lo).bit_length() - HIST_BITS)
        self.count = torch.zeros(((self.k_hi - self.k_lo) >> self.shift) + 1, dtype=torch.long, device=device)

    def add(self, s: torch.Tensor) -> None:
        """Count the values ``s`` (P,), all inside the bracket."""
        b = (_float_keys(s).clamp_(self.k_lo, self.k_hi) - self.k_lo) >> self.shift
        self.count.index_add_(0, b, torch.ones_like(b))

    def select(self, a: int, b: int) -> tuple[bool, float, float] | None:
        """The a-th and b-th largest values (0-based, b = a or a + 1): ``(True, s_a, s_b)`` when their bins hold
        one value each; else ``(False, s_lo, s_hi)``, the narrower bracket of the bins that hold them; None
        when the bracket does not hold them."""
        desc = self.count.flip(0).cumsum(0)  # (bins,) values in the top j + 1 bins
        if a < 0 or b >= int(desc[-1]):
            return None
        last = self.count.shape[0] - 1
        bin_a, bin_b = (last - int(torch.searchsorted(desc, r, right=True)) for r in (a, b))

        def one_value(k: int) -> bool:  # a bin of one key (not an end cut at +-_KEY_CLAMP)
            return self.shift == 0 and not (k == 0 and self.lo < -_KEY_CLAMP) and not (k == last and self.hi > _KEY_CLAMP)

        if one_value(bin_a) and one_value(bin_b):
            return True, _key_value(self.k_lo + bin_a, self.dtype), _key_value(self.k_lo + bin_b, self.dtype)
        s_hi = self.hi if bin_a == last else _key_value(self.k_lo + ((bin_a + 1) << self.shift) - 1, self.dtype)
        s_lo = self.lo if bin_b == 0 else _key_value(self.k_lo + (bin_b << self.shift), self.dtype)
        return False, s_lo, s_hi


def _negative_distance_quantiles(
    pairs: SortedPairs,
    qs: tuple[float, ...],
    chunk_size: int,
    num_neg: int,
    *,
    collect_all_max: int | None = None,
    slack: float = 6.0,
    seed: int = 0,
    keep: _KeptPairs | None = None,
    riders: Sequence[Any] = (),
) -> list[float]:
    """Exact ``numpy.quantile(d_neg, q, method="linear")`` for each q, d_neg = distances of all ``num_neg``
    negative pairs, without storing them: only the values inside a bracket around the two order statistics
    each quantile needs are kept (all values when ``num_neg <= collect_all_max``; a missed bracket is widened
    and the pass repeated).  ``keep``: also keeps every pair above the lowest bracket there (for the
    counts); ``riders`` see every tile of the first pass.  The one exact quantile of the library:
    :mod:`tcmlib.report` uses it too."""
    need = []  # (j, j + 1 clipped, gamma) per q: value = lerp(d_(j), d_(j+1), gamma), 0-based ascending
    for q in qs:
        h = (num_neg - 1) * q
        j = math.floor(h)
        need.append((j, min(j + 1, num_neg - 1), h - j))
    if num_neg <= (COLLECT_ALL_MAX if collect_all_max is None else collect_all_max):
        brackets = [(-math.inf, math.inf)] * len(qs)  # similarity brackets (s_lo, s_hi), inclusive
    else:
        brackets = _pilot_brackets(pairs, qs, slack, seed)
    out: dict[int, float | None] = {}
    pending = list(range(len(qs)))
    while pending:
        quant = Quantiles({i: brackets[i] for i in pending}, keep)
        for tile in pair_tiles(pairs, chunk_size):
            for c in (*riders, quant):
                c.add(tile)
        riders = ()  # a rider sees the first pass only
        out.update(quant.result(need))
        pending = [i for i in pending if out[i] is None]
        for i in [i for i in pending if i in quant.refined]:  # held too many: the bins that hold the values
            if quant.refined[i] == brackets[i]:
                raise RuntimeError(f"the quantile bracket {brackets[i]} could not be narrowed: are the "
                                   "similarities outside [-1.25, 1.25]?")
            brackets[i] = quant.refined[i]
        missed = [i for i in pending if i not in quant.refined]
        if missed:  # the pilot missed: widen those brackets and run the pass again
            slack = max(slack, 0.5) * 8.0
            wide = _pilot_brackets(pairs, qs, slack, seed)
            for i in missed:
                # a superset of the old bracket; each miss widens 8x, so it ends at (-inf, inf) at worst
                brackets[i] = (min(brackets[i][0], wide[i][0]), max(brackets[i][1], wide[i][1]))
    return [float(out[i]) for i in range(len(qs))]  # type: ignore[arg-type]


def _pilot_brackets(pairs: SortedPairs, qs: tuple[float, ...], slack: float, seed: int) -> list[tuple[float, float]]:
    """Similarity brackets (s_lo, s_hi) likely to contain the q-quantile of the negative distances, from
    the negative pairs among ``PILOT_SIDE`` random rows x ``PILOT_SIDE`` random columns (one small GEMM):
    so many rows that classes of uneven spread are sampled in proportion at any N.  Width: ``slack`` x the
    standard error in probability (the spreads across 8 groups of rows and across 8 groups of columns,
    at least the binomial one), so a bracket holds a few tenths of a per cent of all negatives at the
    defaults, the values the exact pass keeps."""
    xn, lab = pairs.rows, pairs.lab
    cols, col_lab = pairs.col_side
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(xn.shape[0], generator=gen)[:PILOT_SIDE].to(xn.device)  # (r,)
    pick_c = torch.randperm(cols.shape[0], generator=gen)[:PILOT_SIDE].to(xn.device)  # (c,)
    sim = xn.index_select(0, pick) @ cols.index_select(0, pick_c).T  # (r, c)
    neg = lab.index_select(0, pick)[:, None] != col_lab.index_select(0, pick_c)[None, :]  # (r, c); (a, a) is positive
    pooled = sim[neg].sort().values  # (n_p,) ascending
    n_p = pooled.numel()
    inf = float("inf")
    if n_p == 0:
        return [(-inf, inf)] * len(qs)

    def s_at(p: float) -> float:  # the pilot's similarity with a share p of negatives at or above it
        return float(pooled[min(n_p - 1, max(0, round((1.0 - p) * (n_p - 1))))])

    def group_se(hit: torch.Tensor, dim: int) -> float:  # the standard error of the share, from 8 groups
        size = hit.shape[1 - dim]
        groups = min(8, size)
        g = torch.arange(size, device=hit.device) % groups
        f = torch.zeros(groups, dtype=torch.float64, device=hit.device)
        n_g = f.clone().index_add_(0, g, neg.sum(dim=dim).double()).clamp_min(1)
        f = f.index_add_(0, g, hit.sum(dim=dim).double()) / n_g  # (groups,) share per group
        return float(f.std()) / math.sqrt(groups) if groups > 1 else 0.0

    out = []
    for q in qs:
        hit = (sim >= s_at(q)) & neg  # (r, c) negatives with d <= the pilot's quantile
        se = math.hypot(group_se(hit, 1), group_se(hit, 0))
        delta = slack * max(se, math.sqrt(max(q * (1 - q), 1.0 / n_p) / n_p))
        s_hi = inf if q - delta <= 0 else s_at(q - delta)
        s_lo = -inf if q + delta >= 1 else s_at(q + delta)
        out.append((s_lo, s_hi))
    return out
