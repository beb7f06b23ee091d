"""Write the README's headline (the pilot study's answer) and its figure from the committed runs.

The headline sentence's numbers and the figure are computed from ``tcmlib/results/ch07/runs.jsonl`` (chapter 7's
first study, the pilot): the paired change of test OPIS and eps-OPIS per seed with its 95 % t interval and Holm's
correction (``tcmlib.study.comparisons``), the power of its design (``tcmlib.study.power_plan``'s pilot part).  The
sentence is a fixed text with the numbers filled in; every word of direction in it ("cannot tell", "none
survives", "rose") is checked against the data first, and the script stops if the data say otherwise.

    python book/images/make_readme_result.py           # rewrites README's headline block and the figure
    python book/images/make_readme_result.py --check   # exit status 1 if README's block is stale

``tests/test_readme_result.py`` recomputes the numbers from the results file with scipy and statsmodels and
checks the README and the figure's embedded data against them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tcmlib import pilot, study  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FIGURE = Path(__file__).with_name("pilot_opis_change.png")
START, END = "<!-- pilot-headline:start -->", "<!-- pilot-headline:end -->"
NAMES = {"small_cnn": "small CNN", "conv_vit_tiny": "conv-stem ViT", "smooth_ap": "Smooth-AP",
         "recall_surrogate": "RS@k"}


def pilot_runs() -> tuple[study.Protocol, list[dict[str, Any]]]:
    """The pilot's protocol and committed runs (never trained here)."""
    p = study.protocol("ch07", "cpu", smoke=False)
    return p, study.load_runs(study.results_path("ch07", "cpu", smoke=False))


def margins(row: dict[str, Any]) -> str:
    """'paper's margins' or 'margins chosen on validation classes' for a comparison row."""
    return "paper's margins" if "paper" in row["role"] else "margins chosen on validation"


def numbers(p: study.Protocol, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every number of the headline, and the figure's data (per comparison, per seed)."""
    comp = study.comparisons(p, runs)
    h = pilot.headline(comp)
    plan = study.power_plan(dataclasses.replace(study.protocol("converged", "cpu", smoke=False), backbones=()),
                            [], runs)["pilot"]
    prim = h["OPIS"]["primary"]
    eps = h["eps_OPIS"]["holm"]
    r1 = h["R@1"]["rows"]
    cnn_r1 = [r for r in r1 if r["backbone"] == "small_cnn"]
    vit_r1 = [r for r in r1 if r["backbone"] != "small_cnn"]
    # every direction the headline states, checked
    assert prim["ci_low"] < 0 < prim["ci_high"], "the primary comparison's interval no longer spans 0"
    assert not h["OPIS"]["holm"], "an OPIS change now survives Holm's correction"
    assert len(eps) == 1 and eps[0]["delta"] < 0, "the eps-OPIS survivors of Holm changed"
    assert all(r["delta"] > 0 and r["p_holm"] < 0.05 for r in cnn_r1), "R@1 no longer rises on the small CNN"
    assert len(vit_r1) == 1 and vit_r1[0]["ci_low"] < 0 < vit_r1[0]["ci_high"], "the ViT's R@1 change is measurable"
    assert not any(r["ci_high"] < 0 for r in r1), "TCM measurably lost R@1 somewhere"
    n_cnn = len(study.for_backbone(p, "small_cnn").final_seeds)
    detect = pilot.detectable_effect(plan["ratio"], n_cnn)
    assert detect > max(-r for r in h["OPIS"]["rel"]), "the observed OPIS changes now reach the detectable size"
    seeds = {b: len(study.for_backbone(p, b).final_seeds) for b in p.backbones}
    for b, loss in study.cells(p):  # "stopped while validation R@1 was still rising": the base's best epoch later
        assert pilot.best_epoch(runs, b, loss)[0] > study.training_length(p, runs, b, loss), (b, loss)
    figure = {}
    for m in ("OPIS", "eps_OPIS"):
        figure[m] = []
        for r in h[m]["rows"]:
            cp = study.for_backbone(p, r["backbone"])
            by = {(x["variant"], x["seed"]): x["final"][m] for x in runs if x["stage"] == "final"
                  and (x["backbone"], x["loss"]) == (r["backbone"], r["loss"])}
            change = [100 * (by[r["variant"], s] - by["base", s]) / r["base_mean"] for s in cp.final_seeds]
            figure[m].append({"backbone": r["backbone"], "loss": r["loss"], "variant": r["variant"],
                              "seeds": list(cp.final_seeds), "change_pct": change,
                              "mean_pct": 100 * r["rel"], "low_pct": 100 * r["ci_low"] / r["base_mean"],
                              "high_pct": 100 * r["ci_high"] / r["base_mean"], "p_holm": r["p_holm"],
                              "label": f"{NAMES[r['backbone']]}, {NAMES[r['loss']]}\n{margins(r)}"})
    return {"seeds_cnn": seeds["small_cnn"], "seeds_vit": seeds.get("conv_vit_tiny"),
            "opis_rel": prim["rel"], "opis_low": prim["rel_low"], "opis_high": prim["rel_high"],
            "n": h["OPIS"]["n"], "lower": h["OPIS"]["lower"],
            "opis_min": min(h["OPIS"]["rel"]), "opis_max": max(h["OPIS"]["rel"]),
            "eps_rel": eps[0]["rel"], "eps_low": eps[0]["ci_low"] / eps[0]["base_mean"],
            "eps_high": eps[0]["ci_high"] / eps[0]["base_mean"], "eps_p": eps[0]["p_holm"],
            "eps_backbone": eps[0]["backbone"], "eps_loss": eps[0]["loss"], "eps_role": eps[0]["role"],
            "r1_min": min(r["delta"] for r in cnn_r1), "r1_max": max(r["delta"] for r in cnn_r1),
            "r1_n_cnn": len(cnn_r1), "vit_r1": vit_r1[0]["delta"], "vit_r1_low": vit_r1[0]["ci_low"],
            "vit_r1_high": vit_r1[0]["ci_high"], "power10": pilot.paired_power(plan["ratio"], n_cnn, -0.10),
            "detect": detect, "figure": figure, "plan": _converged_plan()}


def _converged_plan() -> dict[str, Any] | None:
    """The converged study's committed plan for the primary loss and backbone (None before it is written)."""
    plan = study.load_plan(study.plan_path("converged", "cpu", smoke=False))
    cell = (plan or {}).get("cells", {}).get(f"{study.PRIMARY['backbone']}/{study.PRIMARY['loss']}")
    return None if cell is None else {**cell, "n_power": plan["n_power"]}  # type: ignore[index]


def _second_study(v: dict[str, Any]) -> str:
    """The sentence on the converged study: its design, and, once committed, its plan's numbers."""
    c = v["plan"]
    if c is None:
        return ("a second study, trained to convergence with its seeds planned from the pilot, is under way.")
    length = (f"to convergence ({c['length']} epochs)" if c["converged"] else
              f"for {c['length']} epochs with a decaying learning rate (the longest length its rule tried; "
              "validation accuracy was still rising)")
    return (f"a second study trains each run {length}; {c['n_power']} pairs would give 80 % "
            f"power for a 10 % change, its CPU budget buys {c['seeds']}, enough for a change of "
            f"{100 * abs(c['detectable_rel']):.0f} %; its runs are under way.")


def pct(x: float) -> str:
    return f"{100 * x:+.0f} %"


def text(v: dict[str, Any]) -> str:
    """The README's headline block (Markdown, between the two markers)."""
    assert (v["eps_backbone"], v["eps_loss"], v["eps_role"]) == ("small_cnn", "smooth_ap", "+selected")
    return f"""{START}
**The answer so far, from the pilot study.** On the book's glyph benchmark (models trained from
scratch on a CPU, {v['seeds_cnn']} paired seeds; {v['seeds_vit']} for the transformer), the first study
*cannot tell* whether TCM lowers OPIS. With Smooth-AP on the small CNN and the paper's margins,
TCM changed test OPIS by {pct(v['opis_rel'])} (95 % interval {pct(v['opis_low'])} to {pct(v['opis_high'])}).
Across all {v['n']} comparisons (two base losses, two backbones, the paper's margins or margins
chosen on validation classes) mean OPIS fell in {v['lower']} of {v['n']} (changes from {pct(v['opis_min'])}
to {pct(v['opis_max'])}), but none of the {v['n']} changes survives Holm's correction, the test the
study declared. The one consistency result that does: ε-OPIS (the worst tenth of
the classes) for Smooth-AP with margins chosen on validation classes, {pct(v['eps_rel'])}
({pct(v['eps_low'])} to {pct(v['eps_high'])}, adjusted p = {v['eps_p']:.2g}). TCM did not cost accuracy:
Recall@1 rose by {100 * v['r1_min']:.1f} to {100 * v['r1_max']:.1f} points on the small CNN (all {v['r1_n_cnn']} survive
Holm) and changed by {100 * v['vit_r1']:+.1f} points ({100 * v['vit_r1_low']:+.1f} to {100 * v['vit_r1_high']:+.1f}) on the
transformer. The pilot stopped training while validation Recall@1 was still rising, and its
{v['seeds_cnn']} seeds had a power of {v['power10']:.2f} to detect a 10 % change of OPIS (80 % power only
from {100 * v['detect']:.0f} % on); {_second_study(v)}
[Chapter 13](notebooks/13_what_the_evidence_says.md) has the details
and a short guide on whether to use TCM.

![The pilot's paired change of test OPIS and ε-OPIS with TCM, per seed and on average](book/images/pilot_opis_change.png)

*Change of test OPIS (left) and ε-OPIS (right) with TCM, in % of the base loss's mean, per
comparison: grey dots are single seeds (a base run and its TCM twin share initial weights and
batch order), black the mean with its 95 % t interval, red where the change survives Holm's
correction. Made by `book/images/make_readme_result.py` from `tcmlib/results/ch07/runs.jsonl`.*
{END}"""


def draw(v: dict[str, Any], out: Path = FIGURE) -> None:
    """The figure, with its plotted numbers embedded as JSON (PNG text chunk ``Description``)."""
    rows = v["figure"]["OPIS"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.9 + 0.62 * len(rows)), sharey=True)
    for ax, (m, title) in zip(axes, (("OPIS", "test OPIS"), ("eps_OPIS", "test ε-OPIS (the worst 10 % of classes)"))):
        for i, r in enumerate(v["figure"][m]):
            y = len(rows) - 1 - i
            jitter = np.linspace(-0.12, 0.12, len(r["change_pct"]))
            ax.plot(r["change_pct"], y + jitter, "o", color="0.65", ms=3)
            color = "tab:red" if r["p_holm"] < 0.05 else "k"
            ax.errorbar(r["mean_pct"], y, xerr=[[r["mean_pct"] - r["low_pct"]], [r["high_pct"] - r["mean_pct"]]],
                        fmt="D", color=color, ms=5, capsize=3)
            ax.annotate(f"Holm p {r['p_holm']:.2g}", (1.0, y), xycoords=("axes fraction", "data"),
                        xytext=(-4, 6), textcoords="offset points", ha="right", fontsize=7, color=color)
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set(xlabel="change with TCM (% of the base loss's mean)", title=title)
        ax.title.set_fontsize(9)
        ax.xaxis.label.set_fontsize(9)
    axes[0].set_yticks(range(len(rows)), [r["label"] for r in rows][::-1], fontsize=8)
    fig.suptitle("The pilot study: what TCM changed, seed by seed (grey), on average with a 95 % interval",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110, metadata={"Description": json.dumps(v["figure"])})
    plt.close(fig)


def block(readme: str) -> str:
    """The headline block README holds now ('' when it has none)."""
    if START not in readme or END not in readme:
        return ""
    return readme[readme.index(START): readme.index(END) + len(END)]


def main(argv: list[str]) -> int:
    v = numbers(*pilot_runs())
    new = text(v)
    readme = README.read_text()
    if "--check" in argv:
        stale = block(readme) != new
        print("README's headline is stale: run python book/images/make_readme_result.py" if stale else "up to date")
        return int(stale)
    if not block(readme):
        raise SystemExit(f"README.md lacks the markers {START} ... {END}: put them where the headline goes")
    README.write_text(readme.replace(block(readme), new))
    draw(v)
    print(f"wrote {README.name}'s headline and {FIGURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
