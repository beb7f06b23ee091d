"""A tcmlib loss seen by pytorch-metric-learning as one of its own; imports pml (made by :func:`as_pml_loss`).

pml's ``DistributedLossWrapper`` accepts only subclasses of pml's ``BaseMetricLossFunction``.
:class:`PMLLoss` is one, defined at module level so that it pickles (``torch.multiprocessing.spawn``
sends the loss to each process by pickling it).  This module imports pml, an optional dependency:
``tcmlib.losses`` imports it only when :func:`tcmlib.losses.pml_compat.as_pml_loss` is called.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from torch import nn

__all__ = ["PMLLoss"]


class PMLLoss(BaseMetricLossFunction):  # type: ignore[misc]
    """``loss`` behind pml's ``BaseMetricLossFunction`` interface: same call, same value.

    ``forward(embeddings (B, D), labels (B,) or None, indices_tuple, ref_emb (M, D), ref_labels (M,))``
    returns ``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)`` unchanged: no pml
    reducer, regularizer or distance in between (give the reducer to the tcmlib loss, where it has a
    meaning).  ``labels`` may be ``None`` when a miner's ``indices_tuple`` is given (pml's
    ``pass_labels_to_loss_fn=False``), for losses that accept it (TCM).
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(  # type: ignore[override]
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: Any = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def extra_repr(self) -> str:
        return "calls (loss) as it is; pml's distance and reducer below it are unused"
