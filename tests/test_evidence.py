"""tcmlib.evidence on hand-built records, against scipy / statsmodels and cases with a known answer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from tcmlib.evidence import (PAPER, along_training, frontier, paired_values, pooled_change, primary_test,
                             secondary_tests, two_level_bootstrap)
from tcmlib.study import PRIMARY

CNN, SAP, RSK = "small_cnn", "smooth_ap", "recall_surrogate"


def _run(backbone: str, loss: str, variant: str, seed: int, final: dict, history: list | None = None, **extra) -> dict:
    return {"stage": "final", "backbone": backbone, "loss": loss, "variant": variant, "seed": seed, "final": final,
            "history": history or [], **extra}


def _study(rng: np.random.Generator, n: int = 12, effect: float = -0.1) -> list[dict]:
    runs = []
    for loss, shift in ((SAP, effect), (RSK, effect / 2)):
        for s in range(n):
            base = {"OPIS": 0.003 * (1 + 0.2 * rng.standard_normal()), "eps_OPIS": 0.02 + 0.002 * rng.standard_normal(),
                    "R@1": 0.9 + 0.01 * rng.standard_normal(), "MAP@R": 0.5 + 0.01 * rng.standard_normal()}
            treat = {k: v * (1 + shift + 0.05 * rng.standard_normal()) for k, v in base.items()}
            runs += [_run(CNN, loss, "base", s, base), _run(CNN, loss, PAPER, s, treat)]
    return runs


def test_primary_test_is_scipys_paired_t_test() -> None:
    runs = _study(np.random.default_rng(0))
    row = primary_test(runs, planned_pairs=12)
    _, b, t = paired_values(runs, CNN, SAP, PAPER, "OPIS")
    assert row["p_t"] == pytest.approx(stats.ttest_rel(t, b).pvalue)
    ci = stats.ttest_rel(t, b).confidence_interval(0.95)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert row["rel"] == pytest.approx((t - b).mean() / b.mean())
    assert row["reject"] == (row["p_t"] < PRIMARY["alpha"]) and row["complete"]
    assert not primary_test(runs, planned_pairs=13)["complete"]


def test_secondary_tests_are_holm_adjusted_as_one_family_without_the_primary() -> None:
    runs = _study(np.random.default_rng(1))
    rows = secondary_tests(runs, [(CNN, SAP), (CNN, RSK)])
    assert len(rows) == 2 * 4 - 1  # 2 losses x 4 metrics, less the primary comparison
    assert not any((r["loss"], r["metric"]) == (SAP, "OPIS") for r in rows)
    want = multipletests([r["p_t"] for r in rows], method="holm")[1]
    assert [r["p_holm"] for r in rows] == pytest.approx(list(want))


def test_pooled_change_recovers_a_common_effect() -> None:
    # every pair changes by exactly -10 % of its base (plus zero-mean noise identical across the two losses)
    runs = []
    noise = [0.01, -0.01, 0.02, -0.02, 0.0, 0.005, -0.005]
    for loss in (SAP, RSK):
        for s, e in enumerate(noise):
            runs += [_run(CNN, loss, "base", s, {"OPIS": 1.0}), _run(CNN, loss, PAPER, s, {"OPIS": 0.9 + e})]
    out = pooled_change(runs, [(CNN, SAP), (CNN, RSK)])
    assert out["estimate"] == pytest.approx(-0.1) and out["k"] == 2 and out["tau2"] == pytest.approx(0.0, abs=1e-12)
    assert out["ci_low"] < -0.1 < out["ci_high"]
    one = pooled_change(runs, [(CNN, SAP)])
    assert one["k"] == 1 and one["estimate"] == pytest.approx(-0.1)


def _curves(folder: Path, key: str, u: np.ndarray) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / f"{key}.npz"
    np.savez_compressed(f, utility=u.astype(np.float16), thresholds=np.arange(u.shape[0]), class_ids=np.arange(u.shape[1]))
    return {"file": f"classes/{key}.npz", "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "every": 4}


def test_two_level_bootstrap_known_ratio_and_class_noise(tmp_path: Path) -> None:
    """TCM's per-class utilities = the base's scaled about their mean by sqrt(0.8): OPIS (a variance) is exactly
    0.8 x the base's for any draw of classes, so every replicate gives -20 %; with noise the interval widens."""
    rng = np.random.default_rng(0)
    path = tmp_path / "runs.jsonl"
    runs, noisy = [], []
    for s in range(6):
        u = rng.uniform(0.3, 0.9, (25, 200))
        # float16 storage: choose values that survive it, then build the scaled twin from the stored values
        u = u.astype(np.float16).astype(np.float64)
        v = u.mean(axis=1, keepdims=True) + (u - u.mean(axis=1, keepdims=True)) * np.sqrt(0.8)
        runs += [_run(CNN, SAP, "base", s, {}, class_curves=_curves(tmp_path / "classes", f"b{s}", u)),
                 _run(CNN, SAP, PAPER, s, {}, class_curves=_curves(tmp_path / "classes", f"t{s}", v))]
        w = v + rng.normal(0, 0.05, v.shape)
        noisy += [runs[-2], _run(CNN, SAP, PAPER, s, {}, class_curves=_curves(tmp_path / "classes", f"n{s}", w))]
    out = two_level_bootstrap(path, runs, CNN, SAP, n_boot=200)
    assert out["estimate"] == pytest.approx(-0.2, abs=2e-3)
    assert out["ci_low"] == pytest.approx(-0.2, abs=4e-3) and out["ci_high"] == pytest.approx(-0.2, abs=4e-3)
    wide = two_level_bootstrap(path, noisy, CNN, SAP, n_boot=200)
    assert wide["ci_high"] - wide["ci_low"] > 3 * (out["ci_high"] - out["ci_low"])


def test_along_training_matches_per_epoch_paired_t_intervals() -> None:
    rng = np.random.default_rng(3)
    runs = []
    for s in range(5):
        b = np.cumsum(rng.uniform(0.05, 0.1, 4))
        t = b + np.array([0.03, 0.02, 0.01, 0.0]) + rng.normal(0, 0.005, 4)
        runs += [_run(CNN, SAP, "base", s, {}, [{"val_MAP@R": x} for x in b]),
                 _run(CNN, SAP, PAPER, s, {}, [{"val_MAP@R": x} for x in t])]
    rows = along_training(runs, CNN, SAP)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for e, r in enumerate(rows):
        b = np.array([x["history"][e]["val_MAP@R"] for x in runs if x["variant"] == "base"])
        t = np.array([x["history"][e]["val_MAP@R"] for x in runs if x["variant"] == PAPER])
        ci = stats.ttest_rel(t, b).confidence_interval(0.95)
        assert r["delta"] == pytest.approx((t - b).mean()) and (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high))


def test_frontier_hand_cases() -> None:
    runs = []
    for s, shift in enumerate((-0.001, -0.002, -0.003)):
        acc = [0.2, 0.5, 0.6, 0.7]
        base = [{"val_MAP@R": a, "val_OPIS": 0.01 - 0.01 * a} for a in acc]
        treat = [{"val_MAP@R": a, "val_OPIS": 0.01 - 0.01 * a + shift} for a in acc]
        treat[0] = {"val_MAP@R": 0.2, "val_OPIS": 0.05}  # one wild first epoch
        runs += [_run(CNN, SAP, "base", s, {}, base), _run(CNN, SAP, PAPER, s, {}, treat)]
    out = frontier(runs, CNN, SAP, drop_first=True)
    assert out["gap"] == pytest.approx(-0.002) and out["seeds"] == 3
    gaps = np.array([-0.001, -0.002, -0.003])
    half = stats.t.ppf(0.975, 2) * gaps.std(ddof=1) / np.sqrt(3)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((-0.002 - half, -0.002 + half))
    # p: mean / (sd / sqrt(n)) = -0.002 / (0.001 / sqrt(3)) = -2 sqrt(3), t with 2 degrees of freedom, two-sided
    assert out["p"] == pytest.approx(2 * stats.t.cdf(-2 * np.sqrt(3), 2))
    assert frontier(runs, CNN, SAP)["gap"] > 0  # with the wild first epoch the sign flips
