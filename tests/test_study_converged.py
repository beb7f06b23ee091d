"""The converged study (tcmlib.study, study ``converged``): its length rule, power plan, planned final seeds and
the per-class curves its final runs keep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tcmlib.experiments import config_key
from tcmlib.study import (PAPER_TCM, PRIMARY, class_utility, converged_length, final_seeds, load_plan, load_runs,
                          plan_path, power_plan, protocol, reproduce, stage_configs, variant_name, with_plan)
from tcmlib.train import config_from_record

PAPER = variant_name(PAPER_TCM)


def test_converged_length_hand_cases() -> None:
    h = (8, 16, 32, 64)
    # doubling 8 -> 16 gains 0.010 for base (> tol), 16 -> 32 gains 0.002 and 0.001: the length is 16
    ends = {"base": {8: 0.50, 16: 0.51, 32: 0.512}, "tcm": {8: 0.50, 16: 0.503, 32: 0.504}}
    assert converged_length(ends, h, 0.005) == (16, True)
    assert converged_length({"base": {8: 0.5, 16: 0.504}, "tcm": {8: 0.5, 16: 0.49}}, h, 0.005) == (8, True)  # a loss counts as no gain
    # 32 still gains over 16 and 64 is not recorded yet: undecided
    assert converged_length({"base": {8: 0.5, 16: 0.52, 32: 0.54}, "tcm": {8: 0.5, 16: 0.5, 32: 0.5}}, h, 0.005) == (None, False)
    # every doubling gains: the longest length, flagged as not converged
    rising = {v: {8: 0.5, 16: 0.52, 32: 0.54, 64: 0.56} for v in ("base", "tcm")}
    assert converged_length(rising, h, 0.005) == (64, False)
    assert converged_length({"base": {8: 0.5, 16: 0.5}}, h, 0.005) == (None, False)  # both variants needed
    assert converged_length({}, h, 0.005) == (None, False)


def _pilot(diffs: list[float], base: float = 1.0) -> list[dict]:
    out = []
    for s, d in enumerate(diffs):
        for v, val in (("base", base), (PRIMARY["variant"], base + d)):
            out.append({"stage": "final", "backbone": PRIMARY["backbone"], "loss": PRIMARY["loss"], "seed": s,
                        "variant": v, "final": {"OPIS": val},
                        "history": [{"train_time_s": 40.0, "eval_time_s": 5.0}] * 4})  # 45 s an epoch
    return out


def test_power_plan_matches_the_textbook_sample_size() -> None:
    """Paired t, two-sided, alpha 0.05, power 0.8: d = 0.5 needs 34 pairs (Cohen 1988, table 2.4.1; G*Power),
    d = 0.2 needs 199.  A pilot with paired sd 0.2 x the base mean gives d = 0.10 / 0.2 = 0.5."""
    p = protocol("converged", "cpu", smoke=False)
    p = p.__class__(**{**p.__dict__, "backbones": ("small_cnn",), "losses": ("smooth_ap",),
                       "budget_cpu_h": {"small_cnn/smooth_ap": 1000.0}})
    diffs = list(np.array([1, -1] * 5) * 0.2 / np.std([1, -1] * 5, ddof=1))  # sd exactly 0.2 around mean 0
    curves = []
    for h in (8, 16):
        for s in p.curve_seeds:
            for v, t in (("base", None), (PAPER, PAPER_TCM)):
                from tcmlib.study import make_config
                cfg = make_config(p, "small_cnn", "smooth_ap", t, s, h)
                curves.append({"stage": "curves", "key": config_key(cfg), "backbone": "small_cnn", "loss": "smooth_ap",
                               "config": {"epochs": h}, "final": {"val_MAP@R": 0.5},  # loaded: 90 s an epoch
                               "history": [{"train_time_s": 80.0, "eval_time_s": 10.0}] * (h - 1)
                               + [{"train_time_s": 80.0, "eval_time_s": 10.0 + 8.0}]})  # + 8 s test scoring
    plan = power_plan(p, curves, _pilot(diffs))
    assert plan["pilot"]["ratio"] == pytest.approx(0.2)
    assert plan["n_power"] == 34
    cell = plan["cells"]["small_cnn/smooth_ap"]
    assert cell["length"] == 8 and cell["converged"] and cell["seeds"] == 34
    assert cell["cost_pair_h"] == pytest.approx(2 * (8 * 45 + 8) / 3600)  # the pilot's epochs + the test scoring
    assert cell["power_at_effect"] == pytest.approx(0.80, abs=0.01)
    p_small = p.__class__(**{**p.__dict__, "budget_cpu_h": {"small_cnn/smooth_ap": 3.0}})  # 3 h / 736 s: 14 pairs
    small = power_plan(p_small, curves, _pilot(diffs))["cells"]["small_cnn/smooth_ap"]
    assert small["seeds"] == 14 and small["detectable_rel"] < -0.10  # fewer pairs see only a larger effect
    d_pilot = [0.5 * (-1) ** i for i in range(2)]
    with pytest.raises(ValueError, match=">= 3"):
        power_plan(p, curves, _pilot(d_pilot))


def test_smoke_converged_study_plans_before_its_finals_and_keeps_class_curves(tmp_path: Path) -> None:
    root, cache = tmp_path / "results", tmp_path / "runs"
    path = reproduce("converged", smoke=True, results_root=root, cache_dir=cache, progress=False)
    runs = load_runs(path)
    p = protocol("converged", smoke=True)
    plan = load_plan(plan_path("converged", "cpu", root, smoke=True))
    assert plan is not None and plan["primary"] == PRIMARY
    cell = plan["cells"]["small_cnn/smooth_ap"]
    lengths = {r["config"]["epochs"] for r in runs if r["stage"] == "curves"}
    assert cell["length"] in lengths and cell["length"] < max(lengths)  # never the longest length tried
    final = [r for r in runs if r["stage"] == "final"]
    assert {r["seed"] for r in final} == set(final_seeds(with_plan(p, plan), "small_cnn", "smooth_ap"))
    assert {r["config"]["epochs"] for r in final} == {cell["length"]}
    for r in runs:
        assert config_from_record(r["config"]).lr_schedule == "cosine"
        assert config_from_record(r["config"]).augment_rng == "sample"
    for r in final:
        u = class_utility(path, r)
        assert u.shape[0] == 25 and u.shape[1] >= 2
        # the kept curves give the run's OPIS to float16 rounding and the subsampled thresholds
        assert u.var(axis=1).mean() == pytest.approx(r["final"]["OPIS"], rel=0.1)
    f = path.parent / final[0]["class_curves"]["file"]
    f.write_bytes(f.read_bytes()[:-3] + b"xyz")  # a changed file is refused
    with pytest.raises(ValueError, match="sha256"):
        class_utility(path, final[0])


def test_a_planned_study_waits_for_its_plan() -> None:
    p = protocol("converged", "cpu", smoke=False)
    assert final_seeds(p, "small_cnn", "smooth_ap") is None
    assert stage_configs(p, [], "small_cnn", "smooth_ap", "final") is None
    assert final_seeds(with_plan(p, {"cells": {"small_cnn/smooth_ap": {"seeds": 3}}}), "small_cnn", "smooth_ap") == (0, 1, 2)


def test_committed_plan_precedes_final_runs() -> None:
    """Every cell with a committed final run has a committed plan entry, and its final seeds are the plan's."""
    root = Path(__file__).resolve().parents[1] / "tcmlib" / "results"
    runs = load_runs(root / "converged" / "runs.jsonl")
    plan = load_plan(root / "converged" / "plan.json")
    finals = [r for r in runs if r["stage"] == "final"]
    if not finals:
        pytest.skip("no final run of the converged study committed yet")
    assert plan is not None
    for r in finals:
        cell = plan["cells"][f"{r['backbone']}/{r['loss']}"]
        assert r["seed"] < cell["seeds"] and r["config"]["epochs"] == cell["length"]
        assert json.dumps(r["config"], sort_keys=True)  # a plain record


def test_length_evidence_reads_the_rule_as_it_stands() -> None:
    p = protocol("converged", "cpu", smoke=False)
    from tcmlib.study import length_evidence, make_config
    runs = []
    for h, (b, t) in ((8, (0.70, 0.72)), (16, (0.74, 0.75))):
        for s in p.curve_seeds:
            for v, tcm, val in (("base", None, b), (PAPER, PAPER_TCM, t)):
                cfg = make_config(p, "small_cnn", "smooth_ap", tcm, s, h)
                runs.append({"stage": "curves", "key": config_key(cfg), "final": {"val_MAP@R": val + 0.01 * s}})
    rows = length_evidence(p, runs, "small_cnn", "smooth_ap")
    assert [r["epochs"] for r in rows] == [8, 16]
    assert rows[0]["gain_base"] is None and rows[1]["gain_base"] == pytest.approx(0.04)
    assert rows[1]["gain_tcm"] == pytest.approx(0.03) and rows[0]["tcm"] == pytest.approx(0.725)


def test_a_cell_may_take_its_length_from_another_cells_curves() -> None:
    """CPU scale: RS@k trains for the length Smooth-AP's curves chose, runs no curves of its own, and gets at least
    ``min_seeds`` pairs whatever its budget affords."""
    from tcmlib.study import cell_length, make_config
    p = protocol("converged", "cpu", smoke=False)
    assert p.length_from == {"small_cnn/recall_surrogate": "small_cnn/smooth_ap"}
    p = p.__class__(**{**p.__dict__, "backbones": ("small_cnn",),
                       "budget_cpu_h": {"small_cnn/smooth_ap": 1000.0, "small_cnn/recall_surrogate": 0.01}})
    curves = []
    for h, val in ((8, 0.50), (16, 0.502)):  # 8 -> 16 gains 0.002 <= 0.005: length 8
        for s in p.curve_seeds:
            for t in (None, PAPER_TCM):
                cfg = make_config(p, "small_cnn", "smooth_ap", t, s, h)
                curves.append({"stage": "curves", "key": config_key(cfg), "backbone": "small_cnn", "loss": "smooth_ap",
                               "config": {"epochs": h}, "final": {"val_MAP@R": val},
                               "history": [{"train_time_s": 80.0, "eval_time_s": 10.0}] * h})
    assert cell_length(p, curves, "small_cnn", "recall_surrogate") == (8, True)
    assert cell_length(p, [], "small_cnn", "recall_surrogate") == (None, False)
    assert stage_configs(p, curves, "small_cnn", "recall_surrogate", "curves") == []
    assert len(stage_configs(p, curves, "small_cnn", "smooth_ap", "curves")) > 0
    diffs = list(np.array([1, -1] * 5) * 0.2 / np.std([1, -1] * 5, ddof=1))
    cells = power_plan(p, curves, _pilot(diffs))["cells"]
    rs = cells["small_cnn/recall_surrogate"]
    assert rs["length"] == 8 and rs["seeds"] == 5  # 0.01 h buys no pair: the floor
    assert cells["small_cnn/smooth_ap"]["seeds"] == 34
    bad = p.__class__(**{**p.__dict__, "length_from": {"small_cnn/recall_surrogate": "conv_vit_tiny/smooth_ap"}})
    with pytest.raises(ValueError, match="its own backbone"):
        cell_length(bad, curves, "small_cnn", "recall_surrogate")


def test_reused_run_finds_its_class_curves_with_the_study_that_trained_it() -> None:
    """Chapter 8's converged-length study reuses the converged study's Smooth-AP and RS@k runs: their per-class
    curves stay in ``converged/classes`` and are found from ``ch08_converged/runs.jsonl``, hash-checked."""
    from tcmlib.study import results_path

    path = results_path("ch08_converged", "cpu", smoke=False)
    reused = [r for r in load_runs(path) if r.get("reused_from") == "converged"]
    assert reused, "chapter 8's converged-length study reuses the converged study's runs"
    donor = results_path("converged", "cpu", smoke=False)
    for r in reused[:2]:
        u = class_utility(path, r)
        assert u.ndim == 2 and np.array_equal(u, class_utility(donor, {k: v for k, v in r.items()
                                                                        if k != "reused_from"}))
        assert not (path.parent / r["class_curves"]["file"]).exists()  # not copied: one file, one place


def test_longer_study_reuses_the_converged_curves_and_doubles_the_longest_length() -> None:
    """``converged_long`` trains only the doubled length: its shorter length's configs are, key for key, the
    converged study's longest curves, which its ``reuse`` takes from the committed file."""
    from tcmlib.study import cells, results_path

    conv, long = protocol("converged", "cpu", smoke=False), protocol("converged_long", "cpu", smoke=False)
    assert long.horizons == (conv.horizons[-1], 2 * conv.horizons[-1]) and long.length_tol == conv.length_tol
    assert cells(long) == [("small_cnn", "smooth_ap")] and long.reuse == ("converged",)
    wanted = stage_configs(long, [], "small_cnn", "smooth_ap", "curves")
    assert wanted is not None
    assert {c.epochs for _, c in wanted} == set(long.horizons)
    donor = {r["key"] for r in load_runs(results_path("converged", "cpu", smoke=False)) if r["stage"] == "curves"}
    short = {config_key(c) for _, c in wanted if c.epochs == conv.horizons[-1]}
    longer = [c for _, c in wanted if c.epochs == 2 * conv.horizons[-1]]
    assert len(short) == 2 * len(conv.curve_seeds) and short <= donor
    assert longer and not {config_key(c) for c in longer} & donor
    assert {(c.lr_schedule, c.augment_rng, c.glyph_size) for c in longer} == {("cosine", "sample", conv.glyph_size)}


def test_smoke_longer_study_trains_only_what_the_converged_study_lacks(tmp_path: Path) -> None:
    root, cache = tmp_path / "results", tmp_path / "runs"
    reproduce("converged", smoke=True, results_root=root, cache_dir=cache, progress=False)
    runs = load_runs(reproduce("converged_long", smoke=True, results_root=root, cache_dir=cache, progress=False))
    p = protocol("converged_long", smoke=True)
    short, longer = p.horizons
    assert {r["config"]["epochs"] for r in runs if "reused_from" in r} == {short}
    assert {r["config"]["epochs"] for r in runs if "reused_from" not in r} == {longer}
    from tcmlib.study import cell_length
    length, _ = cell_length(p, runs, "small_cnn", "smooth_ap")
    assert length in p.horizons  # the rule reads the two lengths


def test_terms_study_trains_each_term_alone_at_the_converged_settings() -> None:
    from tcmlib.study import ABLATION_TERMS
    conv, p = protocol("converged", "cpu", smoke=False), protocol("ch10_converged", "cpu", smoke=False)
    plan = load_plan(plan_path("converged", "cpu", smoke=False))
    assert plan is not None and p.epochs == plan["cells"]["small_cnn/smooth_ap"]["length"]
    wanted = stage_configs(p, [], "small_cnn", "smooth_ap", "tune")
    assert wanted is not None and len(p.tune_seeds) >= 3
    assert len(wanted) == len(p.tune_seeds) * (1 + len(ABLATION_TERMS))
    names = {v for v, _ in wanted}
    assert names == {"base", *(variant_name({"margin_pos": mp, "margin_neg": mn, "lambda_pos": lp, "lambda_neg": ln})
                               for mp, mn, lp, ln in ABLATION_TERMS)}
    for v, c in wanted:
        got = (c.lr_schedule, c.augment_rng, c.glyph_size, c.epochs)
        assert got == ("cosine", "sample", conv.glyph_size, p.epochs)
        assert not set(p.tune_seeds) & set(range(20))  # tuning seeds are not final seeds
