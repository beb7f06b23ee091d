"""Retrieval with tied similarities: the expectation over a random order of the tied candidates.

Oracles: every order of every tie group, enumerated, on tiny sets (the definition itself); the dense
reference (:mod:`tcmlib.metrics.reference`, one ``N x N`` matrix) on larger ones, across tile
boundaries; pytorch-metric-learning's ``AccuracyCalculator`` for R-precision, MRR and per-class
results on tie-free data, where the values are unchanged bit for bit.
"""

from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import pytest
import torch

from tcmlib.metrics import _pairs, evaluate_embeddings, per_query_retrieval, recall_and_map_at_r, reference
from tcmlib.metrics.retrieval import retrieval_metrics

retrieval_module = importlib.import_module("tcmlib.metrics.retrieval")
opis_module = importlib.import_module("tcmlib.metrics.opis")


def exact_points(n: int, seed: int, kinds: int = 24, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, 4) rows drawn from 24 directions whose unit vectors and cosines are exact in any order of
    summation: the 16 sign patterns (+-1)^4 (norm 2, entries +-1/2) and the 8 signed unit axes; every
    cosine is a multiple of 1/4, so ties are exact ties on every tile, in float32 and float64."""
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)))
    axes = torch.cat([torch.eye(4), -torch.eye(4)]) * 2.0
    dirs = torch.cat([signs, axes])[:kinds]  # (24, 4)
    g = torch.Generator().manual_seed(seed)
    return dirs[torch.randint(0, len(dirs), (n,), generator=g)].to(dtype)


# ---------------------------------------------------------------- the definition, enumerated
def enumerated(sims: list[float], rel: list[bool], ks: list[int]) -> tuple[list[float], float, float, float]:
    """Mean over every order of the tied candidates of (hits at each k, AP@R, R-precision, reciprocal rank
    within max(ks)), each order ranked by the plain formulas."""
    groups: dict[float, list[bool]] = {}
    for s, r in zip(sims, rel):
        groups.setdefault(s, []).append(r)
    keys = sorted(groups, reverse=True)
    orders = [list(set(itertools.permutations(groups[k]))) for k in keys]  # distinct orders, equally likely
    weights = [1.0 / len(o) for o in orders]
    big_r = sum(rel)
    tot, total_w = [0.0] * (len(ks) + 3), 0.0
    for choice in itertools.product(*orders):
        w = math.prod(weights)
        ranked = [r for part in choice for r in part]
        vals = [float(any(ranked[:k])) for k in ks]
        ap = sum(sum(ranked[:i]) / i for i in range(1, big_r + 1) if ranked[i - 1]) / big_r
        rp = sum(ranked[:big_r]) / big_r
        first = next((i for i, r in enumerate(ranked[: max(ks)]) if r), None)
        rr = 0.0 if first is None else 1.0 / (first + 1)
        for j, v in enumerate(vals + [ap, rp, rr]):
            tot[j] += w * v
        total_w += w
    assert total_w == pytest.approx(1.0)
    return tot[: len(ks)], tot[-3], tot[-2], tot[-1]


def enumerated_oracle(q: torch.Tensor, qy: torch.Tensor, g: torch.Tensor | None = None, gy: torch.Tensor | None = None,
                      ks: list[int] = [1, 2, 3]):  # noqa: B006
    """Per query: (hits, AP@R, R-precision, RR) by enumeration; None for queries with R = 0."""
    qn = q.double() / q.double().norm(dim=1, keepdim=True)
    gn = qn if g is None else g.double() / g.double().norm(dim=1, keepdim=True)
    gl = qy if gy is None else gy
    out = []
    for i in range(len(qy)):
        cand = [j for j in range(len(gl)) if g is not None or j != i]
        rel = [bool(gl[j] == qy[i]) for j in cand]
        if not any(rel):
            out.append(None)
            continue
        sims = [round(float(qn[i] @ gn[j]) * 4) / 4 for j in cand]  # multiples of 1/4: exact keys
        out.append(enumerated(sims, rel, ks))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_tiny_sets_equal_every_order_enumerated(seed, dtype, chunk_size) -> None:
    n = 7
    x = exact_points(n, seed, kinds=5, dtype=dtype)  # 5 directions for 7 points: many ties
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(100 + seed))
    ks = [1, 2, 3]
    want = enumerated_oracle(x, y, ks=ks)
    rm = retrieval_metrics(x, y, ks, chunk_size=chunk_size)
    pq = rm.per_query
    for i, w in enumerate(want):
        if w is None:
            assert math.isnan(pq.ap[i]) and math.isnan(pq.r_precision[i])
            continue
        hits, ap, rp, rr = w
        np.testing.assert_allclose(pq.hits[i].tolist(), hits, rtol=0, atol=1e-12)
        assert (float(pq.ap[i]), float(pq.r_precision[i]), float(pq.reciprocal_rank[i])) == pytest.approx(
            (ap, rp, rr), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_tiny_gallery_equals_every_order_enumerated(seed, chunk_size) -> None:
    q, g = exact_points(5, seed, kinds=4), exact_points(7, seed + 50, kinds=4)
    gen = torch.Generator().manual_seed(200 + seed)
    qy, gy = torch.randint(0, 2, (5,), generator=gen), torch.randint(0, 2, (7,), generator=gen)
    want = enumerated_oracle(q, qy, g, gy, ks=[1, 2, 3])
    rm = retrieval_metrics(q, qy, [1, 2, 3], chunk_size=chunk_size, reference=g, reference_labels=gy)
    for i, w in enumerate(want):
        if w is None:
            continue
        hits, ap, rp, rr = w
        np.testing.assert_allclose(rm.per_query.hits[i].tolist(), hits, rtol=0, atol=1e-12)
        assert (float(rm.per_query.ap[i]), float(rm.per_query.r_precision[i]),
                float(rm.per_query.reciprocal_rank[i])) == pytest.approx((ap, rp, rr), abs=1e-12)


def test_the_dense_reference_equals_every_order_enumerated() -> None:
    for seed in range(6):
        x = exact_points(7, seed, kinds=4)
        y = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(300 + seed))
        want = [w for w in enumerated_oracle(x, y, ks=[1, 2, 3]) if w is not None]
        assert reference.recall_at_k(x, y, (1, 2, 3)) == pytest.approx(
            {k: float(np.mean([w[0][j] for w in want])) for j, k in enumerate((1, 2, 3))}, abs=1e-12)
        assert reference.map_at_r(x, y) == pytest.approx(float(np.mean([w[1] for w in want])), abs=1e-12)


# ---------------------------------------------------------------- larger, across tile boundaries
@pytest.fixture(params=[None, 5], ids=["default tiles", "5-column tiles"])
def tile_cols(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(_pairs, "TILE_COLS", request.param)
    return request.param


@pytest.mark.parametrize("n,kinds,classes", [(40, 6, 4), (150, 24, 10), (600, 24, 30)])
@pytest.mark.parametrize("chunk_size", [7, 64, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_match_the_dense_reference(tile_cols, n, kinds, classes, chunk_size, dtype) -> None:
    x = exact_points(n, n + kinds, kinds=kinds, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(n))
    ks = (1, 2, 4, 8, 31)
    recall, m = recall_and_map_at_r(x, y, ks, chunk_size=chunk_size)
    ref = reference.recall_at_k(x, y, ks)
    for k in ks:
        assert recall[k] == pytest.approx(ref[k], abs=1e-12), k
    assert m == pytest.approx(reference.map_at_r(x, y), abs=1e-12)


@pytest.mark.parametrize("n", [5, 64, 300])
@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_identical_embeddings_score_at_chance(tile_cols, n, chunk_size) -> None:
    """Every candidate ties: R@k, R-precision and MAP@R are those of a uniformly random ranking."""
    y = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(n))
    x = torch.ones(n, 3)
    rm = retrieval_metrics(x, y, (1, 2), chunk_size=chunk_size)
    c = torch.bincount(y)[y].double() - 1  # (N,) R of each query
    valid = c > 0
    p = c[valid] / (n - 1)  # chance that one candidate is relevant
    assert rm.recall[1] == pytest.approx(float(p.mean()), abs=1e-12)
    assert rm.r_precision == pytest.approx(float(p.mean()), abs=1e-12)
    # R@2 = 1 - P(two draws without replacement both irrelevant)
    miss2 = (n - 1 - c[valid]) * (n - 2 - c[valid]) / ((n - 1) * (n - 2))
    assert rm.recall[2] == pytest.approx(float((1 - miss2).mean()), abs=1e-12)
    assert rm.map_at_r == pytest.approx(reference.map_at_r(x, y), abs=1e-12)


def test_identical_embeddings_table() -> None:
    """The issue's case: 5,000 identical embeddings, 10 random classes: R@1 was 0.51 and MAP@R 0.38."""
    n = 5000
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    recall, m = recall_and_map_at_r(torch.ones(n, 8), y, (1,))
    c = torch.bincount(y)[y].double() - 1
    assert recall[1] == pytest.approx(float((c / (n - 1)).mean()), abs=1e-12)  # 0.100
    assert 0.009 < m < 0.013  # a random ranking; pml (ties in faiss's order) gives 0.011


def test_second_pass_runs_only_when_a_tie_reaches_past_the_kept_ranks(monkeypatch) -> None:
    calls = []
    real = retrieval_module.RetrievalTopK._count_equal
    monkeypatch.setattr(retrieval_module.RetrievalTopK, "_count_equal",
                        lambda self, rows, t: calls.append(len(rows)) or real(self, rows, t))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (200,), generator=g)
    per_query_retrieval(x, y, (1, 4))
    assert calls == [0]  # tie-free: no row for the second pass (it returns before any tile)
    per_query_retrieval(exact_points(200, 1), y, (1, 4))
    assert calls[1] > 0


def test_results_do_not_depend_on_the_order_of_the_samples() -> None:
    x = exact_points(120, 7, kinds=10)
    y = torch.randint(0, 6, (120,), generator=torch.Generator().manual_seed(7))
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(8))
    a, b = retrieval_metrics(x, y, (1, 3), chunk_size=16), retrieval_metrics(x[perm], y[perm], (1, 3), chunk_size=16)
    for name in ("hits", "ap", "r_precision", "reciprocal_rank"):
        torch.testing.assert_close(getattr(a.per_query, name)[perm], getattr(b.per_query, name), rtol=0, atol=1e-12)


@pytest.mark.parametrize("keep", [True, False], ids=["kept pairs", "two passes"])
def test_evaluate_rides_with_ties(monkeypatch, keep) -> None:
    if not keep:
        monkeypatch.setattr(opis_module, "KEEP_MAX", 0)
    x = exact_points(300, 3)
    y = torch.randint(0, 12, (300,), generator=torch.Generator().manual_seed(3))
    ev = evaluate_embeddings(x, y, ks=(1, 4), chunk_size=32, far_range=(0.01, 0.9))  # distances are multiples of 1/4
    hits, ap = per_query_retrieval(x, y, (1, 4), chunk_size=32)
    torch.testing.assert_close(ev.hits, hits, rtol=0, atol=1e-12)
    torch.testing.assert_close(ev.ap_at_r, ap, rtol=0, atol=1e-12, equal_nan=True)
    assert ev.map_at_r == pytest.approx(reference.map_at_r(x, y), abs=1e-12)


# ---------------------------------------------------------------- pytorch-metric-learning, tie-free
def clustered(seed: int, n: int, classes: int, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, dim, generator=g)[y] + 1.3 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1), y


def knn_torch():
    """An exact k-nearest-neighbour function for pml (inner product of unit rows), no faiss needed."""
    def knn(query, k, reference, ref_includes_query):
        s = query @ reference.T
        if ref_includes_query:
            s.fill_diagonal_(float("-inf"))
        d, i = s.topk(k, dim=1)
        return d, i
    return knn


@pytest.mark.parametrize("seed,n,classes", [(0, 300, 40), (1, 500, 25)])
@pytest.mark.parametrize("gallery", [False, True])
def test_r_precision_mrr_and_per_class_equal_pml(seed, n, classes, gallery) -> None:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, y = clustered(seed, n, classes)
    ks = (1, 2, 4, 8)
    if gallery:
        g, gy = clustered(seed + 10, n, classes)
        rm = retrieval_metrics(x, y, ks, reference=g, reference_labels=gy)
        args = (x, y, g, gy, False)
    else:
        rm = retrieval_metrics(x, y, ks)
        args = (x, y)
    kw = {"knn_func": knn_torch(), "device": torch.device("cpu")}
    full = AccuracyCalculator(include=("r_precision", "mean_average_precision_at_r", "precision_at_1"),
                              k="max_bin_count", **kw).get_accuracy(*args)
    # (with precision_at_1: pml's requires_knn() does not list mean_reciprocal_rank, so alone it finds no neighbours)
    mrr = AccuracyCalculator(include=("mean_reciprocal_rank", "precision_at_1"), k=max(ks), **kw).get_accuracy(*args)
    assert rm.r_precision == pytest.approx(full["r_precision"], abs=1e-12)
    assert rm.map_at_r == pytest.approx(full["mean_average_precision_at_r"], abs=1e-12)
    assert rm.recall[1] == pytest.approx(full["precision_at_1"], abs=1e-12)
    assert rm.mrr == pytest.approx(mrr["mean_reciprocal_rank"], abs=1e-6)  # pml's ranks are float32
    per = AccuracyCalculator(include=("r_precision", "mean_average_precision_at_r", "precision_at_1"),
                             k="max_bin_count", return_per_class=True, **kw).get_accuracy(*args)
    per_mrr = AccuracyCalculator(include=("mean_reciprocal_rank", "precision_at_1"), k=max(ks), return_per_class=True,
                                 **kw).get_accuracy(*args)
    np.testing.assert_allclose(rm.per_class["R_precision"].numpy(), per["r_precision"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(rm.per_class["MAP@R"].numpy(), per["mean_average_precision_at_r"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(rm.per_class["R@1"].numpy(), per["precision_at_1"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(rm.per_class["MRR"].numpy(), per_mrr["mean_reciprocal_rank"], rtol=0, atol=1e-6)
    assert len(rm.classes) == len(per["r_precision"])
    # groups = labels: the mean of the per-class values (pml's avg_of_avgs)
    kwargs = {"reference": g, "reference_labels": gy} if gallery else {}
    by_class = retrieval_metrics(x, y, ks, groups=y, **kwargs)
    assert by_class.r_precision == pytest.approx(float(rm.per_class["R_precision"].mean()), abs=1e-12)


def test_tie_free_values_unchanged_from_the_plain_formulas() -> None:
    """On tie-free data every query takes the plain formulas: hits are 0 / 1, AP@R is eq. 2 exactly."""
    x, y = clustered(5, 400, 30)
    hits, ap = per_query_retrieval(x, y, (1, 2, 4))
    assert set(hits.unique().tolist()) <= {0.0, 1.0}
    rm = retrieval_metrics(x, y, (1, 2, 4))
    assert torch.equal(rm.per_query.hits, hits) and torch.equal(rm.per_query.ap.nan_to_num(-1), ap.nan_to_num(-1))


@pytest.mark.parametrize("n,kinds", [(150, 12), (64, 1)])
@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_recall_ranked_to_max_k_only_equals_the_full_pass(tile_cols, n, kinds, chunk_size) -> None:
    """``to_r=False`` (the report's R@1) ranks only max(ks) (+1 for ties) per query: the same Recall@k."""
    from tcmlib.metrics.retrieval import RetrievalTopK
    from tcmlib.metrics._pairs import pair_tiles, sort_pairs

    x = exact_points(n, 11, kinds=kinds)
    y = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(n))
    pairs = sort_pairs(x, y)
    short = RetrievalTopK(pairs, [1, 3], chunk_size, to_r=False)
    for tile in pair_tiles(pairs, chunk_size):
        short.add(tile)
    assert short.topk.k == 4  # ranks 1..3 and one more: far fewer than R
    want = reference.recall_at_k(x, y, (1, 3))
    got = short.recall()
    assert got[1] == pytest.approx(want[1], abs=1e-12) and got[3] == pytest.approx(want[3], abs=1e-12)
    assert got == retrieval_metrics(x, y, (1, 3), chunk_size=chunk_size).recall
    assert bool(short.result().ap.isnan().all())  # not ranked down to R: no AP@R
