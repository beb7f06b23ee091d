"""L2 normalisation of rows that cannot overflow or underflow.

``F.normalize`` squares the entries: in float32 a row of norm ~1e20 overflows to ``inf`` (the row
becomes 0) and a row of norm below its ``eps = 1e-12`` is divided by ``eps``, not by its norm (the
cosine turns into a raw dot product).  :func:`l2_normalize` first multiplies each row by a power of
two that brings its largest entry into [0.5, 1).  A power of two is exact, so on well-scaled data
the result *and* its autograd gradient are bit-identical to ``F.normalize``'s; it only changes
rows that ``F.normalize`` gets wrong.  Every loss, metric and model head of ``tcmlib`` uses it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["l2_normalize"]


def l2_normalize(x: Tensor, dim: int = 1) -> Tensor:
    """``x / ||x||`` along ``dim``, e.g. ``(N, D)`` rows -> ``(N, D)`` unit rows, at any scale.

    Each slice is scaled by ``2^-e`` (``e`` from ``torch.frexp`` of its max ``|x|``, detached and
    clamped to the normal range of ``x.dtype``), then passed to ``F.normalize``.  A zero slice
    stays zero, as with ``F.normalize``.  Same dtype, shape and device as ``x``; differentiable.
    """
    fi = torch.finfo(x.dtype)
    lo, hi = math.ceil(math.log2(fi.tiny)), math.floor(math.log2(fi.max))  # normal powers of two
    with torch.no_grad():
        _, e = torch.frexp(x.abs().amax(dim=dim, keepdim=True))  # max |x| = f 2^e, f in [0.5, 1)
        k = (-e.long()).clamp(lo, hi)
        scale = ((k + 1023) << 52).view(torch.float64).to(x.dtype)  # exactly 2^k, from its bits
    return F.normalize(x * scale, dim=dim)
