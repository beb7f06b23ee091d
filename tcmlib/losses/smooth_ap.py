"""Smooth-AP (Brown, Xie, Kalogeiton, Zisserman, ECCV 2020), label-based, in O(B^2) memory.

For a batch of ``B`` L2-normalised embeddings with similarities ``s = X X^T`` and a query ``q``
whose positive set ``P_q`` holds every sample with the label of ``q`` (*including q itself*, as
in the authors' code, Andrew-Brown1/Smooth_AP ``src/Smooth_AP_loss.py``)::

    sigma(x)  = 1 / (1 + exp(clamp(-x / tau, -50, 50)))                     tau = 0.01
    R_all(q,i) = 1 + sum_{j != i, j in batch} sigma(s_qj - s_qi)              (paper Eq. 9)
    R_pos(q,i) = 1 + sum_{j != i, j in P_q}   sigma(s_qj - s_qi)
    AP_q       = (1 / |P_q|) sum_{i in P_q} R_pos(q,i) / R_all(q,i)           (paper Eq. 10)
    L          = 1 - mean_q AP_q

Differences from the authors' code, none of which changes the value on their batch layout
(class-sorted, equal class sizes, L2-normalised inputs):

* Positives come from ``labels``, not from the position in the batch, so any order and any
  class sizes work.
* The embeddings are L2-normalised here (the original assumes the network already did it).
* Memory: the original builds ``(B, B, B)`` tensors.  Only ``i in P_q`` is ever needed, so we
  build ``(c, P, B)`` per chunk of ``c`` queries (``P`` = largest class in the batch) and wrap
  each chunk in ``torch.utils.checkpoint`` so backward does not keep every chunk's
  intermediates: peak memory is ``O(B^2 + c P B)`` and the work ``O(B^2 P)`` instead of ``B^3``.

pytorch-metric-learning 2.9's ``SmoothAPLoss`` takes consecutive blocks of ``C`` = #classes
samples as the positive sets instead of the ``m`` samples of each class, so it matches the
original only when ``C == m`` (``tests/test_smooth_ap.py::test_pml_groups_by_position``).

A query alone in its class has ``P_q = {q}``: ``R_pos = 1`` and ``R_all = 1 + sum_j
sigma(s_qj - 1) ~ 1``, so ``AP_q ~ 1`` and it adds almost nothing to the loss or its gradient
but still counts in the mean (the original's behaviour; kept).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tcmlib._checks import check_embeddings_labels
from tcmlib.losses.pml_compat import check_labels_given, check_reducer, check_whole_batch, reduce_per_query
from tcmlib.normalize import l2_normalize

__all__ = ["SmoothAPLoss", "smooth_ap_loss"]

# Auto chunk size: about this many elements in each (c, P, B) intermediate (16 MiB in float32).
_CHUNK_ELEMENTS = 2**22


def _positives_table(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the indices of every sample with its label (itself included), padded.

    labels: (B,) long.  Returns ``pos_idx`` (B, P) long and ``valid`` (B, P) bool, where ``P`` is
    the size of the largest class; row ``q`` lists ``P_q`` in batch order, then padding (index 0,
    ``valid`` False).
    """
    order = torch.argsort(labels, stable=True)                        # (B,) class-sorted positions
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts                         # (C,) first slot of each class
    slot = torch.arange(int(counts.max()), device=labels.device)      # (P,)
    valid = slot[None, :] < counts[inverse][:, None]                  # (B, P)
    pos_idx = order[(starts[inverse][:, None] + slot[None, :]).clamp(max=labels.numel() - 1)]
    return pos_idx.masked_fill(~valid, 0), valid                      # (B, P), (B, P)


def _smooth_ap_chunk(
    sim_q: torch.Tensor, pos_idx: torch.Tensor, valid: torch.Tensor, temperature: float
) -> torch.Tensor:
    """AP_q for a chunk of ``c`` queries: sim_q (c, B) rows of ``s``, pos_idx/valid (c, P) -> (c,)."""
    c, b = sim_q.shape
    s_i = sim_q.gather(1, pos_idx)                                    # (c, P)    s_qi, i in P_q
    diff = sim_q[:, None, :] - s_i[:, :, None]                        # (c, P, B) s_qj - s_qi
    sg = torch.sigmoid((diff / temperature).clamp(-50.0, 50.0))       # (c, P, B)
    j_is_i = torch.arange(b, device=sim_q.device)[None, None, :] == pos_idx[:, :, None]
    sg = sg.masked_fill(j_is_i, 0.0)                                  # (c, P, B) drop j = i
    r_all = 1.0 + sg.sum(-1)                                          # (c, P)    R_all(q, i)
    sg_pos = sg.gather(2, pos_idx[:, None, :].expand(-1, pos_idx.shape[1], -1))  # (c, P, P) j in P_q
    r_pos = 1.0 + (sg_pos * valid[:, None, :]).sum(-1)                # (c, P)    R_pos(q, i)
    ratio = (r_pos / r_all) * valid                                   # (c, P)
    return ratio.sum(1) / valid.sum(1)                                # (c,)      AP_q


def smooth_ap_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.01,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Smooth-AP loss ``1 - mean_q AP_q`` (Brown et al., ECCV 2020, Eqs. 9-10); see the module doc.

    Args:
        embeddings: (B, D) floating; L2-normalised here.
        labels: (B,) integer class ids; positives of ``q`` = same label, ``q`` included.
        temperature: sigmoid temperature ``tau`` > 0 (0.01 in the paper).
        chunk_size: queries per chunk; ``None`` picks one with ~4M elements per intermediate.

    Returns:
        Scalar tensor in ``[0, 1)``, differentiable w.r.t. ``embeddings``; computed in float32 (float64
        for float64 input), also inside a caller's ``torch.autocast`` (disabled here).
    """
    ap, _, _ = _average_precisions(embeddings, labels, temperature, chunk_size)
    return 1.0 - ap.mean()                                            # scalar


def _average_precisions(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float, chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked input -> ``(AP_q (B,), x (B, D) normalised, labels (B,) long)``."""
    x, y = check_embeddings_labels(embeddings, labels)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()                                                 # rank sums need > 8 bits
    with torch.autocast(x.device.type, enabled=False):                # float32 inside a caller's autocast too
        x = l2_normalize(x, dim=1)                                    # (B, D)
        sim = x @ x.T                                                 # (B, B)
        pos_idx, valid = _positives_table(y)                          # (B, P), (B, P)
        b, p = pos_idx.shape
        c = chunk_size or max(1, _CHUNK_ELEMENTS // (p * b))
        aps = []
        for q0 in range(0, b, c):
            args = (sim[q0:q0 + c], pos_idx[q0:q0 + c], valid[q0:q0 + c], float(temperature))
            if c < b and torch.is_grad_enabled() and sim.requires_grad:  # recompute chunk in backward
                aps.append(checkpoint(_smooth_ap_chunk, *args, use_reentrant=False))
            else:
                aps.append(_smooth_ap_chunk(*args))
        return torch.cat(aps), x, y                                   # (B,), (B, D), (B,)


class SmoothAPLoss(nn.Module):
    """Module form of :func:`smooth_ap_loss`: ``loss = SmoothAPLoss()(embeddings (B, D), labels (B,))``.

    ``forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``, pml's calling
    convention, so it goes into pml's ``MultipleLosses``.  AP ranks the whole batch for every query,
    so a miner's ``indices_tuple``, a separate reference set or ``labels=None`` raise ``ValueError``
    (in ``MultipleLosses`` give this loss no miner; ``DistributedLossWrapper`` with ``efficient=False``).

    ``reducer``: optional pml reducer of the per-query losses ``1 - AP_q`` (B,), an ``"element"``
    reduction named ``"ap_loss"``, as pml's ``SmoothAPLoss`` hands its reducer; ``None`` (default)
    is their mean, :func:`smooth_ap_loss`; e.g. ``reducers.ThresholdReducer(low=0.1)`` averages the
    queries whose loss exceeds 0.1.  ``DoNothingReducer()`` returns pml's dict of the ``(B,)`` losses.
    """

    def __init__(self, temperature: float = 0.01, chunk_size: int | None = None, reducer: Any = None) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.reducer = check_reducer(type(self).__name__, reducer)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: Any = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """pml's calling convention; a miner's pairs or a separate reference set raise (see module doc)."""
        labels = check_labels_given(type(self).__name__, labels)
        check_whole_batch(type(self).__name__, embeddings, indices_tuple, ref_emb, ref_labels)
        if self.reducer is None:
            return smooth_ap_loss(embeddings, labels, temperature=self.temperature,
                                  chunk_size=self.chunk_size)
        ap, x, y = _average_precisions(embeddings, labels, self.temperature, self.chunk_size)
        queries = torch.arange(ap.numel(), device=ap.device)              # (B,)
        return reduce_per_query(self.reducer, 1.0 - ap, queries, x, y, name="ap_loss")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, chunk_size={self.chunk_size}"
