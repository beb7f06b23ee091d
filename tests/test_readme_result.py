"""README's headline and figure say what the committed pilot runs say.

The numbers are recomputed here from ``tcmlib/results/ch07/runs.jsonl`` with plain json, numpy, scipy
(``ttest_rel``, ``wilcoxon``, the noncentral t) and statsmodels' Holm -- not with tcmlib's comparison code -- and
compared with the README's headline block and with the data the figure embeds.  README's block must also be what
``book/images/make_readme_result.py`` writes now (not stale).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from statsmodels.stats.multitest import multipletests

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "tcmlib" / "results" / "ch07" / "runs.jsonl"
SCRIPT = ROOT / "book" / "images" / "make_readme_result.py"
FIGURE = ROOT / "book" / "images" / "pilot_opis_change.png"
PAPER = "tcm(m+=0.9, m-=0.5, l+=1, l-=1)"
TEST = {"small_cnn": "wilcoxon", "conv_vit_tiny": "t"}  # the pilot's declared test per backbone


def _script():
    spec = importlib.util.spec_from_file_location("make_readme_result", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _final_runs() -> dict[tuple[str, str, str, int], dict]:
    out: dict[tuple[str, str, str, int], dict] = {}
    for line in RUNS.read_text().splitlines():
        r = json.loads(line)
        if r["stage"] == "final":
            out.setdefault((r["backbone"], r["loss"], r["variant"], r["seed"]), r)
    return out


def _oracle() -> dict[str, list[dict]]:
    """Per metric, every (backbone, loss, TCM variant) comparison: relative change, its t interval, Holm p."""
    runs = _final_runs()
    cells = list(dict.fromkeys((b, loss) for b, loss, _, _ in runs))
    out: dict[str, list[dict]] = {}
    for m in ("OPIS", "eps_OPIS", "R@1"):
        rows = []
        for b, loss in cells:
            seeds = sorted(s for bb, ll, v, s in runs if (bb, ll, v) == (b, loss, "base"))
            for v in dict.fromkeys(v for bb, ll, v, _ in runs if (bb, ll) == (b, loss) and v != "base"):
                base = np.array([runs[b, loss, "base", s]["final"][m] for s in seeds])
                treat = np.array([runs[b, loss, v, s]["final"][m] for s in seeds])
                t = stats.ttest_rel(treat, base)
                ci = t.confidence_interval(0.95)
                p = t.pvalue if TEST[b] == "t" else stats.wilcoxon(treat, base).pvalue
                rows.append({"backbone": b, "loss": loss, "variant": v, "base": base, "treat": treat,
                             "delta": (treat - base).mean(), "rel": (treat - base).mean() / base.mean(),
                             "low": ci.low / base.mean(), "high": ci.high / base.mean(), "p": p,
                             "ci_low": ci.low, "ci_high": ci.high})
        for r, adj in zip(rows, multipletests([r["p"] for r in rows], method="holm")[1]):
            r["p_holm"] = adj
        out[m] = rows
    return out


def _block() -> str:
    text = (ROOT / "README.md").read_text()
    start, end = "<!-- pilot-headline:start -->", "<!-- pilot-headline:end -->"
    assert start in text and end in text, "README.md lacks its headline block"
    return " ".join(text[text.index(start): text.index(end)].split())  # one line, single spaces


def test_readme_headline_is_up_to_date() -> None:
    assert _script().main(["--check"]) == 0, "README's headline is stale: python book/images/make_readme_result.py"


def test_readme_headline_numbers_match_the_committed_runs() -> None:
    o, block = _oracle(), _block()
    pct = lambda x: f"{100 * x:+.0f} %"   # noqa: E731  (the README's format)
    prim = next(r for r in o["OPIS"] if (r["backbone"], r["loss"], r["variant"]) == ("small_cnn", "smooth_ap", PAPER))
    assert f"changed test OPIS by {pct(prim['rel'])} (95 % interval {pct(prim['low'])} to {pct(prim['high'])})" in block
    assert prim["low"] < 0 < prim["high"] and "*cannot tell*" in block
    n, lower = len(o["OPIS"]), sum(r["delta"] < 0 for r in o["OPIS"])
    assert f"mean OPIS fell in {lower} of {n}" in block
    assert all(r["p_holm"] >= 0.05 for r in o["OPIS"]) and f"none of the {n} changes survives Holm" in block
    rels = [r["rel"] for r in o["OPIS"]]
    assert f"(changes from {pct(min(rels))} to {pct(max(rels))})" in block
    eps = [r for r in o["eps_OPIS"] if r["p_holm"] < 0.05]
    assert len(eps) == 1 and (eps[0]["backbone"], eps[0]["loss"]) == ("small_cnn", "smooth_ap") and eps[0]["variant"] != PAPER
    assert (f"{pct(eps[0]['rel'])} ({pct(eps[0]['low'])} to {pct(eps[0]['high'])}, "
            f"adjusted p = {eps[0]['p_holm']:.2g})") in block
    cnn = [r for r in o["R@1"] if r["backbone"] == "small_cnn"]
    vit = [r for r in o["R@1"] if r["backbone"] != "small_cnn"]
    assert all(r["delta"] > 0 and r["p_holm"] < 0.05 for r in cnn)
    d = [100 * r["delta"] for r in cnn]
    assert f"rose by {min(d):.1f} to {max(d):.1f} points on the small CNN (all {len(cnn)} survive Holm)" in block
    v = vit[0]
    assert (f"changed by {100 * v['delta']:+.1f} points ({100 * v['ci_low']:+.1f} to {100 * v['ci_high']:+.1f})"
            in block)
    # the design's power for a 10 % change: paired sd / base mean of the primary comparison, noncentral t
    diff = prim["treat"] - prim["base"]
    ratio, k = diff.std(ddof=1) / prim["base"].mean(), len(diff)
    crit, nc = stats.t.ppf(0.975, k - 1), 0.10 / ratio * np.sqrt(k)
    power = stats.nct.sf(crit, k - 1, nc) + stats.nct.cdf(-crit, k - 1, nc)
    assert f"had a power of {power:.2f} to detect a 10 % change" in block


def test_readme_figure_shows_the_committed_runs() -> None:
    assert "book/images/pilot_opis_change.png" in _block()
    data = json.loads(Image.open(FIGURE).info["Description"])
    o = _oracle()
    for m in ("OPIS", "eps_OPIS"):
        assert len(data[m]) == len(o[m])
        for shown, r in zip(data[m], o[m]):
            assert (shown["backbone"], shown["loss"], shown["variant"]) == (r["backbone"], r["loss"], r["variant"])
            per_seed = 100 * (r["treat"] - r["base"]) / r["base"].mean()
            np.testing.assert_allclose(shown["change_pct"], per_seed, rtol=1e-9, atol=1e-9)
            assert shown["mean_pct"] == pytest.approx(100 * r["rel"], rel=1e-9)
            assert shown["low_pct"] == pytest.approx(100 * r["low"], rel=1e-9)
            assert shown["high_pct"] == pytest.approx(100 * r["high"], rel=1e-9)
            assert shown["p_holm"] == pytest.approx(r["p_holm"], rel=1e-9)
