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

Ties: neighbours come from ``torch.topk``, whose order among exactly equal similarities is
unspecified (so is faiss's).  With exact duplicates in the data, results may therefore differ from
pml / faiss in the tied positions; on tie-free data all three agree.  The query itself is never
its own neighbour: its similarity to itself is set to -inf, so a duplicate of the query (another
sample with the same vector) is a neighbour like any other.

Cost: O(N^2 D) multiply-adds, streamed: ``chunk_size`` queries at a time, a (chunk_size, N)
similarity block is computed, its top-K kept (K = max(ks) and / or the largest R), and the block
dropped.  Memory beyond the inputs: the normalised copy (N, D) and one block; never N x N.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from tcmlib._checks import as_tensor, check_embeddings_labels
from tcmlib.normalize import l2_normalize

__all__ = ["per_query_retrieval", "recall_at_k", "map_at_r", "recall_and_map_at_r"]

BLOCK_ELEMENTS = 2**25  # default similarity block: 2^25 float32 values = 128 MiB


def _check_ks(ks: Sequence[int], n: int) -> list[int]:
    """ks must be positive ints with k < N (a query has N - 1 others)."""
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
        if k >= n:
            raise ValueError(f"k = {k} but there are only {n - 1} other samples per query (N = {n}); use k < N")
        out.append(int(k))
    return out


def _check_groups(groups: Any, n: int) -> torch.Tensor:
    g = as_tensor(groups, "groups")
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must have shape ({n},) (one id per sample), got {tuple(g.shape)}")
    if torch.is_floating_point(g) or g.dtype == torch.bool or torch.is_complex(g):
        raise ValueError(f"groups must hold integer ids, got dtype {g.dtype}")
    return g.long()


def per_query_retrieval(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query hits at each k and AP@R, in one streamed pass (see the module docstring).

    Args:
        embeddings: (N, D) floats; normalised here (cosine similarity).  float64 stays float64,
            other dtypes are computed in float32.
        labels: (N,) integer class ids.
        ks: positive ints, each < N; may be empty (then only AP@R is computed).
        chunk_size: queries per block; default ``2**25 // N`` (a 128 MiB float32 block).

    Returns:
        ``(hits, ap_at_r)``: ``hits`` is (N, len(ks)) bool, ``hits[q, j]`` = some of the ks[j]
        nearest others of q shares its label (always False for singletons); ``ap_at_r`` is (N,)
        float64, the AP@R of each query (eq. 2 of Musgrave et al. 2020), NaN for singletons.
    """
    x, y = check_embeddings_labels(embeddings, labels)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples (a query and one other), got N = {n}")
    ks = _check_ks(ks, n)
    if chunk_size is None:
        chunk_size = max(1, BLOCK_ELEMENTS // n)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    device = x.device
    with torch.no_grad():
        x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        x = l2_normalize(x, dim=1)  # (N, D), unit rows: dot product = cosine similarity
        _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
        r_all = counts[inverse] - 1  # (N,) R = other samples of the same label
        k_max = max(ks + [int(r_all.max())])  # deepest rank any metric needs, <= N - 1
        col_k = torch.as_tensor([k - 1 for k in ks], dtype=torch.long, device=device)  # (len(ks),)
        rank = torch.arange(1, k_max + 1, device=device, dtype=torch.float64)  # (K,) 1-based rank i

        hits = torch.zeros(n, len(ks), dtype=torch.bool, device=device)  # (N, len(ks))
        ap = torch.empty(n, dtype=torch.float64, device=device)  # (N,)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            sim = x[start:end] @ x.T  # (B, N)
            sim.diagonal(offset=start).fill_(float("-inf"))  # (i, start + i): a query is not its own neighbour
            nn_idx = sim.topk(k_max, dim=1).indices  # (B, K), most similar first
            del sim
            rel = y[nn_idx] == y[start:end, None]  # (B, K) rel(i)
            hits[start:end] = rel.cumsum(dim=1)[:, col_k] > 0  # (B, len(ks)) any relevant within the top k
            r = r_all[start:end]  # (B,)
            rel_r = rel & (rank[None, :] <= r[:, None])  # (B, K) rel(i) for i <= R only
            precision = rel_r.cumsum(dim=1) / rank  # (B, K) P(i), float64
            ap[start:end] = (precision * rel_r).sum(dim=1) / r  # (B,) 0 / 0 = NaN for singletons
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


def recall_and_map_at_r(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int | None = None,
    groups: Any = None,
) -> tuple[dict[int, float], float]:
    """Recall@k for each k and MAP@R from one pass; same conventions as :func:`recall_at_k` / :func:`map_at_r`."""
    hits, ap = per_query_retrieval(embeddings, labels, ks, chunk_size=chunk_size)
    n = hits.shape[0]
    g = None if groups is None else _check_groups(groups, n)
    valid = ~torch.isnan(ap)  # (N,) non-singleton queries
    if not bool(valid.any()):
        raise ValueError(
            "every label occurs only once, so no query has a relevant neighbour: "
            "Recall@k and MAP@R are undefined (pass data with at least one repeated label)"
        )
    recall = _average(hits, valid, g)  # (len(ks),)
    ks_list = _check_ks(ks, n)
    return {k: float(v) for k, v in zip(ks_list, recall.tolist())}, float(_average(ap, valid, g))


def recall_at_k(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int | None = None,
    groups: Any = None,
) -> dict[int, float]:
    """Recall@k: share of queries with a same-label sample among their k nearest others.

    Args:
        embeddings: (N, D); labels: (N,) ints; ks: positive ints < N.
        chunk_size: queries per similarity block (default: a 128 MiB block).
        groups: optional (N,) ints.  Then the result is the mean over groups of each group's recall
            (every group weighs the same; groups holding only singletons are skipped).  With
            ``groups=labels`` this is pml's ``avg_of_avgs=True``.

    Returns:
        ``{k: recall}``, averaged over the queries that are not singletons (as pml does).
        R@1 equals pml's ``precision_at_1``.
    """
    return recall_and_map_at_r(embeddings, labels, ks, chunk_size=chunk_size, groups=groups)[0]


def map_at_r(
    embeddings: Any,
    labels: Any,
    *,
    chunk_size: int | None = None,
    groups: Any = None,
) -> float:
    """MAP@R (Musgrave et al. 2020, eq. 2): mean AP@R over queries that are not singletons.

    Equals pml's ``AccuracyCalculator(include=("mean_average_precision_at_r",), k="max_bin_count")``
    with ``get_accuracy(x, labels)`` (query set = reference set) on L2-normalised, tie-free data.
    ``groups``: as in :func:`recall_at_k` (``groups=labels`` = pml's ``avg_of_avgs=True``).
    """
    return recall_and_map_at_r(embeddings, labels, (), chunk_size=chunk_size, groups=groups)[1]
