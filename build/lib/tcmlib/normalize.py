"""L2 normalisation of rows that cannot overflow or underflow.

``F.normalize`` squares the entries: in float32 a row of norm ~1e20 overflows to ``inf`` (the row
becomes 0) and a row of norm below its ``eps = 1e-12`` is divided by ``eps``, not by its norm (the
cosine turns into a raw dot product).  :func:`l2_normalize` first multiplies each row by a power of
two that brings its largest entry into [0.5, 1).  A power of two is exact, so on well-scaled data
the result *and* its autograd gradient are bit-identical to ``F.normalize``'s; it only changes
rows that ``F.normalize`` gets wrong.  Every loss, metric and model head of ``tcmlib`` uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["l2_normalize"]


def l2_normalize(x: Tensor, dim: int = 1) -> Tensor:
    """``x / ||x||`` along ``dim``, e.g. ``(N, D)`` rows -> ``(N, D)`` unit rows, at any scale.

    Each slice is multiplied by ``f / m = 2^-e`` where ``m = f 2^e`` (``torch.frexp``, f in
    [0.5, 1)) is its max ``|x|``, detached and clamped below at the smallest normal number of
    ``x.dtype`` (so 2^-e stays finite).  The quotient of two floats that is a representable power
    of two is computed exactly.  A zero slice stays zero, as with ``F.normalize``.  Same dtype,
    shape and device as ``x``; differentiable.
    """
    m = x.detach().abs().amax(dim=dim, keepdim=True)  # max |x|
    m = m.clamp(min=torch.finfo(x.dtype).tiny)
    f, _ = torch.frexp(m)  # m = f 2^e
    return F.normalize(x * (f / m), dim=dim)
