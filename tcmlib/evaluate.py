"""``tcmlib-eval`` / ``python -m tcmlib.evaluate``: how consistent is one threshold on *your* embeddings?

From the shell, on embeddings saved with ``numpy.save`` (or ``numpy.savez``)::

    tcmlib-eval emb.npy labels.npy --far 1e-3                 # leave-one-out on one set
    tcmlib-eval emb.npy labels.npy --far 1e-3 --opis-far 1e-4 1e-2   # OPIS around that target
    tcmlib-eval data.npz --groups groups.npy --json           # .npz with arrays "embeddings", "labels"
    tcmlib-eval query.npy qlab.npy --gallery gal.npy glab.npy --plot curves.png
    tcmlib-eval emb.npy labels.npy --calibration cal.npy cal_labels.npy --posthoc

It prints Recall@k and MAP@R (:mod:`tcmlib.metrics.retrieval`), OPIS and eps-OPIS over a stated
distance range (:mod:`tcmlib.metrics.opis`), OPIS with a bootstrap interval over classes, and the
global threshold that meets a false-accept target with the per-class (and per-group) FAR / FRR it
gives (:mod:`tcmlib.report`); with ``--posthoc`` also per-class and per-cluster thresholds
(:func:`tcmlib.posthoc.compare_thresholding`).  ``--json`` prints one JSON object instead,
``--plot`` saves the utility-curve figure.  In Python: :func:`eval_report` returns an :class:`EvalReport`.

Units: distances are ``d = 1 - cosine`` in [0, 2], a pair is accepted when ``d <= threshold``;
rates (FAR, FRR, R@k, MAP@R) are fractions in [0, 1] in JSON and percentages in the text; OPIS and
eps-OPIS are variances of per-class utilities in [0, 1] (so at most 0.25; lower is more consistent).

With a gallery (``--gallery``), the deployment reading (a probe is compared against an enrolled
gallery): Recall@k and MAP@R rank the gallery for each query, and every pair-based number (the
threshold for the FAR target, global / per-class / per-group FAR and FRR, OPIS, eps-OPIS and the
bootstrap) uses the query x gallery pairs, each counted for its query's class (or group; ``--groups``
are per query): a class's FAR is the share of its queries' pairs with other-class gallery items that
are accepted (:mod:`tcmlib.metrics.opis`, "Query / reference").  The two sets are taken as disjoint:
an item in both meets itself (distance ~0, an accepted positive pair and its own nearest neighbour),
so passing the queries again as the gallery inflates R@k and TAR; to evaluate one set, omit
``--gallery`` (each sample then queries all others).  A ``--calibration`` set chooses the threshold on
its own pairs; ``--posthoc`` needs one set (no gallery).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcmlib._checks import check_embeddings_labels, check_labels
from tcmlib.metrics.opis import UtilityCurves
from tcmlib.metrics.retrieval import recall_and_map_at_r
from tcmlib.report import OPIS_SCALE, ThresholdReport, _check_calibration, _check_far_target, threshold_report

__all__ = ["EvalReport", "eval_report", "load_arrays", "main"]

PROGRESS_MIN_N = 20_000  # show a progress bar (stderr) from this many samples on


# ----------------------------------------------------------------------------- files
def _read(path: str | Path, what: str) -> np.ndarray | dict[str, np.ndarray]:
    p = Path(path)
    if p.is_dir():
        inside = sorted(f.name for f in p.iterdir() if f.suffix in (".npy", ".npz"))[:5]
        hint = f" (it holds {', '.join(inside)}{', ...' if len(inside) == 5 else ''})" if inside else ""
        raise FileNotFoundError(f"{what} file {p} is a folder, not a file{hint}; pass the path of the .npy / "
                                ".npz file itself")
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} does not exist (save arrays with numpy.save / numpy.savez)")
    try:
        data = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{what} file {p} is not a readable .npy / .npz array file ({e}); "
                         "save numeric arrays with numpy.save or numpy.savez") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            return {k: data[k] for k in data.files}
    return data


def load_arrays(
    embeddings_path: str | Path, labels_path: str | Path | None = None, *, what: str = "embeddings"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(embeddings (N, D), labels (N,), groups (N,) or None)`` from ``.npy`` files or one ``.npz``.

    An ``.npz`` holds the arrays ``embeddings`` and ``labels`` (and optionally ``groups``); a ``.npy``
    holds the embeddings and ``labels_path`` the labels.  Raises ``FileNotFoundError`` / ``ValueError``
    naming the file and what to do; the values themselves are checked by :func:`evaluate`.
    """
    data = _read(embeddings_path, what)
    groups = None
    if isinstance(data, dict):
        missing = [k for k in ("embeddings", "labels") if k not in data and not (k == "labels" and labels_path)]
        if missing:
            raise ValueError(f"{embeddings_path} holds arrays {sorted(data)}, not {missing}: save it as "
                             "numpy.savez(path, embeddings=X, labels=y[, groups=g])")
        emb, lab, groups = data["embeddings"], data.get("labels"), data.get("groups")
    else:
        emb, lab = data, None
    if labels_path is not None:
        read = _read(labels_path, "labels")
        if isinstance(read, dict):
            raise ValueError(f"labels file {labels_path} is an .npz archive; pass a .npy of shape (N,)")
        lab = read
    if lab is None:
        raise ValueError(f"no labels for {embeddings_path}: pass a labels .npy after it")
    for arr, name, src in ((emb, what, embeddings_path), (lab, "labels", labels_path or embeddings_path)):
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} in {src} have dtype {arr.dtype}; expected numbers "
                             "(float embeddings, integer class ids)")
    if lab.ndim == 2 and lab.shape[1] == 1:
        lab = lab[:, 0]
    if emb.ndim != 2:
        raise ValueError(f"{what} in {embeddings_path} have shape {emb.shape}; expected (N, D), one row per sample")
    if lab.ndim != 1 or lab.shape[0] != emb.shape[0]:
        raise ValueError(f"labels in {labels_path or embeddings_path} have shape {lab.shape}; expected "
                         f"({emb.shape[0]},), one class id per row of {embeddings_path}")
    return emb, lab, groups


# ----------------------------------------------------------------------------- the result
@dataclass(repr=False)
class EvalReport:
    """What :func:`evaluate` found; ``to_text()``, ``to_dict()`` (the ``--json`` object), ``plot()``.

    ``retrieval`` maps ``"R@k"`` and ``"MAP@R"`` to fractions; ``report`` is the
    :class:`~tcmlib.report.ThresholdReport` of the threshold for ``far_target``; ``posthoc`` the
    :class:`~tcmlib.posthoc.ThresholdingComparison` when asked for.
    """

    num_queries: int
    num_gallery: int | None
    dim: int
    retrieval: dict[str, float]
    report: ThresholdReport
    posthoc: Any = None

    @property
    def curves(self) -> UtilityCurves:
        return self.report.curves

    def __repr__(self) -> str:
        r = self.report
        g = "" if self.num_gallery is None else f", gallery={self.num_gallery}"
        return (f"EvalReport(N={self.num_queries}{g}, D={self.dim}, R@1={self.retrieval.get('R@1', math.nan):.4f}, "
                f"MAP@R={self.retrieval['MAP@R']:.4f}, OPIS={r.opis:.4g} [{r.opis_ci.lo:.4g}, {r.opis_ci.hi:.4g}], "
                f"eps_OPIS={r.eps_opis:.4g}, threshold={r.threshold:.4f} for FAR {r.far_target:g})")

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers (rates as fractions, distances as 1 - cosine), with their units stated."""
        r, c = self.report, self.report.class_rates
        out: dict[str, Any] = {
            "num_queries": self.num_queries, "num_gallery": self.num_gallery, "dim": self.dim,
            "num_classes": r.num_classes, "retrieval": dict(self.retrieval),
            "retrieval_protocol": "leave-one-out" if self.num_gallery is None else "query vs gallery",
            "pairs": "all pairs of the set" if self.num_gallery is None
            else "query x gallery pairs, each counted for its query's class / group",
            "OPIS": r.opis, "OPIS_CI": [r.opis_ci.lo, r.opis_ci.hi], "CI_level": 1 - r.alpha,
            "eps": r.eps, "eps_OPIS": r.eps_opis,
            "distance_range": list(r.curves.distance_range), "FAR_range": list(r.curves.far_range or ()),
            "num_thresholds": int(r.curves.thresholds.numel()),
            "threshold": r.threshold, "FAR_target": r.far_target, "threshold_source": r.threshold_source,
            "calibration_FAR": r.calibration_far, "global_FAR": c.global_far, "global_FRR": c.global_frr,
            "per_class": {"count": int(c.far.numel()), **c.summary(r.far_target)},
            "per_group": None if r.group_rates is None else
            {"count": int(r.group_rates.far.numel()), **r.group_rates.summary(r.far_target)},
            "posthoc": None if self.posthoc is None else self.posthoc.rows,
            "units": {"rates": "fractions in [0, 1]", "distances": "1 - cosine, in [0, 2]; accepted when d <= t",
                      "OPIS": OPIS_SCALE},
        }
        return out

    def to_text(self) -> str:
        """The report a person reads (rates in %)."""
        r = self.report
        lo, hi = r.curves.distance_range
        proto = ("leave-one-out: each sample queries all others" if self.num_gallery is None
                 else f"each of {self.num_queries} queries ranks a gallery of {self.num_gallery}")
        ret = "  ".join(f"{k} {100 * v:.2f} %" for k, v in self.retrieval.items())
        lines = [f"Retrieval ({proto}; cosine similarity)", f"  {ret}", ""]
        if self.num_gallery is not None:
            lines += ["Pair-based numbers below: query x gallery pairs, each counted for its query's class "
                      "(or group).", ""]
        lines += [r.to_text(),
                  f"  OPIS / eps-OPIS distance range: d in [{lo:.4f}, {hi:.4f}], {r.curves.thresholds.numel()} "
                  "thresholds"]
        if self.posthoc is not None:
            lines += ["", "Post-hoc thresholds (tcmlib.posthoc.compare_thresholding)", self.posthoc.to_text()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def plot(self) -> Any:
        """The per-class FAR/FRR scatter and the utility curves (:meth:`tcmlib.report.ThresholdReport.plot`); the Figure."""
        return self.report.plot()


# ----------------------------------------------------------------------------- the computation
def _retrieval(x: torch.Tensor, y: torch.Tensor, gallery: tuple[torch.Tensor, torch.Tensor] | None,
               ks: Sequence[int], groups: torch.Tensor | None, chunk_size: int | None) -> dict[str, float]:
    kw: dict[str, Any] = {"chunk_size": chunk_size, "groups": groups}
    if gallery is not None:
        kw.update(reference=gallery[0], reference_labels=gallery[1])
    recall, mapr = recall_and_map_at_r(x, y, list(ks), **kw)
    return {**{f"R@{k}": v for k, v in recall.items()}, "MAP@R": mapr}


def eval_report(
    embeddings: Any,
    labels: Any,
    *,
    groups: Any = None,
    gallery: tuple[Any, Any] | None = None,
    calibration: tuple[Any, Any] | None = None,
    far_target: float = 1e-2,
    ks: Sequence[int] = (1, 2, 4, 8),
    far_range: tuple[float, float] = (1e-2, 1e-1),
    num_thresholds: int = 100,
    eps: float = 0.1,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    posthoc: bool = False,
    n_clusters: int = 8,
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> EvalReport:
    """Retrieval, OPIS / eps-OPIS with a bootstrap CI, and the threshold for ``far_target``, in one call.

    Args:
        embeddings: (N, D) floats; labels: (N,) integer class ids.  groups: optional (N,) ids
            (customers, domains): FAR / FRR per group too, and R@k / MAP@R averaged per group.
        gallery: optional ``(embeddings (M, D), labels (M,))``: queries rank it for R@k / MAP@R and every
            pair-based number uses the query x gallery pairs (module docstring).
        calibration: optional held-out ``(embeddings, labels)`` on which the threshold is chosen.
        far_target: global false-accept rate the threshold meets, a fraction in [0, 0.5].  ks: the k of Recall@k.
        far_range, num_thresholds: OPIS's thresholds span these global FAR quantiles (whatever far_target is:
            the report says so in one line).
        eps: eps-OPIS's worst share of classes.  n_boot, alpha, seed: the bootstrap over classes.
        posthoc, n_clusters: also compare per-class and per-cluster thresholds (tcmlib.posthoc).
        progress: a stage progress bar on stderr; ``None``: when N >= 20,000.

    Every number is a call of a public tcmlib function (see the module docstring); nothing new is computed here.
    """
    x, y = check_embeddings_labels(embeddings, labels)
    _check_far_target(far_target)  # before the retrieval pass, not after it
    g = None if groups is None else check_labels(groups, x.shape[0], "groups")
    gal = None
    if gallery is not None:
        gx, gy = check_embeddings_labels(*gallery, emb_name="gallery embeddings", label_name="gallery labels")
        if gx.shape[1] != x.shape[1]:
            raise ValueError(f"gallery embeddings have dimension {gx.shape[1]}, the queries {x.shape[1]}: "
                             "both must come from the same model")
        gal = (gx, gy)
    cal = None if calibration is None else _check_calibration(calibration, x.shape[1])  # the report's own check
    if posthoc and gal is not None:
        raise ValueError("posthoc thresholds are compared on the pairs of one set; run without the gallery "
                         "(or without posthoc)")
    if progress is None:
        progress = x.shape[0] >= PROGRESS_MIN_N
    stages = ["retrieval", "threshold report"] + (["post-hoc"] if posthoc else [])
    from tqdm.auto import tqdm

    bar = tqdm(total=len(stages), desc="tcmlib-eval", unit="stage", disable=not progress, file=sys.stderr)

    def step(name: str) -> None:
        bar.set_postfix_str(name)

    step("retrieval")  # one symmetric pass over the pairs (or queries x gallery)
    retrieval = _retrieval(x, y, gal, ks, g, None)
    bar.update()
    step("threshold report")  # threshold, per-class / per-group rates, curves, R@1: one or two passes
    report = threshold_report(x, y, far_target=far_target, groups=g, calibration=cal, far_range=far_range,
                              num_thresholds=num_thresholds, n_boot=n_boot, alpha=alpha, eps=eps, seed=seed,
                              name="embeddings", chunk_size=chunk_size, reference=None if gal is None else gal[0],
                              reference_labels=None if gal is None else gal[1])
    bar.update()
    comparison = None
    if posthoc:
        step("post-hoc")
        from tcmlib.posthoc import compare_thresholding

        comparison = compare_thresholding(x, y, far_target, calibration=cal, n_clusters=n_clusters, seed=seed,
                                          chunk_size=chunk_size)
        bar.update()
    bar.close()
    return EvalReport(num_queries=int(x.shape[0]), num_gallery=None if gal is None else int(gal[0].shape[0]),
                      dim=int(x.shape[1]), retrieval=retrieval, report=report, posthoc=comparison)


# ----------------------------------------------------------------------------- the command
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tcmlib-eval",
        description="Retrieval, OPIS / eps-OPIS and one-threshold FAR / FRR of saved embeddings "
                    "(.npy, or .npz with arrays embeddings, labels[, groups]).",
        epilog="Distances are 1 - cosine; rates are % in the text, fractions in --json. "
               f"OPIS: {OPIS_SCALE}.")
    p.add_argument("embeddings", help="(N, D) float .npy, or an .npz with embeddings, labels[, groups]")
    p.add_argument("labels", nargs="?", help="(N,) integer class ids .npy (not needed for an .npz)")
    p.add_argument("--groups", metavar="NPY", help="(N,) group ids (customers, domains): rates per group too")
    p.add_argument("--gallery", nargs="+", metavar="FILE",
                   help="gallery embeddings .npy and labels .npy (or one .npz): queries rank the gallery; "
                        "threshold, FAR / FRR and OPIS use the query x gallery pairs")
    p.add_argument("--calibration", nargs="+", metavar="FILE",
                   help="held-out embeddings .npy and labels .npy (or one .npz) to choose the threshold on")
    p.add_argument("--far", type=float, default=1e-2,
                   help="global false-accept target of the one threshold, a fraction (default 0.01 = 1 %%); "
                        "OPIS does not use it (see --opis-far)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="k of Recall@k (default 1 2 4 8)")
    p.add_argument("--opis-far", "--far-range", dest="far_range", type=float, nargs=2, default=[1e-2, 1e-1],
                   metavar=("LO", "HI"),
                   help="OPIS and eps-OPIS average over the thresholds whose global FAR lies in [LO, HI], "
                        "fractions (default 0.01 0.1, i.e. 1 %% .. 10 %%), whatever --far is")
    p.add_argument("--thresholds", type=int, default=100, help="thresholds in OPIS's range (default 100)")
    p.add_argument("--eps", type=float, default=0.1, help="eps-OPIS's worst share of classes (default 0.1)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for OPIS's CI (default 1000)")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - CI level (default 0.05: a 95 %% interval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--posthoc", action="store_true", help="also compare per-class / per-cluster thresholds")
    p.add_argument("--clusters", type=int, default=8, help="k-means clusters for --posthoc (default 8)")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per similarity block (memory)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--plot", metavar="PNG", help="save the FAR/FRR scatter and utility-curve figure here")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help=f"show a progress bar (default: from {PROGRESS_MIN_N:,} samples on)")
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _pair(files: list[str] | None, what: str) -> tuple[np.ndarray, np.ndarray] | None:
    if files is None:
        return None
    if len(files) > 2:
        raise ValueError(f"--{what} takes one .npz or two .npy files (embeddings, labels), got {len(files)}")
    emb, lab, _ = load_arrays(files[0], files[1] if len(files) == 2 else None, what=f"{what} embeddings")
    return emb, lab


def _check_plot_path(path: str) -> None:
    """Refuse a ``--plot`` path that cannot be written, before any work: ``ValueError`` saying why and what to do."""
    from matplotlib.backend_bases import FigureCanvasBase

    p = Path(path)
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if p.is_dir():
        raise ValueError(f"--plot {p} is a folder; give a file name in it, such as {p / 'curves.png'}")
    if p.suffix.lower().lstrip(".") not in formats:
        raise ValueError(f"--plot {p}: the file name must end in a figure format ({', '.join(formats)}), "
                         "such as curves.png")
    folder = p.parent
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--plot {p}: {folder} is a file, not a folder; choose another path")
    if not folder.is_dir():
        raise ValueError(f"--plot {p}: the folder {folder} does not exist; create it first (mkdir -p {folder}) "
                         "or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"--plot {p}: {p if p.exists() else folder} is not writable; choose another path")


def _save_plot(result: EvalReport, path: str) -> str | None:
    """Draw and save the figure; the reason it failed, or None (the report is printed either way)."""
    import matplotlib

    matplotlib.use("Agg")
    try:
        fig = result.plot()
        fig.savefig(path, dpi=120)
    except Exception as e:  # noqa: BLE001 -- any failure here must not cost the report
        return f"{type(e).__name__}: {' '.join(str(e).split())}"
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The ``tcmlib-eval`` command; returns the exit status (2 for bad input, with a one-line reason).

    Output options are checked before the work; the report (text or JSON) is printed even when the
    figure cannot be saved (then exit status 1, with the reason on stderr).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _check_far_target(args.far, "--far")
        if args.plot:
            _check_plot_path(args.plot)
        emb, lab, groups = load_arrays(args.embeddings, args.labels)
        if args.groups is not None:
            g = _read(args.groups, "groups")
            if isinstance(g, dict) or g.ndim != 1 or g.shape[0] != emb.shape[0]:
                raise ValueError(f"groups in {args.groups} must be a .npy of shape ({emb.shape[0]},), one id per "
                                 f"row of {args.embeddings}, got {'an .npz' if isinstance(g, dict) else g.shape}")
            groups = g
        check_embeddings_labels(emb, lab, emb_name=f"embeddings ({args.embeddings})",
                                label_name=f"labels ({args.labels or args.embeddings})")
        result = eval_report(
            torch.from_numpy(np.ascontiguousarray(emb)), torch.from_numpy(np.ascontiguousarray(lab)),
            groups=None if groups is None else torch.from_numpy(np.ascontiguousarray(groups)),
            gallery=_pair(args.gallery, "gallery"), calibration=_pair(args.calibration, "calibration"),
            far_target=args.far, ks=args.ks, far_range=tuple(args.far_range), num_thresholds=args.thresholds,
            eps=args.eps, n_boot=args.n_boot, alpha=args.alpha, seed=args.seed, posthoc=args.posthoc,
            n_clusters=args.clusters, chunk_size=args.chunk_size, progress=args.progress,
        )
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"tcmlib-eval: error: {e}", file=sys.stderr)
        return 2
    plot_error = _save_plot(result, args.plot) if args.plot else None
    saved = args.plot if args.plot and plot_error is None else None
    if args.json:
        print(json.dumps({**result.to_dict(), "plot": saved}, indent=2))
    else:
        print(result.to_text())
        if saved:
            print(f"\nfigure: {saved}")
    if plot_error is not None:
        print(f"tcmlib-eval: error: the report is complete, but the figure was not saved to {args.plot}: "
              f"{plot_error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
