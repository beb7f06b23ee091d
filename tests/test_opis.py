"""Tests for tcmlib.metrics.opis against independent oracles.

The oracle below loops over every pair in Python, computes distances in float64 NumPy and takes the
calibration range with numpy.quantile; the definitions are those of background/paper-notes.md.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tcmlib.metrics import UtilityCurves, eps_opis, opis, utility_curves
from tcmlib.metrics import _pairs
from tcmlib.metrics._pairs import SortedPairs
from tcmlib.metrics.opis import _first_accepting, _negative_distance_quantiles

opis_module = importlib.import_module("tcmlib.metrics.opis")  # (tcmlib.metrics.opis is also a function name)


@pytest.fixture(autouse=True, params=["kept", "two passes", "kept, then dropped"])
def counting_path(request, monkeypatch):
    """Every test runs three ways: the counts from the pairs pass 1 kept (the default for small N), from
    a second pass over the tiles (large N), and with keeping dropped midway (more pairs than allowed)."""
    if request.param == "two passes":
        monkeypatch.setattr(opis_module, "KEEP_MAX", 0)
    elif request.param == "kept, then dropped":
        kept_pairs = opis_module._KeptPairs

        class SmallKeep(kept_pairs):  # type: ignore[misc, valid-type]
            def __init__(self, limit):
                super().__init__(50)  # a few tiles' pairs, then too many

        monkeypatch.setattr(opis_module, "_KeptPairs", SmallKeep)
    return request.param


# ----------------------------------------------------------------------------- brute-force oracle
def brute_force(x, y, *, far_range=(1e-2, 1e-1), distance_range=None, num_thresholds=100, beta=1.0, groups=None, eps=0.1):
    """Every unordered pair in a Python loop; returns a dict of NumPy arrays and floats."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    units = y if groups is None else np.asarray(groups)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(y)
    pairs = []  # (a, b, distance, positive?)
    for a in range(n):
        for b in range(a + 1, n):
            pairs.append((a, b, 1.0 - float(np.dot(xn[a], xn[b])), bool(y[a] == y[b])))
    neg_all = np.array([d for _, _, d, p in pairs if not p])
    if distance_range is None:
        lo, hi = np.quantile(neg_all, far_range)  # method="linear" is numpy's default
    else:
        lo, hi = distance_range
    thr = np.linspace(lo, hi, num_thresholds)
    ids, tar, trr, npos, nneg, excluded = [], [], [], [], [], 0
    for u in sorted(set(units.tolist())):
        touch = [(d, p) for a, b, d, p in pairs if units[a] == u or units[b] == u]
        pos = np.array([d for d, p in touch if p])
        neg = np.array([d for d, p in touch if not p])
        if len(pos) == 0 or len(neg) == 0:
            excluded += 1
            continue
        ids.append(u)
        npos.append(len(pos))
        nneg.append(len(neg))
        tar.append((pos[:, None] <= thr[None, :]).mean(axis=0))
        trr.append((neg[:, None] > thr[None, :]).mean(axis=0))
    tar, trr = np.array(tar).T, np.array(trr).T  # (K, T)
    b2 = beta**2
    den = b2 * trr + tar
    util = np.where(den > 0, (1 + b2) * tar * trr / np.where(den > 0, den, 1), 0.0)
    t = util.shape[1]
    w = math.ceil(round(eps * t, 9))
    order = np.argsort(util.mean(axis=0), kind="stable")
    worst = np.zeros(t, dtype=bool)
    worst[order[:w]] = True
    gap = util[:, worst].mean(axis=1) - util[:, ~worst].mean(axis=1)
    return {
        "thresholds": thr, "tar": tar, "trr": trr, "utility": util, "class_ids": np.array(ids), "num_pos": np.array(npos),
        "num_neg": np.array(nneg), "num_excluded": excluded, "opis": float(util.var(axis=1).mean()),
        "eps_opis": float((gap**2).mean()), "range": (float(lo), float(hi)),
    }


def assert_matches(res: UtilityCurves, ref: dict, atol: float = 1e-12) -> None:
    np.testing.assert_allclose(res.thresholds.numpy(), ref["thresholds"], rtol=0, atol=atol)
    np.testing.assert_allclose(res.distance_range, ref["range"], rtol=0, atol=atol)
    np.testing.assert_array_equal(res.class_ids.numpy(), ref["class_ids"])
    np.testing.assert_array_equal(res.num_pos.numpy(), ref["num_pos"])
    np.testing.assert_array_equal(res.num_neg.numpy(), ref["num_neg"])
    assert res.num_excluded == ref["num_excluded"]
    assert res.num_eligible == len(ref["class_ids"])
    for name in ("tar", "trr", "utility"):
        np.testing.assert_allclose(getattr(res, name).numpy(), ref[name], rtol=0, atol=1e-12, err_msg=name)
    assert res.opis == pytest.approx(ref["opis"], rel=1e-9, abs=1e-15)
    assert res.eps_opis(0.1) == pytest.approx(ref["eps_opis"], rel=1e-9, abs=1e-15)


def make_data(seed: int, n: int, dim: int, classes: int, singletons: int = 0):
    """Uneven class sizes (Dirichlet weights), a few singleton classes appended, clustered points."""
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(n - classes * 2, rng.dirichlet(np.ones(classes))) + 2  # every class >= 2
    y = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)] + [np.arange(classes, classes + singletons)])
    centres = rng.normal(size=(classes + singletons, dim))
    x = centres[y] + rng.normal(scale=rng.uniform(0.3, 1.2, size=classes + singletons)[y][:, None], size=(len(y), dim))
    perm = rng.permutation(len(y))
    return x[perm], y[perm] * 7 - 3  # non-contiguous, negative label ids


# ----------------------------------------------------------------------------- brute-force comparisons
CASES = [  # seed, n, dim, classes, singletons, kwargs
    (0, 40, 4, 5, 0, {"chunk_size": 7}),
    (1, 53, 6, 6, 3, {"chunk_size": 16, "beta": 0.5}),
    (2, 37, 3, 4, 2, {"chunk_size": 37, "beta": 2.0, "num_thresholds": 17}),
    (3, 45, 5, 8, 1, {"chunk_size": 1, "distance_range": (0.1, 1.3), "num_thresholds": 50}),
    (4, 30, 8, 3, 0, {"chunk_size": 11, "far_range": (0.0, 1.0)}),
    (5, 50, 2, 7, 4, {"chunk_size": 1000, "far_range": (0.05, 0.5), "beta": 1.5}),
]


@pytest.mark.parametrize("tile_cols", [4096, 5])  # 5: many column tiles per row block
@pytest.mark.parametrize("seed,n,dim,classes,singletons,kwargs", CASES)
def test_matches_brute_force(seed, n, dim, classes, singletons, kwargs, tile_cols, monkeypatch):
    monkeypatch.setattr(_pairs, "TILE_COLS", tile_cols)
    x, y = make_data(seed, n, dim, classes, singletons)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    res = utility_curves(torch.tensor(x), torch.tensor(y), **kwargs)
    assert_matches(res, brute_force(x, y, **ref_kwargs))
    assert res.far_range == (None if "distance_range" in kwargs else kwargs.get("far_range", (1e-2, 1e-1)))


@pytest.mark.parametrize("chunk_size", [3, 8, 64])
def test_groups_match_brute_force(chunk_size):
    x, y = make_data(10, 42, 4, 6, 2)
    groups = np.random.default_rng(11).integers(0, 4, size=len(y))  # 4 "customers" across classes
    res = utility_curves(torch.tensor(x), torch.tensor(y), groups=torch.tensor(groups), chunk_size=chunk_size)
    assert_matches(res, brute_force(x, y, groups=groups))


def test_float32_input_close_to_float64_oracle():
    x, y = make_data(20, 60, 16, 6, 1)
    res = utility_curves(torch.tensor(x, dtype=torch.float32), torch.tensor(y), chunk_size=13)
    ref = brute_force(x, y)
    np.testing.assert_allclose(res.distance_range, ref["range"], atol=1e-6)
    np.testing.assert_allclose(res.utility.numpy(), ref["utility"], atol=1e-12)


def test_global_far_range_matches_numpy_quantile():
    x, y = make_data(30, 80, 5, 9, 3)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    iu = np.triu_indices(len(y), 1)
    neg = (1 - xn @ xn.T)[iu][(y[:, None] != y[None, :])[iu]]
    for far in [(0.01, 0.1), (0.0, 1.0), (0.2, 0.7)]:
        res = utility_curves(torch.tensor(x), torch.tensor(y), far_range=far, num_thresholds=2, chunk_size=9)
        np.testing.assert_allclose(res.distance_range, np.quantile(neg, far), rtol=0, atol=1e-12)
        # by definition, global FAR(t_max) = share of negative pairs with d <= t_max ~ far[1]
        assert abs((neg <= res.distance_range[1]).mean() - far[1]) <= 1 / len(neg) + 1e-12


@pytest.mark.parametrize("slack", [6.0, 0.0])  # slack 0: the pilot bracket misses and is widened
def test_bracketed_quantiles_exact(slack):
    x, y = make_data(40, 400, 6, 30, 5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    iu = np.triu_indices(len(y), 1)
    neg = (1 - xn @ xn.T)[iu][(y[:, None] != y[None, :])[iu]]
    qs = (0.0, 1e-3, 0.01, 0.1, 0.5, 1.0)
    _, lab = np.unique(y, return_inverse=True)
    order = np.argsort(lab, kind="stable")  # the private helper wants samples sorted by label
    pairs = SortedPairs(torch.tensor(xn[order]), torch.tensor(lab[order]), torch.tensor(order))
    got = _negative_distance_quantiles(pairs, qs, 64, len(neg), collect_all_max=0, slack=slack)
    np.testing.assert_allclose(got, np.quantile(neg, qs), rtol=0, atol=1e-12)


def test_medium_size_against_dense_oracle(monkeypatch):
    # N = 800 with the pilot-bracket quantiles forced on and several column tiles, against a dense
    # NumPy computation (the full distance matrix, per-class masks)
    monkeypatch.setattr(opis_module, "COLLECT_ALL_MAX", 0)
    monkeypatch.setattr(_pairs, "TILE_COLS", 300)
    x, y = make_data(80, 800, 16, 30, 6)
    res = utility_curves(torch.tensor(x), torch.tensor(y), chunk_size=256, far_range=(0.02, 0.2), beta=0.7)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1 - xn @ xn.T  # (N, N)
    iu = np.triu_indices(len(y), 1)
    lo, hi = np.quantile(dist[iu][(y[:, None] != y[None, :])[iu]], (0.02, 0.2))
    thr = np.linspace(lo, hi, 100)
    classes = [c for c in np.unique(y) if (y == c).sum() >= 2]
    tar = np.stack([(dist[np.ix_(y == c, y == c)][np.triu_indices((y == c).sum(), 1)][:, None] <= thr).mean(0) for c in classes], 1)
    trr = np.stack([(dist[np.ix_(y == c, y != c)].ravel()[:, None] > thr).mean(0) for c in classes], 1)
    np.testing.assert_allclose(res.distance_range, (lo, hi), rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.tar.numpy(), tar, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.trr.numpy(), trr, rtol=0, atol=1e-12)
    assert res.num_excluded == 6


def test_counts_come_from_the_path_the_fixture_names(counting_path, monkeypatch):
    # the kept pairs replace the second pass; without them (or once dropped) the second pass runs
    calls = []
    real = opis_module._counting_pass
    monkeypatch.setattr(opis_module, "_counting_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = make_data(7, 60, 5, 6, 2)
    res = utility_curves(torch.tensor(x), torch.tensor(y), chunk_size=8)
    assert_matches(res, brute_force(x, y))
    assert len(calls) == (0 if counting_path == "kept" else 1)
    calls.clear()  # a given range: one pass, the counting one, whatever the path
    utility_curves(torch.tensor(x), torch.tensor(y), chunk_size=8, distance_range=(0.2, 0.9))
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [0.3, 1e-5])  # narrow: float32 steps too fine for the arithmetic guess
def test_first_accepting_counts_boundaries_above(dtype, width):
    rng = np.random.default_rng(3)
    bnd = torch.linspace(0.5, 0.5 - width, 100, dtype=torch.float64).to(dtype)  # (K,) non-increasing
    s = torch.cat([bnd, torch.tensor(rng.uniform(0.5 - 1.1 * width, 0.5, 5000)).to(dtype)])  # ties included
    expected = torch.tensor([int((bnd > v).sum()) for v in s])  # k0 = #{k : b_k > s}, counted one by one
    step = float(bnd[0].double() - bnd[1].double())
    assert torch.equal(_first_accepting(s, bnd, step).clamp(max=99), expected.clamp(max=99))


# ----------------------------------------------------------------------------- hand-computed toy
def test_toy_two_classes_on_unit_circle():
    deg = np.deg2rad([0, 60, 90, 210, 270])
    x = np.stack([np.cos(deg), np.sin(deg)], axis=1)
    y = np.array([0, 0, 1, 1, 2])  # A = {0, 60 deg}, B = {90, 210 deg}, C = {270 deg} a singleton
    # d = 1 - cos(angle): A+ (0,60): 0.5;  B+ (90,210): 1.5
    # negatives of A: 0-90 1, 0-210 1.866, 60-90 0.134, 60-210 1.866, 0-270 1, 60-270 1.866   (6)
    # negatives of B: 0-90 1, 0-210 1.866, 60-90 0.134, 60-210 1.866, 90-270 2, 210-270 0.5  (6)
    # t = 0.6: TAR_A = 1, TRR_A = 5/6 -> U_A = 2 (5/6) / (11/6) = 10/11;  TAR_B = 0 -> U_B = 0
    # t = 1.6: TAR_A = 1, TRR_A = 3/6;  TAR_B = 1, TRR_B = 3/6 (1.866, 1.866, 2) -> U_A = U_B = 2/3
    res = utility_curves(torch.tensor(x), torch.tensor(y), distance_range=(0.6, 1.6), num_thresholds=2)
    assert res.class_ids.tolist() == [0, 1] and res.num_excluded == 1 and res.num_eligible == 2
    assert res.num_pos.tolist() == [1, 1] and res.num_neg.tolist() == [6, 6]
    np.testing.assert_allclose(res.tar.numpy(), [[1, 0], [1, 1]])
    np.testing.assert_allclose(res.trr.numpy(), [[5 / 6, 4 / 6], [3 / 6, 3 / 6]])
    np.testing.assert_allclose(res.utility.numpy(), [[10 / 11, 0], [2 / 3, 2 / 3]])
    # OPIS = mean(var(10/11, 0), var(2/3, 2/3)) = mean((5/11)^2, 0) = 25/242
    assert res.opis == pytest.approx(25 / 242)
    # 10%-OPIS: W = ceil(0.2) = 1 class, B (mean 1/3 < A's 61/66); gaps -10/11 and 0 -> (100/121)/2
    assert res.worst_classes(0.1).tolist() == [1]
    assert res.eps_opis(0.1) == pytest.approx(50 / 121)
    assert res.far_range is None and res.distance_range == (0.6, 1.6)


def test_opis_zero_when_classes_are_copies():
    # 4 classes, each the same 2-D arc in its own pair of dimensions: identical positives, and every
    # negative pair is orthogonal (d = 1 exactly), so every class has the same curves.
    ang = np.deg2rad([0, 20, 55, 90])
    arc = np.stack([np.cos(ang), np.sin(ang)], axis=1)  # (4, 2)
    x = np.zeros((16, 8))
    for c in range(4):
        x[4 * c : 4 * c + 4, 2 * c : 2 * c + 2] = arc
    y = np.repeat(np.arange(4), 4)
    for dtype in (torch.float32, torch.float64):
        res = utility_curves(torch.tensor(x, dtype=dtype), torch.tensor(y), distance_range=(0.01, 1.5), chunk_size=5)
        assert res.utility.var(dim=1).max() == 0
        assert res.opis == 0 and res.eps_opis(0.25) == pytest.approx(0, abs=1e-30)  # mean of 3 equal floats
        assert res.utility.max() > 0  # not trivially zero


def test_groups_equal_labels_reduce_to_classes():
    x, y = make_data(50, 70, 5, 8, 3)
    a = utility_curves(torch.tensor(x), torch.tensor(y), chunk_size=17)
    b = utility_curves(torch.tensor(x), torch.tensor(y), groups=torch.tensor(y), chunk_size=17)
    for name in ("thresholds", "tar", "trr", "utility", "class_ids", "num_pos", "num_neg"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.num_excluded == b.num_excluded == 3


def test_functional_wrappers_agree():
    x, y = make_data(60, 50, 4, 6, 0)
    res = utility_curves(torch.tensor(x), torch.tensor(y), beta=2.0)
    assert opis(torch.tensor(x), torch.tensor(y), beta=2.0) == res.opis
    assert eps_opis(torch.tensor(x), torch.tensor(y), eps=0.3, beta=2.0) == res.eps_opis(0.3)
    assert opis(x, y.tolist()) == utility_curves(x, y).opis  # numpy and lists are accepted
    assert res.mean_utility.shape == (res.num_eligible,)


# ----------------------------------------------------------------------------- invariances (hypothesis)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _summary(res: UtilityCurves) -> dict:
    order = torch.argsort(res.class_ids)
    return {"range": res.distance_range, "utility": res.utility[:, order], "opis": res.opis}


@SETTINGS
@given(seed=st.integers(0, 10**6), n=st.integers(8, 30), chunk=st.integers(1, 32))
def test_invariant_to_sample_order(seed, n, chunk):
    x, y = make_data(seed, n, 3, max(2, n // 5), seed % 3)
    perm = np.random.default_rng(seed + 1).permutation(len(y))
    a = utility_curves(torch.tensor(x), torch.tensor(y), chunk_size=chunk)
    b = utility_curves(torch.tensor(x[perm]), torch.tensor(y[perm]), chunk_size=chunk)
    np.testing.assert_allclose(a.distance_range, b.distance_range, rtol=0, atol=1e-12)
    assert torch.equal(a.class_ids, b.class_ids)
    torch.testing.assert_close(a.utility, b.utility, rtol=0, atol=1e-12)
    assert a.opis == pytest.approx(b.opis, rel=1e-9, abs=1e-15)
    assert a.eps_opis() == pytest.approx(b.eps_opis(), rel=1e-9, abs=1e-15)


@SETTINGS
@given(seed=st.integers(0, 10**6), n=st.integers(8, 30))
def test_invariant_to_label_renaming(seed, n):
    x, y = make_data(seed, n, 3, max(2, n // 4), seed % 3)
    old = np.unique(y)
    new = np.random.default_rng(seed).permutation(len(old)) * 5 + 100  # a random bijection
    y2 = new[np.searchsorted(old, y)]
    a = utility_curves(torch.tensor(x), torch.tensor(y))
    b = utility_curves(torch.tensor(x), torch.tensor(y2))
    sa, sb = _summary(a), _summary(b)
    # class old[i] is class new[i]: map b's columns back to a's order
    col = torch.tensor([int(np.where(b.class_ids.numpy() == new[np.searchsorted(old, c)])[0][0]) for c in a.class_ids.tolist()])
    torch.testing.assert_close(a.utility, b.utility[:, col], rtol=0, atol=1e-12)
    assert sa["opis"] == pytest.approx(sb["opis"], rel=1e-9, abs=1e-15)
    mean = np.sort(a.mean_utility.numpy())
    w = math.ceil(round(0.1 * a.num_eligible, 9))
    assume(mean[w - 1] != mean[w])  # no tie at the worst-group boundary (ties go by class id)
    assert a.eps_opis() == pytest.approx(b.eps_opis(), rel=1e-9, abs=1e-15)


@SETTINGS
@given(seed=st.integers(0, 10**6), log_scale=st.integers(-20, 20), row_scale=st.booleans())
def test_invariant_to_positive_scale(seed, log_scale, row_scale):
    x, y = make_data(seed, 24, 4, 4, 1)
    rng = np.random.default_rng(seed)
    scale = 2.0 ** (rng.integers(-20, 20, size=(len(y), 1)) if row_scale else log_scale)  # exact in binary
    a = utility_curves(torch.tensor(x), torch.tensor(y))
    b = utility_curves(torch.tensor(x * scale), torch.tensor(y))
    assert a.distance_range == b.distance_range
    assert torch.equal(a.utility, b.utility) and a.opis == b.opis


# ----------------------------------------------------------------------------- errors
def _xy(n=12, classes=3):
    x, y = make_data(0, n, 3, classes)
    return torch.tensor(x), torch.tensor(y)


BAD = [
    ("not 2-D", lambda x, y: utility_curves(x[:, 0], y), "2-D"),
    ("labels 2-D", lambda x, y: utility_curves(x, y[:, None]), "1-D"),
    ("length mismatch", lambda x, y: utility_curves(x, y[:-1]), "one label per"),
    ("nan", lambda x, y: utility_curves(torch.where(torch.arange(len(y))[:, None] == 2, float("nan"), x), y), "NaN"),
    ("inf", lambda x, y: utility_curves(torch.where(torch.arange(len(y))[:, None] == 2, float("inf"), x), y), "NaN or inf"),
    ("zero row", lambda x, y: utility_curves(torch.cat([x[:-1], torch.zeros(1, 3, dtype=x.dtype)]), y), "all-zero"),
    ("one eligible class", lambda x, y: utility_curves(x, torch.tensor([0, 0] + list(range(1, len(y) - 1)))), "eligible"),
    ("no negatives", lambda x, y: utility_curves(x, torch.zeros_like(y)), "no negative pairs"),
    ("eps zero", lambda x, y: eps_opis(x, y, eps=0.0), "eps"),
    ("eps one", lambda x, y: eps_opis(x, y, eps=1.0), "eps"),
    ("eps no rest", lambda x, y: eps_opis(x, y, eps=0.9), "worst group"),
    ("eps no rest (method)", lambda x, y: utility_curves(x, y).eps_opis(0.7), "worst group"),
    ("far inverted", lambda x, y: utility_curves(x, y, far_range=(0.1, 0.01)), "far_range"),
    ("far empty", lambda x, y: utility_curves(x, y, far_range=(0.1, 0.1)), "far_range"),
    ("far above 1", lambda x, y: utility_curves(x, y, far_range=(0.1, 1.5)), "far_range"),
    ("far negative", lambda x, y: utility_curves(x, y, far_range=(-0.1, 0.5)), "far_range"),
    ("distance inverted", lambda x, y: utility_curves(x, y, distance_range=(1.0, 0.5)), "distance_range"),
    ("distance empty", lambda x, y: utility_curves(x, y, distance_range=(0.5, 0.5)), "distance_range"),
    ("distance inf", lambda x, y: utility_curves(x, y, distance_range=(0.0, float("inf"))), "distance_range"),
    ("one threshold", lambda x, y: utility_curves(x, y, num_thresholds=1), "num_thresholds"),
    ("beta zero", lambda x, y: utility_curves(x, y, beta=0.0), "beta"),
    ("beta negative", lambda x, y: utility_curves(x, y, beta=-1.0), "beta"),
    ("groups length", lambda x, y: utility_curves(x, y, groups=y[:-1]), "groups"),
    ("groups 2-D", lambda x, y: utility_curves(x, y, groups=y[:, None]), "groups"),
    ("chunk zero", lambda x, y: utility_curves(x, y, chunk_size=0), "chunk_size"),
]


@pytest.mark.parametrize("name,call,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, call, match):
    x, y = _xy()
    with pytest.raises(ValueError, match=match):
        call(x, y)


def test_degenerate_calibration_range_raises():
    # all negatives orthogonal: every negative distance is 1, so the FAR quantiles coincide
    x = torch.eye(6, dtype=torch.float64).repeat_interleave(2, dim=0)  # (12, 6): 6 classes of 2 equal rows
    y = torch.arange(6).repeat_interleave(2)
    with pytest.raises(ValueError, match="calibration range is empty"):
        utility_curves(x, y)


def test_singletons_are_excluded_and_counted():
    x, y = make_data(70, 30, 4, 3, 5)
    res = utility_curves(torch.tensor(x), torch.tensor(y))
    assert res.num_eligible == 3 and res.num_excluded == 5
    assert res.utility.shape == (100, 3)


def test_opis_scale_is_documented_and_its_extremes_are_reached():
    """opis() returns a bare float: its docstring gives the scale (at most 0.25, lower is better), and the
    extremes are what it says.  Oracle by hand: classes 0, 1 are two copies of one unit vector (positive
    distance 0), classes 2, 3 a vector and its opposite (positive distance 2), all four axes orthogonal
    (negative distance 1).  On thresholds in (0, 1): utility 1, 1, 0, 0, so the variance is 1/4 at every
    threshold; eps-OPIS with the worst half: (0 - 1)^2 = 1."""
    for doc in (opis_module.opis.__doc__, opis_module.UtilityCurves.opis.__doc__):
        assert doc is not None and "0.25" in doc and "lower is more consistent" in doc
    eye = torch.eye(4, dtype=torch.float64)
    x = torch.stack([eye[0], eye[0], eye[1], eye[1], eye[2], -eye[2], eye[3], -eye[3]])
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    c = utility_curves(x, y, distance_range=(0.1, 0.9))
    assert torch.equal(c.utility, torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64).expand(100, 4))
    assert c.opis == 0.25 == opis(x, y, distance_range=(0.1, 0.9))
    assert c.eps_opis(0.5) == 1.0
    assert opis(x[:4], y[:4], distance_range=(0.1, 0.9)) == 0.0  # two tight classes: the same utility


def test_the_pilot_brackets_hold_a_small_share_of_negatives_at_large_n():
    """80k samples whose classes spread very unevenly (the pilot once drew 16 rows here and its brackets
    kept up to 41 % of all negatives): each bracket holds under 1.5 % of the negatives and still
    contains its quantile (both shares estimated from 2M other random negative pairs)."""
    g = torch.Generator().manual_seed(5)
    n, classes = 80_000, 200
    y = torch.randint(0, classes, (n,), generator=g)
    spread = torch.logspace(-1.5, 0.5, classes)[torch.randperm(classes, generator=g)]  # (C,) 0.03 .. 3
    x = torch.randn(classes, 4, generator=g)[y] + spread[y, None] * torch.randn(n, 4, generator=g)
    _, lab = torch.unique(y, return_inverse=True)
    order = torch.argsort(lab, stable=True)
    pairs = SortedPairs(_pairs.unit_rows(x)[order].contiguous(), lab[order], order)
    qs = (0.01, 0.1)
    brackets = opis_module._pilot_brackets(pairs, qs, 6.0, 0)
    a = torch.randint(0, n, (2_000_000,), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, n, (2_000_000,), generator=torch.Generator().manual_seed(2))
    keep = (pairs.lab[a] != pairs.lab[b])
    s = (pairs.rows[a[keep]] * pairs.rows[b[keep]]).sum(dim=1)  # other negative pairs' similarities
    for q, (lo, hi) in zip(qs, brackets):
        assert float(((s >= lo) & (s <= hi)).double().mean()) < 0.015, (q, lo, hi)
        # the q-quantile of the distances = the similarity with a share q of negatives above it
        assert float((s > hi).double().mean()) < q < float((s >= lo).double().mean())
