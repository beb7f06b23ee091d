"""The streamed pass over pairs that every metric of :mod:`tcmlib.metrics` shares.

* :func:`unit_rows`: the unit rows every metric compares (normalised in float64, then cast to the
  working dtype: float64 for float64 input, float32 otherwise), so all metrics see the same cosines.
* :func:`upper_tiles`: the similarity matrix ``S = X X^T`` of one set with itself is symmetric, so
  only its upper triangle is computed, ``chunk_size`` rows by ``TILE_COLS`` columns at a time; each
  tile serves its rows *and* (transposed) its columns.  One pass is half a full GEMM.
* :func:`cross_tiles`: query x gallery, every tile of ``Q G^T`` once (no symmetry to use).
* :class:`TopK`: the exact running top-k of every row, fed by tiles from the row side and from the
  column side; only tiles entries above a row's current k-th best are merged.

Memory: one tile, plus ``O(N k)`` for the running top-k (k = the deepest rank asked for).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["TILE_COLS", "TopK", "cross_tiles", "unit_rows", "upper_tiles"]

TILE_COLS = 4096  # columns per tile: a (1024, 4096) float32 tile stays in cache for the counting ops


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, D) unit rows in the working dtype: ``x / ||x||`` in float64, then float32 (float64 input stays
    float64).  Each row is first scaled by a power of two (exact, as in :func:`tcmlib.normalize.l2_normalize`),
    so rows of norm 1e300 or 1e-300 normalise too; on well-scaled rows this changes no bit."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x64 = x.detach().double()
    m = x64.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)  # (N, 1) max |x|
    f, _ = torch.frexp(m)  # m = f 2^e: scaling by f / m = 2^-e is exact, so the norm cannot over- or underflow
    x64 = x64 * (f / m)
    return (x64 / torch.linalg.vector_norm(x64, dim=1, keepdim=True)).to(work)


def upper_tiles(
    xn: torch.Tensor, chunk_size: int, tile_cols: int = TILE_COLS
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(r0, c0, sim)`` over the upper triangle of ``xn xn^T``, every pair ``a < b`` exactly once.

    ``sim`` (B, W) = cosines of rows ``r0 .. r0+B-1`` with columns ``c0 .. c0+W-1``, ``c0 >= r0``; in the
    first tile of a row block (``c0 == r0``) the pairs with column <= row are set to -inf.  Row blocks
    have ``chunk_size`` rows, tiles ``max(tile_cols, chunk_size)`` columns (the first holds the diagonal
    block).  The tiles on the diagonal come first (with labels sorted, a row's own class lies there, so
    a running top-k fills with good candidates early); the order changes no value.  The caller may
    modify ``sim`` in place.
    """
    n = xn.shape[0]
    chunk_size = min(chunk_size, n)
    tile_cols = max(tile_cols, chunk_size)
    lower = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=xn.device).tril()  # (B, B) col <= row
    blocks = range(0, n, chunk_size)
    order = [(r0, r0) for r0 in blocks] + [(r0, c0) for r0 in blocks for c0 in range(r0 + tile_cols, n, tile_cols)]
    for r0, c0 in order:  # the diagonal tiles first: each row meets its own class (sorted labels) early
        r1 = min(r0 + chunk_size, n)
        sim = xn[r0:r1] @ xn[c0 : c0 + tile_cols].T  # (B, W)
        if c0 == r0:
            sim[:, : r1 - r0].masked_fill_(lower[: r1 - r0, : r1 - r0], float("-inf"))
        yield r0, c0, sim


def cross_tiles(
    qn: torch.Tensor, gn: torch.Tensor, chunk_size: int, tile_cols: int = TILE_COLS
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(r0, c0, sim)``: ``sim`` (B, W) = cosines of queries ``r0..`` with gallery items ``c0..``,
    every query x gallery pair once, in tiles of ``chunk_size`` rows by ``max(tile_cols, chunk_size)`` columns."""
    tile_cols = max(tile_cols, chunk_size)
    for r0 in range(0, qn.shape[0], chunk_size):
        for c0 in range(0, gn.shape[0], tile_cols):
            yield r0, c0, qn[r0 : r0 + chunk_size] @ gn[c0 : c0 + tile_cols].T


class TopK:
    """Exact running top-k of every row of a matrix seen tile by tile: most similar first.

    ``depth`` (N,) ints >= 1, the k of each row; ``row_labels`` (N,) and ``col_labels`` (M,): only
    whether an item is *relevant* (same label as the row) is kept, not its index.  :meth:`add` feeds a
    tile from its rows' side; for a symmetric matrix, :meth:`add` the transposed tile as well (rows and
    columns then index the same set) with ``columns=True``.  An entry enters only when strictly above the row's current
    ``depth``-th best (of equal values the one seen first stays; torch.topk's order among ties is
    unspecified anyway).  So once a row has filled, a tile costs a max per row and a few compares; in
    a row's first tile the bar is raised by :meth:`_seed`.
    """

    GROUP = 8  # a row's first tile: the depth-th largest of its maxima over groups of 8 entries seeds the bar
    DENSE_SHARE = 0.05  # above this share of candidates in a tile, merge with a dense topk

    def __init__(self, depth: torch.Tensor, row_labels: torch.Tensor, col_labels: torch.Tensor, dtype: torch.dtype):
        n = depth.shape[0]
        self.k = int(depth.max())
        dev = row_labels.device
        self.val = torch.full((n, self.k), float("-inf"), dtype=dtype, device=dev)  # (N, k) descending
        self.rel = torch.zeros(n, self.k, dtype=torch.bool, device=dev)  # (N, k) relevant?
        self.kpos = (depth - 1).to(dev)  # (N,) column of the depth-th best
        self.kth = self.val[:, 0].clone()  # (N,) the row's depth-th best so far (-inf until filled)
        self.row_labels, self.col_labels = row_labels, col_labels

    def add(self, r0: int, c0: int, sim: torch.Tensor, *, columns: bool = False) -> None:
        """Merge the tile ``sim`` (B, W) of rows ``r0..r0+B-1`` and columns ``c0..c0+W-1``.

        ``columns=False``: its rows are rows of this top-k (candidates: its columns).  ``columns=True``:
        its columns are (the symmetric side of a tile of ``X X^T``), read without transposing the tile.
        """
        if columns:
            sim, r0, c0 = sim.T, c0, r0  # a view: the work below stays on the row-major memory
        b, w = sim.shape
        kth = self.kth[r0 : r0 + b]
        hot = torch.nonzero(sim.amax(dim=1) > kth).squeeze(1)  # (H,) rows with a new candidate
        if hot.numel() == 0:
            return
        if bool(torch.isinf(kth[hot]).any()):  # a first contact: raise the bar with a cheap lower bound
            kth = kth.clone()
            kth[hot] = torch.maximum(kth[hot], self._seed(sim, hot, r0, columns))
        if 4 * hot.numel() < b:  # few hot rows: compare only those (a gathered copy, grouped by row)
            sub_rows, cols = torch.nonzero(sim[hot] > kth[hot, None], as_tuple=True)  # (P,)
            rows = hot[sub_rows]
        elif columns:  # compare on the row-major tile, then group the candidates by its column
            cols, rows = torch.nonzero(sim.T > kth[None, :], as_tuple=True)  # (P,)
            order = torch.argsort(rows, stable=True)
            rows, cols = rows[order], cols[order]
        else:
            rows, cols = torch.nonzero(sim > kth[:, None], as_tuple=True)  # (P,) candidates, by row
        if rows.numel() > self.DENSE_SHARE * hot.numel() * sim.shape[1]:
            self._dense(hot + r0, sim[hot], c0)
        elif rows.numel():
            self._sparse(r0, c0, sim, rows, cols)

    def _seed(self, sim: torch.Tensor, hot: torch.Tensor, r0: int, columns: bool) -> torch.Tensor:
        """(H,) a value just below a lower bound of each hot row's final depth-th best, from ``sim`` alone.

        The maxima of groups of ``GROUP`` consecutive entries are entries of the row, so the depth-th
        largest of them is at most the row's depth-th largest entry; on data without structure about
        depth entries of the tile lie above it.  The next float below it makes ``>`` accept it.
        """
        gs, h = self.GROUP, hot.numel()
        nb = (sim.shape[1]) // gs  # groups per row
        if nb < self.k:  # too few groups to bound the depth-th best
            return torch.full((h,), float("-inf"), dtype=sim.dtype, device=sim.device)
        every = h == sim.shape[0]  # all rows hot: work on views, no gathered copy
        if columns:  # sim is the transposed view of a row-major tile t: group t's rows, per hot column
            t = sim.T[: nb * gs] if every else sim.T[: nb * gs, hot]  # (nb * gs, H)
            gm = t.reshape(nb, gs, h).amax(dim=1).T.contiguous()  # (H, nb)
        else:
            t = sim[:, : nb * gs] if every else sim[hot, : nb * gs]  # (H, nb * gs)
            gm = t.reshape(h, nb, gs).amax(dim=2)  # (H, nb)
        top = gm.topk(self.k, dim=1).values  # (H, k)
        bound = top.gather(1, self.kpos[hot + r0, None]).squeeze(1)  # (H,)
        return torch.nextafter(bound, bound.new_tensor(float("-inf")))

    def _dense(self, g: torch.Tensor, sub: torch.Tensor, c0: int) -> None:
        """Merge all of ``sub`` (H, W), rows ``g`` (H,), columns ``c0..``: a topk per row first."""
        top = sub.contiguous().topk(min(self.k, sub.shape[1]), dim=1)  # (H, k')
        rel = self.col_labels[top.indices + c0] == self.row_labels[g, None]
        self._merge(g, top.values, rel)

    def _sparse(self, r0: int, c0: int, sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Merge the candidates ``sim[rows, cols]`` (P,), ``rows`` ascending, padded into one block per row."""
        counts = torch.bincount(rows, minlength=sim.shape[0])  # (B,) candidates per row
        has = counts > 0
        g = torch.nonzero(has).squeeze(1)  # (H',) rows with candidates
        h, width = g.numel(), int(counts.max())
        slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
        at = (torch.cumsum(has, 0) - 1)[rows] * width + slot  # (P,) place in an (H', width) block, -inf padded
        vals = sim.new_full((h * width,), float("-inf")).index_copy_(0, at, sim[rows, cols])
        rel = torch.zeros(h * width, dtype=torch.bool, device=sim.device)
        rel.index_copy_(0, at, self.col_labels.index_select(0, cols + c0) == self.row_labels.index_select(0, rows + r0))
        self._merge(g + r0, vals.view(h, width), rel.view(h, width))

    def _merge(self, g: torch.Tensor, vals: torch.Tensor, rel: torch.Tensor) -> None:
        """Merge candidates ``vals`` / ``rel`` (H, c) of rows ``g`` (H,) into the buffers."""
        cand_v = torch.cat([self.val[g], vals], dim=1)  # (H, k + c); the buffer first: it wins ties
        cand_r = torch.cat([self.rel[g], rel], dim=1)
        top = cand_v.topk(self.k, dim=1)  # sorted, most similar first
        self.val[g] = top.values
        self.rel[g] = cand_r.gather(1, top.indices)
        self.kth[g] = top.values.gather(1, self.kpos[g, None]).squeeze(1)
