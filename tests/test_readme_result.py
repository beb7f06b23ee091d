"""README's headline and figure say what the committed converged study says.

The numbers are recomputed here from ``tcmlib/results/converged/runs.jsonl`` and ``plan.json`` (and the pilot's
``tcmlib/results/ch07/runs.jsonl``) with plain json, numpy, scipy (``ttest_rel`` and its ``confidence_interval``,
``wilcoxon``) and statsmodels' ``TTestPower`` -- not with tcmlib's comparison code -- and compared with the README's
headline block and with the data the figure embeds.  The interval over seeds and test classes is
``tcmlib.evidence.two_level_bootstrap``'s (checked here to bracket the point estimate and to be what README
prints).  README's block must be what ``book/images/make_readme_result.py`` writes now (not stale), and the script
must stop when the data contradict a word of direction in its text.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from statsmodels.stats.power import TTestPower

from tcmlib.data import GLYPH_PRESETS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tcmlib" / "results" / "converged"
RUNS, PLAN = RESULTS / "runs.jsonl", RESULTS / "plan.json"
PILOT = ROOT / "tcmlib" / "results" / "ch07" / "runs.jsonl"
SCRIPT = ROOT / "book" / "images" / "make_readme_result.py"
FIGURE = ROOT / "book" / "images" / "tcm_change.png"
PAPER = "tcm(m+=0.9, m-=0.5, l+=1, l-=1)"
CELL = ("small_cnn", "smooth_ap")
UNITS = {"OPIS": "%", "eps_OPIS": "%", "R@1": "points", "MAP@R": "points"}


def _script():
    spec = importlib.util.spec_from_file_location("make_readme_result", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _final(path: Path) -> dict[tuple[str, str, str, int], dict]:
    out: dict[tuple[str, str, str, int], dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["stage"] == "final":
            out.setdefault((r["backbone"], r["loss"], r["variant"], r["seed"]), r)
    return out


def _pairs(runs: dict, backbone: str, loss: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    seeds = sorted(s for b, lo, v, s in runs if (b, lo, v) == (backbone, loss, PAPER) and (b, lo, "base", s) in runs)
    return (np.array([runs[backbone, loss, "base", s]["final"][metric] for s in seeds]),
            np.array([runs[backbone, loss, PAPER, s]["final"][metric] for s in seeds]))


def _compare(base: np.ndarray, treat: np.ndarray) -> dict[str, Any]:
    t = stats.ttest_rel(treat, base)
    ci = t.confidence_interval(0.95)
    m = base.mean()
    return {"n": base.size, "delta": (treat - base).mean(), "rel": (treat - base).mean() / m, "p": t.pvalue,
            "low": ci.low, "high": ci.high, "rel_low": ci.low / m, "rel_high": ci.high / m, "base_mean": m}


def _block() -> str:
    text = (ROOT / "README.md").read_text()
    start, end = "<!-- headline:start -->", "<!-- headline:end -->"
    assert start in text and end in text, "README.md lacks its headline block"
    return " ".join(text[text.index(start): text.index(end)].split())  # one line, single spaces


def pct(x: float) -> str:
    return f"{100 * x:+.0f} %"  # the README's format


@pytest.fixture(scope="module")
def script():
    return _script()


@pytest.fixture(scope="module")
def numbers(script) -> dict[str, Any]:
    return script.numbers(*script.converged(), script.pilot_runs())


def test_readme_headline_is_up_to_date(script) -> None:
    assert script.main(["--check"]) == 0, "README's headline is stale: python book/images/make_readme_result.py"


def test_readme_headline_numbers_match_the_committed_runs() -> None:
    runs, plan, block = _final(RUNS), json.loads(PLAN.read_text()), _block()
    cell = plan["cells"]["/".join(CELL)]
    o = _compare(*_pairs(runs, *CELL, "OPIS"))
    n, planned = o["n"], cell["seeds"]
    assert f"for {cell['length']} epochs, with the base model's validation accuracy still rising" in block
    assert not cell["converged"]
    # one doubling further (converged_long, the same curve seeds): TCM stopped gaining, the base closed part of the gap
    long = [json.loads(line) for line in (RESULTS.parent / "converged_long" / "runs.jsonl").read_text().splitlines()]
    val = {(r["variant"], r["config"]["epochs"], r["seed"]): r["final"]["val_MAP@R"] for r in long}
    h = cell["length"]

    def mean_at(variant: str, epochs: int) -> float:
        return float(np.mean([v for (vv, e, _), v in val.items() if (vv, e) == (variant, epochs)]))

    lead, lead2 = (mean_at(PAPER, e) - mean_at("base", e) for e in (h, 2 * h))
    assert mean_at(PAPER, 2 * h) - mean_at(PAPER, h) <= 0.005 < mean_at("base", 2 * h) - mean_at("base", h)
    assert 0 < lead2 < lead
    assert (f"TCM's models had stopped improving by then, the base models had not, and trained for {2 * h} epochs "
            f"the base closed {100 * (1 - lead2 / lead):.0f} % of its gap in validation MAP@R") in block
    first = runs[(*CELL, "base", 0)]
    with np.load(RESULTS / first["class_curves"]["file"]) as z:
        n_test = z["utility"].shape[1]  # (thresholds, test classes)
    assert f"{n_test:,} test classes" in block
    assert (f"changed test OPIS (how unevenly one distance threshold serves the classes; lower is better) by "
            f"{pct(o['rel'])} (95 % interval {pct(o['rel_low'])} to {pct(o['rel_high'])};") in block
    # the declared test, and whether the text may give its verdict yet
    assert o["p"] >= 0.05 and f"does not find a change (p = {o['p']:.2g})" in block
    if n < planned:
        assert f"{n} of the {planned} planned paired seeds so far" in block
        assert f"is read once all {planned} pairs are in; on the {n} of {planned} planned pairs so far" in block
    else:
        assert f"{n} paired seeds" in block and "so far" not in block
        assert "(paired t-test, two-sided, α = 0.05) does not find a change" in block
    # the effect n pairs detect with 80 % power, from the pilot's paired spread (recomputed from the pilot's runs)
    pb, pt = _pairs(_final(PILOT), *CELL, "OPIS")
    ratio = (pt - pb).std(ddof=1) / pb.mean()
    assert ratio == pytest.approx(plan["pilot"]["ratio"], rel=1e-12)
    d = TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert f"with {n} pairs it detects changes of {100 * d * ratio:.0f} % or more with 80 % power" in block
    assert o["rel_low"] < 0 < o["rel_high"] and "so smaller effects are not excluded" in block
    # accuracy, in points
    for m, words in (("R@1", "test Recall@1 rose by"), ("MAP@R", "and MAP@R by")):
        a = _compare(*_pairs(runs, *CELL, m))
        assert a["low"] > 0, f"TCM's {m} change no longer lies above zero"
        assert f"{words} {100 * a['delta']:.1f} points ({100 * a['low']:.1f} to {100 * a['high']:.1f})" in block
    assert "TCM made the model more accurate" in block
    # RS@k only once all its planned pairs are recorded
    rs = plan["cells"].get("small_cnn/recall_surrogate")
    rs_pairs = _pairs(runs, "small_cnn", "recall_surrogate", "OPIS")[0].size
    if rs is not None and rs_pairs >= rs["seeds"]:
        r = _compare(*_pairs(runs, "small_cnn", "recall_surrogate", "OPIS"))
        assert (f"With RS@k as the base loss ({r['n']} paired seeds), TCM changed test OPIS by {pct(r['rel'])} "
                f"(95 % interval {pct(r['rel_low'])} to {pct(r['rel_high'])})") in block
    else:
        assert "RS@k" not in block
    # the transformer (exploratory) once its planned pairs are in: TCM's OPIS above the base's in every pair
    vit = plan["cells"].get("conv_vit_tiny/smooth_ap")
    vb, vt = _pairs(runs, "conv_vit_tiny", "smooth_ap", "OPIS")
    if vit is not None and vb.size >= vit["seeds"]:
        assert (vt > vb).all()
        assert (f"On a small transformer (a conv-stem ViT, {vit['length']} epochs), TCM raised test OPIS in each of "
                f"the {vb.size} pairs we could afford ({pct((vt - vb).mean() / vb.mean())} on average)") in block
    else:
        assert "transformer" not in block
    # the pilot: its primary comparison's interval spans zero and its declared test (Wilcoxon) finds nothing
    p = _compare(pb, pt)
    assert p["low"] < 0 < p["high"] and stats.wilcoxon(pt, pb).pvalue >= 0.05
    configs = {(r["config"]["epochs"], r["config"]["glyph_size"]) for k, r in _final(PILOT).items() if k[:2] == CELL}
    assert len(configs) == 1
    epochs, size = configs.pop()
    pilot_test = GLYPH_PRESETS[size].n_test
    assert epochs < cell["length"] and pilot_test < n_test  # "smaller"
    assert (f"(the pilot: {p['n']} pairs, {epochs} epochs of training, {pilot_test:,} test classes) could not tell "
            "either way") in block


def test_readme_interval_over_seeds_and_classes_is_the_bootstrap() -> None:
    from tcmlib import evidence, study

    runs = study.load_runs(RUNS)
    boot = evidence.two_level_bootstrap(RUNS, runs, *CELL)
    o = _compare(*_pairs(_final(RUNS), *CELL, "OPIS"))
    assert boot["ci_low"] < boot["estimate"] < boot["ci_high"]
    assert boot["ci_low"] < o["rel"] < boot["ci_high"]
    assert f"over seeds and test classes together {pct(boot['ci_low'])} to {pct(boot['ci_high'])})" in _block()


def test_readme_figure_shows_the_committed_runs() -> None:
    assert "book/images/tcm_change.png" in _block()
    assert not (ROOT / "book" / "images" / "pilot_opis_change.png").exists()
    with Image.open(FIGURE) as im:
        data = json.loads(im.info["Description"])
    runs = _final(RUNS)
    shown = data["comparisons"]
    assert [(c["backbone"], c["loss"], c["variant"]) for c in shown][0] == (*CELL, PAPER)
    assert "RS@k" in _block() or len(shown) == 1
    for c in shown:
        for m, unit in UNITS.items():
            base, treat = _pairs(runs, c["backbone"], c["loss"], m)
            o = _compare(base, treat)
            scale = 100 / base.mean() if unit == "%" else 100.0
            d = c["metrics"][m]
            assert d["unit"] == unit
            np.testing.assert_allclose(d["change"], (treat - base) * scale, rtol=1e-9, atol=1e-12)
            for key, want in (("mean", o["delta"]), ("low", o["low"]), ("high", o["high"])):
                assert d[key] == pytest.approx(want * scale, rel=1e-9), (m, key)


def test_figure_is_deterministic(script, numbers, tmp_path: Path) -> None:
    script.draw(numbers, tmp_path / "a.png")
    script.draw(numbers, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert script.figure_data(tmp_path / "a.png") == json.loads(json.dumps(numbers["figure"]))


def _with_pairs_planned(plan: dict, cell: str, seeds: int) -> dict:
    out = copy.deepcopy(plan)
    out["cells"][cell] = {**out["cells"]["/".join(CELL)], "seeds": seeds}
    return out


def test_script_stops_when_the_data_contradict_the_text(script) -> None:
    path, runs, plan = script.converged()
    pilot = script.pilot_runs()
    worse = copy.deepcopy(runs)  # TCM's R@1 below the base's: "rose" and "more accurate" are false
    for r in worse:
        if r["stage"] == "final" and r["variant"] == PAPER:
            r["final"]["R@1"] -= 0.2
    with pytest.raises(script.DataDisagree, match="R@1"):
        script.numbers(path, worse, plan, pilot, n_boot=20)
    halved = copy.deepcopy(runs)  # TCM's OPIS halved: the declared test finds a change
    for r in halved:
        if r["stage"] == "final" and r["variant"] == PAPER:
            r["final"]["OPIS"] *= 0.5
    with pytest.raises(script.DataDisagree, match="does not find"):
        script.numbers(path, halved, plan, pilot, n_boot=20)


def test_text_says_the_count_until_the_planned_pairs_are_in(script) -> None:
    path, runs, plan = script.converged()
    n = len(_pairs(_final(RUNS), *CELL, "OPIS")[0])
    pilot = script.pilot_runs()
    more = script.text(script.numbers(path, runs, _with_pairs_planned(plan, "/".join(CELL), n + 3), pilot, n_boot=20))
    done = script.text(script.numbers(path, runs, _with_pairs_planned(plan, "/".join(CELL), n), pilot, n_boot=20))
    flat = lambda s: " ".join(s.split())  # noqa: E731
    assert f"{n} of the {n + 3} planned paired seeds so far" in flat(more) and "is read once all" in flat(more)
    assert f"{n} paired seeds;" in flat(done) and "so far" not in flat(done)
    assert "α = 0.05) does not find a change" in flat(done)


def test_rsk_is_reported_only_once_all_its_planned_pairs_are_in(script) -> None:
    path, runs, plan = script.converged()
    pilot = script.pilot_runs()
    rs = [{**copy.deepcopy(r), "loss": "recall_surrogate"} for r in runs
          if (r["stage"], r["backbone"], r["loss"]) == ("final", *CELL)]
    k = len({r["seed"] for r in rs if r["variant"] == PAPER})
    both = runs + rs
    v = script.numbers(path, both, _with_pairs_planned(plan, "small_cnn/recall_surrogate", k), pilot, n_boot=20)
    o = _compare(*_pairs({(r["backbone"], r["loss"], r["variant"], r["seed"]): r for r in rs}, "small_cnn",
                         "recall_surrogate", "OPIS"))
    assert (f"With RS@k as the base loss ({k} paired seeds), TCM changed test OPIS by {pct(o['rel'])} "
            f"(95 % interval {pct(o['rel_low'])} to {pct(o['rel_high'])})") in " ".join(script.text(v).split())
    assert [c["loss"] for c in v["figure"]["comparisons"]] == ["smooth_ap", "recall_surrogate"]
    v = script.numbers(path, both, _with_pairs_planned(plan, "small_cnn/recall_surrogate", k + 1), pilot, n_boot=20)
    assert "RS@k" not in script.text(v) and len(v["figure"]["comparisons"]) == 1
