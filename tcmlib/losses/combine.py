"""Add TCM to any base loss: ``L = L_base + L_TCM`` (Zhang et al., ICLR 2024, arXiv 2307.04047).

The paper adds TCM to a base DML loss as a plain sum.  :class:`WithTCM` does exactly that for
any callable ``base(embeddings, labels)``: a tcmlib loss, a function, or a
pytorch-metric-learning loss (``base(embeddings, labels, indices_tuple, ref_emb, ref_labels)``).
A base loss that is an ``nn.Module`` is registered as a submodule, so its learnable parameters
(ArcFace class centres, ProxyAnchor proxies) appear in ``WithTCM(...).parameters()`` and reach
the optimiser.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from tcmlib.losses._names import tcm_parameters
from tcmlib.losses.tcm import TCMLoss

__all__ = ["WithTCM", "add_tcm"]


class WithTCM(nn.Module):
    """``base(embeddings, labels) + TCMLoss(...)(embeddings, labels)``.

    Args:
        base: the base loss; an ``nn.Module`` (its parameters are exposed) or any callable.
        margin_pos, margin_neg, lambda_pos, lambda_neg: TCM parameters, see :func:`tcm_loss`;
            ``None`` takes the default (0.9, 0.5, 1, 1).  pml's names ``margin_plus``,
            ``margin_minus``, ``lambda_plus``, ``lambda_minus`` are accepted as aliases.

    ``forward(embeddings (B, D), labels (B,), indices_tuple=None, ref_emb (M, D)=None,
    ref_labels (M,)=None)`` (pml's calling convention) returns a 0-dim tensor.  ``indices_tuple``
    (a pml miner's output) goes to the base loss only: TCM, as in the paper, uses every pair of the
    batch (for TCM on mined pairs too use pml's ``MultipleLosses([base, TCMLoss()], miners=[m, m])``).  ``ref_emb`` / ``ref_labels``
    go to both.  Arguments left as ``None`` are not passed to the base, so a plain
    ``base(embeddings, labels)`` callable works.

    After each call ``last_base`` and ``last_tcm`` hold the two components as detached 0-dim
    tensors, for logging (call ``float()`` on them when you log; we do not, to avoid a GPU sync).
    """

    def __init__(
        self,
        base: Callable[..., Tensor],
        *,
        margin_pos: float | None = None,
        margin_neg: float | None = None,
        lambda_pos: float | None = None,
        lambda_neg: float | None = None,
        **pml_names: float,
    ) -> None:
        super().__init__()
        if not callable(base):
            raise TypeError(f"base must be a callable loss, got {type(base).__name__}")
        p = tcm_parameters(dict(margin_pos=margin_pos, margin_neg=margin_neg, lambda_pos=lambda_pos,
                                lambda_neg=lambda_neg, **pml_names), "WithTCM")
        self.base = base  # an nn.Module is registered as a submodule by this assignment
        self.tcm = TCMLoss(**p)
        self.last_base: Tensor | None = None
        self.last_tcm: Tensor | None = None

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: Any = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        extra: dict[str, Any] = {}
        if indices_tuple is not None:
            extra["indices_tuple"] = indices_tuple
        if ref_emb is not None:
            extra["ref_emb"] = ref_emb
        if ref_labels is not None:
            extra["ref_labels"] = ref_labels
        base = self.base(embeddings, labels, **extra)
        if not isinstance(base, Tensor):  # e.g. a float 0 from a loss with nothing to do
            base = torch.as_tensor(base, dtype=embeddings.dtype, device=embeddings.device)
        tcm = self.tcm(embeddings, labels, ref_emb=ref_emb, ref_labels=ref_labels)
        self.last_base = base.detach()
        self.last_tcm = tcm.detach()
        return base + tcm


def add_tcm(
    base_loss: Callable[..., Tensor],
    *,
    margin_pos: float | None = None,
    margin_neg: float | None = None,
    lambda_pos: float | None = None,
    lambda_neg: float | None = None,
    **pml_names: float,
) -> WithTCM:
    """``WithTCM(base_loss, ...)``: e.g. ``add_tcm(ArcFaceLoss(10, 128), margin_neg=0.4)``.

    ``None`` takes TCM's default (0.9, 0.5, 1, 1); pml's names (``margin_plus=0.9`` ...) work too.
    """
    p = tcm_parameters(dict(margin_pos=margin_pos, margin_neg=margin_neg, lambda_pos=lambda_pos,
                            lambda_neg=lambda_neg, **pml_names), "add_tcm")
    return WithTCM(base_loss, **p)
