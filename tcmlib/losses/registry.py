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

import inspect
from typing import Any

import torch
from torch import nn

from tcmlib._checks import check_embeddings, check_labels

from tcmlib.losses._names import PML_NAMES
from tcmlib.losses.combine import WithTCM, add_tcm
from tcmlib.losses.recall_surrogate import RecallAtKSurrogateLoss
from tcmlib.losses.smooth_ap import SmoothAPLoss

__all__ = ["available_losses", "loss_kwarg_names", "loss_param_groups", "make_loss"]

_ALIASES = {"rs@k": "recall_surrogate"}
_NAMES = ["arcface", "contrastive", "multi_similarity", "ntxent", "proxy_anchor", "recall_surrogate", "smooth_ap"]
_NEEDS_CLASSES = {"proxy_anchor", "arcface"}
_TCM_OPTIONS = {"margin_pos", "margin_neg", "lambda_pos", "lambda_neg"}

# Learning-rate multiplier for a loss's own parameters, by class name.  ProxyAnchor: x100, as in
# the authors' code (Kim et al., CVPR 2020: proxies at lr * 100) and pml's docs; others: x1.
LR_MULTIPLIERS = {"ProxyAnchorLoss": 100.0}


def available_losses() -> list[str]:
    """Every name :func:`make_loss` accepts, aliases included, sorted."""
    return sorted(_NAMES + list(_ALIASES))


def _canonical(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"loss name must be a string, got {type(name).__name__} {name!r}; "
                        f"valid names: {', '.join(available_losses())}")
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in _NAMES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(available_losses())}")
    return key


def _loss_class(key: str) -> type:
    if key == "smooth_ap":
        return SmoothAPLoss
    if key == "recall_surrogate":
        return RecallAtKSurrogateLoss
    from pytorch_metric_learning import losses  # optional dependency

    return {"contrastive": losses.ContrastiveLoss, "multi_similarity": losses.MultiSimilarityLoss,
            "ntxent": losses.NTXentLoss, "proxy_anchor": losses.ProxyAnchorLoss, "arcface": losses.ArcFaceLoss}[key]


def loss_kwarg_names(name: str) -> set[str]:
    """The keyword arguments the base loss ``name`` accepts in ``make_loss(name, **kwargs)``.

    Read from the ``__init__`` signatures along the loss class's MRO (pml passes ``**kwargs`` up to its
    base classes); ``num_classes`` / ``embedding_size`` are excluded (``make_loss`` passes them itself).
    """
    cls = _loss_class(_canonical(name))
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names.update(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self")
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names - {"num_classes", "embedding_size", "mat_based_loss"}


def _check_pml_input(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook on a pml loss: the checks tcmlib's own losses make, before pml sees the input.

    Calling convention kept: ``(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``.
    Validates only; the inputs go on unchanged.
    """
    names = ("embeddings", "labels", "indices_tuple", "ref_emb", "ref_labels")
    bound = dict(zip(names, args)) | kwargs
    name = type(module).__name__
    if "embeddings" not in bound:
        raise ValueError(f"{name}: call it as loss(embeddings (B, D), labels (B,), ...)")
    emb = bound["embeddings"]
    if not isinstance(emb, torch.Tensor):
        raise TypeError(f"{name}: embeddings must be a torch.Tensor, got {type(emb).__name__}")
    check_embeddings(emb, f"{name} embeddings", allow_zero_rows=True)
    labels = bound.get("labels")
    n_classes = getattr(module, "num_classes", None)
    for lab, e, lname, ename in ((labels, emb, "labels", "embeddings"),
                                 (bound.get("ref_labels"), bound.get("ref_emb"), "ref_labels", "ref_emb")):
        if e is not None and ename == "ref_emb":
            if not isinstance(e, torch.Tensor):
                raise TypeError(f"{name}: ref_emb must be a torch.Tensor, got {type(e).__name__}")
            check_embeddings(e, f"{name} ref_emb", allow_zero_rows=True)
            if e.shape[1] != emb.shape[1]:
                raise ValueError(f"{name}: ref_emb has dimension {e.shape[1]} but embeddings {emb.shape[1]}")
        if lab is None:
            if lname == "labels" and n_classes is not None:
                raise ValueError(f"{name} needs labels (one class id per embedding row)")
            continue
        if e is None:
            raise ValueError(f"{name}: {lname} given without {ename}")
        y = check_labels(lab, e.shape[0], f"{name} {lname}", ename)
        if n_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise ValueError(
                f"{name} {lname} must lie in [0, {n_classes - 1}] (num_classes = {n_classes}: one learnt "
                f"vector per class), got values in [{int(y.min())}, {int(y.max())}]; remap the labels to "
                "0..num_classes-1 or build the loss with the right num_classes")


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
            kwargs (``margin_pos``, ``margin_neg``, ``lambda_pos``, ``lambda_neg``, or pml's names
            ``margin_plus``, ``margin_minus``, ``lambda_plus``, ``lambda_minus``).
        num_classes, embedding_size: required by ``proxy_anchor`` and ``arcface``.
        **kwargs: override the base loss's defaults.

    Returns:
        ``nn.Module`` called as ``loss(embeddings (B, D), labels (B,)) -> 0-dim tensor``.
    """
    key = _canonical(name)
    unknown = sorted(set(kwargs) - loss_kwarg_names(key))
    if unknown:
        raise ValueError(f"loss {key!r} has no option(s) {unknown}; valid: {', '.join(sorted(loss_kwarg_names(key)))}")
    if key in _NEEDS_CLASSES and (num_classes is None or embedding_size is None):
        raise ValueError(
            f"loss {key!r} learns one vector per class: pass num_classes= (training classes) and "
            f"embedding_size= (D), got num_classes={num_classes}, embedding_size={embedding_size}"
        )
    if key in _NEEDS_CLASSES:
        for arg, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"loss {key!r}: {arg} must be a positive int, got {value!r}")
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
        base.register_forward_pre_hook(_check_pml_input, with_kwargs=True)
    if tcm is False or tcm is None:
        return base
    if tcm is True:
        return add_tcm(base)
    if isinstance(tcm, dict):
        unknown_tcm = sorted(set(tcm) - _TCM_OPTIONS - set(PML_NAMES))
        if unknown_tcm:
            raise ValueError(f"tcm has no option(s) {unknown_tcm}; valid: {', '.join(sorted(_TCM_OPTIONS))} "
                             f"(or pml's names {', '.join(PML_NAMES)})")
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
