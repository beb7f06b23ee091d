"""Build any base loss of the TCM paper's study by name, optionally with TCM added.

``make_loss("proxy_anchor", tcm=True, num_classes=100, embedding_size=512)`` returns
``L_ProxyAnchor + L_TCM`` as one ``nn.Module`` called as ``loss(embeddings (B, D), labels (B,))``.
The ranking losses are ours (:mod:`tcmlib.losses.smooth_ap`, :mod:`tcmlib.losses.recall_surrogate`);
the others are pytorch-metric-learning's, wrapped, not rewritten (``pip install
pytorch-metric-learning``).  Defaults below; any ``**kwargs`` override them.

=================  ======================================================================
name               loss and defaults
=================  ======================================================================
smooth_ap          SmoothAPLoss(temperature=0.01)                     Brown et al., ECCV 2020
recall_surrogate   RecallAtKSurrogateLoss(ks=(1,2,4,8,16), tau1=0.01, tau2=1)   Patel et al.,
(alias ``rs@k``)                                                      CVPR 2022
contrastive        pml ContrastiveLoss, cosine similarity, pos_margin=1, neg_margin=0.5
                   (cosine 0.5 = Euclidean distance 1 on the unit sphere, pml's default margin)
multi_similarity   pml MultiSimilarityLoss(alpha=2, beta=50, base=0.5), cosine similarity
proxy_anchor       pml ProxyAnchorLoss(num_classes, embedding_size, margin=0.1, alpha=32)
arcface            pml ArcFaceLoss(num_classes, embedding_size, margin=28.6 deg, scale=64)
ntxent             pml NTXentLoss(temperature=0.07), cosine similarity, positives by label
=================  ======================================================================

Proxy-based losses (proxy_anchor, arcface) own learnable parameters: give them to the optimiser
with :func:`loss_param_groups`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tcmlib.losses.combine import WithTCM, add_tcm
from tcmlib.losses.recall_surrogate import RecallAtKSurrogateLoss
from tcmlib.losses.smooth_ap import SmoothAPLoss

__all__ = ["available_losses", "loss_param_groups", "make_loss"]

_ALIASES = {"rs@k": "recall_surrogate"}
_NAMES = ["arcface", "contrastive", "multi_similarity", "ntxent", "proxy_anchor", "recall_surrogate", "smooth_ap"]
_NEEDS_CLASSES = {"proxy_anchor", "arcface"}

# Learning-rate multiplier for a loss's own parameters, by class name.  ProxyAnchor: x100, as in
# the authors' code (Kim et al., CVPR 2020: proxies at lr * 100) and pml's docs; others: x1.
LR_MULTIPLIERS = {"ProxyAnchorLoss": 100.0}


def available_losses() -> list[str]:
    """Every name :func:`make_loss` accepts, aliases included, sorted."""
    return sorted(_NAMES + list(_ALIASES))


def make_loss(
    name: str,
    *,
    tcm: bool | dict[str, float] = False,
    num_classes: int | None = None,
    embedding_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The base loss ``name`` (see the module table), plus TCM when ``tcm`` is true.

    Args:
        name: one of :func:`available_losses` (case-insensitive).
        tcm: ``False``; ``True`` for ``L_base + L_TCM`` with TCM's defaults; or a dict of TCM
            kwargs (``margin_pos``, ``margin_neg``, ``lambda_pos``, ``lambda_neg``).
        num_classes, embedding_size: required by ``proxy_anchor`` and ``arcface``.
        **kwargs: override the base loss's defaults.

    Returns:
        ``nn.Module`` called as ``loss(embeddings (B, D), labels (B,)) -> 0-dim tensor``.
    """
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in _NAMES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(available_losses())}")
    if key in _NEEDS_CLASSES and (num_classes is None or embedding_size is None):
        raise ValueError(
            f"loss {key!r} learns one vector per class: pass num_classes= (training classes) and "
            f"embedding_size= (D), got num_classes={num_classes}, embedding_size={embedding_size}"
        )
    base: nn.Module
    if key == "smooth_ap":
        base = SmoothAPLoss(**kwargs)
    elif key == "recall_surrogate":
        base = RecallAtKSurrogateLoss(**kwargs)
    else:
        from pytorch_metric_learning import distances, losses  # optional dependency

        if key == "contrastive":
            opts = dict(pos_margin=1.0, neg_margin=0.5, distance=distances.CosineSimilarity())
            base = losses.ContrastiveLoss(**{**opts, **kwargs})
        elif key == "multi_similarity":
            base = losses.MultiSimilarityLoss(**{**dict(alpha=2.0, beta=50.0, base=0.5), **kwargs})
        elif key == "ntxent":
            base = losses.NTXentLoss(**{**dict(temperature=0.07), **kwargs})
        elif key == "proxy_anchor":
            opts = dict(margin=0.1, alpha=32.0)
            base = losses.ProxyAnchorLoss(num_classes, embedding_size, **{**opts, **kwargs})
        else:  # arcface
            opts = dict(margin=28.6, scale=64.0)
            base = losses.ArcFaceLoss(num_classes, embedding_size, **{**opts, **kwargs})
    if tcm is False or tcm is None:
        return base
    if tcm is True:
        return add_tcm(base)
    if isinstance(tcm, dict):
        return add_tcm(base, **tcm)
    raise TypeError(f"tcm must be a bool or a dict of TCM kwargs, got {type(tcm).__name__}")


def loss_param_groups(loss: nn.Module, lr: float, lr_mult: float | None = None) -> list[dict[str, Any]]:
    """Optimiser parameter groups for a loss's own learnable parameters (proxies, class weights).

    Returns ``[{"params": [...], "lr": lr * mult}]`` when ``loss`` (or the base inside a
    :class:`WithTCM`) has trainable parameters, else ``[]``.  ``mult`` is ``lr_mult`` when given,
    else :data:`LR_MULTIPLIERS` (ProxyAnchor x100, as its authors do), else 1.  Usage::

        opt = torch.optim.Adam([{"params": model.parameters(), "lr": lr}, *loss_param_groups(loss, lr)])
    """
    params = [p for p in loss.parameters() if p.requires_grad]
    if not params:
        return []
    base = loss.base if isinstance(loss, WithTCM) else loss
    mult = lr_mult if lr_mult is not None else LR_MULTIPLIERS.get(type(base).__name__, 1.0)
    return [{"params": params, "lr": lr * mult}]
