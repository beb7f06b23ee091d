"""Tests for tcmlib.report against independent oracles (every pair in a Python loop, float64 NumPy)."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from tcmlib.metrics import opis, utility_curves
from tcmlib.report import (
    compare_reports,
    load_embeddings_npy,
    opis_bootstrap_ci,
    paired_bootstrap_difference,
    rates_at_threshold,
    threshold_for_far,
    threshold_report,
)

opis_module = importlib.import_module("tcmlib.metrics.opis")


@pytest.fixture(autouse=True, params=["kept", "two passes"])
def counting_path(request, monkeypatch):
    """Every test runs with the report's counts from the pairs the curves' first pass kept, and from a
    second pass over the tiles (as for large N)."""
    if request.param == "two passes":
        monkeypatch.setattr(opis_module, "KEEP_MAX", 0)
    return request.param


def test_report_counts_from_kept_pairs_or_a_second_pass(counting_path, monkeypatch):
    calls = []
    real = opis_module._counting_pass
    monkeypatch.setattr(opis_module, "_counting_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = toy(n=90, c=9)
    rep = threshold_report(x, y, far_target=0.02, n_boot=20)
    want, glob = brute_rates(x.numpy(), y.numpy(), rep.threshold)
    np.testing.assert_allclose(rep.class_rates.far.numpy(), [want[u][0] for u in rep.class_rates.unit_ids.tolist()],
                               rtol=0, atol=1e-15)
    np.testing.assert_allclose(rep.class_rates.frr.numpy(), [want[u][1] for u in rep.class_rates.unit_ids.tolist()],
                               rtol=0, atol=1e-15)
    assert (rep.global_far, rep.global_frr) == pytest.approx(glob, abs=1e-15)
    assert len(calls) == (0 if counting_path == "kept" else 1)
    # a calibrated threshold far beyond the curves' range (FAR ~50 % > far_range's 10 %), and pass 1
    # keeping only the pairs above the range's bracket: the rates need the second pass
    calls.clear()
    monkeypatch.setattr(opis_module, "COLLECT_ALL_MAX", 0)
    wide = threshold_report(x, y, far_target=0.5, calibration=toy(n=90, c=9, seed=1), n_boot=20)
    want, glob = brute_rates(x.numpy(), y.numpy(), wide.threshold)
    np.testing.assert_allclose(wide.class_rates.far.numpy(), [want[u][0] for u in wide.class_rates.unit_ids.tolist()],
                               rtol=0, atol=1e-15)
    assert wide.global_far == pytest.approx(glob[0], abs=1e-15) and wide.global_far > 0.2
    assert len(calls) == 1


def pairs_of(x, y):
    """Every unordered pair (a, b, distance, positive?) in float64."""
    x = np.asarray(x, dtype=np.float64)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = np.asarray(y)
    return [(a, b, 1.0 - float(xn[a] @ xn[b]), bool(y[a] == y[b])) for a in range(len(y)) for b in range(a + 1, len(y))]


def brute_rates(x, y, t, groups=None):
    """{unit: (FAR, FRR, #neg, #pos)} for eligible units, plus global (FAR, FRR)."""
    pairs = pairs_of(x, y)
    units = np.asarray(y if groups is None else groups)
    out = {}
    for u in sorted(set(units.tolist())):
        touch = [(d, p) for a, b, d, p in pairs if units[a] == u or units[b] == u]
        pos = [d for d, p in touch if p]
        neg = [d for d, p in touch if not p]
        if pos and neg:
            out[u] = (sum(d <= t for d in neg) / len(neg), sum(d > t for d in pos) / len(pos), len(neg), len(pos))
    pos_all = [d for *_, d, p in pairs if p]
    neg_all = [d for *_, d, p in pairs if not p]
    return out, (sum(d <= t for d in neg_all) / len(neg_all), sum(d > t for d in pos_all) / len(pos_all))


def toy(n=60, d=6, c=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    centres = torch.randn(c, d, generator=g, dtype=torch.float64)
    spread = torch.linspace(0.3, 1.2, c, dtype=torch.float64)
    x = centres[y] + spread[y, None] * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype), y


# ----------------------------------------------------------------------------- threshold_for_far
@pytest.mark.parametrize("far", [0.0, 1e-2, 0.05, 0.37, 1.0])
@pytest.mark.parametrize("chunk", [7, 1024])
def test_threshold_is_the_negative_distance_quantile(far, chunk):
    x, y = toy()
    neg = np.array([d for *_, d, p in pairs_of(x, y) if not p])
    expected = np.quantile(neg, far)
    assert threshold_for_far(x, y, far, chunk_size=chunk) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("far", [0.0, 0.013, 0.5, 0.99, 1.0])
def test_threshold_refinement_passes_are_exact(monkeypatch, far):
    """The pilot brackets forced on, and missed (slack 0), force refinement passes of the shared search."""
    import importlib

    om = importlib.import_module("tcmlib.metrics.opis")
    monkeypatch.setattr(om, "COLLECT_ALL_MAX", 0)
    real = om._negative_distance_quantiles
    monkeypatch.setattr(om, "_negative_distance_quantiles", lambda *a, **k: real(*a, **{**k, "slack": 0.0}))
    import tcmlib.report as rp

    monkeypatch.setattr(rp, "_negative_distance_quantiles", om._negative_distance_quantiles)
    x, y = toy(n=70)
    neg = np.array([d for *_, d, p in pairs_of(x, y) if not p])
    assert threshold_for_far(x, y, far, chunk_size=9) == pytest.approx(np.quantile(neg, far), abs=1e-12)


def test_threshold_with_many_tied_distances(monkeypatch):
    """Repeated rows give many identical distances: brackets full of ties still give the exact quantile."""
    import importlib

    monkeypatch.setattr(importlib.import_module("tcmlib.metrics.opis"), "COLLECT_ALL_MAX", 0)
    base = torch.eye(4, dtype=torch.float64)
    x = base.repeat_interleave(5, dim=0)  # 4 classes x 5 identical rows: negatives all at d = 1
    x[0, 1] = 0.5  # one negative distance differs
    y = torch.arange(4).repeat_interleave(5)
    neg = np.array([d for *_, d, p in pairs_of(x, y) if not p])
    for far in (0.0, 0.3, 1.0):
        assert threshold_for_far(x, y, far) == pytest.approx(np.quantile(neg, far), abs=1e-12)


def test_threshold_meets_the_target_on_its_own_data():
    x, y = toy(n=80)
    for far in (0.01, 0.1, 0.5):
        t = threshold_for_far(x, y, far)
        got = rates_at_threshold(x, y, t).global_far
        m = rates_at_threshold(x, y, t).total_neg
        assert far <= got <= far + 1.0 / m + 1e-12  # quantile: at least far, at most one pair more


def test_threshold_numpy_and_float32_inputs():
    x, y = toy(dtype=torch.float32)
    t_torch = threshold_for_far(x, y, 0.05)
    t_np = threshold_for_far(x.numpy(), y.numpy(), 0.05)
    assert t_torch == t_np
    neg = np.array([d for *_, d, p in pairs_of(x, y) if not p])
    assert t_torch == pytest.approx(np.quantile(neg, 0.05), abs=1e-6)


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_threshold_rejects_bad_far(bad):
    x, y = toy()
    with pytest.raises(ValueError, match="far_target"):
        threshold_for_far(x, y, bad)


def test_threshold_rejects_one_class_and_bad_shapes():
    x, _ = toy()
    with pytest.raises(ValueError, match="no negative pairs"):
        threshold_for_far(x, torch.zeros(len(x), dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="labels has"):
        threshold_for_far(x, torch.zeros(3, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        threshold_for_far(x, torch.arange(len(x)) % 3, 0.1, chunk_size=0)


# ----------------------------------------------------------------------------- rates_at_threshold
@pytest.mark.parametrize("chunk", [5, 1024])
@pytest.mark.parametrize("use_groups", [False, True])
def test_rates_match_brute_force(chunk, use_groups):
    x, y = toy(n=50, c=6)
    y[0] = 99  # a singleton class: excluded per class, still forms negative pairs
    groups = (torch.arange(len(y)) * 7) % 4 if use_groups else None
    t = threshold_for_far(x, y, 0.08)
    r = rates_at_threshold(x, y, t, groups=groups, chunk_size=chunk)
    want, (gfar, gfrr) = brute_rates(x, y, t, groups)
    assert r.unit_ids.tolist() == list(want)
    assert r.far.tolist() == pytest.approx([v[0] for v in want.values()], abs=1e-15)
    assert r.frr.tolist() == pytest.approx([v[1] for v in want.values()], abs=1e-15)
    assert r.num_neg.tolist() == [v[2] for v in want.values()]
    assert r.num_pos.tolist() == [v[3] for v in want.values()]
    assert r.global_far == pytest.approx(gfar, abs=1e-15) and r.global_frr == pytest.approx(gfrr, abs=1e-15)
    assert r.num_excluded == (0 if use_groups else 1)
    assert r.by == ("group" if use_groups else "class")


def test_rates_ties_at_the_threshold_are_accepted():
    # distances exactly 0 (identical rows) and exactly 1 (orthogonal rows)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1, 2])
    r = rates_at_threshold(x, y, 0.0)
    assert r.frr.tolist() == [0.0, 0.0]  # positive pairs at d = 0 accepted at t = 0
    # class 0's negatives: 4 with class 1 (d = 1), 2 with sample 4 (d = 0) -> FAR 2/6
    assert r.far.tolist() == pytest.approx([2 / 6, 0.0])
    assert rates_at_threshold(x, y, 1.0).far.tolist() == [1.0, 1.0]


def test_rates_agree_with_utility_curves():
    x, y = toy(n=70, dtype=torch.float32)
    t = threshold_for_far(x, y, 0.05)
    r = rates_at_threshold(x, y, t)
    cv = utility_curves(x, y, distance_range=(t, t + 0.5), num_thresholds=3)
    assert torch.equal(r.unit_ids, cv.class_ids)
    assert torch.allclose(r.far, 1 - cv.trr[0], atol=1e-15)
    assert torch.allclose(r.frr, 1 - cv.tar[0], atol=1e-15)


def test_rates_bad_input():
    x, y = toy()
    with pytest.raises(ValueError, match="threshold"):
        rates_at_threshold(x, y, math.inf)
    with pytest.raises(ValueError, match="groups"):
        rates_at_threshold(x, y, 0.5, groups=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="no eligible"):
        rates_at_threshold(x, torch.arange(len(y)), 0.5)  # all singletons
    with pytest.raises(ValueError, match="NaN"):
        rates_at_threshold(x.clone().fill_(math.nan), y, 0.5)


def test_summary():
    x, y = toy(n=80)
    r = rates_at_threshold(x, y, threshold_for_far(x, y, 0.05))
    s = r.summary(0.05)
    f = r.far.numpy()
    assert s["FAR_min"] == f.min() and s["FAR_max"] == f.max()
    assert s["FAR_median"] == pytest.approx(np.median(f))
    assert s["share_FAR_over_2x"] == pytest.approx((f > 0.1).mean())


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_matches_explicit_resampling():
    x, y = toy(n=90, c=9)
    cv = utility_curves(x, y)
    n_boot, seed = 200, 3
    rng = np.random.default_rng(seed)
    u = cv.utility.numpy()
    boots = [u[:, rng.integers(0, u.shape[1], size=u.shape[1])].var(axis=1).mean() for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [0.05, 0.95])
    got = opis_bootstrap_ci(cv, n_boot=n_boot, alpha=0.1, seed=seed)
    assert got.opis == cv.opis
    assert got.lo == pytest.approx(lo, rel=1e-9) and got.hi == pytest.approx(hi, rel=1e-9)
    assert got.lo <= got.opis * 1.5 and got.lo <= got.hi


def test_bootstrap_from_embeddings_and_groups():
    x, y = toy(n=90, c=9)
    a = opis_bootstrap_ci(x, y, n_boot=50, seed=1)
    b = opis_bootstrap_ci(utility_curves(x, y), n_boot=50, seed=1)
    assert a == b and a.opis == opis(x, y)
    groups = torch.arange(len(y)) % 5
    c = opis_bootstrap_ci(x, y, n_boot=50, seed=1, groups=groups)
    assert c.opis == opis(x, y, groups=groups)


def test_bootstrap_identical_classes_has_zero_width():
    # every class identical up to a rotation of the coordinates -> identical curves -> OPIS 0, CI [0, 0]
    base = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.9, 0.3, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    x = torch.cat([base.roll(2 * i, dims=1) for i in range(3)])
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    ci = opis_bootstrap_ci(x, y, n_boot=20, distance_range=(0.0, 1.5))
    assert max(abs(v) for v in ci) < 1e-15


@pytest.mark.parametrize("kw,match", [({"n_boot": 1}, "n_boot"), ({"alpha": 0.0}, "alpha"), ({"alpha": 1.2}, "alpha")])
def test_bootstrap_bad_input(kw, match):
    x, y = toy()
    with pytest.raises(ValueError, match=match):
        opis_bootstrap_ci(x, y, **kw)
    with pytest.raises(ValueError, match="labels are required"):
        opis_bootstrap_ci(x)
    with pytest.raises(ValueError, match="either"):
        opis_bootstrap_ci(utility_curves(x, y), y)


# ----------------------------------------------------------------------------- report
def test_report_with_calibration_and_groups():
    x, y = toy(n=120, c=12, dtype=torch.float32)
    cal = slice(0, 60)
    ev = slice(60, 120)
    groups = torch.arange(60) % 3
    rep = threshold_report(x[ev], y[ev], far_target=0.05, calibration=(x[cal], y[cal]), groups=groups,
                           n_boot=100, name="toy")
    assert rep.threshold == threshold_for_far(x[cal], y[cal], 0.05)
    assert rep.threshold_source == "calibration set"
    assert rep.calibration_far == rates_at_threshold(x[cal], y[cal], rep.threshold).global_far
    r = rates_at_threshold(x[ev], y[ev], rep.threshold)
    assert torch.equal(rep.class_rates.far, r.far) and rep.global_frr == r.global_frr
    assert rep.group_rates is not None and rep.group_rates.unit_ids.tolist() == [0, 1, 2]
    assert rep.opis == opis(x[ev], y[ev])
    assert rep.opis_ci.lo <= rep.opis_ci.hi
    text = rep.to_text()
    assert "calibration set" in text and "per group (3)" in text and "R@1" in text
    row = rep.row()
    assert row["global_FAR"] == r.global_far and "group_FAR_max" in row


def test_report_without_calibration_numpy_input_and_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    x, y = toy(n=80)
    rep = threshold_report(x.numpy(), y.numpy(), far_target=0.02, n_boot=50)
    assert rep.threshold_source == "evaluation set itself" and rep.calibration_far is None
    assert rep.global_far >= 0.02
    fig = rep.plot()
    fig.savefig(tmp_path / "r.png")
    rep2 = threshold_report(x, y, far_target=0.02, n_boot=50, name="b")
    cmp = compare_reports({"a": rep, "b": rep2})
    text = cmp.to_text()
    assert text.splitlines()[0] == "| | a | b |" and "OPIS" in text and "group" not in text
    cmp.plot().savefig(tmp_path / "c.png")


def test_report_bad_input():
    x, y = toy()
    with pytest.raises(ValueError, match="calibration must be a pair"):
        threshold_report(x, y, calibration=x)
    with pytest.raises(ValueError, match="dimension"):
        threshold_report(x, y, calibration=(x[:, :3], y))
    with pytest.raises(ValueError, match="far_target"):
        threshold_report(x, y, far_target=2.0)
    with pytest.raises(ValueError, match="at least one report"):
        compare_reports({})
    with pytest.raises(ValueError, match="not a ThresholdReport"):
        compare_reports({"a": 1})


# ----------------------------------------------------------------------------- .npy files
def test_load_embeddings_npy_roundtrip_and_errors(tmp_path):
    x, y = toy(dtype=torch.float32)
    np.save(tmp_path / "e.npy", x.numpy())
    np.save(tmp_path / "l.npy", y.numpy()[:, None])  # (N, 1) is accepted
    e, lab = load_embeddings_npy(tmp_path / "e.npy", tmp_path / "l.npy")
    assert torch.equal(e, x) and torch.equal(lab, y)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_embeddings_npy(tmp_path / "missing.npy", tmp_path / "l.npy")
    np.save(tmp_path / "short.npy", y.numpy()[:5])
    with pytest.raises(ValueError, match="one label per embedding row"):
        load_embeddings_npy(tmp_path / "e.npy", tmp_path / "short.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="plain .npy"):
        load_embeddings_npy(tmp_path / "obj.npy", tmp_path / "l.npy")
    np.save(tmp_path / "f.npy", y.numpy() + 0.5)
    with pytest.raises(ValueError, match="integer"):
        load_embeddings_npy(tmp_path / "e.npy", tmp_path / "f.npy")
    np.savez(tmp_path / "z.npz", e=x.numpy())
    with pytest.raises(ValueError, match="npz"):
        load_embeddings_npy(tmp_path / "z.npz", tmp_path / "l.npy")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accept_boundary_is_the_smallest_accepted_similarity(dtype):
    """s >= boundary <=> float64(1 - s) <= t, including t = 0, 1 (cosine 0: denormals), 2 and out-of-range t."""
    from tcmlib.report import _accept_boundary

    work = torch.float32 if dtype == np.float32 else torch.float64
    ts = [0.0, 1.0, 2.0, 1e-9, 0.3, 1.7, -1.0, 5.0] + list(np.random.default_rng(0).uniform(0, 2, 30))
    for t in ts:
        b = dtype(_accept_boundary(float(t), work))
        prev = np.nextafter(b, dtype(-np.inf))
        assert (1.0 - np.float64(b)) <= t or b == 3.0
        assert (1.0 - np.float64(prev)) > t or b == -3.0


# ----------------------------------------------------------------------------- query x gallery pairs
def brute_gallery(q, qy, g, gy, far, far_range=(0.05, 0.4), k_thr=30, eps=0.25, groups=None):
    """Every query x gallery pair in a loop (float64 NumPy), each counted for its query's class (group).

    Returns the threshold for ``far``, {unit: (FAR, FRR)} there, global (FAR, FRR), and OPIS / eps-OPIS
    by hand over the ``far_range`` quantile thresholds, and R@1 (queries with a same-label gallery item).
    """
    qn = np.asarray(q, dtype=np.float64)
    qn = qn / np.linalg.norm(qn, axis=1, keepdims=True)
    gn = np.asarray(g, dtype=np.float64)
    gn = gn / np.linalg.norm(gn, axis=1, keepdims=True)
    qy, gy = np.asarray(qy), np.asarray(gy)
    units = qy if groups is None else np.asarray(groups)
    pairs = [(i, j, 1.0 - float(qn[i] @ gn[j]), bool(qy[i] == gy[j])) for i in range(len(qy)) for j in range(len(gy))]
    neg_all = np.array([d for i, j, d, p in pairs if not p])
    pos_all = np.array([d for i, j, d, p in pairs if p])
    t = float(np.quantile(neg_all, far))
    thr = np.linspace(*np.quantile(neg_all, far_range), k_thr)
    rates, util = {}, []
    for u in sorted(set(units.tolist())):
        pos = np.array([d for i, j, d, p in pairs if units[i] == u and p])
        neg = np.array([d for i, j, d, p in pairs if units[i] == u and not p])
        if len(pos) and len(neg):
            rates[u] = (float(np.mean(neg <= t)), float(np.mean(pos > t)))
            tar, trr = (pos[:, None] <= thr).mean(0), (neg[:, None] > thr).mean(0)
            util.append(np.where(tar + trr > 0, 2 * tar * trr / np.maximum(tar + trr, 1e-300), 0.0))
    util = np.array(util)  # (T, K)
    opis_v = float(util.var(axis=0).mean())
    w = math.ceil(round(eps * len(util), 9))
    worst = np.argsort(util.mean(axis=1), kind="stable")[:w]
    rest = np.setdiff1d(np.arange(len(util)), worst)
    eps_v = float(((util[worst].mean(0) - util[rest].mean(0)) ** 2).mean())
    hit = [gy[np.argmax(gn @ qn[i])] == qy[i] for i in range(len(qy)) if (gy == qy[i]).any()]
    return t, rates, (float(np.mean(neg_all <= t)), float(np.mean(pos_all > t))), opis_v, eps_v, float(np.mean(hit))


def gallery_toy(dtype=torch.float64):
    x, y = toy(n=110, c=9, seed=4, dtype=dtype)
    y[:3] = 50  # a query class the gallery lacks (not eligible) ...
    y[-2:] = 60  # ... and a gallery-only class (a distractor)
    return x[:45], y[:45], x[45:], y[45:]


@pytest.mark.parametrize("chunk", [4, 1024])
def test_query_gallery_report_matches_brute_force(chunk):
    q, qy, g, gy = gallery_toy()
    groups = torch.arange(45) % 3
    kw = dict(far_range=(0.05, 0.4), num_thresholds=30, eps=0.25, n_boot=50)
    rep = threshold_report(q, qy, far_target=0.03, groups=groups, reference=g, reference_labels=gy,
                           chunk_size=chunk, **kw)
    t, rates, glob, opis_v, eps_v, r1 = brute_gallery(q, qy, g, gy, 0.03)
    assert rep.threshold == pytest.approx(t, abs=1e-12)
    assert rep.threshold == threshold_for_far(q, qy, 0.03, reference=g, reference_labels=gy, chunk_size=chunk)
    c = rep.class_rates
    assert c.unit_ids.tolist() == list(rates)  # class 50 (no gallery item) is not eligible, 60 is no unit
    assert 50 not in c.unit_ids.tolist() and c.num_excluded == 1
    np.testing.assert_allclose(c.far.numpy(), [v[0] for v in rates.values()], rtol=0, atol=1e-15)
    np.testing.assert_allclose(c.frr.numpy(), [v[1] for v in rates.values()], rtol=0, atol=1e-15)
    assert (c.global_far, c.global_frr) == pytest.approx(glob, abs=1e-15)
    assert c.total_neg + c.total_pos == 45 * 65
    _, g_rates, *_ = brute_gallery(q, qy, g, gy, 0.03, groups=groups.numpy())
    gr = rep.group_rates
    assert gr is not None and gr.unit_ids.tolist() == list(g_rates)
    np.testing.assert_allclose(gr.far.numpy(), [v[0] for v in g_rates.values()], rtol=0, atol=1e-15)
    np.testing.assert_allclose(gr.frr.numpy(), [v[1] for v in g_rates.values()], rtol=0, atol=1e-15)
    assert rep.opis == pytest.approx(opis_v, abs=1e-14) and rep.eps_opis == pytest.approx(eps_v, abs=1e-14)
    assert rep.opis_ci.opis == rep.opis and rep.opis_ci.lo <= rep.opis <= rep.opis_ci.hi
    assert rep.recall_at_1 == pytest.approx(r1, abs=1e-15)
    alone = rates_at_threshold(q, qy, rep.threshold, reference=g, reference_labels=gy, chunk_size=chunk)
    assert torch.equal(alone.far, c.far) and torch.equal(alone.frr, c.frr)
    assert "queries x a gallery of 65" in rep.to_text()


def test_gallery_equal_to_the_queries_adds_only_self_pairs():
    """reference = embeddings: per-class FAR / TRR as leave-one-out exactly; TAR over n_i^2 ordered pairs
    with the n_i self-pairs accepted (n_i^2 TAR' = 2 C(n_i, 2) TAR + n_i), as the docstrings say."""
    x, y = toy(n=70, c=6, seed=2)
    one = utility_curves(x, y, distance_range=(0.05, 0.6), num_thresholds=12)
    both = utility_curves(x, y, distance_range=(0.05, 0.6), num_thresholds=12, reference=x, reference_labels=y)
    assert torch.equal(one.class_ids, both.class_ids)
    torch.testing.assert_close(both.trr, one.trr, rtol=0, atol=1e-15)
    n_i = torch.bincount(y)[one.class_ids].double()
    torch.testing.assert_close(n_i**2 * both.tar, n_i * (n_i - 1) * one.tar + n_i, rtol=0, atol=1e-9)
    t = threshold_for_far(x, y, 0.05)
    r1, r2 = rates_at_threshold(x, y, t), rates_at_threshold(x, y, t, reference=x, reference_labels=y)
    torch.testing.assert_close(r2.far, r1.far, rtol=0, atol=1e-15)
    n_i = torch.bincount(y)[r1.unit_ids].double()  # the self-pairs are accepted positives: rejects x 2 of n_i^2
    torch.testing.assert_close(n_i**2 * r2.frr, n_i * (n_i - 1) * r1.frr, rtol=0, atol=1e-9)


def test_query_gallery_bad_input():
    q, qy, g, gy = gallery_toy()
    with pytest.raises(ValueError, match="together"):
        threshold_report(q, qy, reference=g)
    with pytest.raises(ValueError, match="dimension"):
        rates_at_threshold(q, qy, 0.3, reference=g[:, :2], reference_labels=gy)
    with pytest.raises(ValueError, match="eligible"):
        threshold_report(q, qy, reference=g, reference_labels=gy + 1000)


def test_report_units_are_stated_and_signatures_explicit():
    import inspect
    import re

    from tcmlib import report

    x, y = toy(n=60)
    rep = threshold_report(x, y, n_boot=20)
    text = rep.to_text()
    assert re.search(r"R@1 \d+\.\d\d %", text) and "at most 0.25" in text  # rates in %, OPIS's scale
    table = compare_reports({"a": rep}).to_text()
    assert f"| R@1 | {100 * rep.recall_at_1:.2f} % |" in table and "at most 0.25" in table
    assert rep.row()["R@1"] == rep.recall_at_1 <= 1.0  # fractions in rows
    for name in report.__all__:
        fn = getattr(report, name)
        if inspect.isfunction(fn):
            kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
            assert inspect.Parameter.VAR_KEYWORD not in kinds, name


@pytest.mark.parametrize("bad, meant", [(1, "0.01"), (1.0, "0.01"), (5, "0.05"), (0.7, "0.007"), (50, "0.5")])
def test_report_refuses_a_far_target_that_looks_like_a_percent(bad, meant):
    """far_target=1 once gave a report at 100 % FAR; anything above 0.5 is now refused, naming the fraction."""
    x, y = toy(n=60)
    with pytest.raises(ValueError, match=rf"would accept .* a fraction, not a percentage: .* far_target={meant}\b"):
        threshold_report(x, y, far_target=bad, n_boot=10)
    with pytest.raises(ValueError, match="not a percentage"):
        paired_bootstrap_difference(x, x, y, "far_spread", far_target=bad, n_boot=10)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):  # no percent reading: out of range
        threshold_report(x, y, far_target=150, n_boot=10)
    rep = threshold_report(x, y, far_target=0.5, n_boot=10)  # the largest accepted target
    assert rep.threshold == threshold_for_far(x, y, 0.5)


def test_report_names_its_two_fars_in_one_line():
    x, y = toy(n=60)
    for far, where in [(1e-3, "not at the threshold above: its FAR 0.10 % lies outside that range"),
                       (0.05, "the threshold above (FAR 5.00 %) is one of them")]:
        text = threshold_report(x, y, far_target=far, n_boot=10).to_text()
        lines = [ln for ln in text.splitlines() if "OPIS and eps-OPIS average over" in ln]
        assert len(lines) == 1 and "global FAR 1 % .. 10 %" in lines[0] and where in lines[0], text
    text = threshold_report(x, y, far_target=1e-3, far_range=(1e-4, 1e-2), n_boot=10).to_text()
    assert "global FAR 0.01 % .. 1 %, the threshold above (FAR 0.10 %) is one of them" in text
