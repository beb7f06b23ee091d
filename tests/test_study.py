"""Part II's protocol (tcmlib.study): class hold-out, the stage rules, the results file, and the
honesty checks on the committed results (current config keys; a committed run retrained)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from tcmlib.data.arrays import ImageArrayDataset, hold_out_classes
from tcmlib.experiments import config_key
from tcmlib.study import (PAPER_TCM, cells, comparisons, for_backbone, frontier_gap, load_runs, plateau_epoch,
                          protocol, reproduce, results_path, select_setting, selected_setting, stage_configs,
                          tuning_fell_back, tuning_means, variant_name)
from tcmlib.train import config_from_record, fit, load_config

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted((ROOT / "tcmlib" / "results").glob("*/runs*.jsonl"))


def _dataset(n_classes: int = 10, per_class: int = 3) -> ImageArrayDataset:
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    images = (labels[:, None, None] * 10 + torch.arange(per_class).repeat(n_classes)[:, None, None]).to(torch.uint8)
    return ImageArrayDataset(images.expand(-1, 2, 2).contiguous(), labels, [f"c{i}" for i in range(n_classes)])


def test_hold_out_classes_is_a_disjoint_relabelled_split() -> None:
    ds = _dataset()
    kept, held = hold_out_classes(ds, 0.3, seed=5)
    assert held.num_classes == 3 and kept.num_classes == 7 and len(kept) + len(held) == len(ds)
    assert set(kept.class_names).isdisjoint(held.class_names)
    for part in (kept, held):
        assert sorted(part.labels.unique().tolist()) == list(range(part.num_classes))
        for i in range(len(part)):  # every image keeps its class (the pixel encodes the original class id)
            original = int(part.images[i, 0, 0]) // 10
            assert part.class_names[int(part.labels[i])] == f"c{original}"
    again, _ = hold_out_classes(ds, 0.3, seed=5)
    assert again.class_names == kept.class_names  # fixed by the seed
    with pytest.raises(ValueError, match="lie in"):
        hold_out_classes(ds, 1.0)
    with pytest.raises(ValueError, match=">= 2 classes"):
        hold_out_classes(_dataset(3), 0.5)


def test_plateau_epoch_hand_cases() -> None:
    base = [[0.50, 0.70, 0.79, 0.80, 0.80], [0.52, 0.72, 0.79, 0.80, 0.81]]  # mean best 0.805 at epoch 5
    assert plateau_epoch({"base": base}, tol=0.01) == 4  # seed means 0.51 0.71 0.79 0.80 0.805
    assert plateau_epoch({"base": base}, tol=0.02) == 3
    assert plateau_epoch({"base": base}, tol=0.001) == 5
    tcm = [[0.6, 0.8, 0.8, 0.8, 0.8]]
    assert plateau_epoch({"base": base, "tcm": tcm}, tol=0.001) == 5  # the slower variant decides
    assert plateau_epoch({"tcm": tcm}, tol=0.0) == 2


def test_select_setting_rule() -> None:
    settings = {"a": (0.80, 0.010), "b": (0.796, 0.006), "c": (0.70, 0.001), "d": (0.81, 0.008)}
    assert select_setting(0.80, settings, 0.005, "a") == "b"  # c costs too much R@1
    assert select_setting(0.80, settings, 0.0, "a") == "d"
    assert select_setting(0.90, settings, 0.005, "a") == "a"  # none qualifies: the paper's default


def test_tuning_means_and_fallback_on_the_committed_study() -> None:
    p = protocol("ch07", scale="cpu", smoke=False)
    runs = load_runs(results_path("ch07", "cpu", smoke=False))
    for backbone, loss in cells(p):
        tune = [r for r in runs if r["stage"] == "tune" and (r["backbone"], r["loss"]) == (backbone, loss)]
        means = tuning_means(p, runs, backbone, loss)
        assert means is not None and set(means) == {r["variant"] for r in tune}
        for v, m in means.items():  # oracle: statistics.fmean over the variant's runs
            mine = [r["final"] for r in tune if r["variant"] == v]
            assert m["seeds"] == len(mine) == len(for_backbone(p, backbone).tune_seeds)
            assert m["val_R@1"] == pytest.approx(statistics.fmean(f["val_R@1"] for f in mine), abs=1e-12)
            assert m["val_OPIS"] == pytest.approx(statistics.fmean(f["val_OPIS"] for f in mine), abs=1e-12)
        base = means["base"]["val_R@1"]
        kept = [v for v, m in means.items() if v != "base" and m["val_R@1"] >= base - p.r1_tol]
        assert tuning_fell_back(p, runs, backbone, loss) == (not kept)
        chosen = selected_setting(p, runs, backbone, loss)
        if kept:  # the lowest val OPIS among the settings that kept R@1
            assert chosen == min(kept, key=lambda v: means[v]["val_OPIS"])
        else:
            assert chosen == variant_name(PAPER_TCM)
    assert tuning_fell_back(p, runs, "conv_vit_tiny", "smooth_ap") is True  # chapter 7's finding
    # every TCM setting as accurate as the base: no fallback; the lowest val OPIS wins
    same = [{**r, "final": {**r["final"], "val_R@1": 0.5}} if r["stage"] == "tune" else r for r in runs]
    assert tuning_fell_back(p, same, "conv_vit_tiny", "smooth_ap") is False
    means = tuning_means(p, same, "conv_vit_tiny", "smooth_ap")
    assert means is not None
    best = min((v for v in means if v != "base"), key=lambda v: means[v]["val_OPIS"])
    assert selected_setting(p, same, "conv_vit_tiny", "smooth_ap") == best
    # until every tuning run is recorded there is no answer
    partial = [r for r in runs if not (r["stage"] == "tune" and r["backbone"] == "conv_vit_tiny"
                                        and r["variant"] == "base")]
    assert tuning_means(p, partial, "conv_vit_tiny", "smooth_ap") is None
    assert tuning_fell_back(p, partial, "conv_vit_tiny", "smooth_ap") is None


def test_reproduce_a_changed_protocol(tmp_path: Path) -> None:
    changed = dataclasses.replace(protocol("ch08", smoke=True), losses=("contrastive",), final_seeds=(7,))
    path = reproduce("ch08", protocol=changed, smoke=True, results_root=tmp_path, cache_dir=tmp_path / "c",
                     progress=False)
    runs = load_runs(path)
    assert path == results_path("ch08", "cpu", tmp_path, smoke=True)
    assert sorted((r["loss"], r["seed"], r["variant"]) for r in runs) == [
        ("contrastive", 7, "base"), ("contrastive", 7, variant_name(PAPER_TCM))]
    assert {r["config"]["epochs"] for r in runs} == {changed.epochs}
    # one more seed: only its two runs are trained, the recorded ones are kept
    more = dataclasses.replace(changed, final_seeds=(7, 8))
    before = path.read_text()
    reproduce("ch08", protocol=more, smoke=True, results_root=tmp_path, cache_dir=tmp_path / "c", progress=False)
    after = path.read_text()
    assert after.startswith(before) and sorted(r["seed"] for r in load_runs(path)) == [7, 7, 8, 8]
    with pytest.raises(TypeError, match="Protocol"):
        reproduce("ch08", protocol="ch07", smoke=True, results_root=tmp_path)  # type: ignore[arg-type]


def test_reproduce_smoke_study(tmp_path: Path) -> None:
    root, cache = tmp_path / "results", tmp_path / "runs"
    path = reproduce("ch07", smoke=True, results_root=root, cache_dir=cache, progress=False)
    assert path == results_path("ch07", "cpu", root, smoke=True)
    runs = load_runs(path)
    p = protocol("ch07", smoke=True)
    n_grid = len(p.tcm_grid)
    stages = [r["stage"] for r in runs]
    assert stages == sorted(stages, key=["curves", "tune", "final"].index)  # stage by stage
    assert stages.count("curves") == 2 * len(p.curve_seeds) and stages.count("tune") == (1 + n_grid) * len(p.tune_seeds)
    final = [r for r in runs if r["stage"] == "final"]
    assert {r["variant"] for r in final} >= {"base", variant_name(PAPER_TCM)}
    for r in runs:
        assert r["key"] == config_key(config_from_record(r["config"])) and r["provenance"]["torch"] == torch.__version__
        assert all("val_R@1" in h and "val_OPIS" in h for h in r["history"])  # validation after every epoch
        assert all("R@1" not in h for h in r["history"][:-1]) and "R@1" in r["final"]  # test: once, at the end
    for r in final:
        lo, hi = r["test_opis_ci"]
        assert lo <= r["final"]["OPIS"] <= hi
    # the tune and final runs train for the plateau length the curves gave
    curves = {}
    for r in runs[: 2 * len(p.curve_seeds)]:
        curves.setdefault(r["variant"], []).append([h["val_R@1"] for h in r["history"]])
    assert {r["config"]["epochs"] for r in runs if r["stage"] != "curves"} == {plateau_epoch(curves, p.plateau_tol)}
    # a second call trains nothing and appends nothing
    before = path.read_text()
    reproduce("ch07", smoke=True, results_root=root, cache_dir=cache, progress=False)
    assert path.read_text() == before
    # a torn last line (a killed writer) is skipped when read and dropped before the next append
    path.write_text(before + before.splitlines()[0][:50])
    assert len(load_runs(path)) == len(runs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n" + before)
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_runs(bad)

    # chapter 8's study reuses chapter 7's recorded runs of the same config and stage, trains the rest
    p8 = protocol("ch08", smoke=True)
    # a run chapter 7 never trains, planted in its file: chapter 8 must take it as it is, not retrain it
    planted_cfg = stage_configs(p8, [], "small_cnn", "proxy_anchor", "final")[0][1]
    planted = {**load_runs(path)[-1], "loss": "proxy_anchor", "variant": "base", "seed": planted_cfg.seed,
               "key": config_key(planted_cfg), "config": dataclasses.asdict(planted_cfg),
               "history": [{"planted": True}]}
    path.write_text(before + json.dumps(planted) + "\n")  # (replacing the torn line written above)
    path8 = reproduce("ch08", smoke=True, results_root=root, cache_dir=cache, progress=False)
    runs8 = load_runs(path8)
    assert len(runs8) == len(p8.losses) * 2 * len(p8.final_seeds) and {r["stage"] for r in runs8} == {"final"}
    keys7 = {(r["stage"], r["key"]): r for r in load_runs(path)}
    for r in runs8:
        assert r["config"]["epochs"] == p8.epochs
        if "reused_from" in r:
            assert r["reused_from"] == "ch07" and r["history"] == keys7["final", r["key"]]["history"]
        else:
            assert ("final", r["key"]) not in keys7
    assert sum("reused_from" in r for r in runs8) == sum(("final", r["key"]) in keys7 for r in runs8)
    assert [r["history"] for r in runs8 if r["key"] == planted["key"]] == [[{"planted": True}]]
    rows = comparisons(p8, runs8)
    assert {r["loss"] for r in rows} == set(p8.losses) and all(0 <= r["p_holm"] <= 1 for r in rows)


@pytest.mark.skipif(not COMMITTED, reason="no committed results yet")
@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_runs_match_what_the_code_builds(path: Path) -> None:
    """A committed run whose config key differs from what today's code builds from its config is stale."""
    for i, r in enumerate(load_runs(path)):
        cfg = config_from_record(r["config"])
        assert config_key(cfg) == r["key"], (
            f"{path.name} line {i + 1} ({r['name']}): its config no longer gives its key; the code changed what "
            "a run computes, so regenerate: python -m tcmlib.experiments reproduce " + r["study"])
        for k in ("commit", "command", "torch", "device", "threads", "date"):
            assert k in r["provenance"], k


@pytest.mark.skipif(not COMMITTED, reason="no committed results yet")
def test_a_committed_run_reproduces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retrain the cheapest committed run and compare with what it recorded.

    To keep ``make test`` short, only the first epoch is retrained: the run starts with its own config
    (so a learning-rate schedule over its whole length is the recorded one) and is stopped once its
    epoch-1 record is written; its recorded epoch-1 validation metrics must come back.  On the CPU model,
    instruction set, thread count and torch version that recorded it, bit for bit; elsewhere CPU
    kernels round differently and training amplifies that, so the rerun is only another draw from
    the seed distribution: it must then land within 5 standard deviations (of a difference of two
    draws) of the recorded seed-to-seed spread of that cell and variant.
    """
    runs = [r for p in COMMITTED if "-" not in p.stem for r in load_runs(p)]
    if not runs:
        pytest.skip("no committed cpu-scale runs yet")
    seeds: dict[tuple, set] = {}
    for r in runs:
        seeds.setdefault((r["backbone"], r["loss"], r["variant"]), set()).add(r["seed"])
    # among runs whose cell and variant have >= 3 recorded seeds (the cross-platform check needs them)
    judged = [r for r in runs if len(seeds[r["backbone"], r["loss"], r["variant"]]) >= 3]
    cheapest = min(judged, key=lambda r: r["history"][0]["train_time_s"])
    cfg = dataclasses.replace(config_from_record(cheapest["config"]), run_dir=str(tmp_path / "run"),
                              progress=False, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(cheapest["provenance"]["threads"])
    try:
        rec = _first_epoch(cfg, monkeypatch)
        here = _platform()
    finally:
        torch.set_num_threads(threads)
    want = cheapest["history"][0]
    keys = [k for k in want if k.startswith("val_")]
    # the logged training loss is a float32 sum whose order the loss code may change without changing
    # a single weight (the TCM rewrite did): compared to float32 rounding, the weights' metrics exactly
    assert abs(rec["loss"] - want["loss"]) <= 1e-6 * abs(want["loss"]), (rec["loss"], want["loss"])
    if {k: rec[k] for k in keys} == {k: want[k] for k in keys}:
        return  # bit for bit
    recorded = {k: cheapest["provenance"].get(k) for k in here}
    assert recorded != here, (f"same CPU, ISA, threads and torch as the recording, yet the rerun differs: "
                              f"{ {k: (rec[k], want[k]) for k in keys} }; provenance {json.dumps(cheapest['provenance'])}")
    # epoch 1 of every recorded seed of this cell and variant (any stage; one value per seed)
    by_seed = {r["seed"]: r["history"][0] for r in runs
               if (r["backbone"], r["loss"], r["variant"]) == (cheapest["backbone"], cheapest["loss"], cheapest["variant"])}
    assert len(by_seed) >= 3, "too few recorded seeds to judge a rerun on another platform"
    for k in keys:
        sd = statistics.stdev(h[k] for h in by_seed.values())
        # two independent draws differ by sqrt(2) sd on average scale; 5 such sds is a guard that a
        # correct rerun passes with near certainty over all the metrics compared
        assert abs(rec[k] - want[k]) <= 5 * 2**0.5 * sd + 1e-12, (k, rec[k], want[k], sd)


class _Stop(Exception):
    pass


def _first_epoch(cfg, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The epoch-1 record of ``fit(cfg)``, stopping the run right after it is written."""
    import tcmlib.train as train

    write = train._write_metrics

    def write_then_stop(run_dir, history):
        write(run_dir, history)
        raise _Stop

    monkeypatch.setattr(train, "_write_metrics", write_then_stop)
    with pytest.raises(_Stop):
        fit(cfg)
    return json.loads((Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()[0])


def _platform() -> dict:
    from tcmlib.study import provenance

    p = provenance("test")
    return {k: p[k] for k in ("torch", "cpu_model", "isa", "threads")}


def test_frontier_gap_hand_case() -> None:
    def curve(variant, r1, op):
        return {"stage": "curves", "backbone": "b", "loss": "l", "variant": variant,
                "history": [{"val_R@1": a, "val_OPIS": o} for a, o in zip(r1, op)]}
    paper = variant_name(PAPER_TCM)
    # base: OPIS 0.4 -> 0.2 as R@1 0.5 -> 0.9; TCM: the same line shifted down by 0.1 over R@1 0.6 -> 0.9
    runs = [curve("base", [0.5, 0.9], [0.4, 0.2]), curve(paper, [0.6, 0.9], [0.25, 0.1])]
    gap, paths = frontier_gap(runs, "b", "l")
    assert gap == pytest.approx(-0.1)
    assert list(paths) == ["base", paper]
    assert math.isnan(frontier_gap([curve("base", [0.1, 0.2], [1, 1]), curve(paper, [0.5, 0.6], [1, 1])], "b", "l")[0])
    with pytest.raises(ValueError, match="no recorded .curves. runs"):
        frontier_gap(runs[:1], "b", "l")


def test_run_costs_hand_case() -> None:
    from tcmlib.study import run_costs

    def run(loss, train, ev, wall, steps, reused=False):
        r = {"stage": "final", "backbone": "cnn", "loss": loss, "wall_s": wall, "config": {"batch_size": 10},
             "history": [{"train_time_s": t, "eval_time_s": e, "step": s} for t, e, s in zip(train, ev, steps)]}
        return {**r, "reused_from": "ch07"} if reused else r

    runs = [run("a", [1.0, 3.0], [0.5, 0.5], 6.0, [10, 20]),     # 200 images in 4 s; other 1 s
            run("a", [2.0, 2.0], [1.0, 1.0], 7.0, [10, 20]),     # 200 images in 4 s; other 1 s
            run("a", [9.0], [9.0], 99.0, [5], reused=True)]      # another study's run: not counted
    (row,) = run_costs(runs)
    assert row == {"stage": "final", "backbone": "cnn", "loss": "a", "runs": 2, "train_s": 4.0, "eval_s": 1.5, "other_s": 1.0,
                   "images_per_s": 50.0}


def test_load_runs_counts_a_run_recorded_twice_once(tmp_path: Path) -> None:
    a = {"stage": "final", "key": "k1", "seed": 0, "final": {"OPIS": 1.0}}
    b = {"stage": "final", "key": "k2", "seed": 1, "final": {"OPIS": 2.0}}
    again = {**a, "final": {"OPIS": 1.0}, "wall_s": 3.0}  # two processes raced on one run
    tune = {**a, "stage": "tune"}                          # the same config in another stage is another run
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (a, b, again, tune)))
    assert load_runs(path) == [a, b, tune]


def test_run_as_recorded_trains_with_the_records_thread_count(monkeypatch) -> None:
    import tcmlib.study as st
    import tcmlib.study.runner

    cfg = load_config(None, dataset="glyphs", glyph_size="tiny", seed=3)
    seen = []
    monkeypatch.setattr(tcmlib.study.runner, "run_cached",
                        lambda c, cache_dir=None: seen.append(torch.get_num_threads()) or c)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    record = {"key": config_key(cfg), "provenance": {"threads": want}}
    assert st.run_as_recorded(cfg, [record]) is cfg
    assert seen == [want] and torch.get_num_threads() == before   # set for the run, restored after
    st.run_as_recorded(cfg, [{"key": "other", "provenance": {"threads": want}}])
    assert seen[-1] == before                                      # no record of cfg: left alone


def test_committed_results_and_the_checkout_are_found_from_the_study_package() -> None:
    """``tcmlib/study/runner.py`` sits one folder deeper than ``study.py`` did: the committed results are still
    ``tcmlib/results`` and provenance still reads git in the checkout (``tcmlib_dirty`` looks at ``tcmlib/``)."""
    import subprocess

    from tcmlib.study import provenance, runner

    assert results_path("ch07", "cpu", smoke=False) == ROOT / "tcmlib" / "results" / "ch07" / "runs.jsonl"
    assert results_path("converged", "gpu", smoke=False) == ROOT / "tcmlib" / "results" / "converged" / "runs-gpu.jsonl"
    assert runner._REPO == ROOT
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("not a git checkout")
    assert provenance("test")["commit"] == git.stdout.strip()


def test_backbone_protocol_sets_a_backbones_losses_seeds_and_test() -> None:
    import numpy as np
    from scipy import stats

    from tcmlib.stats import holm
    from tcmlib.study import cells, comparisons, for_backbone, protocol, stage_configs

    p = dataclasses.replace(protocol("ch08", "cpu", smoke=False), backbones=("small_cnn", "conv_vit_tiny"),
                            losses=("smooth_ap", "contrastive"), final_seeds=tuple(range(6)), test="wilcoxon",
                            backbone_protocol={"conv_vit_tiny": {"losses": ("smooth_ap",), "final_seeds": (0, 1, 2),
                                                                 "test": "t"}})
    assert cells(p) == [("small_cnn", "smooth_ap"), ("small_cnn", "contrastive"), ("conv_vit_tiny", "smooth_ap")]
    assert for_backbone(p, "small_cnn") == p
    vit = stage_configs(p, [], "conv_vit_tiny", "smooth_ap", "final")
    assert sorted({c.seed for _, c in vit}) == [0, 1, 2] and {c.backbone for _, c in vit} == {"conv_vit_tiny"}
    rng = np.random.default_rng(0)
    runs = []
    for backbone, loss in cells(p):
        for variant, cfg in stage_configs(p, [], backbone, loss, "final"):
            runs.append({"stage": "final", "backbone": backbone, "loss": loss, "variant": variant, "seed": cfg.seed,
                         "key": config_key(cfg), "final": {"OPIS": float(rng.normal(1.0 if variant == "base" else 0.9,
                                                                                        0.01))}})
    rows = comparisons(p, runs, metrics=("OPIS",))
    assert [(r["backbone"], r["loss"], r["test"], r["n"]) for r in rows] == [
        ("small_cnn", "smooth_ap", "wilcoxon", 6), ("small_cnn", "contrastive", "wilcoxon", 6),
        ("conv_vit_tiny", "smooth_ap", "t", 3)]
    vit_base = [r["final"]["OPIS"] for r in runs if r["backbone"] == "conv_vit_tiny" and r["variant"] == "base"]
    vit_tcm = [r["final"]["OPIS"] for r in runs if r["backbone"] == "conv_vit_tiny" and r["variant"] != "base"]
    assert rows[2]["p_t"] == pytest.approx(stats.ttest_rel(vit_tcm, vit_base).pvalue)
    raw = [rows[0]["p_wilcoxon"], rows[1]["p_wilcoxon"], rows[2]["p_t"]]   # each cell's own test, one Holm family
    assert [r["p_holm"] for r in rows] == pytest.approx(holm(raw))
