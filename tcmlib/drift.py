"""Drift of a deployed threshold: chosen on one set of classes (or customers), applied to another.

A threshold meets its false-accept target on the data it was chosen on. A deployed system meets
other classes and other customers; this module measures how far the realised FAR lands from the
target there, and gives the numbers a monitoring job needs::

    from tcmlib.drift import threshold_drift, group_drift, far_audit
    dr = threshold_drift((val_emb, val_labels), (test_emb, test_labels), far_target=1e-2, groups=customer)
    print(dr.global_far / dr.far_target, dr.summary())
    gd = group_drift(test_emb, test_labels, customer, far_target=1e-2)   # (G, G) realised FAR
    far_audit(false_accepts=7, audited=300, far_target=1e-2)             # recalibrate?

Definitions (those of :mod:`tcmlib.report`: ``d = 1 - cos``, a pair is accepted when ``d <= t``):

- the threshold meeting ``far_target`` on a set is :func:`tcmlib.report.threshold_for_far` on it;
- the **per-class** FAR on the target data is that of :func:`tcmlib.report.rates_at_threshold`;
- a **customer** (group) is a deployment of its own: its pairs are the pairs among its own samples,
  ``FAR_h(t) = #{a < b: g_a = g_b = h, y_a != y_b, d(a, b) <= t} / #{a < b: g_a = g_b = h, y_a != y_b}``
  (pairs across two customers are never compared by either), and ``FRR_h`` likewise over its positive
  pairs (NaN when it has none);
- :func:`group_drift`: ``far[g, h] = FAR_h(t_g)`` with ``t_g`` chosen on customer g's own pairs; the
  diagonal is in-sample (the target, up to ties), the rest is what customer h would see with g's threshold;
- :func:`far_audit`: the Clopper-Pearson interval of a FAR estimated from a labelled sample of negative
  pairs (``scipy.stats.binomtest``), with the decision "recalibrate" when even its lower end exceeds
  ``tolerance x far_target``.

Inputs may be torch tensors or NumPy arrays; bad input raises ``ValueError`` saying what to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from tcmlib._checks import check_embeddings_labels, check_labels
from tcmlib.report import ThresholdRates, rates_at_threshold, threshold_for_far

__all__ = ["FarAudit", "GroupDrift", "ThresholdDrift", "audit_size", "far_audit", "group_drift",
           "threshold_drift"]


def _far(far_target: float) -> float:
    far = float(far_target)
    if not (math.isfinite(far) and 0.0 < far < 1.0):
        raise ValueError(f"far_target = {far_target} must lie strictly between 0 and 1 (e.g. 1e-2 for 1 %)")
    return far


def _groups(x: torch.Tensor, y: torch.Tensor, groups: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(group_ids (G,), [sample indices of each group])``; every group needs >= 2 classes (a FAR)."""
    g = check_labels(groups, x.shape[0], "groups").cpu()
    ids = torch.unique(g)
    members = [torch.nonzero(g == h).squeeze(1) for h in ids]
    y = y.cpu()
    for h, m in zip(ids.tolist(), members):
        if torch.unique(y[m]).numel() < 2:
            raise ValueError(f"group {h} holds one class only: a customer's FAR needs negative pairs (>= 2 "
                             "classes); merge it with another group or leave it out")
    return ids, members


def _within(x: torch.Tensor, y: torch.Tensor, members: list[torch.Tensor], t: float, chunk: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(G,), (G,) float64: global FAR and FRR of each group's own pairs at ``t`` (FRR NaN: no positives)."""
    far = torch.empty(len(members), dtype=torch.float64)
    frr = torch.empty(len(members), dtype=torch.float64)
    for i, m in enumerate(members):
        yh = y[m.to(y.device)]
        if int(torch.bincount(torch.unique(yh, return_inverse=True)[1]).max()) < 2:
            # no positive pair: rates_at_threshold has no eligible class, so count the negatives directly
            xh = x[m.to(x.device)].double()
            work = torch.float64 if x.dtype == torch.float64 else torch.float32  # as tcmlib.report
            xn = (xh / torch.linalg.vector_norm(xh, dim=1, keepdim=True)).to(work)
            d = 1.0 - (xn @ xn.T).double()
            iu = torch.triu_indices(len(m), len(m), 1)
            far[i], frr[i] = float((d[iu[0], iu[1]] <= t).double().mean()), math.nan
            continue
        r = rates_at_threshold(x[m.to(x.device)], yh, t, chunk_size=chunk)
        far[i], frr[i] = r.global_far, r.global_frr
    return far, frr


# ----------------------------------------------------------------------------- one set -> another
@dataclass
class ThresholdDrift:
    """A threshold chosen on a source set, measured on a target set; see :func:`threshold_drift`.

    ``class_rates``: per-class FAR / FRR (T,) on the target; ``group_ids`` (G,) and ``group_far``,
    ``group_frr`` (G,) float64 the customers' own rates (empty without ``groups``).
    """

    far_target: float
    threshold: float
    source_far: float  # realised global FAR on the source (the target, up to ties)
    class_rates: ThresholdRates
    group_ids: torch.Tensor  # (G,)
    group_far: torch.Tensor  # (G,) float64
    group_frr: torch.Tensor  # (G,) float64

    @property
    def global_far(self) -> float:
        """The realised global FAR on the target data."""
        return self.class_rates.global_far

    def summary(self) -> dict[str, float]:
        """Realised / target FAR: globally, per class (median, max, share > 2x and < 0.5x) and per group."""
        f, t = self.class_rates.far, self.far_target
        out = {"threshold": self.threshold, "source_FAR": self.source_far, "global_FAR": self.global_far,
               "global_ratio": self.global_far / t, "class_ratio_median": float(f.median()) / t,
               "class_ratio_max": float(f.max()) / t, "class_FAR_std": float(f.std(unbiased=False)),
               "share_classes_over_2x": float((f > 2 * t).double().mean()),
               "share_classes_under_half": float((f < t / 2).double().mean())}
        if self.group_far.numel():
            out["group_ratio_min"] = float(self.group_far.min()) / t
            out["group_ratio_max"] = float(self.group_far.max()) / t
        return out


def threshold_drift(source: tuple[Any, Any], target: tuple[Any, Any], far_target: float, *,
                    groups: Any = None, chunk_size: int = 1024) -> ThresholdDrift:
    """The threshold meeting ``far_target`` on ``source = (emb (M, D), labels (M,))``, applied to
    ``target = (emb (N, D), labels (N,))``: realised global, per-class and (with ``groups`` (N,),
    one customer id per target sample) per-customer FAR and FRR.

    ``t = threshold_for_far(*source, far_target)``; per class ``rates_at_threshold(*target, t)``; per
    customer h the rates of its own pairs (module docstring). With and without TCM: call it once per
    model, each with its own embeddings of the same samples. Raises ``ValueError`` for bad input, a
    ``far_target`` outside (0, 1), a dimension mismatch, or a customer with a single class.
    """
    far = _far(far_target)
    for name, pair in (("source", source), ("target", target)):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"{name} must be a pair (embeddings, labels)")
    sx, sy = check_embeddings_labels(*source, emb_name="source embeddings", label_name="source labels")
    x, y = check_embeddings_labels(*target, emb_name="target embeddings", label_name="target labels")
    if sx.shape[1] != x.shape[1]:
        raise ValueError(f"source embeddings have dimension {sx.shape[1]}, target ones {x.shape[1]}: "
                         "both must come from the same model")
    t = threshold_for_far(sx, sy, far, chunk_size=chunk_size)
    src = rates_at_threshold(sx, sy, t, chunk_size=chunk_size).global_far
    rates = rates_at_threshold(x, y, t, chunk_size=chunk_size)
    ids = torch.empty(0, dtype=torch.long)
    gf = gr = torch.empty(0, dtype=torch.float64)
    if groups is not None:
        ids, members = _groups(x, y, groups)
        gf, gr = _within(x, y, members, t, chunk_size)
    return ThresholdDrift(far, t, src, rates, ids, gf, gr)


# ----------------------------------------------------------------------------- customer -> customer
@dataclass
class GroupDrift:
    """Each customer's own threshold applied to every customer; see :func:`group_drift`.

    ``group_ids`` (G,); ``thresholds`` (G,) float64, ``t_g`` chosen on customer g; ``far``, ``frr``
    (G, G) float64 with ``far[g, h] = FAR_h(t_g)`` (row: where the threshold was chosen, column: where
    it is applied).
    """

    far_target: float
    group_ids: torch.Tensor  # (G,)
    thresholds: torch.Tensor  # (G,) float64
    far: torch.Tensor  # (G, G) float64
    frr: torch.Tensor  # (G, G) float64

    @property
    def ratio(self) -> torch.Tensor:
        """(G, G) realised FAR / target."""
        return self.far / self.far_target

    def off_diagonal(self) -> torch.Tensor:
        """(G (G - 1),) the realised / target FAR ratios of a threshold moved to another customer."""
        g = self.far.shape[0]
        return self.ratio[~torch.eye(g, dtype=torch.bool)]

    def summary(self) -> dict[str, float]:
        """Off-diagonal FAR ratios: min, median, max, mean of ``abs(log2(ratio))``, share > 2x; and the worst move."""
        r = self.off_diagonal()
        g = self.far.shape[0]
        worst = int(torch.argmax(torch.where(torch.eye(g, dtype=torch.bool), -math.inf, self.ratio)))
        return {"ratio_min": float(r.min()), "ratio_median": float(r.median()), "ratio_max": float(r.max()),
                "mean_abs_log2_ratio": float(torch.log2(r.clamp_min(1e-300)).abs().mean()),
                "share_over_2x": float((r > 2).double().mean()),
                "worst_source": int(self.group_ids[worst // g]),
                "worst_target": int(self.group_ids[worst % g])}


def group_drift(embeddings: Any, labels: Any, groups: Any, far_target: float, *,
                chunk_size: int = 1024) -> GroupDrift:
    """Choose a threshold on each customer's own pairs, apply it to every customer.

    ``embeddings`` (N, D), ``labels`` (N,), ``groups`` (N,) customer ids (G >= 2 customers, each with
    >= 2 classes). ``t_g = threshold_for_far(x[g], y[g], far_target)``; ``far[g, h]``, ``frr[g, h]``
    the rates of customer h's own pairs at ``t_g``. A model whose distances mean the same for every
    customer has all ratios near 1. Cost: G quantile searches and G^2 streamed passes over a customer's
    pairs. Raises ``ValueError`` for bad input, one group, or a group with a single class.
    """
    far = _far(far_target)
    x, y = check_embeddings_labels(embeddings, labels)
    ids, members = _groups(x, y, groups)
    if len(ids) < 2:
        raise ValueError("group_drift needs >= 2 groups (customers); for one, use threshold_drift")
    thr = torch.tensor([threshold_for_far(x[m.to(x.device)], y[m.to(y.device)], far, chunk_size=chunk_size)
                        for m in members], dtype=torch.float64)
    rows = [_within(x, y, members, float(t), chunk_size) for t in thr.tolist()]
    return GroupDrift(far, ids, thr, torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))


# ----------------------------------------------------------------------------- monitoring
class FarAudit(NamedTuple):
    """A FAR estimated from ``audited`` labelled negative pairs: ``estimate`` with its exact interval."""

    false_accepts: int
    audited: int
    estimate: float
    lo: float
    hi: float
    verdict: str  # "recalibrate" | "within target" | "inconclusive"


def far_audit(false_accepts: int, audited: int, far_target: float, *, alpha: float = 0.05,
              tolerance: float = 1.0) -> FarAudit:
    """Is a deployed threshold still meeting its FAR? From a random sample of negative pairs.

    ``false_accepts`` of ``audited`` negative pairs (a random sample of the different-identity pairs the
    system compared, labelled by review) were accepted. ``lo, hi``: the Clopper-Pearson ``1 - alpha``
    interval (``scipy.stats.binomtest(...).proportion_ci(1 - alpha, "exact")``). Verdict:
    ``"recalibrate"`` when ``lo > tolerance * far_target`` (the FAR exceeds it, one-sided confidence
    ``1 - alpha / 2``), ``"within target"`` when ``hi <= tolerance * far_target``, else
    ``"inconclusive"`` (audit more pairs: :func:`audit_size`).
    """
    from scipy.stats import binomtest

    k, n = int(false_accepts), int(audited)
    if k != false_accepts or n != audited or n < 1 or not 0 <= k <= n:
        raise ValueError(f"false_accepts = {false_accepts}, audited = {audited}: need integers 0 <= "
                         "false_accepts <= audited, audited >= 1")
    far = _far(far_target)
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha = {alpha} must lie strictly between 0 and 1 (0.05 gives a 95 % interval)")
    if not (math.isfinite(float(tolerance)) and float(tolerance) > 0):
        raise ValueError(f"tolerance = {tolerance} must be a finite number > 0 (1: alert above the target)")
    ci = binomtest(k, n).proportion_ci(1 - float(alpha), method="exact")
    bound = float(tolerance) * far
    verdict = "recalibrate" if ci.low > bound else "within target" if ci.high <= bound else "inconclusive"
    return FarAudit(k, n, k / n, float(ci.low), float(ci.high), verdict)


def audit_size(far_target: float, *, alpha: float = 0.05) -> int:
    """The fewest audited negative pairs for which zero false accepts proves FAR <= ``far_target``.

    With 0 of n accepted, the Clopper-Pearson upper bound is ``1 - (alpha / 2) ** (1 / n)``; it is
    ``<= far_target`` from ``n = ceil(log(alpha / 2) / log(1 - far_target))`` on (about 3.7 / FAR at
    95 %: the "rule of three" with the two-sided interval). Any false accept needs more pairs.
    """
    far = _far(far_target)
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha = {alpha} must lie strictly between 0 and 1 (0.05 gives a 95 % interval)")
    n = math.ceil(math.log(float(alpha) / 2) / math.log1p(-far))
    while 1 - (float(alpha) / 2) ** (1 / n) > far:  # guard the float rounding of the closed form
        n += 1
    return n
