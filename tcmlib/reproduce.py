"""``python -m tcmlib.experiments reproduce <study>`` / ``plan <study>`` (also ``python -m tcmlib.reproduce``):
train what a study's results file lacks and append it, or write its power plan.

The command line of :func:`tcmlib.study.reproduce` and :func:`tcmlib.study.write_plan`.  It lives
here, not in :mod:`tcmlib.experiments`, so that :mod:`tcmlib.experiments` (the run cache) does not
import :mod:`tcmlib.study` (which builds on the run cache): no import circle.
"""

from __future__ import annotations

from typing import Sequence

from tcmlib import study

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tcmlib.experiments reproduce ch07 [--scale cpu|gpu] [--only CELL ...] [--max-runs N]`` or ``plan ch07``."""
    import argparse
    import shlex
    import sys

    parser = argparse.ArgumentParser(prog="python -m tcmlib.experiments",
                                     description="Train what a study's results file lacks and append it (Part II).")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="train the missing runs of a study, stage by stage")
    rep.add_argument("study", choices=study.STUDIES)
    rep.add_argument("--scale", choices=("cpu", "gpu"), default=None, help="default: $TCMLIB_SCALE or cpu")
    rep.add_argument("--only", nargs="+", default=[], metavar="CELL",
                     help="cells (backbone/loss, e.g. small_cnn/smooth_ap) or backbones to run")
    rep.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    rep.add_argument("--results", default=None, help="results root (default: <repo>/results)")
    pl = sub.add_parser("plan", help="write the power plan of every cell whose training length is decided "
                                     "(commit it before the final runs, which wait for it)")
    pl.add_argument("study", choices=[s for s in study.STUDIES if study.protocol(s, "cpu", smoke=False).planned])
    pl.add_argument("--scale", choices=("cpu", "gpu"), default=None, help="default: $TCMLIB_SCALE or cpu")
    pl.add_argument("--results", default=None, help="results root (default: <repo>/results)")
    args = parser.parse_args(argv)
    if args.command == "reproduce" and args.max_runs is not None and args.max_runs < 0:
        rep.error(f"--max-runs must be >= 0 (how many new runs to train before stopping), got {args.max_runs}")
    command = shlex.join(["python", "-m", "tcmlib.experiments", *(sys.argv[1:] if argv is None else argv)])
    if args.command == "plan":
        try:
            written = study.write_plan(args.study, scale=args.scale, results_root=args.results, command=command)
        except ValueError as e:
            print(f"python -m tcmlib.experiments: error: {e}", file=sys.stderr)
            return 2
        print(f"plan updated: {written}" if written else "plan unchanged (no newly decided cell)")
        return 0
    try:
        path = study.reproduce(args.study, scale=args.scale, only=args.only, results_root=args.results,
                               max_runs=args.max_runs, command=command)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"python -m tcmlib.experiments: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(study.load_runs(path))} runs in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
