"""pytorch-metric-learning's calling convention: helpers shared by tcmlib's loss modules.

Every tcmlib loss module is called as pml's losses are,
``loss(embeddings (B, D), labels (B,), indices_tuple=None, ref_emb (M, D)=None, ref_labels (M,)=None)``,
so it goes into pml's ``MultipleLosses`` (with or without miners) and its trainers as it is.
pml's ``DistributedLossWrapper`` accepts only subclasses of pml's ``BaseMetricLossFunction``:
:func:`as_pml_loss` wraps a tcmlib loss in one (same call, same value; pml is imported only then).

Reducers.  A pml loss hands its reducer a dict ``{name: {"losses", "indices", "reduction_type"}}``
and returns what the reducer makes of it.  The ranking losses (Smooth-AP, RS@k) are a mean of
per-query losses, so they take a pml ``reducer=`` as pml's ``SmoothAPLoss`` does
(``"element"`` reduction over the queries, :func:`reduce_per_query`; the default, ``None``, is
the mean).  TCM is already reduced (each term is the mean over its hard pairs; pml's reducers pass
``ThresholdConsistentMarginLoss``'s value through unchanged), so ``TCMLoss(reducer=)`` is refused.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["as_pml_loss", "check_whole_batch", "check_labels_given", "check_reducer", "reduce_per_query"]


def check_labels_given(name: str, labels: Any) -> Any:
    """``labels``; ``ValueError`` if a ranking loss gets ``None`` (pml's ``pass_labels_to_loss_fn=False``)."""
    if labels is None:
        raise ValueError(
            f"{name} needs labels: it ranks each query's positives (the samples with its label) among "
            "the whole batch, so a miner's indices_tuple cannot stand in for them; pass labels "
            "(in pml's trainers and distributed tests: pass_labels_to_loss_fn=True)"
        )
    return labels


def check_reducer(name: str, reducer: Any) -> Any:
    """``None``, or the pml reducer for a loss that takes one (a deep copy, as pml's losses keep).

    Raises ``TypeError`` for anything that is not a pml ``BaseReducer``.
    """
    if reducer is None:
        return None
    try:
        from pytorch_metric_learning.reducers import BaseReducer, DoNothingReducer, MultipleReducers
    except ImportError:  # no pml: nothing can be a pml reducer
        BaseReducer = DoNothingReducer = MultipleReducers = None
    if BaseReducer is None or not isinstance(reducer, BaseReducer):
        raise TypeError(
            f"{name}(reducer=) takes a pytorch-metric-learning reducer (e.g. "
            f"pytorch_metric_learning.reducers.ThresholdReducer(low=0)), got {type(reducer).__name__}"
        )
    return reducer if isinstance(reducer, (DoNothingReducer, MultipleReducers)) else copy.deepcopy(reducer)


def reduce_per_query(
    reducer: Any, losses: torch.Tensor, queries: torch.Tensor, embeddings: torch.Tensor,
    labels: torch.Tensor, name: str = "loss",
) -> Any:
    """pml's reduction of per-query losses: ``reducer({name: losses (Q,) of rows queries (Q,)}, ...)``.

    ``embeddings`` (N, D) and ``labels`` (N,) are the rows ``queries`` index (pml's reducers use
    them for a zero loss and class weights).  ``Q = 0`` hands the reducer pml's zero loss.  Returns
    what the reducer returns: a 0-dim tensor (``DoNothingReducer``: the dict itself).
    """
    info: dict[str, Any]
    if queries.numel() == 0:
        info = {"losses": 0, "indices": None, "reduction_type": "already_reduced"}
    else:
        info = {"losses": losses, "indices": queries, "reduction_type": "element"}
    return reducer({name: info}, embeddings, labels)


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

    The result (a :class:`tcmlib.losses.pml_wrapper.PMLLoss`, which pickles, so it goes through
    ``torch.multiprocessing.spawn``) calls ``loss(embeddings, labels, indices_tuple, ref_emb,
    ref_labels)`` and returns its value unchanged (no pml reducer, regularizer or distance in
    between); ``loss`` is a submodule, so its parameters and ``state_dict`` go along.  Needs
    ``pip install pytorch-metric-learning``.  Example: ``DistributedLossWrapper(as_pml_loss(TCMLoss()))``.
    """
    if not isinstance(loss, nn.Module):
        raise TypeError(f"as_pml_loss needs a loss nn.Module (e.g. TCMLoss()), got {type(loss).__name__}")
    from tcmlib.losses.pml_wrapper import PMLLoss  # pml is an optional dependency: imported here

    return PMLLoss(loss)
