"""Recall@k and MAP@R: hand-computed toys, a brute-force Python-loop oracle, and pml's AccuracyCalculator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmlib.metrics.retrieval import map_at_r, per_query_retrieval, recall_and_map_at_r, recall_at_k


def circle(degrees: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1).to(dtype)  # (N, 2)


def clustered(n: int, classes: int, dim: int, seed: int, noise: float = 1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, dim, generator=g, dtype=torch.float64)[y]
    x = x + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x.to(dtype), y


def brute_force(x: torch.Tensor, y: torch.Tensor, ks: list[int]) -> tuple[list[list[bool]], list[float]]:
    """Per query: sort all others by cosine similarity (float64), check hits, AP@R by its formula."""
    x = x.double() / x.double().norm(dim=1, keepdim=True)
    n = len(y)
    hits, aps = [], []
    for q in range(n):
        others = [j for j in range(n) if j != q]
        ranked = sorted(others, key=lambda j: -float(x[q] @ x[j]))
        rel = [int(y[j]) == int(y[q]) for j in ranked]
        r = sum(rel)  # = class count - 1
        hits.append([any(rel[:k]) for k in ks])
        if r == 0:
            aps.append(float("nan"))
            continue
        # AP@R = (1/R) sum_{i<=R} P(i) rel(i), P(i) = (1/i) sum_{j<=i} rel(j)
        aps.append(sum(sum(rel[:i]) / i for i in range(1, r + 1) if rel[i - 1]) / r)
    return hits, aps


# ---------------------------------------------------------------- hand-computed toys
# Six unit vectors at these angles (degrees); cosine order = angular-distance order.
TOY_ANGLES = [0, 20, 50, 90, 175, 200]
TOY_LABELS = [0, 0, 1, 1, 0, 2]  # A A B B A C (C is a singleton)
# Neighbours of each query, nearest first (angular distance), and its relevance:
# p0 A:   p1 A(20)  p2 B(50)  p3 B(90)  p5 C(160) p4 A(175)  R=2 rel 1,0   hit@1 yes  AP = (1/2)(1/1) = 0.5
# p1 A:   p0 A(20)  p2 B(30)  p3 B(70)  p4 A(155) p5 C(180)  R=2 rel 1,0   hit@1 yes  AP = 0.5
# p2 B:   p1 A(30)  p3 B(40)  p0 A(50)  p4 A(125) p5 C(150)  R=1 rel 0     hit@2 yes  AP = 0
# p3 B:   p2 B(40)  p1 A(70)  p4 A(85)  p0 A(90)  p5 C(110)  R=1 rel 1     hit@1 yes  AP = 1
# p4 A:   p5 C(25)  p3 B(85)  p2 B(125) p1 A(155) p0 A(175)  R=2 rel 0,0   hit@4 yes  AP = 0
# p5 C:   singleton, left out.  Over the 5 others:
# R@1 = 3/5, R@2 = 4/5, R@4 = 5/5, MAP@R = (0.5 + 0.5 + 0 + 1 + 0) / 5 = 0.4.
# Per class (groups = labels): A = {p0, p1, p4}, B = {p2, p3}:
# R@1 = (2/3 + 1/2) / 2 = 7/12, MAP@R = ((0.5 + 0.5 + 0) / 3 + (0 + 1) / 2) / 2 = 5/12.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 4, 6, 100, None])
def test_toy_circle(dtype: torch.dtype, chunk_size: int | None) -> None:
    x, y = circle(TOY_ANGLES, dtype), torch.tensor(TOY_LABELS)
    recall, m = recall_and_map_at_r(x, y, (1, 2, 4), chunk_size=chunk_size)
    assert recall == pytest.approx({1: 3 / 5, 2: 4 / 5, 4: 1.0}, abs=1e-12)
    assert m == pytest.approx(0.4, abs=1e-12)
    assert map_at_r(x, y, chunk_size=chunk_size) == pytest.approx(0.4, abs=1e-12)
    assert recall_at_k(x, y, (1,), groups=y)[1] == pytest.approx(7 / 12, abs=1e-12)
    assert map_at_r(x, y, groups=y) == pytest.approx(5 / 12, abs=1e-12)
    hits, ap = per_query_retrieval(x, y, (1, 2, 4), chunk_size=chunk_size)
    assert hits[:, 0].tolist() == [True, True, False, True, False, False]
    assert ap[:5].tolist() == pytest.approx([0.5, 0.5, 0.0, 1.0, 0.0], abs=1e-12)
    assert math.isnan(ap[5])


def test_toy_average_precision_with_gap() -> None:
    # Query p0 at 0 deg (A); the others at 10 A, 20 B, 30 A, 40 A: rel = 1, 0, 1, 1 and R = 3.
    # AP@R = (1/3) (P(1) + P(3)) = (1/3) (1/1 + 2/3) = 5/9; the relevant item at rank 4 is past R.
    x, y = circle([0, 10, 20, 30, 40]), torch.tensor([0, 0, 1, 0, 0])
    _, ap = per_query_retrieval(x, y, ())
    assert float(ap[0]) == pytest.approx(5 / 9, abs=1e-12)


def test_duplicates_self_is_never_a_neighbour() -> None:
    # p0 and p1 are the same vector with different labels: p0's nearest other is p1 (a miss),
    # whatever order topk gives among the two similarities of 1 (the self is masked, not skipped).
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    y = torch.tensor([0, 1, 0, 1])
    hits, _ = per_query_retrieval(x, y, (1, 2))
    assert hits[0].tolist() == [False, True]  # p1 (label 1) then p2 (label 0)
    assert hits[1].tolist() == [False, False]  # p0 (0), p2 (0); p3 (1) is third
    # Same vectors, same label: the duplicate is a hit at 1.
    hits, _ = per_query_retrieval(x, torch.tensor([0, 0, 1, 1]), (1,))
    assert hits[:2, 0].tolist() == [True, True]


# ---------------------------------------------------------------- brute-force oracle
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [1, 7, 13, 64])
def test_matches_brute_force(seed: int, chunk_size: int) -> None:
    x, y = clustered(n=53, classes=12, dim=5, seed=seed, noise=1.5)  # 53: no chunk divides it
    ks = [1, 2, 4, 8, 52]
    hits_ref, ap_ref = brute_force(x, y, ks)
    hits, ap = per_query_retrieval(x, y, ks, chunk_size=chunk_size)
    assert hits.tolist() == hits_ref
    np.testing.assert_allclose(ap.numpy(), np.array(ap_ref), rtol=0, atol=1e-12)  # NaN == NaN here
    valid = [i for i, a in enumerate(ap_ref) if not math.isnan(a)]
    recall, m = recall_and_map_at_r(x, y, ks, chunk_size=chunk_size)
    for j, k in enumerate(ks):
        assert recall[k] == pytest.approx(sum(hits_ref[i][j] for i in valid) / len(valid), abs=1e-12)
    assert m == pytest.approx(sum(ap_ref[i] for i in valid) / len(valid), abs=1e-12)


# ---------------------------------------------------------------- pytorch-metric-learning
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("avg_of_avgs", [False, True])
def test_matches_pml_accuracy_calculator(seed: int, avg_of_avgs: bool) -> None:
    pytest.importorskip("faiss")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    # Many small classes (sizes ~ Poisson(3), with singletons); unit vectors, since pml's default
    # FaissKNN ranks by L2 distance, which on unit vectors is the cosine order.
    x, y = clustered(n=1500, classes=500, dim=16, seed=seed, noise=1.0, dtype=torch.float32)
    x = torch.nn.functional.normalize(x, dim=1)
    assert (torch.bincount(y) == 1).any()
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
        avg_of_avgs=avg_of_avgs, device=torch.device("cpu"),
    )
    acc = calc.get_accuracy(x, y)
    groups = y if avg_of_avgs else None
    recall, m = recall_and_map_at_r(x, y, (1,), chunk_size=97, groups=groups)
    assert recall[1] == pytest.approx(acc["precision_at_1"], abs=1e-12)
    assert m == pytest.approx(acc["mean_average_precision_at_r"], abs=1e-12)


# ---------------------------------------------------------------- invariances (hypothesis)
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 40),
    classes=st.integers(1, 10),
    chunk_size=st.integers(1, 50),
    scale=st.sampled_from([1e-3, 0.5, 7.0, 1e4]),
)
def test_invariances(seed: int, n: int, classes: int, chunk_size: int, scale: float) -> None:
    x, y = clustered(n, classes, dim=4, seed=seed)  # float64: no near-ties at rounding level
    if bool((torch.bincount(y) < 2).all()):
        return  # every sample a singleton: undefined, tested in test_value_errors
    ks = [k for k in (1, 2, 5) if k < n]
    hits, ap = per_query_retrieval(x, y, ks)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    names = torch.randperm(1000, generator=g)[:classes] * 7 - 3000  # injective renaming, negatives too
    for x2, y2, back in [
        (x[perm], y[perm], perm),  # reorder samples
        (x, names[y], torch.arange(n)),  # rename labels
        (x * scale, y, torch.arange(n)),  # rescale embeddings
    ]:
        hits2, ap2 = per_query_retrieval(x2, y2, ks, chunk_size=chunk_size)
        assert torch.equal(hits2, hits[back])
        np.testing.assert_allclose(ap2.numpy(), ap[back].numpy(), rtol=0, atol=1e-12)
        r2, m2 = recall_and_map_at_r(x2, y2, ks, chunk_size=chunk_size)
        r1, m1 = recall_and_map_at_r(x, y, ks)
        assert r2 == pytest.approx(r1, abs=1e-12) and m2 == pytest.approx(m1, abs=1e-12)


# ---------------------------------------------------------------- bad input
def test_value_errors() -> None:
    x, y = circle(TOY_ANGLES), torch.tensor(TOY_LABELS)
    for ks in [(0,), (-1,), (1.5,), (True,), (6,), (1, 60)]:
        with pytest.raises(ValueError, match="k"):
            recall_at_k(x, y, ks)
    with pytest.raises(ValueError, match="at least 2 samples"):
        recall_at_k(x[:1], y[:1], (1,))
    with pytest.raises(ValueError, match="one label per embedding"):
        map_at_r(x, y[:5])
    with pytest.raises(ValueError, match="only once"):
        map_at_r(x, torch.arange(6))
    with pytest.raises(ValueError, match="NaN"):
        map_at_r(torch.full((6, 2), float("nan")), y)
    with pytest.raises(ValueError, match="all-zero"):
        map_at_r(torch.zeros(6, 2), y)
    with pytest.raises(ValueError, match="integer"):
        map_at_r(x, y + 0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        map_at_r(x, y, chunk_size=0)
    with pytest.raises(ValueError, match="groups"):
        map_at_r(x, y, groups=y[:3])


def test_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, y = clustered(n=500, classes=100, dim=8, seed=0)
    cpu = recall_and_map_at_r(x, y, (1, 4), chunk_size=33)
    gpu = recall_and_map_at_r(x.cuda(), y.cuda(), (1, 4), chunk_size=33)
    assert gpu[0] == pytest.approx(cpu[0], abs=1e-12) and gpu[1] == pytest.approx(cpu[1], abs=1e-12)
