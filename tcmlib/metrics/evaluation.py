"""One call for every metric of the book: Recall@k, MAP@R, OPIS and eps-OPIS, from one set of passes.

``evaluate_embeddings(embeddings, labels)`` returns an :class:`Evaluation`.  Its numbers are those of
:func:`~tcmlib.metrics.retrieval.recall_at_k`, :func:`~tcmlib.metrics.retrieval.map_at_r`, :func:`~tcmlib.metrics.opis.opis`
and :func:`~tcmlib.metrics.opis.eps_opis` with the same arguments, bit for bit, but the pairs are visited
only as often as OPIS needs: the calibration-range pass (skipped when ``distance_range`` is given),
then the counting pass (skipped when the first pass could keep the pairs it counts); the retrieval
rides on the first pass (each tile of the similarity matrix, computed once, feeds the running top-k
of its rows and columns before OPIS uses it).

Keys and units (:meth:`Evaluation.as_dict`, the names the training loop logs):

- ``R@k``: Recall@k, a fraction in [0, 1] (share of queries with a same-label item among their k
  nearest candidates); higher is better.
- ``MAP@R``: mean AP@R (Musgrave et al. 2020), a fraction in [0, 1]; higher is better.
- ``OPIS``: mean over thresholds of the variance across classes of per-class utility; utilities lie
  in [0, 1], so OPIS lies in [0, 0.25]; lower means one threshold suits all classes alike.
- ``eps_OPIS``: mean over thresholds of the squared gap between the mean utility of the worst
  ``ceil(eps T)`` classes and of the rest, in [0, 1]; lower is better.

These are the library's one naming scheme for metric keys: a metric's own name (``"R@1"``,
``"MAP@R"``, ``"OPIS"``, ``"eps_OPIS"``, ``"FAR"``, ``"FRR"``), with snake_case qualifiers around it
(``"val_R@1"``, ``"global_FAR"``, ``"FAR_median"``, ``"OPIS_lo"``): :meth:`Evaluation.as_dict`, the
training history of :func:`tcmlib.train.fit`, :meth:`tcmlib.report.ThresholdReport.row`,
:meth:`tcmlib.report.ThresholdRates.summary` and ``tcmlib.evaluate.EvalReport.to_dict`` use it.
The one exception is deliberate: functions *of k* (:func:`~tcmlib.metrics.retrieval.recall_at_k`,
:func:`~tcmlib.metrics.retrieval.recall_and_map_at_r`, ``Evaluation.recall``) return ``{k: value}``
keyed by the int k you passed (``recall_at_k(x, y, ks=(1,))[1]``, as pml's ``k``), and ``as_dict``
names them ``"R@k"``.  Values are fractions everywhere; text reports print rates and R@k in %, and
state OPIS's scale.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tcmlib.metrics.opis import (DEFAULT_CHUNK_SIZE, ClassCounts, UtilityCurves, calibrate, check_inputs, count_pass,
                                 curve_setup)
from tcmlib.metrics.retrieval import RetrievalTopK, _check_ks, average_retrieval

__all__ = ["Evaluation", "evaluate_embeddings", "evaluate"]


@dataclass(frozen=True)
class Evaluation:
    """The metrics of one embedding set (units in the module docstring).

    ``recall`` ``{k: R@k}``; ``map_at_r``; ``opis`` (in [0, 0.25]); ``eps_opis`` with its ``eps``;
    ``curves`` the per-class utility curves behind OPIS (thresholds, TAR, TRR, utility);
    ``hits`` (N, len(ks)) and ``ap_at_r`` (N,) float64 per query (NaN: no relevant candidate; with ties,
    expectations: :func:`~tcmlib.metrics.retrieval.per_query_retrieval`).
    """

    recall: dict[int, float]
    map_at_r: float
    opis: float
    eps_opis: float
    eps: float
    curves: UtilityCurves
    hits: torch.Tensor
    ap_at_r: torch.Tensor

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{"R@1": ..., "MAP@R": ..., "OPIS": ..., "eps_OPIS": ...}``, each key after ``prefix`` (e.g. ``"val_"``)."""
        out = {f"{prefix}R@{k}": v for k, v in self.recall.items()}
        out.update({f"{prefix}MAP@R": self.map_at_r, f"{prefix}OPIS": self.opis, f"{prefix}eps_OPIS": self.eps_opis})
        return out

    def __repr__(self) -> str:
        r = ", ".join(f"R@{k} {v:.4f}" for k, v in self.recall.items())
        lo, hi = self.curves.distance_range
        return (f"Evaluation({r}, MAP@R {self.map_at_r:.4f}, OPIS {self.opis:.3g} (of at most 0.25), "
                f"{100 * self.eps:g}%-OPIS {self.eps_opis:.3g}; {self.curves.num_eligible} classes, "
                f"thresholds {lo:.4f}..{hi:.4f})")


def evaluate_embeddings(
    embeddings: Any,
    labels: Any,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    eps: float = 0.1,
    far_range: tuple[float, float] = (1e-2, 1e-1),
    distance_range: tuple[float, float] | None = None,
    num_thresholds: int = 100,
    beta: float = 1.0,
    groups: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reference: Any = None,
    reference_labels: Any = None,
) -> Evaluation:
    """Recall@k, MAP@R, OPIS and eps-OPIS of ``embeddings`` (N, D) with ``labels`` (N,), in one pass over
    the pairs (two when the calibration range comes from the data and the pairs accepted at its end are
    too many to keep: more than ``tcmlib.metrics.opis.KEEP_MAX``).

    Args:
        ks: the k of Recall@k, positive ints < N (<= M with a reference set).
        eps: the worst share of classes in eps-OPIS, in (0, 1).
        far_range, distance_range, num_thresholds, beta: OPIS's thresholds and utility, as
            :func:`~tcmlib.metrics.opis.utility_curves`.
        groups: optional (N,) ids: OPIS per group instead of per class, and Recall@k / MAP@R averaged
            over groups (as their functions' ``groups``).
        chunk_size: rows per similarity tile.
        reference, reference_labels: optional gallery (M, D), (M,): retrieval ranks the gallery for
            every query (pml's ``get_accuracy`` with a separate reference), OPIS uses the query x
            gallery pairs.

    Returns:
        An :class:`Evaluation`; ``.as_dict()`` gives ``{"R@k", "MAP@R", "OPIS", "eps_OPIS"}``.
    """
    x, y, g, rx, ry = check_inputs(embeddings, labels, groups, reference, reference_labels)
    n = x.shape[0]
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps = {eps} must lie strictly between 0 and 1 (eps = 0.1 is the 10%-OPIS)")
    if rx is None:
        if n < 2:
            raise ValueError(f"need at least 2 samples (a query and one other), got N = {n}")
        ks_list = _check_ks(ks, n - 1)
    else:
        ks_list = _check_ks(ks, rx.shape[0], "reference items per query")
    with torch.no_grad():
        setup = curve_setup(x, y, g, rx, ry, far_range=far_range, distance_range=distance_range,
                            num_thresholds=num_thresholds, beta=beta, chunk_size=chunk_size)
        retrieval = RetrievalTopK(setup.pairs, ks_list, setup.chunk)
        cal = calibrate(setup, riders=[retrieval])  # pass 1: retrieval sees every tile before OPIS masks positives
        counts = ClassCounts(setup, cal.thresholds)
        count_pass(setup, cal, [counts])  # pass 2 (retrieval rides on it when pass 1 did not run), or kept pairs
        curves = setup.curves(cal.thresholds, counts.result())
        pq = retrieval.result()
    recall, map_r = average_retrieval(pq.hits, pq.ap, ks_list, g)
    return Evaluation(recall=recall, map_at_r=map_r, opis=curves.opis, eps_opis=curves.eps_opis(eps), eps=float(eps),
                      curves=curves, hits=pq.hits, ap_at_r=pq.ap)


@functools.wraps(evaluate_embeddings, assigned=("__annotations__", "__type_params__"))
def evaluate(*args: Any, **kwargs: Any) -> Evaluation:
    """Deprecated name of :func:`evaluate_embeddings` (four functions were once called ``evaluate``)."""
    warnings.warn("tcmlib.metrics.evaluate is now tcmlib.metrics.evaluate_embeddings", DeprecationWarning,
                  stacklevel=2)
    return evaluate_embeddings(*args, **kwargs)
