"""What the chapters read from a study's recorded runs; nothing here trains.

Paired test-set comparisons with Holm's correction (:func:`comparisons`), the accuracy-consistency frontier gap
(:func:`frontier_gap`), what the converged length rule has read (:func:`length_evidence`), how far a study has
got (:func:`status`), what it cost (:func:`run_costs`, :func:`total_cpu_hours`) and where its numbers come from
(:func:`where_from`).  Every function takes the runs as ``tcmlib.study.runner.load_runs`` reads them.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from tcmlib.experiments import config_key
from tcmlib.study.protocols import (PAPER_TCM, Protocol, _complete, _curve_ends, cells, for_backbone, selected_setting,
                                    stage_configs, variant_name)

__all__ = ["status", "comparisons", "frontier_gap", "length_evidence", "where_from", "run_costs", "total_cpu_hours"]


def status(p: Protocol, runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per cell: how many runs of each stage are recorded and wanted, and whether the cell is complete."""
    rows = []
    for backbone, loss in cells(p):
        row: dict[str, Any] = {"backbone": backbone, "loss": loss}
        for stage in p.stages:
            wanted = stage_configs(p, runs, backbone, loss, stage)
            have = {(r["stage"], r["key"]) for r in runs}
            row[stage] = (f"{sum((stage, config_key(c)) in have for _, c in wanted)}/{len(wanted)}"
                          if wanted is not None else "waits")
        row["complete"] = _complete(p, runs, backbone, loss, p.stages[-1]) is not None
        rows.append(row)
    return rows


def comparisons(p: Protocol, runs: Sequence[Mapping[str, Any]],
                metrics: Sequence[str] = ("R@1", "MAP@R", "OPIS", "eps_OPIS")) -> list[dict[str, Any]]:
    """Paired test-set comparisons of every TCM variant with its base, per complete cell and metric.

    One row per (cell, variant, metric): :func:`tcmlib.stats.paired_comparison` over the final
    seeds, plus ``p_holm``: the p of the protocol's test (``p.test``: Wilcoxon signed-rank, or the
    paired t-test) adjusted by Holm over all rows of the same metric (the family of comparisons the
    study makes for that metric).
    """
    from tcmlib.stats import holm, paired_comparison

    if "final" not in p.stages:
        raise ValueError("this study has no final stage: its runs are scored on validation classes only")
    rows: list[dict[str, Any]] = []
    for backbone, loss in cells(p):
        final = _complete(p, runs, backbone, loss, "final")
        if final is None:
            continue
        cp = for_backbone(p, backbone)
        by = {(r["variant"], r["seed"]): r for r in final}
        variants = list(dict.fromkeys(r["variant"] for r in final if r["variant"] != "base"))
        selected = selected_setting(p, runs, backbone, loss)
        for v in variants:
            for m in metrics:
                base = [by["base", s]["final"][m] for s in cp.final_seeds]
                treat = [by[v, s]["final"][m] for s in cp.final_seeds]
                rows.append({"backbone": backbone, "loss": loss, "variant": v,
                             "role": ("paper" if v == variant_name(PAPER_TCM) else "") +
                                     ("+selected" if v == selected else ""),
                             "metric": m, "test": cp.test, **paired_comparison(base, treat)})
    for m in metrics:
        family = [r for r in rows if r["metric"] == m]
        for r, adj in zip(family, holm([r["p_t" if r["test"] == "t" else "p_wilcoxon"] for r in family])):
            r["p_holm"] = adj
    return rows


def frontier_gap(runs: Sequence[Mapping[str, Any]], backbone: str, loss: str, *, stage: str = "curves"
                 ) -> tuple[float, dict[str, tuple[Any, Any]]]:
    """Does TCM move the accuracy-consistency frontier?  ``(gap, paths)`` from a cell's learning curves.

    ``paths[variant] = (val R@1, val OPIS)`` per epoch (seed means, sorted by R@1) for the base loss
    and base + TCM (paper).  ``gap`` is the mean over 50 evenly spaced R@1 values in the range both
    paths cover of ``OPIS_tcm(R@1) - OPIS_base(R@1)`` (linear interpolation): negative when TCM is
    more consistent at equal accuracy, NaN when the paths share no R@1 range.  ``stage``: whose
    per-epoch validation records to use (the learning curves, or e.g. chapter 8's ``final`` runs).
    """
    import numpy as np

    paths = {}
    for variant in ("base", variant_name(PAPER_TCM)):
        rs = [r for r in runs if (r["stage"], r["backbone"], r["loss"], r["variant"]) == (stage, backbone, loss, variant)]
        if not rs:
            raise ValueError(f"no recorded {stage!r} runs of {backbone} x {loss} ({variant})")
        r1 = np.mean([[h["val_R@1"] for h in r["history"]] for r in rs], axis=0)
        op = np.mean([[h["val_OPIS"] for h in r["history"]] for r in rs], axis=0)
        order = np.argsort(r1, kind="stable")
        paths[variant] = (r1[order], op[order])
    (rb, ob), (rt, ot) = paths.values()
    lo, hi = max(rb[0], rt[0]), min(rb[-1], rt[-1])
    if hi <= lo:
        return float("nan"), paths
    grid = np.linspace(lo, hi, 50)
    return float(np.mean(np.interp(grid, rt, ot) - np.interp(grid, rb, ob))), paths


def length_evidence(p: Protocol, runs: Sequence[Mapping[str, Any]], backbone: str, loss: str
                    ) -> list[dict[str, Any]]:
    """What the converged length rule has read so far, one row per recorded length: ``{"epochs", "base", "tcm",
    "gain_base", "gain_tcm"}`` (seed means of the length metric at the end; gains over the previous length)."""
    p = for_backbone(p, backbone)
    ends = _curve_ends(p, runs, backbone, loss)
    base, tcm = ends.get("base", {}), ends.get(variant_name(PAPER_TCM), {})
    rows, prev = [], None
    for h in p.horizons:
        if h not in base or h not in tcm:
            break
        rows.append({"epochs": h, "base": base[h], "tcm": tcm[h],
                     "gain_base": None if prev is None else base[h] - base[prev],
                     "gain_tcm": None if prev is None else tcm[h] - tcm[prev]})
        prev = h
    return rows


def where_from(path: str | os.PathLike, runs: Sequence[Mapping[str, Any]]) -> str:
    """Which file, commits and machines a study's numbers come from, and its recorded training time."""
    prov = [r["provenance"] for r in runs if "reused_from" not in r]
    reused = sorted({r["reused_from"] for r in runs if "reused_from" in r})
    commits = sorted({(r["provenance"]["commit"] or "?")[:10] for r in runs})
    machines = sorted({f'{q.get("cpu_model", q["device"])} ({q["cpus"]} CPUs), {q["threads"]} thread(s) a run, '
                       f'torch {q["torch"]}' for q in prov})
    own = [r for r in runs if "reused_from" not in r]
    lines = [f"file: {path}", f"runs: {len(runs)} ({len(own)} trained for this study"
             + (f", {len(runs) - len(own)} reused from {', '.join(reused)})" if reused else ")"),
             f"commits: {', '.join(commits) or '-'}", f"machines: {'; '.join(machines) or '-'}",
             f"training time recorded (this study's own runs): {total_cpu_hours(own):.2f} h"]
    return "\n".join(lines)


def run_costs(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What a run costs, per stage, backbone and base loss: medians over the study's own (not reused) runs.

    ``train_s`` (optimisation), ``eval_s`` (validation after every epoch, test at the end),
    ``other_s`` (the rest of the run's wall time: start-up, data, the bootstrap interval),
    ``images_per_s`` (training images per second of ``train_s``; images = steps x batch size).
    """
    import numpy as np

    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in runs:
        if "reused_from" not in r:
            groups.setdefault((r["stage"], r.get("backbone", "?"), r["loss"]), []).append(r)
    rows = []
    for (stage, backbone, loss), rs in groups.items():
        train = np.array([sum(h["train_time_s"] for h in r["history"]) for r in rs])
        ev = np.array([sum(h.get("eval_time_s", 0.0) for h in r["history"]) for r in rs])
        wall = np.array([r["wall_s"] for r in rs])
        images = np.array([r["history"][-1]["step"] * r["config"]["batch_size"] for r in rs])
        rows.append({"stage": stage, "backbone": backbone, "loss": loss, "runs": len(rs), "train_s": float(np.median(train)),
                     "eval_s": float(np.median(ev)), "other_s": float(np.median(wall - train - ev)),
                     "images_per_s": float(np.median(images / train))})
    return rows


def total_cpu_hours(runs: Sequence[Mapping[str, Any]]) -> float:
    """Training + evaluation time of the runs (hours), from their per-epoch records, each run once.

    Per-epoch times survive a resume (they are checkpointed), so an interrupted run counts fully;
    start-up (data loading, model building, under a few seconds a run) is not included.
    """
    seen: dict[str, float] = {}
    for r in runs:
        seen[r["key"]] = sum(float(h.get("train_time_s", 0.0)) + float(h.get("eval_time_s", 0.0)) for h in r["history"])
    return sum(seen.values()) / 3600
