"""Write the README's headline (the converged study's answer) and its figure from the committed runs.

The numbers come from ``tcmlib/results/converged/runs.jsonl`` and its power plan ``plan.json`` (the design: the
comment above ``tcmlib.study.PRIMARY``), analysed by ``tcmlib.evidence``: the declared primary test (small CNN x
Smooth-AP, base vs base + TCM at the paper's margins, test OPIS, paired t-test, two-sided, alpha 0.05), the change
of Recall@1 and MAP@R, the two-level bootstrap over seeds and test classes, and the power of the pairs recorded so
far (from the plan's pilot spread).  The sentence about the first study (the pilot) reads
``tcmlib/results/ch07/runs.jsonl``.  The text is fixed with the numbers filled in; every word of direction in it
("does not find", "rose", "more accurate", "not excluded", "could not tell") is checked against the data first, and
the script stops with a message if the data say otherwise (then the sentence must be rewritten, not the check).
While fewer than the plan's pairs are recorded the text says how many, and does not give the test's verdict as
final.  RS@k (the second base loss) gets a sentence and a row in the figure only once all its planned pairs are in.

    python book/images/make_readme_result.py           # rewrites README's headline block and the figure
    python book/images/make_readme_result.py --check   # exit status 1 if README's block or the figure is stale

``tests/test_readme_result.py`` recomputes the numbers from the results files with json, numpy, scipy and
statsmodels and checks the README and the figure's embedded data against them.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tcmlib import evidence, pilot, study  # noqa: E402
from tcmlib.data import GLYPH_PRESETS  # noqa: E402
from tcmlib.stats import paired_comparison  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FIGURE = Path(__file__).with_name("tcm_change.png")
START, END = "<!-- headline:start -->", "<!-- headline:end -->"
PRIMARY = (study.PRIMARY["backbone"], study.PRIMARY["loss"])
SECOND = ("small_cnn", "recall_surrogate")  # RS@k: reported once all its planned pairs are recorded
VIT = ("conv_vit_tiny", "smooth_ap")  # the transformer, exploratory: a sentence once its planned pairs are in
NAMES = {"smooth_ap": "Smooth-AP", "recall_surrogate": "RS@k"}
METRICS = (("OPIS", "test OPIS", "%"), ("eps_OPIS", "test ε-OPIS (worst 10 % of classes)", "%"),
           ("R@1", "test Recall@1", "points"), ("MAP@R", "test MAP@R", "points"))


class DataDisagree(AssertionError):
    """The committed runs no longer say what the README's fixed text says."""


def require(ok: bool, what: str) -> None:
    """Stop unless the data say ``what`` (a statement the headline makes)."""
    if not ok:
        raise DataDisagree(f"the data no longer say that {what}: rewrite that sentence of text(), not the check")


def converged() -> tuple[Path, list[dict[str, Any]], dict[str, Any]]:
    """The converged study's runs file, its recorded runs and its committed power plan (never trained here)."""
    path = study.results_path("converged", "cpu", smoke=False)
    plan = study.load_plan(study.plan_path("converged", "cpu", smoke=False))
    if plan is None or f"{PRIMARY[0]}/{PRIMARY[1]}" not in plan.get("cells", {}):
        raise SystemExit(f"{path.with_name('plan.json')} has no plan for {PRIMARY[0]}/{PRIMARY[1]} yet: "
                         "the headline is written once the study's power plan is committed")
    return path, study.load_runs(path), plan


def pilot_runs() -> tuple[study.Protocol, list[dict[str, Any]]]:
    """The first study's (the pilot's) protocol and committed runs."""
    return study.protocol("ch07", "cpu", smoke=False), study.load_runs(study.results_path("ch07", "cpu", smoke=False))


def per_seed(runs: Sequence[Mapping[str, Any]], backbone: str, loss: str) -> dict[str, dict[str, Any]]:
    """Per metric, the figure's data: the paired change per seed and its mean with the 95 % t interval.

    OPIS and eps-OPIS in % of the base runs' mean, R@1 and MAP@R in points (100 x the change).
    """
    out = {}
    for m, _, unit in METRICS:
        seeds, base, treat = evidence.paired_values(runs, backbone, loss, evidence.PAPER, m)
        r = paired_comparison(base, treat)
        scale = 100 / r["base_mean"] if unit == "%" else 100.0
        out[m] = {"seeds": seeds, "change": ((treat - base) * scale).tolist(), "mean": r["delta"] * scale,
                  "low": r["ci_low"] * scale, "high": r["ci_high"] * scale, "unit": unit}
    return out


def numbers(path: Path, runs: list[dict[str, Any]], plan: Mapping[str, Any],
            pilot_study: tuple[study.Protocol, list[dict[str, Any]]], *, n_boot: int = 2000) -> dict[str, Any]:
    """Every number of the headline and the figure's data, each direction the text states checked."""
    cell = plan["cells"][f"{PRIMARY[0]}/{PRIMARY[1]}"]
    prim = evidence.primary_test(runs, planned_pairs=int(cell["seeds"]))
    n = prim["n"]
    require(prim["variant"] == evidence.PAPER and prim["metric"] == "OPIS", "the primary test is TCM's OPIS")
    second = plan["cells"].get(f"{SECOND[0]}/{SECOND[1]}")
    second_done = (second is not None
                   and len(evidence.paired_values(runs, *SECOND, evidence.PAPER, "OPIS")[0]) >= int(second["seeds"]))
    cells = [PRIMARY] + ([SECOND] if second_done else [])
    sec = {(r["backbone"], r["loss"], r["metric"]): r for r in evidence.secondary_tests(runs, cells)
           if r["variant"] == evidence.PAPER}
    boot = evidence.two_level_bootstrap(path, runs, *PRIMARY, n_boot=n_boot)
    detect = pilot.detectable_effect(plan["pilot"]["ratio"], n, power=plan["target_power"],
                                     alpha=prim["alpha"])
    first = next(r for r in runs if (r["stage"], r["backbone"], r["loss"], r["variant"]) == ("final", *PRIMARY, "base"))
    n_test = int(study.class_utility(path, first).shape[1])  # (thresholds, test classes)
    gains = study.length_evidence(study.protocol("converged", "cpu", smoke=False), runs, *PRIMARY)[-1]

    # every direction the text states, checked
    require(not prim["reject"], "the declared test does not find a change of OPIS")
    for lo, hi in ((prim["rel_low"], prim["rel_high"]), (boot["ci_low"], boot["ci_high"])):
        require(lo < 0 < hi and max(lo, -detect) < min(hi, detect),
                "both intervals hold changes of OPIS smaller than the detectable one (so they are not excluded)")
    for m in ("R@1", "MAP@R"):
        require(sec[(*PRIMARY, m)]["ci_low"] > 0 and sec[(*PRIMARY, m)]["p_holm"] < 0.05,
                f"TCM raised test {m} (interval above zero, Holm p < 0.05)")
    require(not cell["converged"] and gains["epochs"] == cell["length"]
            and min(gains["gain_base"], gains["gain_tcm"]) > 0,
            "validation MAP@R was still rising at the study's length")
    lp = study.protocol("converged_long", "cpu", smoke=False)
    long = study.length_evidence(lp, study.load_runs(study.results_path("converged_long", "cpu", smoke=False)),
                                 *PRIMARY)[-1]
    lead, lead_long = gains["tcm"] - gains["base"], long["tcm"] - long["base"]
    require(long["epochs"] == 2 * cell["length"] and long["gain_tcm"] <= lp.length_tol < long["gain_base"],
            "one doubling further, TCM's validation MAP@R gained within the length rule's tolerance, the base's more")
    require(0 < lead_long < lead, "trained twice as long, the base closed part (not all) of TCM's lead")
    require(n_test == GLYPH_PRESETS[first["config"]["glyph_size"]].n_test, "the runs were scored on every test class")
    pp, pr = pilot_study
    h = pilot.headline(study.comparisons(pp, pr))["OPIS"]
    require(h["primary"]["ci_low"] < 0 < h["primary"]["ci_high"] and not h["holm"],
            "the pilot could not tell (its primary interval spans 0, no OPIS change survives Holm)")
    pilot_length, pilot_test = study.training_length(pp, pr, *PRIMARY), GLYPH_PRESETS[pp.glyph_size].n_test
    require(pilot_length < cell["length"] and pilot_test < n_test,
            "the pilot was the smaller study (fewer epochs of training, fewer test classes)")

    v: dict[str, Any] = {
        "length": cell["length"], "n": n, "planned": int(cell["seeds"]), "complete": prim["complete"],
        "n_test": n_test, "rel": prim["rel"], "lo": prim["rel_low"], "hi": prim["rel_high"], "p": prim["p_t"],
        "alpha": prim["alpha"], "boot_lo": boot["ci_low"], "boot_hi": boot["ci_high"], "boot_est": boot["estimate"],
        "detect": detect, "power": plan["target_power"],
        "pilot_n": h["primary"]["n"], "pilot_length": pilot_length, "pilot_test": pilot_test,
        "long": long["epochs"], "closed": 1 - lead_long / lead,
        "figure": {"comparisons": []},
    }
    for b, loss in cells:
        d = per_seed(runs, b, loss)
        k = len(d["OPIS"]["seeds"])
        pairs = f"{k} pairs" if (b, loss) != PRIMARY or prim["complete"] else f"{k} of {v['planned']} planned pairs"
        v["figure"]["comparisons"].append({"backbone": b, "loss": loss, "variant": evidence.PAPER,
                                           "label": f"small CNN, {NAMES[loss]}", "pairs": pairs, "metrics": d})
    for m, key in (("R@1", "r1"), ("MAP@R", "map")):
        r = sec[(*PRIMARY, m)]
        v[key], v[f"{key}_lo"], v[f"{key}_hi"] = 100 * r["delta"], 100 * r["ci_low"], 100 * r["ci_high"]
    if second_done:
        r = sec[(*SECOND, "OPIS")]
        v["second"] = {"n": r["n"], "rel": r["rel"], "lo": r["rel_low"], "hi": r["rel_high"]}
    vit = plan["cells"].get(f"{VIT[0]}/{VIT[1]}")
    _, vb, vt = evidence.paired_values(runs, *VIT, evidence.PAPER, "OPIS")
    if vit is not None and vb.size >= int(vit["seeds"]):
        require(bool((vt > vb).all()), "TCM raised the transformer's test OPIS in every pair")
        v["vit"] = {"n": int(vb.size), "rel": float((vt - vb).mean() / vb.mean()), "length": int(vit["length"])}
    return v


def pct(x: float) -> str:
    return f"{100 * x:+.0f} %"


def _wrap(paragraph: str, width: int = 100) -> str:
    """``paragraph`` on lines of at most ``width`` characters, never breaking between a number and its '%'."""
    one = " ".join(paragraph.split()).replace(" %", "\0%")
    return textwrap.fill(one, width, break_long_words=False, break_on_hyphens=False).replace("\0", " ")


def text(v: Mapping[str, Any]) -> str:
    """The README's headline block (Markdown, between the two markers)."""
    n, planned = v["n"], v["planned"]
    seeds = f"{n} paired seeds" if v["complete"] else f"{n} of the {planned} planned paired seeds so far"
    verdict = ("does not find a change" if v["complete"] else
               f"is read once all {planned} pairs are in; on the {n} of {planned} planned pairs so far it does "
               "not find a change")
    second = ""
    if "second" in v:
        s = v["second"]
        second = (f" With RS@k as the base loss ({s['n']} paired seeds), TCM changed test OPIS by {pct(s['rel'])} "
                  f"(95 % interval {pct(s['lo'])} to {pct(s['hi'])}).")
    vit = ""
    if "vit" in v:
        t = v["vit"]
        vit = (f" On a small transformer (a conv-stem ViT, {t['length']} epochs), TCM raised test OPIS in each "
                   f"of the {t['n']} pairs we could afford ({pct(t['rel'])} on average): an exploratory result.")
    answer = f"""**The answer.** On the book's glyph benchmark (a small CNN trained from scratch with Smooth-AP
for {v['length']} epochs, with the base model's validation accuracy still rising;
{seeds}; {v['n_test']:,} test classes), adding TCM at the paper's margins changed test
OPIS (how unevenly one distance threshold serves the classes; lower is better) by
{pct(v['rel'])} (95 % interval {pct(v['lo'])} to {pct(v['hi'])}; over seeds and test classes together
{pct(v['boot_lo'])} to {pct(v['boot_hi'])}). The test we declared before the runs (paired t-test,
two-sided, α = {v['alpha']:g}) {verdict} (p = {v['p']:.2g}); with {n} pairs it detects changes of
{100 * v['detect']:.0f} % or more with {100 * v['power']:.0f} % power, so smaller effects are not
excluded. TCM made the model more accurate: test Recall@1 rose by {v['r1']:.1f} points
({v['r1_lo']:.1f} to {v['r1_hi']:.1f}) and MAP@R by {v['map']:.1f} points ({v['map_lo']:.1f} to
{v['map_hi']:.1f}). Part of that is a head start: TCM's models had stopped improving by then,
the base models had not, and trained for {v['long']} epochs the base closed {100 * v['closed']:.0f} % of
its gap in validation MAP@R.{second}{vit} The first, smaller study (the pilot: {v['pilot_n']} pairs, {v['pilot_length']} epochs
of training, {v['pilot_test']:,} test classes) could not tell either way; chapter 13 says what it got wrong.
[Chapter 13](notebooks/13_what_the_evidence_says.md) has the details and a short guide on
whether to use TCM."""
    return f"""{START}
{_wrap(answer)}

![What TCM changed, seed by seed and on average: test OPIS, ε-OPIS, Recall@1 and MAP@R](book/images/tcm_change.png)

*The change with TCM for each seed (grey dots: a base model and its TCM model share the seed)
and on average (black: the mean with its 95 % t interval): test OPIS and ε-OPIS in % of the base
model's mean (left of zero is more consistent), Recall@1 and MAP@R in points (right of zero is
more accurate). Made by `book/images/make_readme_result.py` from
`tcmlib/results/converged/runs.jsonl` and its `plan.json`.*
{END}"""


def draw(v: Mapping[str, Any], out: Path = FIGURE) -> None:
    """The figure, with its plotted numbers embedded as JSON (PNG text chunk ``Description``); same data, same bytes."""
    rows = v["figure"]["comparisons"]
    fig, axes = plt.subplots(2, 2, figsize=(9, 1.9 + 1.1 * len(rows)), sharey=True)
    for ax, (m, title, unit) in zip(axes.flat, METRICS):
        for i, c in enumerate(rows):
            d, y = c["metrics"][m], len(rows) - 1 - i
            ax.plot(d["change"], y + np.linspace(-0.15, 0.15, len(d["change"])), "o", color="0.6", ms=3.5)
            ax.errorbar(d["mean"], y, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="D", color="k",
                        ms=5, capsize=3)
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("change with TCM (% of the base mean)" if unit == "%" else "change with TCM (points)",
                      fontsize=8)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.tick_params(labelsize=8)
    labels = [f"{c['label']}\n{c['pairs']}" for c in rows][::-1]
    for ax in axes[:, 0]:
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
    fig.suptitle("What adding TCM (the paper's margins) changed, seed by seed (grey) and on average with a 95 % "
                 "interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110, metadata={"Description": json.dumps(v["figure"]), "Software": None})
    plt.close(fig)


def figure_data(path: Path = FIGURE) -> dict[str, Any] | None:
    """The data a figure file embeds (None when the file is missing or carries none)."""
    if not path.exists():
        return None
    with Image.open(path) as im:
        info = im.info.get("Description")
    return None if info is None else json.loads(info)


def block(readme: str) -> str:
    """The headline block README holds now ('' when it has none)."""
    if START not in readme or END not in readme:
        return ""
    return readme[readme.index(START): readme.index(END) + len(END)]


def main(argv: list[str]) -> int:
    try:
        v = numbers(*converged(), pilot_runs())
    except DataDisagree as e:
        print(f"make_readme_result.py: {e}", file=sys.stderr)
        return 2
    new = text(v)
    readme = README.read_text()
    if "--check" in argv:
        stale = block(readme) != new or figure_data() != json.loads(json.dumps(v["figure"]))
        print("README's headline or its figure is stale: run python book/images/make_readme_result.py" if stale
              else "up to date")
        return int(stale)
    if not block(readme):
        raise SystemExit(f"README.md lacks the markers {START} ... {END}: put them where the headline goes")
    README.write_text(readme.replace(block(readme), new))
    draw(v)
    print(f"wrote {README.name}'s headline and {FIGURE.relative_to(ROOT)} ({v['n']} of {v['planned']} planned pairs"
          f"{'' if v['complete'] else ' so far'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
