"""Recall@k surrogate, RS@k (Patel, Tolias, Matas, CVPR 2022), label-based, in O(B^2) memory.

For a batch of ``B`` L2-normalised embeddings and a query ``q`` with positives ``P_q`` (same
label, ``q`` excluded), ``s_j = <x_q, x_j>``, as the authors' code computes it
(yash0307/RecallatK_surrogate ``src/losses.py``)::

    sigma_t(x) = 1 / (1 + exp(clamp(-x / t, -50, 50)))
    r_i    = 1 + sum_{j != i} sigma_tau1(s_j - s_i)        i in P_q, j over the whole batch  (Eq. 6)
    rho_k  = min(sum_{i in P_q} sigma_tau2(k - r_i), k) / min(k, |P_q|)                     (Eq. 7)
    L      = mean_q (1 - mean_{k in K} rho_k)              K = {min(k, B) : k in ks}

``tau1 = 0.01``, ``tau2 = 1`` (the authors' current code; before Nov 2024 it used ``tau2 = k``).
Only ``j = i`` is masked, so the query itself (similarity 1, the largest) is counted in ``r_i``:
``r_i`` is about the true rank of ``i`` among the other samples *plus one*.  We keep this default.
Clipped ``k`` values may repeat (``B = 4``: K = 1, 2, 4, 4, 4) and are kept, as in the original.

Differences from the authors' code, none of which changes the value on their layout
(class-sorted, equal class sizes, L2-normalised inputs):

* Positives come from ``labels``; a query with no other sample of its class has no ``rho_k``
  (the original divides by zero) and is left out of the mean; if no query has a positive the
  loss is ``0`` (still attached to the graph).
* The embeddings are L2-normalised here (the original's network does it).
* Memory: ``(c, P, B)`` per chunk of ``c`` queries, each chunk checkpointed: ``O(B^2 + c P B)``.

SiMix (``simix=True``, the paper's Sec. 3.3): within each class of ``m >= 2`` samples, every
one of the ``C(m, 2)`` pairs ``(a, b)`` gives a virtual sample ``alpha x_a + (1 - alpha) x_b``
with ``alpha ~ U(0, 1)`` per pair, *not* re-normalised (the original supports ``m`` in
{3, 4, 6}; any ``m`` works here).  Virtual samples are extra positives of their class, extra
items to rank and extra queries; ``K`` is still clipped with the real batch size ``B``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tcmlib._checks import check_embeddings_labels
from tcmlib.losses.pml_compat import check_labels_given, check_reducer, check_whole_batch, reduce_per_query
from tcmlib.normalize import l2_normalize

__all__ = ["RecallAtKSurrogateLoss", "recall_surrogate_loss", "simix_samples"]

# Auto chunk size: about this many elements in each (c, P, B) intermediate (16 MiB in float32).
_CHUNK_ELEMENTS = 2**22


def simix_samples(
    embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiMix: append ``alpha x_a + (1 - alpha) x_b`` for every same-class pair ``a < b``.

    embeddings: (B, D), labels: (B,).  Returns (B + V, D) and (B + V,), ``V = sum_c C(m_c, 2)``;
    the first ``B`` rows are the inputs unchanged.  ``alpha ~ U(0, 1)`` from ``generator``.
    """
    same = labels[:, None] == labels[None, :]                         # (B, B)
    a, b = torch.triu(same, diagonal=1).nonzero(as_tuple=True)        # (V,), (V,) pairs a < b
    alpha = torch.rand(a.numel(), 1, generator=generator, device="cpu").to(embeddings)  # (V, 1)
    virtual = alpha * embeddings[a] + (1.0 - alpha) * embeddings[b]   # (V, D)
    return torch.cat([embeddings, virtual]), torch.cat([labels, labels[a]])


def _positives_table(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the indices of the *other* samples with its label, padded.

    labels: (B,) long.  Returns ``pos_idx`` (B, P) long and ``valid`` (B, P) bool, ``P`` = size
    of the largest class; row ``q`` lists its class in batch order with ``q`` itself and the
    padding marked invalid (index 0).
    """
    order = torch.argsort(labels, stable=True)                        # (B,) class-sorted positions
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts                         # (C,) first slot of each class
    slot = torch.arange(int(counts.max()), device=labels.device)      # (P,)
    valid = slot[None, :] < counts[inverse][:, None]                  # (B, P)
    pos_idx = order[(starts[inverse][:, None] + slot[None, :]).clamp(max=labels.numel() - 1)]
    valid &= pos_idx != torch.arange(labels.numel(), device=labels.device)[:, None]  # q not in P_q
    return pos_idx.masked_fill(~valid, 0), valid                      # (B, P), (B, P)


def _rs_chunk(
    sim_q: torch.Tensor, pos_idx: torch.Tensor, valid: torch.Tensor, ks: torch.Tensor,
    tau1: float, tau2: float,
) -> torch.Tensor:
    """``1 - mean_k rho_k`` for ``c`` queries: sim_q (c, B), pos_idx/valid (c, P), ks (K,) -> (c,)."""
    c, b = sim_q.shape
    s_i = sim_q.gather(1, pos_idx)                                    # (c, P)    s_i, i in P_q
    diff = sim_q[:, None, :] - s_i[:, :, None]                        # (c, P, B) s_j - s_i
    sg = torch.sigmoid((diff / tau1).clamp(-50.0, 50.0))              # (c, P, B)
    j_is_i = torch.arange(b, device=sim_q.device)[None, None, :] == pos_idx[:, :, None]
    r = 1.0 + sg.masked_fill(j_is_i, 0.0).sum(-1)                     # (c, P)    r_i
    hit = torch.sigmoid(((ks - r[:, :, None]) / tau2).clamp(-50.0, 50.0))  # (c, P, K) sigma(k - r_i)
    hits = (hit * valid[:, :, None]).sum(1)                           # (c, K)
    n_pos = valid.sum(1, keepdim=True).to(ks)                         # (c, 1)    |P_q|
    rho = torch.minimum(hits, ks) / torch.minimum(ks, n_pos)          # (c, K)    rho_k
    return 1.0 - rho.mean(1)                                          # (c,)


def recall_surrogate_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    tau1: float = 0.01,
    tau2: float = 1.0,
    simix: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """RS@k loss ``mean_q (1 - mean_k rho_k)`` (Patel, Tolias, Matas, CVPR 2022); see the module doc.

    Args:
        embeddings: (B, D) floating; L2-normalised here.
        labels: (B,) integer class ids; positives of ``q`` = same label, ``q`` excluded.
        ks: the k of Recall@k, positive ints, each clipped to ``min(k, B)``.
        tau1: rank-sigmoid temperature > 0.  tau2: recall-sigmoid temperature > 0.
        simix: add SiMix virtual samples (uses ``generator`` for ``alpha``).
        chunk_size: queries per chunk; ``None`` picks one with ~4M elements per intermediate.

    Returns:
        Scalar tensor, differentiable w.r.t. ``embeddings``; computed in float32 (float64 for float64
        input), also inside a caller's ``torch.autocast`` (disabled here).
    """
    losses, queries, x, y, sim = _per_query(embeddings, labels, ks, tau1, tau2, simix, generator, chunk_size)
    if queries.numel() == 0:
        return sim.sum() * 0.0                                        # no positive pair: loss 0
    return losses.mean()                                              # scalar


def _per_query(
    embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], tau1: float, tau2: float,
    simix: bool, generator: torch.Generator | None, chunk_size: int | None,
) -> tuple[torch.Tensor, ...]:
    """Checked input -> ``(losses (Q,), queries (Q,), x (B', D), labels (B',), sim (B', B'))``.

    ``queries``: the rows of ``x`` (SiMix samples after the batch) with a positive; ``losses``
    their ``1 - mean_k rho_k``.  ``Q = 0``: both empty.
    """
    x, y = check_embeddings_labels(embeddings, labels)
    if not tau1 > 0 or not tau2 > 0:
        raise ValueError(f"tau1 and tau2 must be > 0, got tau1={tau1}, tau2={tau2}")
    if len(ks) == 0 or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()                                                 # rank sums need > 8 bits
    with torch.autocast(x.device.type, enabled=False):                # float32 inside a caller's autocast too
        k_vals = torch.tensor([min(int(k), x.shape[0]) for k in ks], dtype=x.dtype, device=x.device)  # (K,)
        x = l2_normalize(x, dim=1)                                    # (B, D)
        if simix:
            x, y = simix_samples(x, y, generator)                     # (B + V, D), (B + V,)
        sim = x @ x.T                                                 # (B', B')
        pos_idx, valid = _positives_table(y)                          # (B', P), (B', P)
        queries = valid.any(1).nonzero().squeeze(1)                   # (Q,) queries with |P_q| >= 1
        if queries.numel() == 0:
            return sim.new_zeros(0), queries, x, y, sim
        b, p = pos_idx.shape
        c = chunk_size or max(1, _CHUNK_ELEMENTS // (p * b))
        losses = []
        for q0 in range(0, queries.numel(), c):
            qs = queries[q0:q0 + c]                                   # (c,)
            args = (sim[qs], pos_idx[qs], valid[qs], k_vals, float(tau1), float(tau2))
            if c < queries.numel() and torch.is_grad_enabled() and sim.requires_grad:
                losses.append(checkpoint(_rs_chunk, *args, use_reentrant=False))  # recompute in backward
            else:
                losses.append(_rs_chunk(*args))
        return torch.cat(losses), queries, x, y, sim                  # (Q,), (Q,), (B', D), (B',), (B', B')


class RecallAtKSurrogateLoss(nn.Module):
    """Module form of :func:`recall_surrogate_loss`: ``RecallAtKSurrogateLoss()(emb (B, D), labels (B,))``.

    ``forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``, pml's calling
    convention, so it goes into pml's ``MultipleLosses``.  Recall@k ranks the whole batch for every
    query, so a miner's ``indices_tuple``, a separate reference set or ``labels=None`` raise
    ``ValueError``.

    ``reducer``: optional pml reducer of the per-query losses ``1 - mean_k rho_k`` of the queries
    with a positive (an ``"element"`` reduction whose indices are those queries' rows, SiMix rows
    after the batch's); ``None`` (default) is their mean, :func:`recall_surrogate_loss`.
    ``DoNothingReducer()`` returns pml's dict of the per-query losses.
    """

    def __init__(
        self,
        ks: Sequence[int] = (1, 2, 4, 8, 16),
        tau1: float = 0.01,
        tau2: float = 1.0,
        simix: bool = False,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        reducer: Any = None,
    ) -> None:
        super().__init__()
        if not tau1 > 0 or not tau2 > 0:
            raise ValueError(f"tau1 and tau2 must be > 0, got tau1={tau1}, tau2={tau2}")
        if len(ks) == 0 or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
            raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
        self.ks = tuple(int(k) for k in ks)
        self.tau1, self.tau2 = float(tau1), float(tau2)
        self.simix = simix
        self.generator = generator
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
            return recall_surrogate_loss(
                embeddings, labels, ks=self.ks, tau1=self.tau1, tau2=self.tau2,
                simix=self.simix, generator=self.generator, chunk_size=self.chunk_size,
            )
        losses, queries, x, y, _ = _per_query(embeddings, labels, self.ks, self.tau1, self.tau2,
                                              self.simix, self.generator, self.chunk_size)
        return reduce_per_query(self.reducer, losses, queries, x, y)

    def extra_repr(self) -> str:
        return f"ks={self.ks}, tau1={self.tau1}, tau2={self.tau2}, simix={self.simix}"
