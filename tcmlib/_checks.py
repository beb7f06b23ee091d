"""Input validation shared by losses and metrics: bad input raises ``ValueError``, never a number.

Every public function of ``tcmlib`` that takes embeddings and labels calls
:func:`check_embeddings_labels` first.  Messages say what is wrong and what to do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["as_tensor", "check_embeddings", "check_labels", "check_embeddings_labels", "check_margin"]


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """Return ``x`` as a tensor (NumPy arrays and lists are converted, tensors passed through)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (np.ndarray, list, tuple)):
        arr = np.asarray(x)
        if arr.dtype.kind not in "biufc":  # strings, objects, dates: no tensor of numbers
            raise ValueError(f"{name} must hold numbers, got a numpy array of dtype {arr.dtype} "
                             f"(e.g. {arr.ravel()[:1].tolist()}); map class names to integer ids first")
        return torch.as_tensor(arr)
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def check_embeddings(embeddings: Any, name: str = "embeddings", *, allow_zero_rows: bool = False) -> torch.Tensor:
    """Check an ``(N, D)`` floating tensor of finite values with non-zero rows; return it as a tensor."""
    x = as_tensor(embeddings, name)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}; "
            "flatten or stack your vectors into one row per sample"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one sample of dimension >= 1")
    if torch.is_complex(x):
        raise ValueError(f"{name} is complex (dtype {x.dtype}); embeddings must be real: pass x.real, x.abs() "
                         "or torch.view_as_real(x).flatten(1), whichever your model means")
    if not torch.is_floating_point(x):
        x = x.float()
    # one read of the device for both checks: [all finite, number of all-zero rows]
    finite = torch.isfinite(x).all()
    flags = (finite, (x.detach().abs().sum(dim=1) == 0).sum()) if not allow_zero_rows else (finite,)
    all_finite, *zero_rows = torch.stack([f.long() for f in flags]).tolist()
    if not all_finite:
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(
            f"{name} contains NaN or inf in {bad} of {x.shape[0]} rows; "
            "check the model output (a diverged run or a bad input image)"
        )
    if not allow_zero_rows:
        zero = zero_rows[0]
        if zero:
            raise ValueError(
                f"{name} has {zero} all-zero rows; cosine similarity is undefined for a zero vector: "
                "drop those samples or fix the embedder"
            )
    return x


def check_labels(labels: Any, n: int, name: str = "labels", emb_name: str = "embeddings") -> torch.Tensor:
    """Check a 1-D integer label tensor of length ``n``; return it as a ``long`` tensor."""
    y = as_tensor(labels, name)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(y.shape)}; pass one integer label per sample")
    if y.shape[0] != n:
        raise ValueError(
            f"{name} has {y.shape[0]} entries but {emb_name} has {n} rows; "
            "pass exactly one label per embedding row"
        )
    if torch.is_floating_point(y) or torch.is_complex(y) or y.dtype == torch.bool:
        if torch.is_floating_point(y) and bool((y == y.round()).all()) and bool(torch.isfinite(y).all()):
            return y.long()
        raise ValueError(f"{name} must hold integer class ids, got dtype {y.dtype}")
    return y.long()


def check_embeddings_labels(
    embeddings: Any, labels: Any, *, emb_name: str = "embeddings", label_name: str = "labels",
    allow_zero_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a pair ``(N, D)`` embeddings and ``(N,)`` labels; return both as tensors on the embeddings' device."""
    x = check_embeddings(embeddings, emb_name, allow_zero_rows=allow_zero_rows)
    y = check_labels(labels, x.shape[0], label_name, emb_name)
    return x, y.to(x.device)


def check_margin(value: float, name: str) -> float:
    """A cosine margin must lie in [-1, 1] (cosine similarities cannot leave that interval)."""
    v = float(value)
    if not -1.0 <= v <= 1.0:
        raise ValueError(f"{name} = {value} is outside [-1, 1]; margins are cosine similarities")
    return v
