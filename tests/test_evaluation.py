"""metrics.evaluate_embeddings (one call, retrieval riding on OPIS's pass), query/gallery retrieval and OPIS, and the
running top-k they share: against brute-force loops, pml's AccuracyCalculator and the separate functions."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from tcmlib.metrics import evaluate_embeddings, map_at_r, per_query_retrieval, recall_and_map_at_r, recall_at_k, utility_curves
from tcmlib.metrics import _pairs
from tcmlib.metrics._pairs import DenseTopK, TopK, cross_tiles, upper_tiles

opis_module = importlib.import_module("tcmlib.metrics.opis")


@pytest.fixture(autouse=True, params=["kept", "two passes"])
def counting_path(request, monkeypatch):
    """Every test runs with OPIS's counts from the pairs its first pass kept and from a second pass."""
    if request.param == "two passes":
        monkeypatch.setattr(opis_module, "KEEP_MAX", 0)
    return request.param


def clustered(n: int, classes: int, dim: int, seed: int, noise: float = 1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, dim, generator=g, dtype=torch.float64)[y]
    x = x + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x.to(dtype), y


def brute_query_gallery(q, qy, g, gy, ks):
    """Per query: rank every gallery item by cosine (float64), hits at each k, AP@R (R = same-label items)."""
    qn = q.double() / q.double().norm(dim=1, keepdim=True)
    gn = g.double() / g.double().norm(dim=1, keepdim=True)
    hits, aps = [], []
    for i in range(len(qy)):
        ranked = sorted(range(len(gy)), key=lambda j: -float(qn[i] @ gn[j]))
        rel = [int(gy[j]) == int(qy[i]) for j in ranked]
        r = sum(rel)
        hits.append([any(rel[:k]) for k in ks])
        aps.append(float("nan") if r == 0 else sum(sum(rel[:i]) / i for i in range(1, r + 1) if rel[i - 1]) / r)
    return hits, aps


# ----------------------------------------------------------------------------- the running top-k
def assert_same_above(val, rel, want_val, want_rel, d, tol=2e-6):
    """The same relevance flags among the top d at every rank whose value stands apart from its neighbours'
    (by more than ``tol``: which of equal, or equal up to rounding, values ranks first is unspecified)."""
    w = want_val[: d + 1].tolist()
    for j in range(d):
        if all(abs(w[j] - w[i]) > tol for i in (j - 1, j + 1) if 0 <= i < len(w)):
            assert bool(rel[j]) == bool(want_rel[j]), j


@pytest.mark.parametrize("topk_class", [TopK, DenseTopK])
@pytest.mark.parametrize("chunk,tile_cols,deep", [(7, 5, False), (16, 40, False), (64, 64, False), (64, 64, True)])
def test_topk_of_symmetric_tiles_equals_dense_topk(chunk, tile_cols, deep, topk_class):
    """Rows and (transposed) columns of upper-triangle tiles give every row its exact top-k; ``deep``:
    every row's k exceeds a tile's width, so rows stay unfilled over several tiles."""
    x, y = clustered(150, 9, 6, seed=3, dtype=torch.float32)
    xn = torch.nn.functional.normalize(x, dim=1)
    depth = torch.randint(1, 30, (150,), generator=torch.Generator().manual_seed(0))
    if deep:
        depth += 70
    top = topk_class(depth, y, y, torch.float32)
    for r0, c0, sim in upper_tiles(xn, chunk, tile_cols):
        top.add(r0, c0, sim)
        top.add(r0, c0, sim, columns=True)
    full = (xn @ xn.T).fill_diagonal_(float("-inf"))
    want = full.topk(int(depth.max()), dim=1)
    val, rel = top.ranked()
    for i in range(150):
        d = int(depth[i])
        torch.testing.assert_close(val[i, :d], want.values[i, :d], rtol=0, atol=1e-6)
        assert_same_above(val[i], rel[i], want.values[i], y[want.indices[i]] == y[i], d)


@pytest.mark.parametrize("topk_class", [TopK, DenseTopK])
@pytest.mark.parametrize("n,chunk,tile_cols", [(700, 128, 200), (1000, 96, 130)])
def test_topk_screened_cells_and_edges_equal_dense_topk(n, chunk, tile_cols, topk_class):
    """Wider tiles: rows and columns screened by cell maxima (tile widths not multiples of a cell), exact."""
    x, y = clustered(n, 9, 12, seed=n, dtype=torch.float32)
    xn = torch.nn.functional.normalize(x, dim=1)
    depth = torch.randint(1, 60, (n,), generator=torch.Generator().manual_seed(1))
    top = topk_class(depth, y, y, torch.float32)
    for r0, c0, sim in upper_tiles(xn, chunk, tile_cols):
        top.add(r0, c0, sim)
        top.add(r0, c0, sim, columns=True)
    want = (xn @ xn.T).fill_diagonal_(float("-inf")).topk(int(depth.max()), dim=1)
    val, rel = top.ranked()
    for i in range(n):
        d = int(depth[i])
        torch.testing.assert_close(val[i, :d], want.values[i, :d], rtol=0, atol=1e-6)
        assert_same_above(val[i], rel[i], want.values[i], y[want.indices[i]] == y[i], d)


def test_topk_first_contact_is_exact():
    """Long rows (a first tile where every entry is a candidate: bars raised from its cells, then merged); exact."""
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(40, 3000, generator=g)
    depth = torch.full((40,), 25)
    lab = torch.zeros(3000, dtype=torch.long)
    top = TopK(depth, lab[:40], lab, torch.float32)
    for c0 in range(0, 3000, 1000):
        top.add(0, c0, sim[:, c0 : c0 + 1000])
    torch.testing.assert_close(top.ranked()[0], sim.topk(25, dim=1).values, rtol=0, atol=0)


@pytest.mark.parametrize("columns", [False, True])
def test_topk_raised_bars_are_exact_with_ties(monkeypatch, columns):
    """Rows that have seen only low values meet mostly hot tiles: their bars are first raised from the
    tiles' fine-cell maxima (a lower bound of each row's depth-th best, one step below it), then the tiles
    are screened sparsely.  Values on a grid of 1/4, so the bounds tie with many entries; exact."""
    g = torch.Generator().manual_seed(2)
    sim = (torch.randn(48, 3000, generator=g) * 4).round() / 4  # (48, 3000) many ties
    sim[:, :500] -= 10  # the first tile: low values only, so the bars start low
    depth = torch.randint(1, 40, (48,), generator=g)
    lab = torch.randint(0, 3, (3000,), generator=g)
    raised = []
    real = TopK._raise_bars
    monkeypatch.setattr(TopK, "_raise_bars", lambda self, r0, cm: raised.append(r0) or real(self, r0, cm))
    top = TopK(depth, lab[:48], lab, torch.float32)
    for c0 in range(0, 3000, 500):
        tile = sim[:, c0 : c0 + 500]  # (48, 500)
        if columns:  # the same tile, seen from the column side of its transpose
            top.add(c0, 0, tile.T.contiguous(), columns=True)
        else:
            top.add(0, c0, tile)
    assert raised, "no tile raised the bars: the test misses the path it is about"
    val, rel = top.ranked()
    want = sim.topk(int(depth.max()), dim=1)
    for i in range(48):
        d = int(depth[i])
        torch.testing.assert_close(val[i, :d], want.values[i, :d], rtol=0, atol=0)
        # ties may order relevant and other entries differently, but strictly above the d-th value it is fixed
        above = sim[i] > want.values[i, d - 1]
        assert int(rel[i, : int(above.sum())].sum()) == int((above & (lab == lab[i])).sum())


# ----------------------------------------------------------------------------- the tiles
def test_the_tiles_cover_every_pair_once_in_order():
    """The upper triangle: the diagonal blocks (their upper triangle, -inf on and below the diagonal), then
    the tiles right of them; query x gallery: every tile once.  Each tile is the GEMM of its rows and columns."""
    x = torch.nn.functional.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    got_up = list(upper_tiles(x, 64, 100))
    diag = [(r0, r0) for r0 in range(0, 300, 64)]
    right = [(r0, c0) for r0 in range(0, 300, 64) for c0 in range(r0 + 64, 300, 100)]
    assert [(r, c) for r, c, _ in got_up] == diag + right
    seen = torch.zeros(300, 300, dtype=torch.long)
    for r0, c0, sim in got_up:
        full = x[r0 : r0 + 64] @ x[c0 : c0 + sim.shape[1]].T
        if r0 == c0:
            full = full.masked_fill(torch.ones_like(full, dtype=torch.bool).tril(), float("-inf"))
        assert torch.equal(sim, full)
        seen[r0 : r0 + sim.shape[0], c0 : c0 + sim.shape[1]] += (sim > float("-inf")).long()
    assert torch.equal(seen, torch.ones(300, 300, dtype=torch.long).triu(1))  # every pair a < b once
    got_cross = list(cross_tiles(x[:70], x[70:], 32, 50))
    assert [(r, c) for r, c, _ in got_cross] == [(r, c) for r in range(0, 70, 32) for c in range(0, 230, 50)]
    for r0, c0, sim in got_cross:
        assert torch.equal(sim, x[:70][r0 : r0 + 32] @ x[70:][c0 : c0 + 50].T)


# ----------------------------------------------------------------------------- query / gallery retrieval
@pytest.mark.parametrize("chunk", [1, 13, None])
def test_query_gallery_retrieval_matches_brute_force(chunk):
    x, y = clustered(90, 8, 5, seed=4, noise=1.5)
    q, qy, g, gy = x[:30], y[:30], x[30:], y[30:]
    ks = [1, 2, 5, 60]
    hits_ref, ap_ref = brute_query_gallery(q, qy, g, gy, ks)
    hits, ap = per_query_retrieval(q, qy, ks, chunk_size=chunk, reference=g, reference_labels=gy)
    assert hits.tolist() == hits_ref
    np.testing.assert_allclose(ap.numpy(), np.array(ap_ref), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_query_gallery_matches_pml(seed):
    pytest.importorskip("faiss")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, y = clustered(1200, 150, 16, seed=seed, dtype=torch.float32)
    x = torch.nn.functional.normalize(x, dim=1)
    q, qy, g, gy = x[:400], y[:400], x[400:], y[400:]
    qy = qy.clone()
    qy[:5] = 1000 + torch.arange(5)  # queries whose label the gallery lacks: left out, as pml does
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                              device=torch.device("cpu"))
    acc = calc.get_accuracy(q, qy, g, gy, ref_includes_query=False)
    recall, m = recall_and_map_at_r(q, qy, (1,), chunk_size=97, reference=g, reference_labels=gy)
    assert recall[1] == pytest.approx(acc["precision_at_1"], abs=1e-12)
    assert m == pytest.approx(acc["mean_average_precision_at_r"], abs=1e-12)
    ev = evaluate_embeddings(q, qy, ks=(1,), reference=g, reference_labels=gy)
    assert ev.recall == recall and ev.map_at_r == m


def test_query_gallery_retrieval_bad_input():
    x, y = clustered(40, 4, 3, seed=0)
    with pytest.raises(ValueError, match="together"):
        recall_at_k(x, y, (1,), reference=x)
    with pytest.raises(ValueError, match="dimension"):
        map_at_r(x, y, reference=x[:, :2], reference_labels=y)
    with pytest.raises(ValueError, match="reference items"):
        recall_at_k(x, y, (41,), reference=x, reference_labels=y)
    with pytest.raises(ValueError, match="reference_labels"):
        recall_at_k(x, y, (1,), reference=x, reference_labels=y[:3])
    with pytest.raises(ValueError, match="no query has a relevant"):
        recall_at_k(x, y, (1,), reference=x, reference_labels=y + 100)


# ----------------------------------------------------------------------------- query / gallery OPIS
def brute_query_gallery_curves(q, qy, g, gy, far_range, k_thr=100, groups=None):
    """Every query x gallery pair in a loop; a pair counts for its query's class (or group) only."""
    qn = q.double().numpy() / np.linalg.norm(q.double().numpy(), axis=1, keepdims=True)
    gn = g.double().numpy() / np.linalg.norm(g.double().numpy(), axis=1, keepdims=True)
    units = (qy if groups is None else groups).tolist()
    pairs = [(units[i], int(qy[i]) == int(gy[j]), 1.0 - float(qn[i] @ gn[j]))
             for i in range(len(qy)) for j in range(len(gy))]
    neg = np.array([d for _, p, d in pairs if not p])
    thr = np.linspace(*np.quantile(neg, far_range), k_thr)
    tar, trr = [], []
    for c in sorted(set(units)):
        pos = np.array([d for u, p, d in pairs if u == c and p])
        ng = np.array([d for u, p, d in pairs if u == c and not p])
        if len(pos) and len(ng):
            tar.append((pos[:, None] <= thr).mean(0))
            trr.append((ng[:, None] > thr).mean(0))
    return thr, np.array(tar).T, np.array(trr).T


@pytest.mark.parametrize("use_groups", [False, True])
def test_query_gallery_curves_match_brute_force(use_groups):
    x, y = clustered(70, 6, 4, seed=5, noise=0.8)
    q, qy, g, gy = x[:25], y[:25], x[25:], y[25:]
    groups = qy % 3 if use_groups else None
    res = utility_curves(q, qy, reference=g, reference_labels=gy, far_range=(0.05, 0.4), chunk_size=7,
                         groups=groups)
    thr, tar, trr = brute_query_gallery_curves(q, qy, g, gy, (0.05, 0.4), groups=groups)
    np.testing.assert_allclose(res.thresholds.numpy(), thr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.tar.numpy(), tar, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.trr.numpy(), trr, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_groups", [False, True])
def test_evaluate_equals_the_separate_functions(dtype, use_groups):
    x, y = clustered(300, 25, 8, seed=7, dtype=dtype)
    groups = (y % 4) if use_groups else None
    ev = evaluate_embeddings(x, y, ks=(1, 3), groups=groups, chunk_size=64)
    recall, m = recall_and_map_at_r(x, y, (1, 3), groups=groups, chunk_size=64)
    curves = utility_curves(x, y, groups=groups, chunk_size=64)
    assert ev.recall == recall and ev.map_at_r == m  # bit for bit: the same tiles
    assert ev.opis == curves.opis and ev.eps_opis == curves.eps_opis(0.1)
    hits, ap = per_query_retrieval(x, y, (1, 3), chunk_size=64)
    assert torch.equal(ev.hits, hits) and torch.equal(ev.ap_at_r.isnan(), ap.isnan())
    given = evaluate_embeddings(x, y, distance_range=curves.distance_range, chunk_size=64, groups=groups)
    assert given.opis == pytest.approx(curves.opis, abs=1e-15)


@pytest.mark.parametrize("kind", ["one set", "groups", "gallery"])
def test_evaluate_on_cuda_matches_cpu(kind):
    """The same code on a GPU, every tile computed there: float64, so the cosines agree to ~1e-16 and so do
    every count, R@k, MAP@R and OPIS."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, y = clustered(700, 20, 8, seed=11)
    kw = {"one set": {}, "groups": {"groups": y % 3},
          "gallery": {"reference": x[:300] + 0.1, "reference_labels": y[:300]}}[kind]
    cpu = evaluate_embeddings(x, y, ks=(1, 3), chunk_size=64, **kw)
    gpu = evaluate_embeddings(x.cuda(), y.cuda(), ks=(1, 3), chunk_size=64, **{k: v.cuda() for k, v in kw.items()})
    assert gpu.recall == pytest.approx(cpu.recall, abs=1e-12)
    assert gpu.map_at_r == pytest.approx(cpu.map_at_r, abs=1e-12)
    assert gpu.opis == pytest.approx(cpu.opis, abs=1e-12) and gpu.eps_opis == pytest.approx(cpu.eps_opis, abs=1e-12)
    assert torch.equal(gpu.hits.cpu(), cpu.hits)
    torch.testing.assert_close(gpu.curves.utility.cpu(), cpu.curves.utility, rtol=0, atol=1e-12)


def test_evaluation_keys_units_and_repr():
    x, y = clustered(200, 20, 6, seed=2)
    ev = evaluate_embeddings(x, y, ks=(1, 2))
    d = ev.as_dict("val_")
    assert list(d) == ["val_R@1", "val_R@2", "val_MAP@R", "val_OPIS", "val_eps_OPIS"]
    assert all(0.0 <= v <= 1.0 for v in d.values()) and 0.0 <= ev.opis <= 0.25
    text = repr(ev)
    assert len(text) < 250 and "OPIS" in text and "0.25" in text


@pytest.mark.parametrize("kw,match", [
    ({"eps": 0.0}, "eps"), ({"eps": 1.0}, "eps"), ({"ks": (0,)}, "positive"), ({"ks": (200,)}, "other samples"),
    ({"far_range": (0.5, 0.1)}, "far_range"), ({"num_thresholds": 1}, "num_thresholds"),
    ({"reference": np.zeros((3, 6))}, "together"),
])
def test_evaluate_bad_input(kw, match):
    x, y = clustered(60, 6, 6, seed=0)
    with pytest.raises(ValueError, match=match):
        evaluate_embeddings(x, y, **kw)


def test_evaluate_has_no_var_keyword_arguments():
    import inspect

    from tcmlib.metrics import eps_opis, opis

    for fn in (evaluate_embeddings, opis, eps_opis, utility_curves, recall_at_k, map_at_r, recall_and_map_at_r):
        kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, fn.__name__
    assert math.isfinite(opis(*clustered(60, 6, 6, seed=1), num_thresholds=5))


def test_the_old_name_warns_and_gives_the_same_evaluation() -> None:
    """``tcmlib.metrics.evaluate`` (the name the README once used) is now ``evaluate_embeddings``."""
    import tcmlib.metrics as metrics

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 6, generator=g), torch.randint(0, 6, (120,), generator=g)
    with pytest.warns(DeprecationWarning, match="evaluate_embeddings"):
        old = metrics.evaluate(x, y, ks=(1, 2))
    assert old.as_dict() == evaluate_embeddings(x, y, ks=(1, 2)).as_dict()
