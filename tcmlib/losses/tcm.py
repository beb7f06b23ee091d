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
  one float (B, M) buffer (the similarities, then overwritten by W = dL/ds) and three boolean
  masks, not O(B^2 D);
* with a reference set pml pairs ``embeddings[i]`` with ``embeddings[j]`` (not ``ref_emb[j]``):
  wrong; we pair query i with reference j;
* pml drops self pairs when ``ref_labels is labels``; we drop them when
  ``ref_emb is embeddings`` (or no reference set is given): the pair (i, i) is a sample
  with itself, whatever the label tensors are.

How it is computed.  The hinge is piecewise linear in s, so dL/ds is the constant W (B, M) of
tcm_loss's docstring: no need to differentiate the masked expression with autograd (which keeps
~6 (B, M) temporaries and makes ~20 passes over them).  Under ``no_grad`` we compute the masks, the
value from the hard pairs' cosines (gathered, so no float pass over the whole matrix) and W; the
gradients W rn, W^T xn (2 W xn without a reference set, W being symmetric) are one or two GEMMs,
handed to autograd by a small function (value 0, gradient g; g keeps its graph, so second
derivatives are right too).  On 2 CPU
cores (``benchmarks/tcm_vs_pml.py``) this is faster than the naive autograd form and, with one
gradient GEMM instead of two, about as fast as a bare similarity GEMM's forward + backward.
Gathering the hard pairs synchronises with a GPU (as the input checks already do).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from tcmlib._checks import check_embeddings, check_embeddings_labels, check_margin
from tcmlib.losses._names import tcm_parameters
from tcmlib.normalize import l2_normalize

__all__ = ["tcm_loss", "TCMLoss"]


def _check_weight(value: float, name: str) -> float:
    """A term weight must be a finite number >= 0 (a negative weight would reward hard pairs)."""
    v = float(value)
    if not (v >= 0.0 and v != float("inf")):
        raise ValueError(f"{name} = {value} must be a finite number >= 0")
    return v


def _checked(emb: Any, labels: Any, emb_name: str, label_name: str) -> tuple[Tensor, Tensor | None]:
    """Checked ``(N, D)`` embeddings and ``(N,)`` labels; ``labels=None`` passes as ``None``."""
    if labels is None:
        return check_embeddings(emb, emb_name), None
    return check_embeddings_labels(emb, labels, emb_name=emb_name, label_name=label_name)


def _pairs(indices_tuple: Any, n_rows: int, n_ref: int, device: torch.device) -> tuple[Tensor, ...]:
    """A miner's ``indices_tuple`` as pml's four pair index tensors ``(a1, p, a2, n)``, checked.

    ``(a, p, n)`` (triplets) becomes ``(a, p, a, n)``, as pml's ``convert_to_pairs`` does.  Anchors
    index ``embeddings`` (``n_rows``), positives / negatives index the reference set (``n_ref``).
    """
    if isinstance(indices_tuple, Tensor):
        raise TypeError(
            "the third argument is indices_tuple (a miner's output, pml's calling convention), got a "
            "tensor; pass a reference set by keyword: loss(embeddings, labels, ref_emb=..., ref_labels=...)"
        )
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise TypeError(
            "indices_tuple must be a miner's output: a tuple (anchors, positives, negatives) or "
            f"(anchors1, positives, anchors2, negatives) of 1-D index tensors, got {type(indices_tuple).__name__}"
            + (f" of length {len(indices_tuple)}" if isinstance(indices_tuple, (tuple, list)) else "")
        )
    t = [torch.as_tensor(i, device=device) for i in indices_tuple]
    if any(i.ndim != 1 or i.dtype.is_floating_point or i.dtype == torch.bool for i in t):
        raise TypeError("indices_tuple must hold 1-D integer index tensors, got "
                        + ", ".join(f"{tuple(i.shape)} {i.dtype}" for i in t))
    a1, p, a2, n = (t[0], t[1], t[0], t[2]) if len(t) == 3 else t
    for anchors, other, kind in ((a1, p, "positive"), (a2, n, "negative")):
        if anchors.numel() != other.numel():
            raise ValueError(f"indices_tuple: {anchors.numel()} anchors but {other.numel()} {kind}s; "
                             "each anchor index needs one partner index")
        if anchors.numel() and (int(anchors.min()) < 0 or int(anchors.max()) >= n_rows):
            raise ValueError(f"indices_tuple: anchor indices must lie in [0, {n_rows - 1}] (rows of embeddings)")
        if other.numel() and (int(other.min()) < 0 or int(other.max()) >= n_ref):
            raise ValueError(f"indices_tuple: {kind} indices must lie in [0, {n_ref - 1}] "
                             "(rows of ref_emb, or of embeddings without a reference set)")
    return a1.long(), p.long(), a2.long(), n.long()


def tcm_loss(
    embeddings: Tensor,
    labels: Tensor | None,
    *,
    indices_tuple: Any = None,
    margin_pos: float = 0.9,
    margin_neg: float = 0.5,
    lambda_pos: float = 1.0,
    lambda_neg: float = 1.0,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    ref_embeddings: Tensor | None = None,
) -> Tensor:
    """TCM loss of a batch (paper eq. for L_TCM, see the module docstring).

    Args:
        embeddings: ``(B, D)`` float, not necessarily normalised (we L2-normalise rows).
        labels: ``(B,)`` integer class ids; may be ``None`` when ``indices_tuple`` is given (the
            tuple says which pairs are positive), as pml's losses take it
            (``pass_labels_to_loss_fn=False``).
        indices_tuple: optional pairs from a pml miner, ``(a, p, n)`` or ``(a1, p, a2, n)``
            (1-D index tensors); then only those pairs count, as given (repeats count repeatedly,
            labels are not re-checked), exactly as pml's ``ThresholdConsistentMarginLoss``.
        margin_pos: m+, a positive pair with cosine ``s <= m+`` is hard; in [-1, 1].
        margin_neg: m-, a negative pair with cosine ``s >= m-`` is hard; in [-1, 1].
        lambda_pos, lambda_neg: weights l+ and l- of the two terms.
        ref_emb: optional ``(M, D)`` reference set; needs ``ref_labels`` ``(M,)`` (pml's names),
            except with ``indices_tuple``, where labels are not needed.
        ref_embeddings: deprecated name of ``ref_emb`` (DeprecationWarning).

    Which pairs count:
        * ``indices_tuple`` given: its pairs; anchors index ``embeddings``, positives and
          negatives index ``ref_emb`` (or ``embeddings`` without a reference set);
        * no reference set (or ``ref_emb is embeddings``, the same tensor object):
          all ordered pairs (i, j) of the batch with i != j; self pairs are excluded;
        * a separate reference set: every query x reference pair (i, j), B * M of them,
          including pairs whose rows happen to be equal.

    A batch with a single class has no negative pairs, so the negative term is 0 (not an error);
    a batch of one sample without a reference set has no pairs at all and gives 0.

    Gradient (exact; the hinge is linear between its kinks):

        dL/ds_ij = -l+ / n+  if (i, j) is a hard positive,
                   +l- / n-  if (i, j) is a hard negative,
                   0         otherwise                       (n+, n- = numbers of hard pairs)

    Returns:
        A 0-dim tensor: float32 for float16 / bfloat16 / float32 input, float64 for float64.
        Everything runs in float32 (float64 for float64 input), also inside a caller's
        ``torch.autocast`` (disabled here; half inputs are cast up), so margins are compared
        precisely and the gradient entries l/n (n up to ~B^2) do not underflow.
    """
    if ref_embeddings is not None:
        warnings.warn("tcm_loss(ref_embeddings=) is deprecated: use ref_emb= (pml's name)",
                      DeprecationWarning, stacklevel=2)
        if ref_emb is not None:
            raise ValueError("pass the reference set once, as ref_emb= (ref_embeddings is its old name)")
        ref_emb = ref_embeddings
    if labels is None and indices_tuple is None:
        raise ValueError(
            "TCM needs labels to tell positive from negative pairs: pass labels, or a miner's "
            "indices_tuple (then labels=None is fine, as in pml's pass_labels_to_loss_fn=False)"
        )
    x, y = _checked(embeddings, labels, "embeddings", "labels")
    m_pos = check_margin(margin_pos, "margin_pos")
    m_neg = check_margin(margin_neg, "margin_neg")
    l_pos = _check_weight(lambda_pos, "lambda_pos")
    l_neg = _check_weight(lambda_neg, "lambda_neg")
    if ref_labels is not None and ref_emb is None:
        raise ValueError("ref_labels without ref_emb: pass ref_emb and ref_labels together (or neither)")
    if ref_emb is not None and ref_labels is None and indices_tuple is None:
        raise ValueError("ref_emb without ref_labels: pass ref_emb and ref_labels together (or neither), "
                         "or a miner's indices_tuple (then the reference labels are not needed)")
    exclude_self = ref_emb is None or ref_emb is embeddings
    if ref_emb is None:
        r, ry = x, y
    else:
        r, ry = _checked(ref_emb, ref_labels, "ref_emb", "ref_labels")
        if r.shape[1] != x.shape[1]:
            raise ValueError(
                f"ref_emb has dimension {r.shape[1]} but embeddings has {x.shape[1]}; "
                "both must come from the same embedder"
            )
        if r.device != x.device:
            raise ValueError(f"ref_emb is on {r.device} but embeddings on {x.device}; move one of them")
        ry = None if ry is None else ry.to(x.device)
    pairs = None if indices_tuple is None else _pairs(indices_tuple, x.shape[0], r.shape[0], x.device)

    with torch.autocast(x.device.type, enabled=False):  # float32 inside a caller's autocast too
        return _tcm_body(x, y, r, ry, pairs, exclude_self, m_pos, m_neg, l_pos, l_neg)


def _tcm_body(x: Tensor, y: Tensor | None, r: Tensor, ry: Tensor | None, pairs: tuple[Tensor, ...] | None, exclude_self: bool,
              m_pos: float, m_neg: float, l_pos: float, l_neg: float) -> Tensor:
    """tcm_loss after its checks, outside autocast: x (B, D), y (B,), r (M, D) (``r is x``: no reference set)."""
    same_set = r is x
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # half inputs: the GEMM, the masks and the sums in float32
    r = x if same_set else r.float() if r.dtype in (torch.float16, torch.bfloat16) else r
    xn = l2_normalize(x, dim=1)  # (B, D)
    rn = xn if r is x else l2_normalize(r, dim=1)  # (M, D)
    acc = torch.promote_types(xn.dtype, torch.float32)  # masks, hinge and sums: at least float32
    with torch.no_grad():
        s = (xn @ rn.T).to(acc)  # (B, M) cosines
        if pairs is None:
            assert y is not None and ry is not None  # checked above: labels are needed without pairs
            same = y[:, None] == ry[None, :]  # (B, M)
            hard_pos = (s <= m_pos) & same  # (B, M), "<=" as pml
            if exclude_self:
                hard_pos.fill_diagonal_(False)  # the pairs (i, i)
            hard_neg = (s >= m_neg) & ~same  # (B, M), ">=" as pml
            s_pos, s_neg = s[hard_pos], s[hard_neg]  # (n+,), (n-,) the hard pairs' cosines
        else:  # the miner's pairs, as given: (n_p,) and (n_n,) index pairs
            a1, p, a2, n = pairs
            hp, hn = s[a1, p] <= m_pos, s[a2, n] >= m_neg
            (a1, p), (a2, n) = (a1[hp], p[hp]), (a2[hn], n[hn])  # the hard ones
            s_pos, s_neg = s[a1, p], s[a2, n]  # (n+,), (n-,)
        a, b = l_pos / max(len(s_pos), 1), l_neg / max(len(s_neg), 1)  # an empty term: 0, not NaN
        loss = a * (m_pos - s_pos).sum() + b * (s_neg - m_neg).sum()
        # W = dL/ds (B, M): -l+/n+ on hard positives, +l-/n- on hard negatives, 0 elsewhere
        if pairs is None:
            w = s.zero_().masked_fill_(hard_neg, b).masked_fill_(hard_pos, -a)  # reuses s's memory
        else:  # a pair listed k times weighs k times (accumulate), as in pml's sums
            w = s.zero_().index_put_((a2, n), s.new_full(n.shape, b), accumulate=True)
            w.index_put_((a1, p), s.new_full(p.shape, -a), accumulate=True)
            if rn is xn:
                w = w + w.T  # s_ij = s_ji: both orders of a pair move xn the same way
    # s = xn rn^T, so dL/dxn = W rn and dL/drn = W^T xn: hand them to autograd (_Gradient adds 0 to
    # the value).  The GEMMs run in float32 (the caller's autocast is off): W's entries l/n underflow float16.
    if rn is xn and xn.requires_grad:  # W symmetric (W + W^T for mined pairs): W xn + W^T xn
        loss = loss + _Gradient.apply(xn, (2 * w if pairs is None else w) @ xn.to(acc))
    if rn is not xn and xn.requires_grad:
        loss = loss + _Gradient.apply(xn, w @ rn.to(acc))
    if rn is not xn and rn.requires_grad:
        loss = loss + _Gradient.apply(rn, w.T @ xn.to(acc))
    return loss


class _Gradient(torch.autograd.Function):
    """``0`` in the forward pass, ``grad * g`` as the gradient of ``t``: a known gradient handed to autograd.

    ``g`` keeps its own graph (``g = W xn``, W piecewise constant), so a second derivative
    (``create_graph=True``) differentiates ``g`` and comes out right; a first-order backward never
    enters that graph.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor, g: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(g)
        return g.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (g,) = ctx.saved_tensors
        return grad * g, None


class TCMLoss(nn.Module):
    """Module form of :func:`tcm_loss`; same parameters, checked once at construction.

    A parameter left as ``None`` takes its default (m+ 0.9, m- 0.5, l+ = l- = 1); pml's names
    ``margin_plus``, ``margin_minus``, ``lambda_plus``, ``lambda_minus`` are accepted as aliases.

    ``forward(embeddings (B, D), labels (B,), indices_tuple=None, ref_emb (M, D)=None,
    ref_labels (M,)=None)`` (pml's calling convention, so it works in pml's ``MultipleLosses``, with
    its miners and, through :func:`tcmlib.losses.pml_compat.as_pml_loss`, in ``DistributedLossWrapper``)
    returns a 0-dim tensor.  With a miner's ``indices_tuple`` only the mined pairs count and the
    value and gradient equal pml's ``ThresholdConsistentMarginLoss`` given the same tuple; then
    ``labels`` may be ``None``, as with pml's losses.  ``reducer=`` raises ``ValueError``: the value is
    already a mean over the hard pairs of each term (pml's reducers leave its TCM value unchanged).
    Add it to any base loss: ``loss = base(x, y) + TCMLoss()(x, y)`` (or use
    :class:`tcmlib.losses.combine.WithTCM`).
    """

    def __init__(
        self,
        margin_pos: float | None = None,
        margin_neg: float | None = None,
        lambda_pos: float | None = None,
        lambda_neg: float | None = None,
        reducer: Any = None,
        **pml_names: float,
    ) -> None:
        super().__init__()
        if reducer is not None:
            raise ValueError(
                "TCMLoss takes no reducer: its value is already reduced (each term is the mean over its "
                "hard pairs; pml's reducers pass ThresholdConsistentMarginLoss's value through unchanged); "
                "drop reducer= (weigh the two terms with lambda_pos / lambda_neg)"
            )
        # None: the default (0.9, 0.5, 1, 1); pml's names (margin_plus, ...) are accepted too
        p = tcm_parameters(dict(margin_pos=margin_pos, margin_neg=margin_neg, lambda_pos=lambda_pos,
                                lambda_neg=lambda_neg, **pml_names), "TCMLoss")
        self.margin_pos = check_margin(p["margin_pos"], "margin_pos")
        self.margin_neg = check_margin(p["margin_neg"], "margin_neg")
        self.lambda_pos = _check_weight(p["lambda_pos"], "lambda_pos")
        self.lambda_neg = _check_weight(p["lambda_neg"], "lambda_neg")

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: Any = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """pml's calling convention; see :func:`tcm_loss` for the arguments."""
        return tcm_loss(
            embeddings,
            labels,
            indices_tuple=indices_tuple,
            margin_pos=self.margin_pos,
            margin_neg=self.margin_neg,
            lambda_pos=self.lambda_pos,
            lambda_neg=self.lambda_neg,
            ref_emb=ref_emb,
            ref_labels=ref_labels,
        )

    def extra_repr(self) -> str:
        return (
            f"margin_pos={self.margin_pos}, margin_neg={self.margin_neg}, "
            f"lambda_pos={self.lambda_pos}, lambda_neg={self.lambda_neg}"
        )
