"""Recall@k and MAP@R, exact and streamed over row blocks of the similarity matrix.

Protocol (the standard deep-metric-learning one, as in pytorch-metric-learning's
``AccuracyCalculator`` with the reference set equal to the query set):

- every sample is a query; its database is all *other* samples (leave-one-out);
- neighbours are ranked by cosine similarity of L2-normalised embeddings, most similar first;
- a neighbour is relevant when it has the query's label.

Recall@k (Musgrave et al. 2020 call R@1 "precision at 1"): a query is a *hit* at k when at least
one of its k nearest others is relevant; Recall@k = share of hits.

MAP@R (Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020, eq. 2): with
R = number of other samples of the query's label (class count - 1),

    AP@R = (1 / R) * sum_{i=1..R} P(i) * rel(i),   P(i) = (1 / i) * sum_{j=1..i} rel(j),

where rel(i) = 1 when the i-th nearest other sample is relevant; MAP@R = mean of AP@R.

Singletons (queries whose class has one sample, R = 0): they have no relevant item, so Recall@k
and AP@R are undefined for them.  Like pytorch-metric-learning (its ``not_lone_query_mask``),
we leave them out of every average; they still serve as database items for the other queries.
Where pml returns NaN (no query has R >= 1) we raise ``ValueError``.

Ties: the order among exactly equal similarities is unspecified (the running top-k keeps the one
seen first, ``torch.topk`` orders them as it likes; so does faiss).  With exact duplicates in the data, results may therefore differ from
pml / faiss in the tied positions; on tie-free data all three agree.  The query itself is never
its own neighbour: the pair (q, q) is never formed, so a duplicate of the query (another
sample with the same vector) is a neighbour like any other.

Query / gallery: with a separate ``reference`` set (and ``reference_labels``) every query ranks all
reference items (none is removed: the sets are disjoint), R = the number of reference items with the
query's label, and queries with R = 0 are left out.  This is pml's ``AccuracyCalculator.get_accuracy(
query, query_labels, reference, reference_labels, ref_includes_query=False)``.

Cost: one pass over the pairs (``tcmlib.metrics._pairs``).  Without a reference set the
similarity matrix is symmetric and only its upper triangle is computed: half a full GEMM, first the
``chunk_size``-square blocks on the diagonal (with labels sorted, they hold each query's own class),
then ``chunk_size`` rows by 4096 columns at a time, each tile serving its rows and (transposed) its
columns.  A running top-k per query (k = max(ks) and the query's R) is merged exactly; once it has
filled, a tile costs one read for the maxima of small cells and little else.  Memory beyond the
inputs: the unit rows (N, D), up to three tiles (on the CPU the next ones are computed ahead in a
worker thread) and the running top-k, N x (max k + 64) values.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from tcmlib._checks import as_tensor, check_embeddings_labels
from tcmlib.metrics._pairs import TopK, cross_tiles, unit_rows, upper_tiles

__all__ = ["per_query_retrieval", "recall_at_k", "map_at_r", "recall_and_map_at_r"]

DEFAULT_CHUNK_SIZE = 1024  # rows of the similarity matrix per tile (as tcmlib.metrics.opis)


def _check_ks(ks: Sequence[int], n: int, what: str = "other samples per query") -> list[int]:
    """ks must be positive ints with k <= n (n = the number of candidates a query ranks)."""
    if isinstance(ks, numbers.Integral) and not isinstance(ks, (bool, np.bool_)):
        ks = [int(ks)]
    if isinstance(ks, (np.ndarray, torch.Tensor)):
        ks = ks.tolist() if ks.ndim else [ks.item()]
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise ValueError(f"ks must be a positive int or a sequence of them, got {ks!r}")
    out: list[int] = []
    for k in ks:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"every k must be a positive int, got {k!r} in ks = {ks!r}")
        if k > n:
            raise ValueError(f"k = {k} but there are only {n} {what}; use k <= {n}")
        out.append(int(k))
    return out


def _check_chunk(chunk_size: int | None) -> int:
    if chunk_size is None:
        return DEFAULT_CHUNK_SIZE
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)


def _check_groups(groups: Any, n: int) -> torch.Tensor:
    g = as_tensor(groups, "groups")
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must have shape ({n},) (one id per query), got {tuple(g.shape)}")
    if torch.is_floating_point(g) or g.dtype == torch.bool or torch.is_complex(g):
        raise ValueError(f"groups must hold integer ids, got dtype {g.dtype}")
    return g.long()


def _check_reference(x: torch.Tensor, reference: Any, reference_labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A separate reference (gallery) set: ``(M, D)`` embeddings and ``(M,)`` labels, checked."""
    if reference is None or reference_labels is None:
        raise ValueError("pass reference and reference_labels together (or neither, for leave-one-out)")
    r, ry = check_embeddings_labels(reference, reference_labels, emb_name="reference",
                                    label_name="reference_labels")
    if r.shape[1] != x.shape[1]:
        raise ValueError(f"reference has dimension {r.shape[1]} but the queries {x.shape[1]}: both must come "
                         "from the same embedder")
    return r.to(x.device), ry.to(x.device)


class RetrievalPass:
    """Hits at each k and AP@R of every query, from tiles of similarities fed in any order.

    ``row_labels`` (N,) of the queries, ``col_labels`` (M,) of the candidates, sorted ascending (each
    query's R, its relevant candidates, is read off them).  ``symmetric``: the tiles come from
    ``tcmlib.metrics._pairs.upper_tiles`` (queries = candidates) and each also serves its columns.  :func:`per_query_retrieval` drives one
    pass; :func:`tcmlib.metrics.evaluation.evaluate` lets it ride on OPIS's first pass.
    """

    def __init__(self, row_labels: torch.Tensor, col_labels: torch.Tensor, ks: list[int], *, symmetric: bool,
                 dtype: torch.dtype) -> None:
        # (N,) R: the candidates with the query's label (not counting the query itself in one set)
        r = (torch.searchsorted(col_labels, row_labels, right=True) - torch.searchsorted(col_labels, row_labels)
             - (1 if symmetric else 0))
        depth = torch.clamp(r, min=max(ks, default=1))  # (N,) deepest rank each query needs, >= 1
        self.topk = TopK(depth, row_labels, col_labels, dtype)
        self.r, self.ks, self.symmetric = r, ks, symmetric

    def add(self, r0: int, c0: int, sim: torch.Tensor) -> None:
        if self.symmetric and r0 == c0:  # a diagonal block, upper triangle only: fill in the lower, feed once
            self.topk.add(r0, c0, torch.maximum(sim, sim.T))
        else:
            self.topk.add(r0, c0, sim)
            if self.symmetric:
                self.topk.add(r0, c0, sim, columns=True)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hits (N, len(ks)) bool, ap (N,) float64)`` in the order of ``row_labels``; NaN AP where R = 0."""
        rel = self.topk.ranked()[1]  # (N, K) rel(i), most similar first
        n, k_max = rel.shape
        col_k = torch.as_tensor([k - 1 for k in self.ks], dtype=torch.long, device=rel.device)  # (len(ks),)
        rank = torch.arange(1, k_max + 1, device=rel.device, dtype=torch.float64)  # (K,) 1-based rank i
        hits = torch.zeros(n, len(self.ks), dtype=torch.bool, device=rel.device)
        ap = torch.empty(n, dtype=torch.float64, device=rel.device)
        step = max(1, 2**22 // k_max)  # rows at a time: the cumulative sums stay small
        for s0 in range(0, n, step):
            rl, r = rel[s0 : s0 + step], self.r[s0 : s0 + step]
            hits[s0 : s0 + step] = rl.cumsum(dim=1)[:, col_k] > 0  # any relevant within the top k
            rel_r = rl & (rank[None, :] <= r[:, None])  # (B, K) rel(i) for i <= R only
            precision = rel_r.cumsum(dim=1) / rank  # (B, K) P(i), float64
            ap[s0 : s0 + step] = (precision * rel_r).sum(dim=1) / r  # (B,) 0 / 0 = NaN where R = 0
        return hits, ap


def sort_by_label(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(unit rows (N, D), labels (N,), order (N,))`` sorted by label (stable): the order every pass uses,
    so that the positives of a row block lie in one band of columns."""
    order = torch.argsort(y, stable=True)
    return unit_rows(x)[order].contiguous(), y[order], order


def per_query_retrieval(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int | None = None,
    reference: Any = None,
    reference_labels: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query hits at each k and AP@R, in one streamed pass (see the module docstring).

    Args:
        embeddings: (N, D) floats, the queries; normalised here (cosine similarity).  float64 stays
            float64, other dtypes are computed in float32.
        labels: (N,) integer class ids.
        ks: positive ints, each < N (each <= M with a reference set); may be empty (only AP@R).
        chunk_size: rows per similarity tile (default 1024; tiles are 1024 x 4096).
        reference, reference_labels: optional separate gallery, (M, D) and (M,); then every query
            ranks all M items (none is the query itself).

    Returns:
        ``(hits, ap_at_r)``: ``hits`` is (N, len(ks)) bool, ``hits[q, j]`` = some of the ks[j]
        nearest candidates of q shares its label (always False where R = 0); ``ap_at_r`` is (N,)
        float64, the AP@R of each query (eq. 2 of Musgrave et al. 2020), NaN where R = 0.
    """
    x, y = check_embeddings_labels(embeddings, labels)
    n = x.shape[0]
    chunk = _check_chunk(chunk_size)
    with torch.no_grad():
        if reference is None and reference_labels is None:
            if n < 2:
                raise ValueError(f"need at least 2 samples (a query and one other), got N = {n}")
            ks = _check_ks(ks, n - 1)
            xs, ys, order = sort_by_label(x, y)
            acc = RetrievalPass(ys, ys, ks, symmetric=True, dtype=xs.dtype)
            for r0, c0, sim in upper_tiles(xs, chunk):
                acc.add(r0, c0, sim)
            hits_s, ap_s = acc.result()
            hits, ap = torch.empty_like(hits_s), torch.empty_like(ap_s)
            hits[order], ap[order] = hits_s, ap_s
            return hits, ap
        g, gy = _check_reference(x, reference, reference_labels)
        ks = _check_ks(ks, g.shape[0], "reference items per query")
        qn, qy, order = sort_by_label(x, y)  # both sides sorted, as tcmlib.metrics.opis does
        gn, gy, _ = sort_by_label(g, gy)
        work = torch.promote_types(qn.dtype, gn.dtype)
        acc = RetrievalPass(qy, gy, ks, symmetric=False, dtype=work)
        for r0, c0, sim in cross_tiles(qn.to(work), gn.to(work), chunk):
            acc.add(r0, c0, sim)
        hits_s, ap_s = acc.result()
        hits, ap = torch.empty_like(hits_s), torch.empty_like(ap_s)
        hits[order], ap[order] = hits_s, ap_s
        return hits, ap


def _average(per_query: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Mean over valid queries of (Q, ...) values; with groups: the mean over groups of per-group means."""
    per_query = per_query[valid].double()  # (Q, ...)
    if groups is None:
        return per_query.mean(dim=0)
    _, g = torch.unique(groups.to(valid.device)[valid], return_inverse=True)  # (Q,) group index 0..G-1
    n_groups = int(g.max()) + 1
    sums = torch.zeros((n_groups,) + per_query.shape[1:], dtype=torch.float64, device=per_query.device)
    sums.index_add_(0, g, per_query)  # (G, ...)
    sizes = torch.bincount(g, minlength=n_groups).double()  # (G,)
    return (sums / sizes.reshape((-1,) + (1,) * (per_query.ndim - 1))).mean(dim=0)


def average_retrieval(
    hits: torch.Tensor, ap: torch.Tensor, ks: Sequence[int], groups: Any = None
) -> tuple[dict[int, float], float]:
    """``({k: Recall@k}, MAP@R)`` from per-query ``hits`` (N, len(ks)) and ``ap`` (N,) (NaN = no relevant
    candidate, left out); with ``groups`` (N,), the mean over groups of the per-group means."""
    g = None if groups is None else _check_groups(groups, hits.shape[0])
    valid = ~torch.isnan(ap)  # (N,) queries with R >= 1
    if not bool(valid.any()):
        raise ValueError(
            "no query has a relevant candidate (every label occurs only once, or no query label occurs in "
            "the reference set): Recall@k and MAP@R are undefined (pass data with repeated labels)"
        )
    recall = _average(hits, valid, g)  # (len(ks),)
    return {int(k): float(v) for k, v in zip(ks, recall.tolist())}, float(_average(ap, valid, g))


def recall_and_map_at_r(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int | None = None,
    groups: Any = None,
    reference: Any = None,
    reference_labels: Any = None,
) -> tuple[dict[int, float], float]:
    """Recall@k for each k and MAP@R from one pass; same conventions as :func:`recall_at_k` / :func:`map_at_r`."""
    hits, ap = per_query_retrieval(embeddings, labels, ks, chunk_size=chunk_size, reference=reference,
                                   reference_labels=reference_labels)
    return average_retrieval(hits, ap, _check_ks(ks, 2**62), groups)  # ks checked against N above


def recall_at_k(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int | None = None,
    groups: Any = None,
    reference: Any = None,
    reference_labels: Any = None,
) -> dict[int, float]:
    """Recall@k: share of queries with a same-label item among their k nearest candidates.

    Args:
        embeddings: (N, D) queries; labels: (N,) ints; ks: positive ints < N (<= M with a reference).
        chunk_size: rows per similarity tile (default 1024).
        groups: optional (N,) ints.  Then the result is the mean over groups of each group's recall
            (every group weighs the same; groups holding only singletons are skipped).  With
            ``groups=labels`` this is pml's ``avg_of_avgs=True``.
        reference, reference_labels: optional separate gallery (M, D), (M,): the candidates of every
            query (pml's ``get_accuracy(query, query_labels, reference, reference_labels,
            ref_includes_query=False)``).  Without them: leave-one-out on the embeddings themselves.

    Returns:
        ``{k: recall}``, a fraction in [0, 1], averaged over the queries with at least one relevant
        candidate (as pml does).  R@1 equals pml's ``precision_at_1``.  Keyed by the int k; the
        named key ``"R@k"`` is the scheme of :mod:`tcmlib.metrics.evaluation`.
    """
    return recall_and_map_at_r(embeddings, labels, ks, chunk_size=chunk_size, groups=groups, reference=reference,
                               reference_labels=reference_labels)[0]


def map_at_r(
    embeddings: Any,
    labels: Any,
    *,
    chunk_size: int | None = None,
    groups: Any = None,
    reference: Any = None,
    reference_labels: Any = None,
) -> float:
    """MAP@R (Musgrave et al. 2020, eq. 2), a fraction in [0, 1]: mean AP@R over queries with R >= 1.

    Equals pml's ``AccuracyCalculator(include=("mean_average_precision_at_r",), k="max_bin_count")``
    with ``get_accuracy(x, labels)`` (query set = reference set) on L2-normalised, tie-free data, and
    with a ``reference`` set ``get_accuracy(x, labels, reference, reference_labels, False)``.
    ``groups``: as in :func:`recall_at_k` (``groups=labels`` = pml's ``avg_of_avgs=True``).
    """
    return recall_and_map_at_r(embeddings, labels, (), chunk_size=chunk_size, groups=groups, reference=reference,
                               reference_labels=reference_labels)[1]
