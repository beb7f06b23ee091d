"""Post-hoc thresholds: one per class (oracle), one per k-means cluster (FairCal-style), or one global.

A fixed embedder can be made more consistent after training by giving different samples different
thresholds. This module computes the usual baselines and compares them with the one global threshold
of :mod:`tcmlib.report` at the same false-accept target::

    from tcmlib.posthoc import compare_thresholding
    cmp = compare_thresholding(emb, labels, far_target=1e-2, calibration=(cal_emb, cal_labels), n_clusters=8)
    print(cmp.to_text())

Distances are ``d(a, b) = 1 - cos(x_a, x_b)`` (float64 of the working-dtype cosine, as in
:mod:`tcmlib.metrics.opis`), and a pair is accepted when ``d <= t`` (ties accepted).

**Query-based decisions.** With a threshold ``t_q`` per sample, the ordered pair ``(q, g)``, ``q != g``,
is decided with the threshold of its *query* ``q``: accepted iff ``d(q, g) <= t_q``. For class i::

    FAR_i = #{(q, g): y_q = i, y_g != i, d(q, g) <= t_q} / (n_i (N - n_i))
    FRR_i = #{(q, g): y_q = y_g = i, q != g, d(q, g) >  t_q} / (n_i (n_i - 1))

When every sample of class i has the same threshold (a global threshold, or a per-class one) these are
exactly the unordered per-class rates of :func:`tcmlib.report.rates_at_threshold` (each negative pair
of i has one member in i; each positive pair is counted twice with the same threshold).

**Thresholds meeting a FAR target.** For a set of queries (a class, a cluster) the threshold is
``numpy.quantile(D, far_target)`` (linear interpolation) over the distances ``D`` of its ordered
negative pairs ``{(q, g): q in the set, y_g != y_q}``, as :func:`tcmlib.report.threshold_for_far`
does for all negative pairs. For a class c this is exactly ``threshold_for_far(x, y == c, far_target)``.

Memory: the negative distances of one class or cluster are held at once, O(n_k N) floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tcmlib._checks import as_tensor, check_embeddings, check_embeddings_labels, check_labels
from tcmlib.metrics.opis import utility
from tcmlib.report import (DEFAULT_CHUNK_SIZE, _check_calibration, _check_chunk, _check_far, _prepare,
                           rates_at_threshold, threshold_for_far)

__all__ = [
    "ClassThresholds",
    "ClusterThresholds",
    "MethodRates",
    "ThresholdingComparison",
    "cluster_thresholds",
    "compare_thresholding",
    "per_class_thresholds",
    "query_rates",
]


# ----------------------------------------------------------------------------- shared helpers
def _unit_thresholds(xn: torch.Tensor, lab: torch.Tensor, unit: torch.Tensor, num_units: int, far: float,
                     chunk: int) -> torch.Tensor:
    """(U,) float64: per unit u, ``numpy.quantile`` at ``far`` of the distances of the ordered negative
    pairs ``(q, g)`` with ``unit[q] == u`` and ``lab[g] != lab[q]`` (queries of u against all samples)."""
    out = torch.full((num_units,), math.nan, dtype=torch.float64)
    for u in range(num_units):
        rows = torch.nonzero(unit == u).squeeze(1)  # (n_u,)
        parts = []
        for r0 in range(0, rows.numel(), chunk):
            r = rows[r0 : r0 + chunk]
            d = 1.0 - (xn[r] @ xn.T).double()  # (B, N)
            parts.append(d[lab[r, None] != lab[None, :]].cpu().numpy())
        neg = np.concatenate(parts) if parts else np.empty(0)
        if neg.size:
            out[u] = float(np.quantile(neg, far))
    return out


def _query_counts(xn: torch.Tensor, lab: torch.Tensor, t_q: torch.Tensor, chunk: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,), (N,) int64: per query q, #negatives g with d(q, g) <= t_q and #positives g != q with d > t_q."""
    n = xn.shape[0]
    fa = torch.zeros(n, dtype=torch.long)
    fr = torch.zeros(n, dtype=torch.long)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        d = 1.0 - (xn[r0:r1] @ xn.T).double()  # (B, N)
        acc = d <= t_q[r0:r1, None].to(d.device)
        same = lab[r0:r1, None] == lab[None, :]  # (B, N), includes q itself
        idx = torch.arange(r1 - r0, device=xn.device)
        same[idx, idx + r0] = False
        fa[r0:r1] = (acc & (lab[r0:r1, None] != lab[None, :])).sum(dim=1).cpu()
        fr[r0:r1] = (~acc & same).sum(dim=1).cpu()
    return fa, fr


# ----------------------------------------------------------------------------- per-class (oracle)
@dataclass
class ClassThresholds:
    """One threshold per class: ``class_ids`` (C,) ascending, ``thresholds`` (C,) float64 distances."""

    class_ids: torch.Tensor  # (C,) int64
    thresholds: torch.Tensor  # (C,) float64
    far_target: float

    def threshold_for(self, labels: Any) -> torch.Tensor:
        """(N,) float64 threshold of each sample from its label (N,); every label must have a threshold."""
        y0 = as_tensor(labels, "labels")
        y = check_labels(y0, y0.shape[0] if y0.ndim == 1 else 0).cpu()
        pos = torch.searchsorted(self.class_ids, y).clamp_max(len(self.class_ids) - 1)
        missing = self.class_ids[pos] != y
        if bool(missing.any()):
            raise ValueError(f"labels {sorted(set(y[missing].tolist()))[:5]} have no threshold: per-class "
                             "thresholds exist only for the classes they were computed on")
        return self.thresholds[pos]


def per_class_thresholds(embeddings: Any, labels: Any, far_target: float, *,
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> ClassThresholds:
    """Per class c of ``labels`` (N,), the threshold with FAR ``far_target`` on c's own negative pairs.

    ``t_c = numpy.quantile({d(a, b): y_a = c, y_b != c}, far_target)`` over ``embeddings`` (N, D), i.e.
    exactly ``threshold_for_far(embeddings, labels == c, far_target)``. Then ``FAR_c(t_c)`` meets the
    target for every class, up to ties and one pair in ``n_c (N - n_c)``.

    This is an **oracle upper bound**, not a deployable method: it needs the labels of the very classes
    it is applied to, and a deployed system meets new classes whose labels (and thresholds) it does not
    have. Use it to measure how much consistency any per-class threshold rule could buy at most.
    Raises ``ValueError`` for bad input, a ``far_target`` outside [0, 1] or a single class.
    """
    x, y = check_embeddings_labels(embeddings, labels)
    far = _check_far(far_target)
    chunk = _check_chunk(chunk_size)
    xn, lab, n_lab, num_neg = _prepare(x, y)
    if num_neg == 0:
        raise ValueError("there are no negative pairs: all samples share one label; a FAR needs >= 2 classes")
    lab = lab.to(xn.device)
    t = _unit_thresholds(xn, lab, lab, len(n_lab), far, chunk)
    return ClassThresholds(class_ids=torch.unique(y).cpu(), thresholds=t, far_target=far)


# ----------------------------------------------------------------------------- per-cluster (FairCal-style)
@dataclass
class ClusterThresholds:
    """k-means clusters of a calibration set with one threshold each; see :func:`cluster_thresholds`.

    ``centroids`` (K, D) float64 in the unit-normalised embedding space; ``thresholds`` (K,) float64;
    ``cluster_sizes`` (K,) int64 calibration samples per cluster.
    """

    centroids: torch.Tensor  # (K, D) float64
    thresholds: torch.Tensor  # (K,) float64
    cluster_sizes: torch.Tensor  # (K,) int64
    far_target: float
    seed: int

    def assign(self, embeddings: Any) -> torch.Tensor:
        """(N,) int64 index of the nearest centroid (Euclidean, after L2 normalisation) of each row (N, D)."""
        x = check_embeddings(embeddings)
        if x.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"embeddings have dimension {x.shape[1]}, the centroids {self.centroids.shape[1]}: "
                             "apply the clusters to embeddings of the model they were fitted on")
        x64 = x.detach().double().cpu()
        xn = x64 / torch.linalg.vector_norm(x64, dim=1, keepdim=True)
        return torch.cdist(xn, self.centroids).argmin(dim=1)

    def threshold_for(self, embeddings: Any) -> torch.Tensor:
        """(N,) float64: each row's threshold, that of its nearest centroid. Needs no labels."""
        return self.thresholds[self.assign(embeddings)]


def cluster_thresholds(calib_embeddings: Any, calib_labels: Any, n_clusters: int, far_target: float, *,
                       seed: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ClusterThresholds:
    """A threshold per k-means cluster of a labelled calibration set (in the spirit of FairCal,
    Salvador et al., ICLR 2022), applied to new data by nearest centroid.

    1. ``sklearn.cluster.KMeans(n_clusters, random_state=seed, n_init=10)`` on the L2-normalised
       ``calib_embeddings`` (M, D); each calibration sample is assigned to its nearest centroid
       (:meth:`ClusterThresholds.assign`, the same rule used later on new data).
    2. A pair is assigned to the cluster of its **query**: cluster k's threshold is
       ``numpy.quantile({d(q, g): q in k, y_g != y_q}, far_target)`` over the ordered calibration pairs
       with the query in k and the other member anywhere in the calibration set with a different label
       (``calib_labels`` (M,) are needed to know which pairs are negative; the new data's labels are not).
    3. On new data, a sample's threshold is that of its nearest centroid, and the pair ``(q, g)`` is
       accepted iff ``d(q, g) <= t_q`` (see the module docstring).

    Requires scikit-learn (``pip install 'tcmlib[data]'``). Raises ``ValueError`` for bad input, a
    ``far_target`` outside [0, 1], ``n_clusters`` not in [1, M] or a single calibration class.
    """
    x, y = check_embeddings_labels(calib_embeddings, calib_labels, emb_name="calibration embeddings",
                                   label_name="calibration labels")
    far = _check_far(far_target)
    chunk = _check_chunk(chunk_size)
    k = int(n_clusters)
    if k != n_clusters or not 1 <= k <= x.shape[0]:
        raise ValueError(f"n_clusters = {n_clusters} must be an integer in [1, {x.shape[0]}] (the calibration size)")
    xn, lab, _, num_neg = _prepare(x, y)
    if num_neg == 0:
        raise ValueError("the calibration set has one label only: a FAR needs >= 2 classes")
    try:
        from sklearn.cluster import KMeans
    except ImportError as e:  # pragma: no cover - scikit-learn is an optional dependency
        raise ImportError("cluster_thresholds needs scikit-learn: pip install 'tcmlib[data]'") from e
    x64 = x.detach().double().cpu()
    unit64 = (x64 / torch.linalg.vector_norm(x64, dim=1, keepdim=True)).numpy()
    km = KMeans(n_clusters=k, random_state=int(seed), n_init=10).fit(unit64)
    centroids = torch.from_numpy(np.asarray(km.cluster_centers_, dtype=np.float64))
    out = ClusterThresholds(centroids, torch.empty(0), torch.empty(0, dtype=torch.long), far, int(seed))
    cl = out.assign(x64)  # (M,)
    out.cluster_sizes = torch.bincount(cl, minlength=k)
    out.thresholds = _unit_thresholds(xn, lab.to(xn.device), cl.to(xn.device), k, far, chunk)
    if bool(torch.isnan(out.thresholds).any()):  # only an empty cluster (duplicate points) has no pairs
        empty = torch.nonzero(torch.isnan(out.thresholds)).squeeze(1).tolist()
        raise ValueError(f"clusters {empty} received no calibration sample (too many clusters for the distinct "
                         f"points); use fewer than {k} clusters")
    return out


# ----------------------------------------------------------------------------- rates of any rule
@dataclass
class MethodRates:
    """Per-class rates of one thresholding rule on an evaluation set (eligible classes: >= 2 samples).

    ``class_ids`` (T,) ascending; ``far``, ``frr``, ``utility`` (T,) float64, with
    ``U_i = (1 + b^2) TAR_i TRR_i / (b^2 TRR_i + TAR_i)``, ``TAR_i = 1 - FRR_i``, ``TRR_i = 1 - FAR_i``
    (the utility of :mod:`tcmlib.metrics.opis` at the applied thresholds). ``global_far`` / ``global_frr``
    over all (ordered, query-based) pairs.
    """

    name: str
    class_ids: torch.Tensor  # (T,) int64
    far: torch.Tensor  # (T,) float64
    frr: torch.Tensor  # (T,) float64
    utility: torch.Tensor  # (T,) float64
    global_far: float
    global_frr: float
    beta: float

    @property
    def inconsistency(self) -> float:
        """OPIS at the deployed operating point: ``(1/T) sum_i (U_i - mean_j U_j)^2`` (population variance).

        OPIS averages this variance over a grid of shared thresholds; here each class is evaluated once,
        at the threshold(s) the rule actually applies to it (K = 1)."""
        return float(self.utility.var(unbiased=False))

    def summary(self) -> dict[str, float]:
        """Spread of per-class FAR and FRR (population std, min, max, worst class), inconsistency, global rates."""
        out: dict[str, float] = {"global_FAR": self.global_far, "global_FRR": self.global_frr}
        for key, v in (("FAR", self.far), ("FRR", self.frr)):
            out[f"{key}_std"] = float(v.std(unbiased=False))
            out[f"{key}_min"] = float(v.min())
            out[f"{key}_max"] = float(v.max())
            out[f"{key}_worst_class"] = int(self.class_ids[int(v.argmax())])  # first of the ties
        out["inconsistency"] = self.inconsistency
        return out


def _method_rates(name: str, class_ids: torch.Tensor, far: torch.Tensor, frr: torch.Tensor, global_far: float,
                  global_frr: float, beta: float) -> MethodRates:
    far, frr = far.double().cpu(), frr.double().cpu()
    return MethodRates(name, class_ids.cpu(), far, frr, utility(1.0 - frr, 1.0 - far, beta), float(global_far),
                       float(global_frr), beta)


def _check_beta(beta: float) -> float:
    b = float(beta)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"beta = {beta} must be a finite number > 0 (1 gives the F1 / harmonic mean)")
    return b


def query_rates(embeddings: Any, labels: Any, thresholds: Any, *, beta: float = 1.0, name: str = "rule",
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> MethodRates:
    """Per-class FAR, FRR and utility when each query q uses its own threshold ``thresholds[q]``.

    ``embeddings`` (N, D), ``labels`` (N,), ``thresholds`` (N,) distances (or one number for all).
    Rates as in the module docstring (query-based ordered pairs); with one threshold for all samples
    they equal :func:`tcmlib.report.rates_at_threshold`. Streamed ``chunk_size`` query rows at a time.
    """
    x, y = check_embeddings_labels(embeddings, labels)
    n = x.shape[0]
    chunk = _check_chunk(chunk_size)
    b = _check_beta(beta)
    t = (torch.tensor(float(thresholds)) if isinstance(thresholds, (int, float))
         else as_tensor(thresholds, "thresholds")).double().cpu()
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"thresholds must be one finite distance per sample ({n},), got shape {tuple(t.shape)}")
    xn, lab, n_lab, num_neg = _prepare(x, y)
    if num_neg == 0:
        raise ValueError("there are no negative pairs: all samples share one label; a FAR needs >= 2 classes")
    eligible = n_lab >= 2  # (L,)
    if not bool(eligible.any()):
        raise ValueError("no class has >= 2 samples: per-class FRR needs positive pairs")
    fa, fr = _query_counts(xn, lab.to(xn.device), t, chunk)
    lab = lab.cpu()
    num_l = len(n_lab)
    fa_c = torch.bincount(lab, weights=fa.double(), minlength=num_l)  # (L,)
    fr_c = torch.bincount(lab, weights=fr.double(), minlength=num_l)
    n_l = n_lab.cpu().double()
    neg_c, pos_c = n_l * (n - n_l), n_l * (n_l - 1)  # ordered pairs with the query in the class
    e = eligible.cpu()
    return _method_rates(name, torch.unique(y).cpu()[e], fa_c[e] / neg_c[e], fr_c[e] / pos_c[e],
                         float(fa_c.sum() / neg_c.sum()), float(fr_c.sum() / pos_c.sum()), b)


# ----------------------------------------------------------------------------- the comparison
@dataclass
class ThresholdingComparison:
    """Global vs cluster vs per-class (oracle) thresholds on one evaluation set; see :func:`compare_thresholding`."""

    far_target: float
    threshold_source: str  # "calibration set" or "evaluation set itself"
    global_threshold: float
    clusters: ClusterThresholds
    class_thresholds: ClassThresholds
    methods: dict[str, MethodRates]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One dict per method: its name and :meth:`MethodRates.summary`."""
        return [{"method": name, **m.summary()} for name, m in self.methods.items()]

    def to_text(self) -> str:
        """A Markdown table: one column per method, one line per quantity."""
        names = list(self.methods)
        pct = lambda v: f"{100 * v:.2f} %"
        spec: list[tuple[str, str, Any]] = [
            ("global FAR", "global_FAR", pct), ("global FRR", "global_FRR", pct),
            ("per-class FAR, std", "FAR_std", pct), ("per-class FAR, min", "FAR_min", pct),
            ("per-class FAR, max", "FAR_max", pct), ("worst class (FAR)", "FAR_worst_class", str),
            ("per-class FRR, std", "FRR_std", pct), ("per-class FRR, min", "FRR_min", pct),
            ("per-class FRR, max", "FRR_max", pct), ("worst class (FRR)", "FRR_worst_class", str),
            ("inconsistency (var of utility)", "inconsistency", lambda v: f"{v:.3g}"),
        ]
        rows = self.rows
        out = [f"FAR target {pct(self.far_target)}; global and cluster thresholds chosen on the {self.threshold_source}",
               "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        out += [f"| {label} | " + " | ".join(fmt(r[key]) for r in rows) + " |" for label, key, fmt in spec]
        return "\n".join(out)

    def _repr_markdown_(self) -> str:
        return self.to_text()


def compare_thresholding(
    embeddings: Any,
    labels: Any,
    far_target: float = 1e-2,
    *,
    calibration: tuple[Any, Any] | None = None,
    n_clusters: int = 8,
    seed: int = 0,
    beta: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ThresholdingComparison:
    """Per-class FAR / FRR, their spread and the inconsistency of three rules on ``embeddings`` (N, D), ``labels`` (N,).

    - ``"global"``: one threshold, :func:`tcmlib.report.threshold_for_far` on ``calibration = (emb, labels)``
      when given, else on the evaluation set; rates by :func:`tcmlib.report.rates_at_threshold`.
    - ``"cluster"``: :func:`cluster_thresholds` (``n_clusters``, ``seed``) fitted on the same data as the
      global threshold, applied by nearest centroid (no evaluation labels used).
    - ``"per-class oracle"``: :func:`per_class_thresholds` on the evaluation set itself (uses its labels:
      an upper bound, not deployable).

    Each gets a :class:`MethodRates` (per-class FAR, FRR, utility, spread, ``inconsistency`` =
    ``Var_i U_i`` at the applied thresholds). Without a calibration set, the global and cluster
    thresholds are fitted in-sample, which flatters them; pass held-out data for an honest comparison.
    """
    x, y = check_embeddings_labels(embeddings, labels)
    far = _check_far(far_target)
    b = _check_beta(beta)
    if calibration is not None:
        cx, cy = _check_calibration(calibration, x.shape[1])
        source = "calibration set"
    else:
        cx, cy, source = x, y, "evaluation set itself"
    t = threshold_for_far(cx, cy, far, chunk_size=chunk_size)
    g = rates_at_threshold(x, y, t, chunk_size=chunk_size)
    clusters = cluster_thresholds(cx, cy, n_clusters, far, seed=seed, chunk_size=chunk_size)
    oracle = per_class_thresholds(x, y, far, chunk_size=chunk_size)
    methods = {
        "global": _method_rates("global", g.unit_ids, g.far, g.frr, g.global_far, g.global_frr, b),
        "cluster": query_rates(x, y, clusters.threshold_for(x), beta=b, name="cluster", chunk_size=chunk_size),
        "per-class oracle": query_rates(x, y, oracle.threshold_for(y), beta=b, name="per-class oracle",
                                        chunk_size=chunk_size),
    }
    return ThresholdingComparison(far, source, t, clusters, oracle, methods)
