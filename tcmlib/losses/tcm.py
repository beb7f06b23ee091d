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
(v2.9); without a reference set value and gradient equal pml's (to rounding).  Ordered vs
unordered pairs give the same value: every unordered pair appears twice in the sum and twice in
the count.  Differences from pml:

* one (B, M) similarity GEMM instead of gathering both members of every pair: extra memory is
  O(B M) (similarities, two boolean masks, their gradient), not O(B^2 D);
* with a reference set pml pairs ``embeddings[i]`` with ``embeddings[j]`` (not ``ref_emb[j]``):
  wrong; we pair query i with reference j;
* pml drops self pairs when ``ref_labels is labels``; we drop them when
  ``ref_embeddings is embeddings`` (or no reference set is given): the pair (i, i) is a sample
  with itself, whatever the label tensors are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from tcmlib._checks import check_embeddings_labels, check_margin
from tcmlib.normalize import l2_normalize

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
        With float16 autocast use a ``GradScaler`` as usual: the gradient entries are l/n (n up
        to ~B^2), below float16's range for large batches unless the loss is scaled.
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

    xn = l2_normalize(x, dim=1)  # (B, D), cannot overflow or underflow
    rn = xn if r is x else l2_normalize(r, dim=1)  # (M, D)
    sim = xn @ rn.T  # (B, M), the only O(B M D) step; autograd differentiates this GEMM
    return _TCMHinge.apply(sim, y, ry, exclude_self, m_pos, m_neg, l_pos, l_neg)


def _block_rows(sim: Tensor) -> int:
    """Rows per block: ~2^16 entries (256 KB of float32, cache-resident) on CPU; 2^24 on a GPU."""
    return max(1, (2**16 if sim.device.type == "cpu" else 2**24) // sim.shape[1])


class _TCMHinge(torch.autograd.Function):
    """L_TCM as a function of the similarity matrix ``sim`` (B, M), with its gradient written out.

    dL/ds_ij = -l+ / n+  if (i, j) is a hard positive,
               +l- / n-  if (i, j) is a hard negative,
               0         otherwise                       (n+, n- = numbers of hard pairs)

    Why by hand: autograd of the masked expression keeps ~6 (B, M) temporaries and makes ~20
    passes over memory, more time than the GEMMs at B = 4096.  Here rows are processed in blocks
    of ~2^16 entries that stay in cache, and only two boolean (B, M) masks are kept for backward.
    Masks, hinge and sums use at least float32 (``acc``) whatever the dtype of ``sim``.
    Not twice differentiable (the hinge's second derivative is 0 almost everywhere anyway).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, sim: Tensor, y: Tensor, ry: Tensor, exclude_self: bool,
        m_pos: float, m_neg: float, l_pos: float, l_neg: float,
    ) -> Tensor:
        B, M = sim.shape
        acc = torch.promote_types(sim.dtype, torch.float32)
        hard_pos = torch.empty(B, M, dtype=torch.bool, device=sim.device)  # (B, M)
        hard_neg = torch.empty(B, M, dtype=torch.bool, device=sim.device)  # (B, M)
        pos_sum = sim.new_zeros((), dtype=acc)
        neg_sum = sim.new_zeros((), dtype=acc)
        n_pos = torch.zeros((), dtype=torch.long, device=sim.device)
        n_neg = torch.zeros((), dtype=torch.long, device=sim.device)
        rows = _block_rows(sim)
        for r0 in range(0, B, rows):
            s = sim[r0 : r0 + rows].to(acc)  # (b, M), b <= rows
            same = y[r0 : r0 + rows, None] == ry[None, :]  # (b, M)
            hp = torch.le(s, m_pos, out=hard_pos[r0 : r0 + rows]).logical_and_(same)  # s <= m+, as pml
            if exclude_self:
                hp.diagonal(offset=r0).fill_(False)  # the pairs (i, i)
            hn = torch.ge(s, m_neg, out=hard_neg[r0 : r0 + rows]).logical_and_(same.logical_not_())  # s >= m-
            # torch.where, not a product with the mask: exact zeros off the hard pairs
            pos_sum += torch.where(hp, m_pos - s, 0.0).sum()
            neg_sum += torch.where(hn, s - m_neg, 0.0).sum()
            n_pos += hp.sum()
            n_neg += hn.sum()
        # an empty term has sum exactly 0: dividing by max(n, 1) gives 0, not NaN
        w_pos = l_pos / n_pos.clamp(min=1).to(acc)
        w_neg = l_neg / n_neg.clamp(min=1).to(acc)
        ctx.save_for_backward(hard_pos, hard_neg, w_pos, w_neg)
        ctx.sim_dtype = sim.dtype
        return pos_sum * w_pos + neg_sum * w_neg

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hard_pos, hard_neg, w_pos, w_neg = ctx.saved_tensors
        a, b = -w_pos * grad, w_neg * grad  # 0-dim
        grad_sim = torch.empty(hard_pos.shape, dtype=ctx.sim_dtype, device=hard_pos.device)  # (B, M)
        rows = _block_rows(hard_pos)
        for r0 in range(0, hard_pos.shape[0], rows):
            g = hard_pos[r0 : r0 + rows] * a + hard_neg[r0 : r0 + rows] * b  # (b, M)
            grad_sim[r0 : r0 + rows] = g
        return grad_sim, None, None, None, None, None, None, None


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
