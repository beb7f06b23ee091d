"""Threshold-Consistent Margin (TCM) loss, in matrix form.

Zhang, Xu, Tang, Fang, Wu, Tighe, Xing, "Threshold-Consistent Margin Loss for Open-World Deep
Metric Learning", ICLR 2024 (arXiv 2307.04047).  With S+ / S- the cosine similarities of the
positive / negative pairs of a batch:

    L_TCM = l+ * sum_{s in S+, s <= m+} (m+ - s) / #{s in S+ : s <= m+}
          + l- * sum_{s in S-, s >= m-} (s - m-) / #{s in S- : s >= m-}

A term with no hard pair (empty set) is exactly 0, with zero gradient.  The margins m+ / m- are
*absolute* cosine values shared by all classes: that is what pulls every class toward one
operating band, so one threshold works for all of them.

Inequalities (``<=`` for positives, ``>=`` for negatives), ordered pairs and the defaults
(m+ = 0.9, m- = 0.5, l+ = l- = 1) match pytorch-metric-learning's ``ThresholdConsistentMarginLoss``
(v2.9).  Ordered vs unordered pairs give the same value: every unordered pair appears twice in
the sum and twice in the count.  Unlike pml we compute one (B, M) similarity matrix instead of
gathering every pair (pml needs O(B^2 D) memory), and our reference-set path is correct.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcmlib._checks import check_embeddings_labels, check_margin

__all__ = ["tcm_loss", "TCMLoss"]


def _check_weight(value: float, name: str) -> float:
    """A term weight must be a finite number >= 0 (a negative weight would reward hard pairs)."""
    v = float(value)
    if not (v >= 0.0 and v != float("inf")):
        raise ValueError(f"{name} = {value} must be a finite number >= 0")
    return v


def tcm_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin_pos: float = 0.9,
    margin_neg: float = 0.5,
    lambda_pos: float = 1.0,
    lambda_neg: float = 1.0,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
) -> Tensor:
    """TCM loss of a batch (paper eq. for L_TCM, see the module docstring).

    Args:
        embeddings: ``(B, D)`` float, not necessarily normalised (we L2-normalise rows).
        labels: ``(B,)`` integer class ids.
        margin_pos: m+, a positive pair with cosine ``s <= m+`` is hard; in [-1, 1].
        margin_neg: m-, a negative pair with cosine ``s >= m-`` is hard; in [-1, 1].
        lambda_pos, lambda_neg: weights l+ and l- of the two terms.
        ref_embeddings: optional ``(M, D)`` reference set; needs ``ref_labels`` ``(M,)``.

    Which pairs count:
        * no reference set (or ``ref_embeddings is embeddings``, the same tensor object):
          all ordered pairs (i, j) of the batch with i != j; self pairs are excluded;
        * a separate reference set: every query x reference pair (i, j), B * M of them,
          including pairs whose rows happen to be equal.

    A batch with a single class has no negative pairs, so the negative term is 0 (not an error);
    a batch of one sample without a reference set has no pairs at all and gives 0.

    Returns:
        A 0-dim tensor: float32 for float16 / bfloat16 / float32 input, float64 for float64.
        The similarity GEMM runs in the input dtype (or the autocast dtype); the hinge, the
        masks and the sums run in at least float32, so margins are compared precisely.
    """
    x, y = check_embeddings_labels(embeddings, labels)
    m_pos = check_margin(margin_pos, "margin_pos")
    m_neg = check_margin(margin_neg, "margin_neg")
    l_pos = _check_weight(lambda_pos, "lambda_pos")
    l_neg = _check_weight(lambda_neg, "lambda_neg")
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("pass ref_embeddings and ref_labels together (or neither)")
    exclude_self = ref_embeddings is None or ref_embeddings is embeddings
    if ref_embeddings is None:
        r, ry = x, y
    else:
        r, ry = check_embeddings_labels(
            ref_embeddings, ref_labels, emb_name="ref_embeddings", label_name="ref_labels"
        )
        if r.shape[1] != x.shape[1]:
            raise ValueError(
                f"ref_embeddings has dimension {r.shape[1]} but embeddings has {x.shape[1]}; "
                "both must come from the same embedder"
            )
        if r.device != x.device:
            raise ValueError(f"ref_embeddings is on {r.device} but embeddings on {x.device}; move one of them")
        ry = ry.to(x.device)

    xn = F.normalize(x, dim=1)  # (B, D)
    rn = xn if r is x else F.normalize(r, dim=1)  # (M, D)
    sim = xn @ rn.T  # (B, M), the only O(B M D) step
    acc = torch.promote_types(sim.dtype, torch.float32)
    sim = sim.to(acc)  # no-op for float32 / float64

    same = y[:, None] == ry[None, :]  # (B, M)
    pos = same
    if exclude_self:
        pos = same.clone()
        pos.fill_diagonal_(False)  # i != j
    hard_pos = pos & (sim <= m_pos)  # (B, M)
    hard_neg = ~same & (sim >= m_neg)  # (B, M)

    # torch.where, not multiplication by a mask: non-hard entries get an exact zero gradient
    zero = sim.new_zeros(())
    pos_sum = torch.where(hard_pos, m_pos - sim, zero).sum()
    neg_sum = torch.where(hard_neg, sim - m_neg, zero).sum()
    # an empty term has sum exactly 0: dividing by max(count, 1) gives 0 and no NaN
    n_pos = hard_pos.sum().clamp(min=1).to(acc)
    n_neg = hard_neg.sum().clamp(min=1).to(acc)
    return l_pos * pos_sum / n_pos + l_neg * neg_sum / n_neg


class TCMLoss(nn.Module):
    """Module form of :func:`tcm_loss`; same parameters, checked once at construction.

    ``forward(embeddings (B, D), labels (B,), ref_embeddings (M, D) = None, ref_labels (M,) = None)``
    returns a 0-dim tensor.  Add it to any base loss: ``loss = base(x, y) + TCMLoss()(x, y)``
    (or use :class:`tcmlib.losses.combine.WithTCM`).
    """

    def __init__(
        self,
        margin_pos: float = 0.9,
        margin_neg: float = 0.5,
        lambda_pos: float = 1.0,
        lambda_neg: float = 1.0,
    ) -> None:
        super().__init__()
        self.margin_pos = check_margin(margin_pos, "margin_pos")
        self.margin_neg = check_margin(margin_neg, "margin_neg")
        self.lambda_pos = _check_weight(lambda_pos, "lambda_pos")
        self.lambda_neg = _check_weight(lambda_neg, "lambda_neg")

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        return tcm_loss(
            embeddings,
            labels,
            margin_pos=self.margin_pos,
            margin_neg=self.margin_neg,
            lambda_pos=self.lambda_pos,
            lambda_neg=self.lambda_neg,
            ref_embeddings=ref_embeddings,
            ref_labels=ref_labels,
        )

    def extra_repr(self) -> str:
        return (
            f"margin_pos={self.margin_pos}, margin_neg={self.margin_neg}, "
            f"lambda_pos={self.lambda_pos}, lambda_neg={self.lambda_neg}"
        )
