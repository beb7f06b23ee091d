"""Tests for tcmlib.posthoc against brute-force oracles (every ordered pair in Python, float64 NumPy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcmlib.metrics import utility_curves
from tcmlib.posthoc import (
    ClusterThresholds,
    cluster_thresholds,
    compare_thresholding,
    method_bootstrap_ci,
    paired_method_difference,
    per_class_thresholds,
    query_rates,
)
from tcmlib.report import rates_at_threshold, threshold_for_far


def toy(n=60, d=6, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    centres = torch.randn(c, d, generator=g, dtype=torch.float64)
    spread = torch.linspace(0.3, 1.2, c, dtype=torch.float64)
    return centres[y] + spread[y, None] * torch.randn(n, d, generator=g, dtype=torch.float64), y


def dist(x):
    x = np.asarray(x, dtype=np.float64)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return 1.0 - xn @ xn.T  # (N, N)


def brute_query_rates(x, y, t):
    """{class: (FAR, FRR)} with query-based decisions d(q, g) <= t[q], classes with >= 2 samples."""
    d, y, t = dist(x), np.asarray(y), np.broadcast_to(np.asarray(t, dtype=np.float64), (len(y),))
    out = {}
    for c in sorted(set(y.tolist())):
        if (y == c).sum() < 2:
            continue
        fa = na = fr = npos = 0
        for q in np.flatnonzero(y == c):
            for g in range(len(y)):
                if g == q:
                    continue
                if y[g] == c:
                    npos += 1
                    fr += d[q, g] > t[q]
                else:
                    na += 1
                    fa += d[q, g] <= t[q]
        out[c] = (fa / na, fr / npos)
    return out


# ----------------------------------------------------------------------------- per-class thresholds
def test_per_class_hand_computed():
    # 1-D directions on the unit circle: class 0 at angles 0, 0.1; class 1 at 1.0, 1.1; class 2 at 3.0
    ang = np.array([0.0, 0.1, 1.0, 1.1, 3.0])
    x = np.stack([np.cos(ang), np.sin(ang)], 1)
    y = np.array([0, 0, 1, 1, 2])
    ct = per_class_thresholds(x, y, 0.0)  # FAR 0 quantile: the closest negative of each class
    d = dist(x)
    assert ct.class_ids.tolist() == [0, 1, 2]
    assert ct.thresholds[0].item() == pytest.approx(d[1, 2])  # angle 0.9
    assert ct.thresholds[1].item() == pytest.approx(d[1, 2])
    assert ct.thresholds[2].item() == pytest.approx(d[3, 4])  # angle 1.9
    ct1 = per_class_thresholds(x, y, 1.0)  # FAR 1: the farthest negative
    assert ct1.thresholds[2].item() == pytest.approx(d[0, 4])


@pytest.mark.parametrize("far", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_per_class_is_the_quantile_of_its_own_negatives(far, chunk):
    x, y = toy()
    d = dist(x)
    yn = y.numpy()
    ct = per_class_thresholds(x, y, far, chunk_size=chunk)
    for c, t in zip(ct.class_ids.tolist(), ct.thresholds.tolist()):
        neg = d[np.ix_(yn == c, yn != c)].ravel()
        assert t == pytest.approx(np.quantile(neg, far), abs=1e-12)
        assert t == pytest.approx(threshold_for_far(x, (y == c).long(), far), abs=1e-12)


def test_per_class_meets_the_target_for_every_class():
    x, y = toy(n=120, seed=3)
    ct = per_class_thresholds(x, y, 0.1)
    r = query_rates(x, y, ct.threshold_for(y))
    n_neg = [int((y == c).sum() * (y != c).sum()) for c in r.class_ids.tolist()]
    assert all(abs(f - 0.1) <= 1.0 / m + 1e-12 for f, m in zip(r.far.tolist(), n_neg))


def test_per_class_bad_input():
    x, y = toy()
    with pytest.raises(ValueError, match="far_target"):
        per_class_thresholds(x, y, 1.5)
    with pytest.raises(ValueError, match="one label"):
        per_class_thresholds(x, torch.zeros(60, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="entries"):
        per_class_thresholds(x, y[:10], 0.1)
    ct = per_class_thresholds(x, y, 0.1)
    with pytest.raises(ValueError, match="no threshold"):
        ct.threshold_for(torch.tensor([0, 99]))


# ----------------------------------------------------------------------------- query-based rates
@pytest.mark.parametrize("chunk", [4, 1024])
def test_query_rates_match_brute_force(chunk):
    x, y = toy(n=40)
    t = torch.linspace(0.2, 0.9, 40, dtype=torch.float64)
    r = query_rates(x, y, t, chunk_size=chunk)
    oracle = brute_query_rates(x, y, t.numpy())
    assert r.class_ids.tolist() == list(oracle)
    for i, c in enumerate(r.class_ids.tolist()):
        assert r.far[i].item() == pytest.approx(oracle[c][0], abs=1e-12)
        assert r.frr[i].item() == pytest.approx(oracle[c][1], abs=1e-12)


def test_query_rates_with_one_threshold_equal_rates_at_threshold():
    x, y = toy()
    for t in (0.1, 0.45, 1.3):
        q, r = query_rates(x, y, t), rates_at_threshold(x, y, t)
        assert torch.equal(q.class_ids, r.unit_ids)
        assert torch.allclose(q.far, r.far, atol=1e-15) and torch.allclose(q.frr, r.frr, atol=1e-15)
        assert q.global_far == pytest.approx(r.global_far) and q.global_frr == pytest.approx(r.global_frr)


def test_query_rates_ties_accepted():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = np.array([0, 0, 1, 1])
    r = query_rates(x, y, [0.0, 0.0, 1.0, 1.0])  # d = 0 within classes, 1 across
    assert r.frr.tolist() == [0.0, 0.0]
    assert r.far.tolist() == [0.0, 1.0]  # class 1 queries accept d = 1 <= 1


def test_query_rates_bad_input():
    x, y = toy()
    with pytest.raises(ValueError, match="one finite distance per sample"):
        query_rates(x, y, torch.zeros(5))
    with pytest.raises(ValueError, match="one finite distance per sample"):
        query_rates(x, y, torch.full((60,), float("nan")))
    with pytest.raises(ValueError, match="beta"):
        query_rates(x, y, 0.5, beta=0.0)
    with pytest.raises(ValueError, match=">= 2 samples"):
        query_rates(x[:3], torch.tensor([0, 1, 2]), 0.5)


# ----------------------------------------------------------------------------- cluster thresholds
def test_cluster_thresholds_match_brute_force_and_are_reproducible():
    x, y = toy(n=80, seed=1)
    cl = cluster_thresholds(x, y, 3, 0.1, seed=0, chunk_size=7)
    assert isinstance(cl, ClusterThresholds) and cl.centroids.shape == (3, 6)
    a = cl.assign(x).numpy()
    assert cl.cluster_sizes.tolist() == np.bincount(a, minlength=3).tolist()
    d, yn = dist(x), y.numpy()
    for k in range(3):
        neg = np.concatenate([d[q, yn != yn[q]] for q in np.flatnonzero(a == k)])
        assert cl.thresholds[k].item() == pytest.approx(np.quantile(neg, 0.1), abs=1e-12)
    again = cluster_thresholds(x, y, 3, 0.1, seed=0)
    assert torch.equal(again.thresholds, cl.thresholds) and torch.equal(again.centroids, cl.centroids)
    # nearest centroid, with the threshold of that centroid
    xn = x / x.norm(dim=1, keepdim=True)
    near = ((xn[:, None, :] - cl.centroids[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(cl.assign(3.0 * x), near)
    assert torch.equal(cl.threshold_for(x), cl.thresholds[near])


def test_one_cluster_is_the_global_threshold():
    x, y = toy()
    cl = cluster_thresholds(x, y, 1, 0.05)
    # every ordered negative pair twice: the same quantile up to the interpolation over doubled values
    d, yn = dist(x), y.numpy()
    iu = np.triu_indices(len(yn), 1)
    neg = d[iu][yn[iu[0]] != yn[iu[1]]]
    assert cl.thresholds[0].item() == pytest.approx(np.quantile(np.repeat(neg, 2), 0.05), abs=1e-12)
    assert cl.thresholds[0].item() == pytest.approx(threshold_for_far(x, y, 0.05), abs=5e-3)


def test_cluster_bad_input():
    x, y = toy()
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_thresholds(x, y, 0, 0.1)
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_thresholds(x, y, 61, 0.1)
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_thresholds(x, y, 2.5, 0.1)
    with pytest.raises(ValueError, match="far_target"):
        cluster_thresholds(x, y, 2, -0.1)
    with pytest.raises(ValueError, match="one label"):
        cluster_thresholds(x, torch.zeros(60, dtype=torch.long), 2, 0.1)
    cl = cluster_thresholds(x, y, 2, 0.1)
    with pytest.raises(ValueError, match="dimension"):
        cl.threshold_for(torch.randn(4, 3))


# ----------------------------------------------------------------------------- the comparison
def test_compare_thresholding():
    x, y = toy(n=160, seed=2)
    cal, ev = slice(0, 80), slice(80, 160)
    cmp = compare_thresholding(x[ev], y[ev], 0.1, calibration=(x[cal], y[cal]), n_clusters=3, seed=1)
    assert list(cmp.methods) == ["global", "cluster", "per-class oracle"]
    assert cmp.threshold_source == "calibration set"
    t = threshold_for_far(x[cal], y[cal], 0.1)
    assert cmp.global_threshold == t
    glob = cmp.methods["global"]
    oracle = brute_query_rates(x[ev], y[ev], t)
    assert glob.far.tolist() == pytest.approx([oracle[c][0] for c in glob.class_ids.tolist()])
    cl = cmp.methods["cluster"]
    oracle = brute_query_rates(x[ev], y[ev], cmp.clusters.threshold_for(x[ev]).numpy())
    assert cl.frr.tolist() == pytest.approx([oracle[c][1] for c in cl.class_ids.tolist()])
    # the oracle meets the target on every class: the smallest FAR spread
    s = {name: m.summary() for name, m in cmp.methods.items()}
    assert s["per-class oracle"]["FAR_std"] < min(s["global"]["FAR_std"], s["cluster"]["FAR_std"])
    # inconsistency = population variance of the F1 utility of (1 - FRR, 1 - FAR)
    tar, trr = 1 - glob.frr, 1 - glob.far
    u = 2 * tar * trr / (tar + trr)
    assert glob.inconsistency == pytest.approx(float(u.var(unbiased=False)))
    assert s["global"]["FAR_worst_class"] == int(glob.class_ids[int(glob.far.argmax())])
    text = cmp.to_text()
    assert "per-class oracle" in text and "inconsistency" in text


def test_inconsistency_is_opis_at_one_threshold():
    x, y = toy(n=90, seed=4)
    cmp = compare_thresholding(x, y, 0.05, n_clusters=2)
    assert cmp.threshold_source == "evaluation set itself"
    t = cmp.global_threshold
    curves = utility_curves(x, y, distance_range=(t, t + 0.1), num_thresholds=2)
    assert cmp.methods["global"].utility.tolist() == pytest.approx(curves.utility[0].tolist(), abs=1e-12)
    assert cmp.methods["global"].inconsistency == pytest.approx(float(curves.utility[0].var(unbiased=False)))


def test_compare_thresholding_bad_input():
    x, y = toy()
    with pytest.raises(ValueError, match="pair"):
        compare_thresholding(x, y, 0.1, calibration=(x,))
    with pytest.raises(ValueError, match="dimension"):
        compare_thresholding(x, y, 0.1, calibration=(torch.randn(20, 3), y[:20]))
    with pytest.raises(ValueError, match="beta"):
        compare_thresholding(x, y, 0.1, beta=-1)


# ----------------------------------------------------------------------------- intervals over classes
def _two_rules():
    x, y = toy(n=150, seed=5)
    return query_rates(x, y, 0.4), query_rates(x, y, torch.linspace(0.2, 0.7, 150, dtype=torch.float64))


def test_method_bootstrap_ci_matches_a_hand_loop():
    a, _ = _two_rules()
    far, u = a.far.numpy(), a.utility.numpy()
    for stat, vals, f in (("far_spread", far, np.std), ("inconsistency", u, np.var)):
        ci = method_bootstrap_ci(a, stat, n_boot=300, alpha=0.1, seed=3)
        rng = np.random.default_rng(3)
        reps = [f(vals[rng.integers(0, len(vals), size=len(vals))]) for _ in range(300)]
        assert ci.value == pytest.approx(f(vals), abs=1e-15)
        assert (ci.lo, ci.hi) == pytest.approx(tuple(np.quantile(reps, [0.05, 0.95])), abs=1e-15)
        assert ci.lo <= ci.value <= ci.hi
    assert method_bootstrap_ci(a, "inconsistency").value == pytest.approx(a.inconsistency)


def test_paired_method_difference_matches_a_hand_loop_and_is_antisymmetric():
    a, b = _two_rules()
    r = paired_method_difference(a, b, "far_spread", n_boot=200, seed=1)
    rng = np.random.default_rng(1)
    fa, fb = a.far.numpy(), b.far.numpy()
    reps = []
    for _ in range(200):
        i = rng.integers(0, len(fa), size=len(fa))
        reps.append(np.std(fa[i]) - np.std(fb[i]))
    assert r.difference == pytest.approx(np.std(fa) - np.std(fb), abs=1e-15)
    assert (r.lo, r.hi) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])), abs=1e-15)
    sign = np.sign(r.difference)
    assert r.share_other_sign == pytest.approx(np.mean(sign * np.array(reps) <= 0))
    flipped = paired_method_difference(b, a, "far_spread", n_boot=200, seed=1)
    assert flipped.difference == -r.difference and flipped.lo == pytest.approx(-r.hi)
    same = paired_method_difference(a, a, "inconsistency", n_boot=50)
    assert same.difference == 0.0 and same.share_other_sign == 1.0 and same.lo == same.hi == 0.0


def test_interval_helpers_bad_input():
    a, _ = _two_rules()
    x, y = toy(n=60, seed=6)
    other = query_rates(x[y < 5], y[y < 5], 0.4)  # classes 0-4 of 0-6
    with pytest.raises(ValueError, match="different classes"):
        paired_method_difference(a, other)
    with pytest.raises(ValueError, match="stat"):
        method_bootstrap_ci(a, "opis")
    with pytest.raises(ValueError, match="n_boot"):
        method_bootstrap_ci(a, n_boot=1)
    with pytest.raises(ValueError, match="alpha"):
        paired_method_difference(a, a, alpha=0.0)
