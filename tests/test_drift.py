"""Tests for tcmlib.drift against hand-computed cases and brute-force pair loops (float64 NumPy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta

from tcmlib.drift import audit_size, far_audit, group_drift, threshold_drift
from tcmlib.report import threshold_for_far


def toy(n=90, d=5, c=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    centres = torch.randn(c, d, generator=g, dtype=torch.float64)
    spread = torch.linspace(0.3, 1.2, c, dtype=torch.float64)
    return centres[y] + spread[y, None] * torch.randn(n, d, generator=g, dtype=torch.float64), y


def pair_dists(x, y):
    """(negative distances, positive distances) over unordered pairs a < b, float64."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    neg, pos = [], []
    for a in range(len(y)):
        for b in range(a + 1, len(y)):
            d = 1.0 - xn[a] @ xn[b]
            (pos if y[a] == y[b] else neg).append(d)
    return np.array(neg), np.array(pos)


def circle(angles):
    a = np.asarray(angles, dtype=np.float64)
    return np.stack([np.cos(a), np.sin(a)], 1)


# ----------------------------------------------------------------------------- group -> group
def test_group_drift_hand_computed():
    # customer 0: class 0 at angle 0 (x2), class 1 at 0.5; customer 1: class 2 at 2.0 (x2), class 3 at 2.3,
    # class 4 at 3.0. Negatives of 0: two at angle gap 0.5. Of 1: gaps 0.3, 0.3, 1.0, 1.0, 0.7.
    x = circle([0.0, 0.0, 0.5, 2.0, 2.0, 2.3, 3.0])
    y = np.array([0, 0, 1, 2, 2, 3, 4])
    g = np.array([0, 0, 0, 1, 1, 1, 1])
    gd = group_drift(x, y, g, 0.5)
    d = lambda gap: 1 - math.cos(gap)
    assert gd.thresholds.tolist() == pytest.approx([d(0.5), d(0.7)])  # median of [.3, .3, .7, 1, 1]: 0.7
    # row: where chosen, column: where applied
    assert gd.far.flatten().tolist() == pytest.approx([1.0, 2 / 5, 1.0, 3 / 5])
    assert gd.frr.flatten().tolist() == [0.0, 0.0, 0.0, 0.0]
    assert gd.off_diagonal().tolist() == pytest.approx([0.8, 2.0])  # ratios 0.4 / 0.5 and 1.0 / 0.5
    s = gd.summary()
    assert (s["worst_source"], s["worst_target"]) == (1, 0)
    assert s["share_over_2x"] == 0.0 and s["ratio_max"] == pytest.approx(2.0)


def test_group_drift_matches_brute_force():
    x, y = toy(n=120, seed=1)
    groups = (y % 3).numpy()  # three customers, three classes each
    gd = group_drift(x, y, groups, 0.1, chunk_size=7)
    yn = y.numpy()
    per = [pair_dists(x[groups == h], yn[groups == h]) for h in range(3)]
    for gi in range(3):
        t = np.quantile(per[gi][0], 0.1)
        assert gd.thresholds[gi].item() == pytest.approx(t, abs=1e-12)
        for h in range(3):
            neg, pos = per[h]
            assert gd.far[gi, h].item() == pytest.approx(np.mean(neg <= t), abs=1e-12)
            assert gd.frr[gi, h].item() == pytest.approx(np.mean(pos > t), abs=1e-12)
    # in-sample: the target, up to one pair of the customer's negatives
    for h in range(3):
        assert abs(gd.far[h, h].item() - 0.1) <= 1 / len(per[h][0]) + 1e-12


def test_group_drift_same_distribution_is_near_one_and_identical_groups_exactly_one():
    x, y = toy(n=60, seed=2)
    # two customers holding copies of the same samples (relabelled classes): every ratio is identical
    x2 = torch.cat([x, x])
    y2 = torch.cat([y, y + 100])
    g2 = torch.cat([torch.zeros(60, dtype=torch.long), torch.ones(60, dtype=torch.long)])
    gd = group_drift(x2, y2, g2, 0.2)
    assert gd.thresholds[0] == gd.thresholds[1]
    assert torch.equal(gd.far[0], gd.far[1]) and gd.far[0, 0] == gd.far[0, 1]


def test_group_drift_bad_input():
    x, y = toy()
    with pytest.raises(ValueError, match="one class only"):
        group_drift(x, y, (y == 0).long(), 0.1)  # group 1 is class 0 alone
    with pytest.raises(ValueError, match=">= 2 groups"):
        group_drift(x, y, torch.zeros(90, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="far_target"):
        group_drift(x, y, y % 2, 0.0)
    with pytest.raises(ValueError, match="groups"):
        group_drift(x, y, (y % 2)[:10], 0.1)
    with pytest.raises(ValueError, match="integer"):
        group_drift(x, y, torch.rand(90), 0.1)


# ----------------------------------------------------------------------------- one set -> another
def test_threshold_drift_matches_brute_force():
    x, y = toy(n=160, seed=3)
    src, tgt = y < 4, y >= 4  # disjoint classes: chosen on 0-3, applied to 4-8
    groups = (y[tgt] % 2).numpy()
    dr = threshold_drift((x[src], y[src]), (x[tgt], y[tgt]), 0.05, groups=groups)
    neg_s, _ = pair_dists(x[src], y[src])
    t = np.quantile(neg_s, 0.05)
    assert dr.threshold == pytest.approx(t, abs=1e-12)
    assert dr.threshold == threshold_for_far(x[src], y[src], 0.05)
    assert abs(dr.source_far - 0.05) <= 1 / len(neg_s) + 1e-12
    xt, yt = x[tgt].numpy(), y[tgt].numpy()
    neg_t, _ = pair_dists(xt, yt)
    assert dr.global_far == pytest.approx(np.mean(neg_t <= t), abs=1e-12)
    # per class: pairs touching the class
    xn = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    dm = 1 - xn @ xn.T
    for i, c in enumerate(dr.class_rates.unit_ids.tolist()):
        assert dr.class_rates.far[i].item() == pytest.approx(np.mean(dm[np.ix_(yt == c, yt != c)] <= t))
    # per customer: its own pairs only
    for i, h in enumerate(dr.group_ids.tolist()):
        neg, pos = pair_dists(xt[groups == h], yt[groups == h])
        assert dr.group_far[i].item() == pytest.approx(np.mean(neg <= t), abs=1e-12)
        assert dr.group_frr[i].item() == pytest.approx(np.mean(pos > t), abs=1e-12)
    s = dr.summary()
    f = dr.class_rates.far.numpy()
    assert s["global_ratio"] == pytest.approx(dr.global_far / 0.05)
    assert s["share_classes_over_2x"] == pytest.approx(np.mean(f > 0.1))
    assert s["class_ratio_max"] == pytest.approx(f.max() / 0.05)
    assert s["group_ratio_max"] == pytest.approx(dr.group_far.max().item() / 0.05)


def test_threshold_drift_customer_without_positive_pairs():
    # a customer of singleton classes: its FAR is defined, its FRR is not (NaN)
    x = circle([0.0, 0.0, 1.0, 1.0, 0.2, 0.6, 2.0])
    y = np.array([0, 0, 1, 1, 2, 3, 4])
    g = np.array([0, 0, 0, 0, 1, 1, 1])
    dr = threshold_drift((x[:4], y[:4]), (x, y), 0.5, groups=g)
    t = 1 - math.cos(1.0)  # all four negatives of the source are at gap 1.0
    assert dr.threshold == pytest.approx(t)
    # customer 1 gaps: 0.4, 1.8, 1.4 -> one of three accepted
    assert dr.group_far.tolist() == pytest.approx([1.0, 1 / 3])
    assert dr.group_frr[0].item() == 0.0 and math.isnan(dr.group_frr[1].item())


def test_threshold_drift_bad_input():
    x, y = toy()
    with pytest.raises(ValueError, match="pair"):
        threshold_drift((x,), (x, y), 0.1)
    with pytest.raises(ValueError, match="dimension"):
        threshold_drift((x[:, :3], y), (x, y), 0.1)
    with pytest.raises(ValueError, match="far_target"):
        threshold_drift((x, y), (x, y), 1.0)
    with pytest.raises(ValueError, match="source labels"):
        threshold_drift((x, y[:5]), (x, y), 0.1)
    with pytest.raises(ValueError, match="one class only"):
        threshold_drift((x, y), (x, y), 0.1, groups=(y == 0).long())


# ----------------------------------------------------------------------------- monitoring
def test_far_audit_clopper_pearson_from_beta_quantiles():
    for k, n in ((0, 300), (3, 300), (10, 300), (50, 1000)):
        a = far_audit(k, n, 0.01)
        lo = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
        hi = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
        assert (a.lo, a.hi) == pytest.approx((lo, hi), rel=1e-7, abs=1e-12)
        assert a.estimate == k / n
    assert far_audit(0, 300, 0.01).hi == pytest.approx(1 - 0.025 ** (1 / 300))  # hand: 0.01222
    assert far_audit(0, 300, 0.01).verdict == "inconclusive"
    assert far_audit(10, 300, 0.01).verdict == "recalibrate"  # lo = 0.016 > 0.01
    assert far_audit(10, 300, 0.01, tolerance=2.0).verdict == "inconclusive"  # 0.016 < 0.02
    assert far_audit(0, 400, 0.01).verdict == "within target"


def test_audit_size_is_the_smallest_n():
    n = audit_size(0.01)
    assert n == math.ceil(math.log(0.025) / math.log(0.99)) == 368
    assert far_audit(0, n, 0.01).verdict == "within target"
    assert far_audit(0, n - 1, 0.01).verdict == "inconclusive"
    for far in (1e-3, 0.05, 0.2):
        m = audit_size(far, alpha=0.1)
        assert far_audit(0, m, far, alpha=0.1).hi <= far < far_audit(0, m - 1, far, alpha=0.1).hi


def test_far_audit_bad_input():
    with pytest.raises(ValueError, match="false_accepts"):
        far_audit(5, 3, 0.01)
    with pytest.raises(ValueError, match="audited"):
        far_audit(0, 0, 0.01)
    with pytest.raises(ValueError, match="false_accepts"):
        far_audit(1.5, 10, 0.01)
    with pytest.raises(ValueError, match="far_target"):
        far_audit(1, 10, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        far_audit(1, 10, 0.01, alpha=1.0)
    with pytest.raises(ValueError, match="tolerance"):
        far_audit(1, 10, 0.01, tolerance=-1)
    with pytest.raises(ValueError, match="alpha"):
        audit_size(0.01, alpha=0)
