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

Ties: equal similarities are ranked without looking at labels, as the expectation over a uniformly
random order of the tied candidates.  A query whose k-th nearest candidate ties with others gets the
probability of a hit at k; AP@R, R-precision and the reciprocal rank get their expected values
(formulas in :func:`_expected_under_ties`; the dense :mod:`tcmlib.metrics.reference` implements the
same rule).  So identical embeddings score at chance (R@1 = the mean of (class size - 1) / (N - 1)),
and no result depends on the order of the samples.  Ties are found in the running top-k, kept one
rank deeper than needed; a query whose tie at its deepest rank reaches past what was kept gets its
tied candidates counted in a second pass over the tiles that hold its row (none on tie-free data,
where every value is what it was before ties were handled).  pml / faiss break ties in an arbitrary
order, so on tied data they differ from these expectations; on tie-free data all agree.  The query
itself is never its own neighbour: the pair (q, q) is never formed, so a duplicate of the query
(another sample with the same vector) is a candidate like any other, tied with the query's other
duplicates.

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
inputs: the unit rows (N, D), one tile and the running top-k, N x (max k + 64) values (on a GPU
:class:`~tcmlib.metrics._pairs.DenseTopK`, N x max k, merges every tile densely: no host sync per tile).
"""

from __future__ import annotations

import numbers
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from tcmlib._checks import as_tensor, check_embeddings_labels
from tcmlib.metrics._pairs import SortedPairs, Tile, Want, flat_nonzero, make_topk, pair_tiles, sort_pairs

__all__ = ["RetrievalMetrics", "RetrievalTopK", "per_query_retrieval", "ranked_per_query", "recall_at_k", "map_at_r", "recall_and_map_at_r", "retrieval_metrics"]

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


class PerQuery(NamedTuple):
    """Per-query retrieval results, (N, ...) float64.  Where R = 0 (no relevant candidate): ``ap`` and
    ``r_precision`` NaN, ``hits`` and ``reciprocal_rank`` 0 (every average leaves these queries out).

    ``hits`` (N, len(ks)): 1 when a relevant candidate is among the k nearest (with ties: its
    probability); ``ap`` AP@R; ``r_precision`` (relevant among the R nearest) / R; ``reciprocal_rank``
    1 / rank of the nearest relevant candidate, 0 when none is among the ``max(ks)`` nearest (NaN
    without ks)."""

    hits: torch.Tensor
    ap: torch.Tensor
    r_precision: torch.Tensor
    reciprocal_rank: torch.Tensor


class RetrievalTopK:
    """Hits at each k, AP@R, R-precision and reciprocal rank of every query: a running top-k of the
    similarities, fed tile by tile (``add(tile)`` reads ``tile.sim``: every pair of the tile).

    ``pairs`` the sorted sides (``tcmlib.metrics._pairs.sort_pairs``; each query's R, its relevant
    candidates, is read off the sorted labels), ``ks`` checked, ``chunk_size`` the rows per tile of the
    pass (a second pass over the same tiles counts the rows whose tie at their deepest rank reaches past
    what the running top-k kept, :meth:`result`; never run on data without tied similarities).
    :func:`per_query_retrieval` drives one pass; :func:`tcmlib.metrics.evaluation.evaluate_embeddings` feeds it the
    tiles of OPIS's first pass.  ``to_r=False``: only the ``max(ks)`` nearest are ranked (enough for
    :meth:`recall`, far cheaper than ranking R); AP@R and R-precision are then NaN.
    """

    def __init__(self, pairs: SortedPairs, ks: list[int], chunk_size: int, *, to_r: bool = True) -> None:
        row_labels, col_labels = pairs.lab, pairs.col_side[1]
        # (N,) R: the candidates with the query's label (not counting the query itself in one set)
        r = (torch.searchsorted(col_labels, row_labels, right=True) - torch.searchsorted(col_labels, row_labels)
             - (1 if pairs.symmetric else 0))
        self.depth = torch.clamp(r if to_r else torch.zeros_like(r), min=max(ks, default=1))  # (N,) ranks needed, >= 1
        # one rank deeper: a tie between the depth-th and the next candidate shows (the ranks above are exact)
        self.topk = make_topk(self.depth + 1, row_labels, col_labels, pairs.rows.dtype)
        self.r, self.ks, self.symmetric, self.to_r = r, ks, pairs.symmetric, to_r
        self.pairs, self.chunk_size = pairs, chunk_size
        self.row_labels, self.col_labels = row_labels, col_labels

    def add(self, tile: Tile) -> None:
        sim = tile.sim
        if self.symmetric and tile.r0 == tile.c0:  # a diagonal block, upper triangle only: fill in the lower, feed once
            self.topk.add(tile.r0, tile.c0, torch.maximum(sim, sim.T))
        else:
            self.topk.add(tile.r0, tile.c0, sim)
            if self.symmetric:
                self.topk.add(tile.r0, tile.c0, sim, columns=True)

    def result(self) -> PerQuery:
        """The :class:`PerQuery` results, in the input order of the queries."""
        pq, order = self.per_query(), self.pairs.order
        out = []
        for t in pq:
            back = torch.empty_like(t)
            back[order] = t
            out.append(back)
        return PerQuery(*out)

    def recall(self) -> dict[int, float]:
        """``{k: Recall@k}`` over the queries with R >= 1 (as :func:`recall_at_k`)."""
        has_r = torch.empty_like(self.r, dtype=torch.bool)
        has_r[self.pairs.order] = self.r > 0  # in input order, as the hits
        valid = _valid(torch.where(has_r, 0.0, math.nan))  # (an error when no query has R >= 1)
        hits = self.result().hits
        return {int(k): float(v) for k, v in zip(self.ks, _average(hits, valid, None).tolist())}

    def per_query(self) -> PerQuery:
        """The :class:`PerQuery` results in the sorted order of the queries.

        Ties (equal similarities) count as the expectation over a uniformly random order of the tied
        candidates (:func:`_expected_under_ties`).  Rows without a tie among their ranks (all rows of
        tie-free data) take the plain formulas, bit for bit as before ties were handled.
        """
        val, rel = self.topk.ranked()  # (N, K + 1), most similar first
        return ranked_per_query(val, rel, self.r, self.depth, self.ks, self._count_equal, to_r=self.to_r)

    def _count_equal(self, rows: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(count, relevant)`` (S,) int64: candidates of each row of ``rows`` (S,) whose similarity equals its
        ``target`` (S,), and how many of them are relevant, from a second pass over the tiles those rows meet."""
        if not rows.numel():
            return rows.new_zeros(0), rows.new_zeros(0)
        n = self.row_labels.shape[0]
        goal = torch.full((n,), math.nan, dtype=target.dtype, device=target.device)  # NaN equals nothing
        goal[rows] = target
        need = torch.zeros(n, dtype=torch.bool, device=rows.device)
        need[rows] = True
        before = [0] + need.long().cumsum(0).tolist()  # rows needed before each index

        def wanted(a: int, b: int) -> bool:  # a needed row in [a, a + b)?
            return before[min(a + b, n)] > before[a]

        def want(r0: int, c0: int, b: int, w: int) -> bool:
            return wanted(r0, b) or (self.symmetric and r0 != c0 and wanted(c0, w))

        count = torch.zeros(n, dtype=torch.long, device=rows.device)
        relevant = torch.zeros(n, dtype=torch.long, device=rows.device)

        def tally(at: torch.Tensor, sim: torch.Tensor, cand_labels: torch.Tensor) -> None:
            """``sim`` (L, W): the similarities of rows ``at`` (L,) with candidates of ``cand_labels`` (W,)."""
            eq = sim == goal.index_select(0, at)[:, None]  # (L, W)
            count.index_add_(0, at, eq.sum(dim=1))
            same = cand_labels[None, :] == self.row_labels.index_select(0, at)[:, None]  # (L, W)
            relevant.index_add_(0, at, (eq & same).sum(dim=1))

        for tile in pair_tiles(self.pairs, self.chunk_size, want):
            r0, c0, sim = tile.r0, tile.c0, tile.sim
            if self.symmetric and r0 == c0:
                sim = torch.maximum(sim, sim.T)
            b, w = sim.shape
            loc = flat_nonzero(need[r0 : r0 + b])
            if loc.numel():
                tally(loc + r0, sim.index_select(0, loc), self.col_labels[c0 : c0 + w])
            if self.symmetric and r0 != c0:
                loc = flat_nonzero(need[c0 : c0 + w])
                if loc.numel():
                    tally(loc + c0, sim.index_select(1, loc).T, self.row_labels[r0 : r0 + b])
        return count.index_select(0, rows), relevant.index_select(0, rows)


def ranked_per_query(
    val: torch.Tensor, rel: torch.Tensor, r: torch.Tensor, depth: torch.Tensor, ks: list[int],
    count_equal: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], *, to_r: bool = True,
) -> PerQuery:
    """The :class:`PerQuery` results from every query's ranked candidates, most similar first.

    ``val`` (N, K + 1) similarities and ``rel`` (N, K + 1) relevance, exact down to rank ``depth + 1``
    (``depth`` (N,) = max(max(ks), R), one rank deeper so that a tie at the deepest rank shows); ``r`` (N,) R.
    Ties count as the expectation over a uniformly random order of the tied candidates
    (:func:`_expected_under_ties`).  ``count_equal(rows (S,), target (S,))`` gives, for rows whose tie at the
    deepest rank reaches past what was kept, all candidates equal to ``target`` and how many are relevant
    ``(count (S,), relevant (S,))``; it is called exactly once (``S`` may be 0), so a version that talks to
    other processes stays in step.
    """
    k_max = val.shape[1] - 1  # the deepest rank any query needs
    n, dev = val.shape[0], val.device
    col_k = torch.as_tensor([k - 1 for k in ks], dtype=torch.long, device=dev)  # (len(ks),)
    k_rr = max(ks, default=0)  # the reciprocal rank counts the nearest relevant within max(ks)
    rank = torch.arange(1, k_max + 1, device=dev, dtype=torch.float64)  # (K,) 1-based rank i
    hits = torch.zeros(n, len(ks), dtype=torch.float64, device=dev)
    ap, rp, rr = (torch.empty(n, dtype=torch.float64, device=dev) for _ in range(3))
    step = max(1, 2**22 // max(k_max, 1))  # rows at a time: the cumulative sums stay small
    for s0 in range(0, n, step):
        rl, rs = rel[s0 : s0 + step, :k_max], r[s0 : s0 + step]
        hits[s0 : s0 + step] = (rl.cumsum(dim=1)[:, col_k] > 0).double()  # any relevant within the top k
        rel_r = rl & (rank[None, :] <= rs[:, None])  # (B, K) rel(i) for i <= R only
        precision = rel_r.cumsum(dim=1) / rank  # (B, K) P(i), float64
        ap[s0 : s0 + step] = (precision * rel_r).sum(dim=1) / rs  # (B,) 0 / 0 = NaN where R = 0
        rp[s0 : s0 + step] = rel_r.sum(dim=1).double() / rs
        if k_rr:
            first = rl[:, :k_rr].double().argmax(dim=1)  # (B,) 0-based rank of the first relevant (0: none)
            rr[s0 : s0 + step] = torch.where(rl[:, :k_rr].any(dim=1), 1.0 / (first + 1).double(), 0.0)
        else:
            rr[s0 : s0 + step] = math.nan
    # rows with a tie among their exact ranks 1..depth+1: the expectation over the tie orders
    pos = torch.arange(k_max + 1, device=dev)
    tied_pair = (val[:, 1:] == val[:, :-1]) & (pos[None, 1:] <= depth[:, None])  # (N, K)
    tied = flat_nonzero(tied_pair.any(dim=1))  # (T,)
    rows, target = tied, val.new_empty(0)  # (S,) rows whose tie at the deepest rank reaches past the kept ranks
    if tied.numel():
        dep = depth.index_select(0, tied)
        v = val.index_select(0, tied)
        past = flat_nonzero(v.gather(1, dep[:, None] - 1).squeeze(1) == v.gather(1, dep[:, None]).squeeze(1))
        rows, target = tied.index_select(0, past), v.index_select(0, past).gather(1, dep.index_select(0, past)[:, None]).squeeze(1)
    g_all, h_all = count_equal(rows, target)  # all members of those ties (once, S may be 0)
    if tied.numel():
        at_last = (v == v.gather(1, dep[:, None])) & (pos[None, :] <= dep[:, None])  # (T, K + 1)
        g, h = at_last.sum(dim=1), (at_last & rel.index_select(0, tied)).sum(dim=1)  # (T,) kept members
        if past.numel():
            if bool((g_all < g.index_select(0, past)).any()):
                raise RuntimeError("the second pass over the tiles saw fewer tied similarities than the first: "
                                   "the tiles were not recomputed bit for bit")
            g.index_copy_(0, past, g_all)
            h.index_copy_(0, past, h_all)
        e = _expected_under_ties(v, rel.index_select(0, tied), dep, r.index_select(0, tied), g, h, ks, k_rr)
        for out, new in zip((hits, ap, rp, rr), e):
            out.index_copy_(0, tied, new)
    if not to_r:  # the ranks down to R were not kept
        ap.fill_(math.nan)
        rp.fill_(math.nan)
    return PerQuery(hits, ap, rp, rr)


def _expected_under_ties(
    val: torch.Tensor, rel: torch.Tensor, depth: torch.Tensor, r: torch.Tensor, g_last: torch.Tensor,
    h_last: torch.Tensor, ks: list[int], k_rr: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hits (T, len(ks)), ap, r_precision, reciprocal_rank)`` (T,) float64: the expectations over a
    uniformly random order of each group of tied candidates (the ranking never looks at labels).

    ``val``, ``rel`` (T, K + 1): each row's best candidates, most similar first, exact down to rank
    ``depth + 1`` (``depth`` (T,)); ``r`` (T,) R; ``g_last`` / ``h_last`` (T,): the size of the tie group at
    rank ``depth + 1`` and its relevant members, counted over all candidates.  At rank i inside a group of
    g tied candidates, h relevant, o of them ranked before i, A relevant candidates above the group:

        E[rel(i)] = h / g,        E[rel(i) P(i)] = (h/g (A + 1) + o h(h-1) / (g(g-1))) / i,
        P(no relevant within the top i) = prod over the group's first o + 1 places of (g - h - j) / (g - j)

    (0 when A > 0), from which hits at k, AP@R (Musgrave et al. 2020, eq. 2), R-precision and the
    reciprocal rank (sum_i (P(none in top i-1) - P(none in top i)) / i over i <= k_rr) follow.
    """
    t, k1 = val.shape
    pos = torch.arange(k1, device=val.device)  # (K + 1,) 0-based rank
    exact = pos[None, :] <= depth[:, None]  # (T, K + 1) the ranks known exactly
    new = torch.ones_like(exact)
    new[:, 1:] = val[:, 1:] != val[:, :-1]  # a group starts here
    start = torch.where(new, pos[None, :], 0).cummax(dim=1).values  # (T, K + 1) first rank of each one's group
    gid = new.long().cumsum(dim=1) - 1  # (T, K + 1) group index along the row
    rel_x = rel & exact
    g = torch.zeros(t, k1, dtype=torch.float64, device=val.device).scatter_add_(1, gid, exact.double()).gather(1, gid)
    h = torch.zeros(t, k1, dtype=torch.float64, device=val.device).scatter_add_(1, gid, rel_x.double()).gather(1, gid)
    last = val == val.gather(1, depth[:, None])  # (T, K + 1) in the group at rank depth + 1: counted in full
    g = torch.where(last, g_last.double()[:, None], g)
    h = torch.where(last, h_last.double()[:, None], h)
    a = torch.cat([rel_x.new_zeros(t, 1), rel_x], dim=1).long().cumsum(dim=1).gather(1, start).double()  # (T, K + 1)
    o = (pos[None, :] - start).double()  # (T, K + 1) group members ranked before
    rank = (pos + 1).double()  # (K + 1,)
    e_rel = h / g  # (T, K + 1)
    pair = torch.where(g > 1, h * (h - 1) / (g * (g - 1)).clamp(min=1), 0.0)
    in_r = rank[None, :] <= r[:, None]  # (T, K + 1) ranks i <= R (the ranks below are not exact: NaN there)
    rd = r.double()
    ap = torch.where(in_r, (e_rel * (a + 1) + o * pair) / rank, 0.0).sum(dim=1) / rd
    rp = torch.where(in_r, e_rel, 0.0).sum(dim=1) / rd
    factor = torch.where(a > 0, 0.0, ((g - h - o) / (g - o)).clamp(min=0))  # (T, K + 1)
    miss = factor.cumprod(dim=1)  # (T, K + 1) P(no relevant within the top i)
    hits = 1.0 - miss[:, [k - 1 for k in ks]]  # (T, len(ks))
    if k_rr:
        before = torch.cat([miss.new_ones(t, 1), miss[:, : k_rr - 1]], dim=1)  # (T, k_rr) P(none above i)
        rr = ((before - miss[:, :k_rr]) / rank[:k_rr]).sum(dim=1)
    else:
        rr = torch.full((t,), math.nan, dtype=torch.float64, device=val.device)
    return hits, ap, rp, rr


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
        ``(hits, ap_at_r)``, float64: ``hits`` (N, len(ks)), ``hits[q, j]`` = 1 when some of the ks[j]
        nearest candidates of q shares its label, else 0 (0 where R = 0; with tied similarities at
        rank ks[j], the probability of a hit under a random order of the tie); ``ap_at_r`` (N,), the
        AP@R of each query (eq. 2 of Musgrave et al. 2020; its expectation under ties), NaN where R = 0.
        :func:`retrieval_metrics` adds R-precision and the reciprocal rank.
    """
    pq = _per_query(embeddings, labels, ks, chunk_size, reference, reference_labels)[0]
    return pq.hits, pq.ap


def _per_query(
    embeddings: Any, labels: Any, ks: Sequence[int], chunk_size: int | None, reference: Any, reference_labels: Any
) -> tuple[PerQuery, list[int], torch.Tensor]:
    """``(per-query results in input order, checked ks, labels (N,))``: one streamed pass."""
    x, y = check_embeddings_labels(embeddings, labels)
    n = x.shape[0]
    chunk = _check_chunk(chunk_size)
    with torch.no_grad():
        if reference is None and reference_labels is None:
            if n < 2:
                raise ValueError(f"need at least 2 samples (a query and one other), got N = {n}")
            ks = _check_ks(ks, n - 1)
            pairs = sort_pairs(x, y)
        else:
            g, gy = _check_reference(x, reference, reference_labels)
            ks = _check_ks(ks, g.shape[0], "reference items per query")
            pairs = sort_pairs(x, y, g, gy)  # both sides sorted, as tcmlib.metrics.opis does
        acc = RetrievalTopK(pairs, ks, chunk)
        for tile in pair_tiles(pairs, chunk):
            acc.add(tile)
        return acc.result(), ks, y


@dataclass(frozen=True)
class RetrievalMetrics:
    """Recall@k, MAP@R, R-precision and MRR, averaged and per class, from one pass.

    ``recall`` ``{k: R@k}``; ``map_at_r``; ``r_precision``: mean of (relevant among the R nearest) / R;
    ``mrr``: mean reciprocal rank of the nearest relevant candidate, 0 when none is among the
    ``max(ks)`` nearest (pml's ``AccuracyCalculator(k=max(ks))``; NaN without ks).  All averaged over
    the queries with R >= 1 (or over groups).  ``classes`` (C,): the labels of those queries, ascending;
    ``per_class[name]`` (C,) float64: each class's mean over its queries (pml's ``return_per_class``),
    for ``name`` in ``"R@k"`` (each k), ``"MAP@R"``, ``"R_precision"``, ``"MRR"``.  ``per_query``: the
    :class:`PerQuery` values in input order.
    """

    recall: dict[int, float]
    map_at_r: float
    r_precision: float
    mrr: float
    classes: torch.Tensor
    per_class: dict[str, torch.Tensor]
    per_query: PerQuery

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{"R@1": ..., "MAP@R": ..., "R_precision": ..., "MRR": ...}``, each key after ``prefix``."""
        out = {f"{prefix}R@{k}": v for k, v in self.recall.items()}
        out.update({f"{prefix}MAP@R": self.map_at_r, f"{prefix}R_precision": self.r_precision,
                    f"{prefix}MRR": self.mrr})
        return out


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int | None = None,
    groups: Any = None,
    reference: Any = None,
    reference_labels: Any = None,
) -> RetrievalMetrics:
    """Recall@k, MAP@R, R-precision and MRR of ``embeddings`` (N, D) with ``labels`` (N,), averaged and per
    class, from the one streamed pass of :func:`per_query_retrieval` (same arguments; ``groups`` as in
    :func:`recall_at_k`).  Equal to pml's ``AccuracyCalculator(k=max(ks))`` for MRR and, with
    ``k="max_bin_count"``, for the others, ``return_per_class=True`` for ``per_class`` (tie-free data).
    """
    pq, ks, y = _per_query(embeddings, labels, ks, chunk_size, reference, reference_labels)
    g = None if groups is None else _check_groups(groups, pq.ap.shape[0])
    valid = _valid(pq.ap)
    recall = _average(pq.hits, valid, g)
    names = [f"R@{k}" for k in ks] + ["MAP@R", "R_precision", "MRR"]
    table = torch.cat([pq.hits, pq.ap[:, None], pq.r_precision[:, None], pq.reciprocal_rank[:, None]], dim=1)
    classes, means = _group_means(table, valid, y.to(valid.device))  # (C,), (C, len(ks) + 3)
    return RetrievalMetrics(
        recall={int(k): float(v) for k, v in zip(ks, recall.tolist())}, map_at_r=float(_average(pq.ap, valid, g)),
        r_precision=float(_average(pq.r_precision, valid, g)), mrr=float(_average(pq.reciprocal_rank, valid, g)),
        classes=classes.cpu(), per_class={name: means[:, j].cpu() for j, name in enumerate(names)}, per_query=pq,
    )


def _group_means(per_query: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (G,), means (G, ...))``: the mean of the valid queries' (N, ...) values per group id, ids ascending."""
    per_query = per_query[valid].double()  # (Q, ...)
    ids, g = torch.unique(groups.to(valid.device)[valid], return_inverse=True)  # (Q,) group index 0..G-1
    n_groups = int(g.max()) + 1
    sums = torch.zeros((n_groups,) + per_query.shape[1:], dtype=torch.float64, device=per_query.device)
    sums.index_add_(0, g, per_query)  # (G, ...)
    sizes = torch.bincount(g, minlength=n_groups).double()  # (G,)
    return ids, sums / sizes.reshape((-1,) + (1,) * (per_query.ndim - 1))


def _average(per_query: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Mean over valid queries of (N, ...) values; with groups: the mean over groups of per-group means."""
    if groups is None:
        return per_query[valid].double().mean(dim=0)
    return _group_means(per_query, valid, groups)[1].mean(dim=0)


def _valid(ap: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the queries with R >= 1 (AP@R not NaN); an error when there is none."""
    valid = ~torch.isnan(ap)
    if not bool(valid.any()):
        raise ValueError(
            "no query has a relevant candidate (every label occurs only once, or no query label occurs in "
            "the reference set): Recall@k and MAP@R are undefined (pass data with repeated labels)"
        )
    return valid


def average_retrieval(
    hits: torch.Tensor, ap: torch.Tensor, ks: Sequence[int], groups: Any = None
) -> tuple[dict[int, float], float]:
    """``({k: Recall@k}, MAP@R)`` from per-query ``hits`` (N, len(ks)) and ``ap`` (N,) (NaN = no relevant
    candidate, left out); with ``groups`` (N,), the mean over groups of the per-group means."""
    g = None if groups is None else _check_groups(groups, hits.shape[0])
    valid = _valid(ap)  # (N,) queries with R >= 1
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
