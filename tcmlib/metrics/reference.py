"""Dense reference implementations: one short function per metric, to read and to copy.

Each function below works when copied **alone** into another file that has ``import torch``: it uses
no other function of this module and nothing of ``tcmlib``.  They form the whole ``N x N`` matrix
(memory O(N^2): a few thousand samples), compute in float64 and favour clarity over speed.  The
streamed functions of ``tcmlib.metrics`` (``recall_at_k``, ``map_at_r``, ``utility_curves``,
``opis``, ``eps_opis``) and :func:`tcmlib.losses.tcm.tcm_loss` compute the same numbers at any N and
are tested against these (``tests/test_reference_lift.py`` copies each one alone into a temporary
module and compares).

Conventions, shared with the streamed code:

* cosine similarity ``s = <x_a, x_b> / (|x_a| |x_b|)``; distance ``d = 1 - s`` in [0, 2];
* retrieval is leave-one-out: every sample is a query, its candidates are all *other* samples,
  ranked by similarity; queries with no other sample of their label (R = 0) are left out;
* **ties** (equal similarities) count as the expectation over a uniformly random order of the tied
  candidates: the ranking never looks at labels, and identical embeddings score at chance;
* OPIS: unordered pairs ``a != b``; classes with >= 2 samples are *eligible*; thresholds
  ``linspace(t_min, t_max, K)`` with ``(t_min, t_max)`` the ``far_range`` quantiles (linear
  interpolation, as ``numpy.quantile``) of all negative-pair distances; ``d <= t`` is accepted.

By-hand versions elsewhere (written for their page, not lifted from here): chapter 1's
``recall_by_hand``, chapter 4's ``class_curves`` / ``streamed_tar_trr``, chapter 5's ``tcm_by_pairs``,
the brute-force oracles of ``tests/test_retrieval.py``, ``tests/test_opis.py`` and
``tests/test_tcm_loss.py``, and the naive forms in ``benchmarks/retrieval_vs_pml.py`` and
``benchmarks/tcm_vs_pml.py``.

Formulas: Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020 (Recall@k, MAP@R,
eq. 2); Zhang et al., "Threshold-Consistent Margin Loss for Open-World Deep Metric Learning", ICLR
2024 (OPIS, eps-OPIS, the TCM loss; the exact definitions are our reading, book chapter 4).
"""

from __future__ import annotations

import torch

__all__ = ["eps_opis", "map_at_r", "opis", "recall_at_k", "tcm_loss", "utility_curves"]


def recall_at_k(x: torch.Tensor, y: torch.Tensor, ks: tuple[int, ...] = (1, 2, 4, 8)) -> dict[int, float]:
    """Recall@k: share of queries with a same-label sample among their k nearest others.

    x (N, D) embeddings, y (N,) integer labels; ``{k: recall}``.  Leave-one-out, queries with no
    other sample of their label left out.  Ties: a tie at rank k counts the chance that a random
    order of the tied candidates puts a relevant one within the top k.
    """
    xn = x.double() / x.double().norm(dim=1, keepdim=True)  # (N, D) unit rows
    s = (xn @ xn.T).fill_diagonal_(float("-inf"))  # (N, N) cosines; a query is not its own candidate
    rel = (y[:, None] == y[None, :]).fill_diagonal_(False)  # (N, N) relevant candidates
    keep = rel.any(dim=1)  # (N,) queries with R >= 1
    s, rel = s[keep], rel[keep]  # (Q, N)
    out = {}
    for k in ks:
        v = s.topk(k, dim=1).values[:, -1:]  # (Q, 1) the k-th largest similarity
        above, tied = s > v, s == v  # (Q, N)
        m = k - above.sum(dim=1, keepdim=True)  # (Q, 1) places within the top k left to the tied ones
        g, h = tied.sum(dim=1, keepdim=True), (tied & rel).sum(dim=1, keepdim=True)  # (Q, 1) tied, relevant
        g, h, j = g.double(), h.double(), torch.arange(k, dtype=torch.float64)  # j (k,)
        # P(no relevant among m of the g tied, in random order) = prod_{j<m} (g - h - j) / (g - j)
        miss = torch.where(j < m, ((g - h - j) / (g - j)).clamp(min=0), 1.0).prod(dim=1)  # (Q,)
        hit = torch.where((above & rel).any(dim=1), 1.0, 1.0 - miss)  # (Q,)
        out[k] = hit.mean().item()
    return out


def map_at_r(x: torch.Tensor, y: torch.Tensor) -> float:
    """MAP@R (Musgrave et al. 2020, eq. 2): mean over queries of AP@R = (1/R) sum_{i<=R} P(i) rel(i).

    x (N, D), y (N,); R = number of other samples with the query's label, P(i) = precision among the
    i nearest.  Ties: the expectation over a random order of each group of tied candidates.  At rank i
    inside a group of g tied candidates, h of them relevant, with o of the group ranked before i and
    A relevant candidates above the group: E[rel(i) P(i)] = (h/g (A + 1) + o h(h-1) / (g(g-1))) / i.
    """
    xn = x.double() / x.double().norm(dim=1, keepdim=True)  # (N, D)
    s = (xn @ xn.T).fill_diagonal_(float("-inf"))  # (N, N)
    rel = (y[:, None] == y[None, :]).fill_diagonal_(False)  # (N, N)
    r = rel.sum(dim=1)  # (N,) R of each query
    s, rel, r = s[r > 0], rel[r > 0], r[r > 0]  # (Q, N), (Q,)
    asc = s.sort(dim=1).values  # (Q, N) similarities, ascending
    rel_asc = torch.where(rel, s, float("-inf")).sort(dim=1).values  # (Q, N) relevant ones, ascending
    v = asc.flip(1)  # (Q, N) v[:, i-1] = similarity at rank i
    n = s.shape[1]
    count = lambda sorted_, v, right: torch.searchsorted(sorted_, v, right=right).double()  # (Q, N) #{<= v} or #{< v}
    above = n - count(asc, v, True)  # (Q, N) candidates strictly above rank i's value
    g = count(asc, v, True) - count(asc, v, False)  # (Q, N) its tie group's size
    a = n - count(rel_asc, v, True)  # (Q, N) relevant ones strictly above
    h = count(rel_asc, v, True) - count(rel_asc, v, False)  # (Q, N) relevant ones in the group
    i = torch.arange(1, n + 1, dtype=torch.float64)  # (N,) rank
    o = i - 1 - above  # (Q, N) group members ranked before rank i
    pair = torch.where(g > 1, h * (h - 1) / (g * (g - 1)).clamp(min=1), 0.0)  # P(two given group members relevant)
    term = (h / g * (a + 1) + o * pair) / i  # (Q, N) E[rel(i) P(i)]
    ap = torch.where(i <= r[:, None], term, 0.0).sum(dim=1) / r.double()  # (Q,)
    return ap.mean().item()


def utility_curves(
    x: torch.Tensor, y: torch.Tensor, far_range: tuple[float, float] = (1e-2, 1e-1), num_thresholds: int = 100,
    beta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class TAR, TRR and utility at K thresholds: ``(thresholds (K,), classes (T,), tar, trr, utility)``,
    the last three (K, T), for the T eligible classes (>= 2 samples), in ascending label order.

    x (N, D), y (N,).  Pairs a < b, d = 1 - cos.  TAR_i(t) = share of the positive pairs of class i
    (both members in i) with d <= t; TRR_i(t) = share of its negative pairs (exactly one member in i)
    with d > t; U_i = (1 + b^2) TAR TRR / (b^2 TRR + TAR), 0 where TAR = TRR = 0.  Thresholds:
    ``linspace(t_min, t_max, K)``, (t_min, t_max) the ``far_range`` quantiles of all negative distances.
    """
    xn = x.double() / x.double().norm(dim=1, keepdim=True)  # (N, D)
    a, b = torch.triu_indices(len(y), len(y), offset=1)  # (P,) every unordered pair a < b
    d = 1.0 - (xn[a] * xn[b]).sum(dim=1)  # (P,) distances
    lo, hi = torch.quantile(d[y[a] != y[b]], torch.tensor(far_range, dtype=torch.float64)).tolist()
    t = torch.linspace(lo, hi, num_thresholds, dtype=torch.float64)  # (K,)
    labels, counts = torch.unique(y, return_counts=True)
    classes = labels[counts >= 2]  # (T,) eligible classes
    tar, trr = [], []
    for c in classes:
        in_a, in_b = y[a] == c, y[b] == c
        pos, neg = d[in_a & in_b], d[in_a ^ in_b]  # (P_c,), (M_c,)
        tar.append((pos[:, None] <= t).double().mean(dim=0))  # (K,)
        trr.append((neg[:, None] > t).double().mean(dim=0))
    tar_, trr_ = torch.stack(tar, dim=1), torch.stack(trr, dim=1)  # (K, T)
    den = beta**2 * trr_ + tar_
    util = torch.where(den > 0, (1 + beta**2) * tar_ * trr_ / den.clamp(min=1e-300), 0.0)  # (K, T)
    return t, classes, tar_, trr_, util


def opis(utility: torch.Tensor) -> float:
    """OPIS = (1/K) sum_k (1/T) sum_i (U_i(t_k) - mean_i U_i(t_k))^2, from ``utility`` (K, T) (thresholds x
    classes, e.g. the last output of ``utility_curves``): the mean over thresholds of the population
    variance across classes.  In [0, 0.25]; lower is more consistent."""
    return utility.var(dim=1, unbiased=False).mean().item()


def eps_opis(utility: torch.Tensor, eps: float = 0.1) -> float:
    """eps-OPIS = (1/K) sum_k (mean_{i in W} U_i(t_k) - mean_{i in R} U_i(t_k))^2 from ``utility`` (K, T).

    W = the ceil(eps T) classes of lowest mean utility over the thresholds (ties: the lower class
    index first), R = the others (must be non-empty).  eps = 0.1 is the paper's 10%-OPIS.
    """
    t = utility.shape[1]
    w = -int(-round(eps * t, 9) // 1)  # ceil(eps T); round: 0.1 * 30 must give 3, not 4
    worst = torch.zeros(t, dtype=torch.bool)
    worst[torch.sort(utility.mean(dim=0), stable=True).indices[:w]] = True  # (T,)
    gap = utility[:, worst].mean(dim=1) - utility[:, ~worst].mean(dim=1)  # (K,)
    return (gap**2).mean().item()


def tcm_loss(
    x: torch.Tensor, y: torch.Tensor, m_pos: float = 0.9, m_neg: float = 0.5, l_pos: float = 1.0, l_neg: float = 1.0
) -> torch.Tensor:
    """TCM loss of a batch, differentiable (autograd):

        L = l+ sum_{s in S+, s <= m+} (m+ - s) / #{s in S+ : s <= m+} + l- sum_{s in S-, s >= m-} (s - m-) / #{...}

    x (B, D), y (B,); S+ / S- the cosines of the positive / negative pairs i != j; a term with no hard
    pair is 0.  Ordered and unordered pairs give the same value.  Returns a 0-dim tensor.
    """
    xn = x / x.norm(dim=1, keepdim=True)  # (B, D)
    s = xn @ xn.T  # (B, B)
    same = y[:, None] == y[None, :]  # (B, B)
    not_self = ~torch.eye(len(y), dtype=torch.bool, device=x.device)
    pos, neg = s[same & not_self], s[~same]  # (P,), (M,)
    hard_pos, hard_neg = pos[pos <= m_pos], neg[neg >= m_neg]
    loss_pos = (m_pos - hard_pos).sum() / max(len(hard_pos), 1)
    loss_neg = (hard_neg - m_neg).sum() / max(len(hard_neg), 1)
    return l_pos * loss_pos + l_neg * loss_neg
