"""Ties: Recall@1 and MAP@R when many similarities are equal, this checkout next to an older one and pml.

A collapsed model (every embedding the same) or a coarsely quantised one ties often.  A retrieval metric
must then rank the tied candidates without looking at their labels; ``tcmlib`` counts the expectation over
a uniformly random order of the tied candidates, so identical embeddings score at chance (R@1 = the chance
that a random other sample shares the query's class).  An older ``tcmlib`` broke ties in an order that
followed the labels, and scored a collapsed model far above chance.

Data (seeded): N samples, ``classes`` random labels, and either every embedding identical (``collapsed``)
or Gaussian clusters rounded to one decimal (``rounded``: many partial ties).  Contenders:

* ``chance``: the label-free expectation for collapsed embeddings, sum_c n_c (n_c - 1) / (N (N - 1));
* ``this``:   :func:`tcmlib.metrics.recall_and_map_at_r` of this checkout;
* ``before``: the same function of another checkout (``--before PATH``, e.g. a ``git worktree`` of commit
  d5cb1c7, run in a subprocess with that checkout on ``PYTHONPATH``);
* ``pml``:    pytorch-metric-learning's AccuracyCalculator (faiss breaks ties in index order).

    python benchmarks/ties.py
    git worktree add /tmp/tcm-old d5cb1c7 && python benchmarks/ties.py --before /tmp/tcm-old
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys

import torch

SIZES = (1000, 5000)
CLASSES = 10


def make_data(n: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x (n, 16) float32, labels (n,) int64)``: collapsed (all rows equal) or rounded clusters."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    if kind == "collapsed":
        return torch.ones(n, 16) / 4.0, labels
    centres = torch.randn(CLASSES, 16, generator=g)
    x = centres[labels] + 1.5 * torch.randn(n, 16, generator=g)
    x = torch.nn.functional.normalize(x, dim=1)
    return (x * 10).round() / 10, labels  # one decimal: many equal similarities


def measure_here() -> dict[str, list[float]]:
    """``{"<kind> <n>": [R@1, MAP@R]}`` with the ``tcmlib`` importable in this process."""
    from tcmlib.metrics import recall_and_map_at_r

    out = {}
    for kind in ("collapsed", "rounded"):
        for n in SIZES:
            x, y = make_data(n, kind)
            recall, mapr = recall_and_map_at_r(x, y, ks=(1,))
            out[f"{kind} {n}"] = [float(recall[1]), float(mapr)]
    return out


def measure_pml() -> dict[str, list[float]]:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")
    out = {}
    for kind in ("collapsed", "rounded"):
        for n in SIZES:
            x, y = make_data(n, kind)
            a = calc.get_accuracy(x, y)
            out[f"{kind} {n}"] = [a["precision_at_1"], a["mean_average_precision_at_r"]]
    return out


def chance(n: int) -> float:
    _, y = make_data(n, "collapsed")
    counts = torch.bincount(y).double()
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", help="another tcm-book checkout to measure side by side")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure_here()))
        return
    cols = {"this": measure_here(), "pml": measure_pml()}
    if args.before:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.before)}
        done = subprocess.run([sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True,
                              check=True)
        cols["before"] = json.loads(done.stdout.strip().splitlines()[-1])
    names = list(cols)
    print("| data | N | chance R@1 | " + " | ".join(f"{c} R@1 | {c} MAP@R" for c in names) + " |")
    print("|---|---|---|" + "---|---|" * len(names))
    for key in cols["this"]:
        kind, n = key.split()
        ch = f"{chance(int(n)):.3f}" if kind == "collapsed" else ""
        vals = " | ".join(f"{cols[c][key][0]:.3f} | {cols[c][key][1]:.3f}" for c in names)
        print(f"| {kind} | {n} | {ch} | {vals} |")


if __name__ == "__main__":
    main()
