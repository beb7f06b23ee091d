"""pytorch-metric-learning's calling convention: helpers shared by tcmlib's loss modules.

Every tcmlib loss module is called as pml's losses are,
``loss(embeddings (B, D), labels (B,), indices_tuple=None, ref_emb (M, D)=None, ref_labels (M,)=None)``,
so it goes into pml's ``MultipleLosses`` (with or without miners) and its trainers as it is.
pml's ``DistributedLossWrapper`` accepts only subclasses of pml's ``BaseMetricLossFunction``:
:func:`as_pml_loss` wraps a tcmlib loss in one (same call, same value; pml is imported only then).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["as_pml_loss", "check_whole_batch"]


def check_whole_batch(
    name: str, embeddings: Any, indices_tuple: Any, ref_emb: Any, ref_labels: Any
) -> None:
    """Raise ``ValueError`` unless a ranking loss gets the whole batch: no mined pairs, no reference set.

    A ranking loss (Smooth-AP, RS@k) ranks every sample of the batch for every query, so a miner's
    subset of pairs has no meaning for it; ``ref_emb is embeddings`` (the same tensor) is the batch.
    """
    if indices_tuple is not None:
        raise ValueError(
            f"{name} ranks the whole batch for every query, so it cannot use a miner's indices_tuple; "
            "call it without one (in pml's MultipleLosses give it no miner: miners=[..., None])"
        )
    if (ref_emb is not None and ref_emb is not embeddings) or (ref_emb is None and ref_labels is not None):
        raise ValueError(
            f"{name} ranks the batch against itself; a separate reference set (ref_emb, ref_labels) is not "
            "supported: concatenate it with the batch (torch.cat) and pass that as embeddings, labels "
            "(with pml's DistributedLossWrapper use efficient=False)"
        )


def as_pml_loss(loss: nn.Module) -> nn.Module:
    """``loss`` as a subclass of pml's ``BaseMetricLossFunction``, for ``DistributedLossWrapper``.

    The result calls ``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)`` and returns its
    value unchanged (no pml reducer, regularizer or distance in between); ``loss`` is a submodule, so
    its parameters and ``state_dict`` go along.  Needs ``pip install pytorch-metric-learning``.
    Example: ``DistributedLossWrapper(as_pml_loss(TCMLoss()))``.
    """
    if not isinstance(loss, nn.Module):
        raise TypeError(f"as_pml_loss needs a loss nn.Module (e.g. TCMLoss()), got {type(loss).__name__}")
    return _pml_class()(loss)


_CLASS: type | None = None


def _pml_class() -> type:
    """The wrapper class, built on first use (pml is an optional dependency)."""
    global _CLASS
    if _CLASS is None:
        from pytorch_metric_learning.losses import BaseMetricLossFunction

        class PMLLoss(BaseMetricLossFunction):  # type: ignore[misc]
            """A tcmlib loss seen by pml as one of its own (``isinstance(.., BaseMetricLossFunction)``)."""

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

        _CLASS = PMLLoss
    return _CLASS
