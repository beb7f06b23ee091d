"""The streamed pass over pairs that every metric of :mod:`tcmlib.metrics` shares.

* :func:`unit_rows`: the unit rows every metric compares (normalised in float64, then cast to the
  working dtype: float64 for float64 input, float32 otherwise), so all metrics see the same cosines.
* :func:`upper_tiles`: the similarity matrix ``S = X X^T`` of one set with itself is symmetric, so
  only its upper triangle is computed: the square blocks on the diagonal, then ``chunk_size`` rows by
  ``TILE_COLS`` columns at a time; each tile serves its rows *and* (transposed) its columns.  One pass
  is half a full GEMM.
* :func:`cross_tiles`: query x gallery, every tile of ``Q G^T`` once (no symmetry to use).
* :func:`pair_tiles`: the one loop every streamed metric runs, ``for tile in pair_tiles(...)``, each
  :class:`Tile` fed to named consumers (``add(tile)``, then ``result()``).
* :class:`TopK` (the CPU): the exact running top-k of every row, fed by tiles from the row side and
  from the column side; a tile is screened by the maxima of small cells, and only the entries above a
  row's current k-th best are kept (merged when a row's pending buffer fills).  It reads counts back
  from the device every tile; :class:`DenseTopK` (a GPU) merges every tile densely and never does
  (:func:`make_topk` chooses by device type).

Memory: one tile, plus ``O(N (k + 64))`` for the running top-k (k = the deepest rank asked for, 64
candidates pending per row).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from tcmlib._heap import bound_heap

__all__ = ["TILE_COLS", "Pairs", "SortedPairs", "Tile", "TopK", "cross_tiles", "flat_nonzero", "make_topk",
           "nonzero_rc", "pair_tiles", "sort_pairs", "unit_rows", "upper_tiles"]

TILE_COLS = 4096  # columns per tile on the CPU: a (1024, 4096) float32 tile stays in cache for the counting ops
GPU_TILE_COLS = 16384  # on a GPU: wider tiles, fewer kernel launches (a (1024, 16384) float32 tile is 64 MiB)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, D) unit rows in the working dtype: ``x / ||x||`` in float64, then float32 (float64 input stays
    float64).  Each row is first scaled by a power of two (exact, as in :func:`tcmlib.normalize.l2_normalize`),
    so rows of norm 1e300 or 1e-300 normalise too; on well-scaled rows this changes no bit.  Computed
    2048 rows at a time (each row on its own: the same bits), so the float64 copies stay in cache."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty(x.shape, dtype=work, device=x.device)
    for s0 in range(0, x.shape[0], 2048):
        x64 = x[s0 : s0 + 2048].detach().double()
        m = x64.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)  # (B, 1) max |x|
        f, _ = torch.frexp(m)  # m = f 2^e: scaling by f / m = 2^-e is exact; the norm cannot over/underflow
        x64 = x64 * (f / m)
        out[s0 : s0 + 2048] = x64 / torch.linalg.vector_norm(x64, dim=1, keepdim=True)
    return out


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """(P,) int64 flat positions of the True entries of a bool tensor, in memory order (for
    ``sim.reshape(-1).index_select(0, flat)``, a cheaper gather than boolean indexing).  On the CPU
    through numpy's ``flatnonzero``, which is about twice as fast there as ``torch.nonzero``."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.contiguous().numpy()))
    return torch.nonzero(mask.reshape(-1)).squeeze(1)


def nonzero_rc(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, cols, flat)`` (P,) int64 of the True entries of a (B, W) bool matrix, row by row:
    ``torch.nonzero(mask, as_tuple=True)`` plus the flat positions ``rows * W + cols``
    (:func:`flat_nonzero`)."""
    flat = flat_nonzero(mask)
    rows = flat // mask.shape[1]
    return rows, flat - rows * mask.shape[1], flat


Want = Callable[[int, int, int, int], bool]  # want(r0, c0, rows, cols): compute this tile?


def upper_tiles(
    xn: torch.Tensor, chunk_size: int, tile_cols: int = TILE_COLS, want: Want | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(r0, c0, sim)`` over the upper triangle of ``xn xn^T``, every pair ``a < b`` exactly once.

    ``sim`` (B, W) = cosines of rows ``r0 .. r0+B-1`` with columns ``c0 .. c0+W-1``, ``c0 >= r0``.  Row
    blocks have ``chunk_size`` rows.  First come the square blocks on the diagonal (``c0 == r0``,
    ``W == B``), the pairs with column <= row set to -inf (with labels sorted, a row's own class lies
    there, so a running top-k fills with good candidates early); then the tiles right of them,
    ``max(tile_cols, chunk_size)`` columns wide.  The order changes no value.  The caller may modify
    ``sim`` in place.  ``want(r0, c0, B, W)`` (optional): a tile it returns False for is skipped, not
    computed; the others are the same tiles, bit for bit (a second pass over some rows).
    """
    n = xn.shape[0]
    chunk_size = min(chunk_size, n)
    tile_cols = max(tile_cols, chunk_size)
    lower = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=xn.device).tril()  # (B, B) col <= row
    for r0 in range(0, n, chunk_size):
        if want is not None and not want(r0, r0, min(chunk_size, n - r0), min(chunk_size, n - r0)):
            continue
        block = xn[r0 : r0 + chunk_size]
        sim = block @ block.T  # (B, B)
        yield r0, r0, sim.masked_fill_(lower[: sim.shape[0], : sim.shape[0]], float("-inf"))
    for r0 in range(0, n, chunk_size):
        for c0 in range(r0 + chunk_size, n, tile_cols):
            if want is None or want(r0, c0, min(chunk_size, n - r0), min(tile_cols, n - c0)):
                yield r0, c0, xn[r0 : r0 + chunk_size] @ xn[c0 : c0 + tile_cols].T  # (B, W)


def cross_tiles(
    qn: torch.Tensor, gn: torch.Tensor, chunk_size: int, tile_cols: int = TILE_COLS, want: Want | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(r0, c0, sim)``: ``sim`` (B, W) = cosines of queries ``r0..`` with gallery items ``c0..``,
    every query x gallery pair once, in tiles of ``chunk_size`` rows by ``max(tile_cols, chunk_size)`` columns;
    ``want`` as in :func:`upper_tiles`."""
    n, m = qn.shape[0], gn.shape[0]
    tile_cols = max(tile_cols, chunk_size)
    for r0 in range(0, n, chunk_size):
        for c0 in range(0, m, tile_cols):
            if want is None or want(r0, c0, min(chunk_size, n - r0), min(tile_cols, m - c0)):
                yield r0, c0, qn[r0 : r0 + chunk_size] @ gn[c0 : c0 + tile_cols].T


@dataclass
class SortedPairs:
    """Both sides of the pairs, unit rows sorted by label (the order every pass uses).

    ``rows`` (N, D), ``lab`` (N,) dense label index, ``order`` (N,) positions in the input; ``cols``,
    ``col_lab``, ``col_order`` the same for a reference set, or None (pairs within ``rows``).
    """

    rows: torch.Tensor
    lab: torch.Tensor
    order: torch.Tensor
    cols: torch.Tensor | None = None
    col_lab: torch.Tensor | None = None
    col_order: torch.Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.cols is None

    @property
    def col_side(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(unit rows (M, D), labels (M,))`` of the candidates: the reference set, or the rows themselves."""
        if self.cols is None or self.col_lab is None:
            return self.rows, self.lab
        return self.cols, self.col_lab


def sort_pairs(
    x: torch.Tensor, y: torch.Tensor, rx: torch.Tensor | None = None, ry: torch.Tensor | None = None
) -> SortedPairs:
    """The :class:`SortedPairs` of checked ``x`` (N, D), ``y`` (N,) (and a reference ``rx`` (M, D), ``ry`` (M,)).

    Unit rows (:func:`unit_rows`) sorted by label, stably; with a reference, the labels of both sides are
    indexed densely together and both sides are cast to the wider dtype.
    """
    if rx is None or ry is None:
        _, lab = torch.unique(y, return_inverse=True)  # (N,) label index 0..L-1
        order = torch.argsort(lab, stable=True)
        return SortedPairs(unit_rows(x)[order].contiguous(), lab[order], order)
    n = x.shape[0]
    _, both = torch.unique(torch.cat([y, ry]), return_inverse=True)  # dense labels, shared by both sides
    lab, r_lab = both[:n], both[n:]
    order, r_order = torch.argsort(lab, stable=True), torch.argsort(r_lab, stable=True)
    rows, cols = unit_rows(x)[order], unit_rows(rx)[r_order]
    work = torch.promote_types(rows.dtype, cols.dtype)  # float64 when either side is float64
    return SortedPairs(rows.to(work).contiguous(), lab[order], order, cols.to(work).contiguous(), r_lab[r_order],
                       r_order)


class Pairs(NamedTuple):
    """Listed pairs: sorted row indices (P,), column indices (P,) (int64) and similarities ``s`` (P,)."""

    rows: torch.Tensor
    cols: torch.Tensor
    s: torch.Tensor


class Tile:
    """One tile of the loop over the pairs (:func:`pair_tiles`): rows ``r0..r0+B-1``, columns ``c0..c0+W-1``.

    Read it one of two ways.  :attr:`sim` (B, W): every pair's cosine (in a diagonal block of one set the
    entries with column <= row are -inf, not pairs), e.g. for a running top-k.  :meth:`values` and
    :meth:`pairs`: the negative pairs (different labels) with ``s >= s_min``, and the positive ones, listed;
    the first such call sets the tile's positives to -inf in place, so a consumer that reads :attr:`sim`
    comes earlier in the loop (reading it afterwards raises).  The positives of a row block lie in one
    band of columns (labels sorted on both sides): only that band is compared.
    """

    def __init__(self, r0: int, c0: int, sim: torch.Tensor, pairs: SortedPairs, band: tuple[int, int],
                 upper: torch.Tensor | None) -> None:
        self.r0, self.c0, self._sim, self._pairs, self._band, self._upper = r0, c0, sim, pairs, band, upper
        self._same: torch.Tensor | None = None  # (B, band width) positive pairs in the band, once masked
        self._pos: Pairs | None = None

    @property
    def sim(self) -> torch.Tensor:
        """(B, W) the cosines of all pairs of the tile."""
        if self._same is not None:
            raise RuntimeError("this tile's positives are already masked: a consumer reading tile.sim must come "
                               "before those reading tile.values() or tile.pairs()")
        return self._sim

    def _negatives(self) -> torch.Tensor:
        """(B, W) the tile with its positive pairs set to -inf (in place, once)."""
        if self._same is None:
            lo, hi = self._band
            b = self._sim.shape[0]
            self._same = self._sim.new_zeros(b, 0, dtype=torch.bool)  # (B, w) the band's positive pairs
            self._band_sim = self._sim[:, :0]  # (B, w) the band before masking
            if hi > lo:
                lab, (_, col_lab) = self._pairs.lab, self._pairs.col_side
                same = lab[self.r0 : self.r0 + b, None] == col_lab[None, lo:hi]  # (B, w)
                if self._upper is not None and self.c0 == self.r0:  # the diagonal block: pairs col > row only
                    same[:, :b] &= self._upper[:b, :b]
                band = self._sim[:, lo - self.c0 : hi - self.c0]
                self._same, self._band_sim = same, band.clone()
                band.masked_fill_(same, float("-inf"))
        return self._sim

    def _positives(self) -> Pairs:
        """All positive pairs of the tile (once)."""
        if self._pos is None:
            self._negatives()
            assert self._same is not None
            pr, pc = torch.nonzero(self._same, as_tuple=True)
            self._pos = Pairs(pr + self.r0, pc + self._band[0], self._band_sim[pr, pc])
        return self._pos

    def dense(self) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
        """``(neg (B, W), lo, same (B, w), band (B, w))``, nothing listed (no host synchronisation): the tile
        with its positives and non-pairs at -inf; the band of columns ``lo .. lo + w - 1`` that may hold
        positives, which of its entries are positive pairs, and their similarities."""
        neg = self._negatives()
        assert self._same is not None
        return neg, self._band[0], self._same, self._band_sim

    def values(self, s_min: float) -> torch.Tensor:
        """(P,) the similarities of the tile's negative pairs with ``s >= s_min`` (``s > -inf`` for -inf)."""
        neg = self._negatives()
        return neg.reshape(-1).index_select(0, flat_nonzero(_at_least(neg, s_min)))

    def pairs(self, s_min: float) -> tuple[Pairs, Pairs]:
        """``(negatives, positives)``: the tile's pairs with ``s >= s_min`` (``s > -inf`` for -inf), by global
        sorted index (index_select: on the CPU a gather several times faster than indexing with a tensor)."""
        neg = self._negatives()
        rows, cols, flat = nonzero_rc(_at_least(neg, s_min))
        return Pairs(rows + self.r0, cols + self.c0, neg.reshape(-1).index_select(0, flat)), \
            _select(self._positives(), s_min)


def _at_least(sim: torch.Tensor, s_min: float) -> torch.Tensor:
    """``sim >= s_min``; for -inf ``sim > -inf`` (every pair, none of the -inf non-pairs)."""
    return sim > s_min if s_min == float("-inf") else sim >= s_min


def _select(p: Pairs, s_min: float) -> Pairs:
    """The listed pairs with ``s >= s_min``."""
    keep = torch.nonzero(p.s >= s_min).squeeze(1)
    return Pairs(p.rows.index_select(0, keep), p.cols.index_select(0, keep), p.s.index_select(0, keep))


def pair_tiles(pairs: SortedPairs, chunk_size: int, want: Want | None = None) -> Iterator[Tile]:
    """The one loop over the pairs: the :class:`Tile` s of :func:`upper_tiles` (one set: the upper triangle of
    ``rows rows^T``) or :func:`cross_tiles` (``rows cols^T``), ``min(chunk_size, N)`` rows by
    :data:`TILE_COLS` columns (:data:`GPU_TILE_COLS` on a GPU).  ``want`` (optional) skips tiles; the others are the same, bit for bit.
    From :data:`tcmlib._heap.LARGE_ROWS` rows on, the tiles' buffers are unmapped when freed
    (:func:`tcmlib._heap.bound_heap`), so they cannot pile up in the heap."""
    xn, lab = pairs.rows, pairs.lab
    n = xn.shape[0]
    bound_heap(n)
    chunk = min(int(chunk_size), n)
    cols, col_lab = pairs.col_side
    # the same-label columns of row block i lie in [lo[i], hi[i]) (labels sorted on both sides)
    starts = torch.arange(0, n, chunk, device=lab.device)  # (blocks,) first row of each block
    lo = torch.searchsorted(col_lab, lab[starts]).tolist()
    hi = torch.searchsorted(col_lab, lab[(starts + chunk - 1).clamp(max=n - 1)], right=True).tolist()
    width = TILE_COLS if xn.device.type == "cpu" else GPU_TILE_COLS
    if pairs.symmetric:
        upper = torch.ones(chunk, chunk, dtype=torch.bool, device=xn.device).triu(1)  # (B, B) col > row
        tiles = upper_tiles(xn, chunk, width, want)
    else:
        upper, tiles = None, cross_tiles(xn, cols, chunk, width, want)
    for r0, c0, sim in tiles:
        i = r0 // chunk
        yield Tile(r0, c0, sim, pairs, (max(lo[i], c0), min(hi[i], c0 + sim.shape[1])), upper)


def _cells(sim: torch.Tensor, cell: int, columns: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(whole, body, cell_max)``: ``sim`` (B, W) cut into cells of ``cell`` consecutive entries of a row,
    ``body`` (B, W // cell, cell) a view of the first ``whole`` columns, ``cell_max`` (B, W // cell) their
    maxima; ``columns``: ``sim`` is a transposed view (reduced along the memory layout instead)."""
    whole = sim.shape[1] // cell * cell  # the body: whole cells; the edge: the last W - whole entries
    body = sim[:, :whole].unflatten(1, (-1, cell))  # (B, W // cell, cell), a view
    # reduced along the memory layout: a transposed view reduces slowly otherwise
    cell_max = body.permute(1, 2, 0).amax(dim=1).T if columns else body.amax(dim=2)  # (B, W // cell)
    return whole, body, cell_max


def make_topk(depth: torch.Tensor, row_labels: torch.Tensor, col_labels: torch.Tensor, dtype: torch.dtype
              ) -> TopK | DenseTopK:
    """The running top-k for the labels' device (arguments as :class:`TopK`): on the CPU the screened
    :class:`TopK`, on a GPU the :class:`DenseTopK`, which never waits for the device."""
    if _dense(row_labels.device):
        return DenseTopK(depth, row_labels, col_labels, dtype)
    return TopK(depth, row_labels, col_labels, dtype)


def _dense(device: torch.device) -> bool:
    """Merge every tile densely (no host synchronisation) on this device?  Everywhere but on the CPU."""
    return device.type != "cpu"


class DenseTopK:
    """Exact running top-k of every row of a matrix seen tile by tile, most similar first: each tile's
    ``topk`` merged with the rows' best so far (one more ``topk``), for every row of every tile.

    Arguments and methods as :class:`TopK`.  More arithmetic than its screening, but nothing the host has to
    wait for (no ``nonzero``, no value read back): on a GPU the tiles queue up without a pause.
    Memory: ``(N, k)`` values and flags, and two ``(B, 2k)`` candidate blocks per tile.
    """

    def __init__(self, depth: torch.Tensor, row_labels: torch.Tensor, col_labels: torch.Tensor, dtype: torch.dtype):
        self.k = int(depth.max())  # the one read of the device, before the tiles
        n, dev = depth.shape[0], row_labels.device
        self.val = torch.full((n, self.k), float("-inf"), dtype=dtype, device=dev)  # (N, k) descending
        self.rel = torch.zeros(n, self.k, dtype=torch.bool, device=dev)  # (N, k) relevant?
        self.row_labels, self.col_labels = row_labels, col_labels

    def ranked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(val, rel)`` (N, k): every row's top k so far, most similar first, and whether each is relevant."""
        return self.val, self.rel

    def add(self, r0: int, c0: int, sim: torch.Tensor, *, columns: bool = False) -> None:
        """Merge the tile ``sim`` (B, W) of rows ``r0..`` and columns ``c0..`` (``columns=True``: into the
        top-k of its columns, the symmetric side of a tile of ``X X^T``)."""
        dim = 0 if columns else 1  # columns: a topk down the columns, no transposed copy of the tile
        top = sim.topk(min(self.k, sim.shape[dim]), dim=dim)  # (B, k') or (k', W)
        vals, idx = (top.values.T, top.indices.T) if columns else (top.values, top.indices)  # (H, k')
        if columns:  # (one set: row and column labels are the same)
            r0, c0 = c0, r0
        h = vals.shape[0]
        rel = self.col_labels.index_select(0, idx.reshape(-1) + c0).view_as(idx) == self.row_labels[r0 : r0 + h, None]
        merged = torch.cat([self.val[r0 : r0 + h], vals], dim=1).topk(self.k, dim=1)  # (H, k), sorted
        self.rel[r0 : r0 + h] = torch.cat([self.rel[r0 : r0 + h], rel], dim=1).gather(1, merged.indices)
        self.val[r0 : r0 + h] = merged.values


class TopK:
    """Exact running top-k of every row of a matrix seen tile by tile: most similar first.

    ``depth`` (N,) ints >= 1, the k of each row; ``row_labels`` (N,) and ``col_labels`` (M,): only
    whether an item is *relevant* (same label as the row) is kept, not its index.  :meth:`add` feeds a
    tile from its rows' side; for a symmetric matrix, :meth:`add` the transposed tile as well (rows and
    columns then index the same set) with ``columns=True``; :meth:`ranked` gives the result.  Every entry
    strictly above the row's *bar* (its ``depth``-th best when last merged, or a lower bound of its
    depth-th best) is a candidate (the order among equal values is unspecified, as in torch.topk).  A tile
    is screened by the maxima of its *cells* (``CELLS`` consecutive entries of a row of the tile, or of a
    column): only cells whose maximum beats the row's bar are read again.  Candidates wait in the row's
    pending buffer (``PENDING`` slots); a row is merged (one topk of its k best, its pending ones and its
    new ones) only when they would overflow it, so a merge serves many tiles.  A tile whose cells are
    mostly hot (the rows' bars are low: they have seen little) first raises the bars with the maxima of
    ``FINE`` cells (:meth:`_raise_bars`) and is screened again; a tile still mostly hot is merged through
    a dense topk.
    """

    CELLS = (64, 16)  # entries per cell: along a row of the tile (contiguous), along a column (strided)
    DENSE_SHARE = 0.25  # above this share of hot cells in a tile, merge a dense topk of all its rows
    PENDING = 64  # candidates a row may hold unmerged (its bar rises when they are merged)
    FINE = (16, 16)  # entries per cell when a tile is mostly hot: their maxima raise the bars first

    def __init__(self, depth: torch.Tensor, row_labels: torch.Tensor, col_labels: torch.Tensor, dtype: torch.dtype):
        n = depth.shape[0]
        self.k = int(depth.max())
        dev = row_labels.device
        self.val = torch.full((n, self.k), float("-inf"), dtype=dtype, device=dev)  # (N, k) descending
        self.rel = torch.zeros(n, self.k, dtype=torch.bool, device=dev)  # (N, k) relevant?
        self.kpos = (depth - 1).to(dev)  # (N,) column of the depth-th best
        self.kth = self.val[:, 0].clone()  # (N,) the row's depth-th best so far (-inf until filled)
        # candidates above the bar wait in a pending buffer, merged (one topk) when it fills or at the end
        self.pend_v = torch.full((n, self.PENDING), float("-inf"), dtype=dtype, device=dev)  # (N, PENDING)
        self.pend_r = torch.zeros(n, self.PENDING, dtype=torch.bool, device=dev)
        self.fill = torch.zeros(n, dtype=torch.long, device=dev)  # (N,) pending candidates per row
        self.row_labels, self.col_labels = row_labels, col_labels

    def ranked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(val, rel)`` (N, k): every row's top k so far, most similar first, and whether each is relevant
        (merges what is pending)."""
        g = flat_nonzero(self.fill > 0)
        if g.numel():
            self._merge(g, self.val.new_empty(g.numel(), 0), self.rel.new_empty(g.numel(), 0))
        return self.val, self.rel

    def add(self, r0: int, c0: int, sim: torch.Tensor, *, columns: bool = False) -> None:
        """Merge the tile ``sim`` (B, W) of rows ``r0..r0+B-1`` and columns ``c0..c0+W-1``.

        ``columns=False``: its rows are rows of this top-k (candidates: its columns).  ``columns=True``:
        its columns are (the symmetric side of a tile of ``X X^T``), read without transposing the tile.
        """
        if columns:
            sim, r0, c0 = sim.T, c0, r0  # a view: the work below stays on the row-major memory
        b, w = sim.shape
        kth = self.kth[r0 : r0 + b]
        cell = self.CELLS[columns]
        whole, body, cell_max = _cells(sim, cell, columns)
        hot = (cell_max > kth[:, None]).contiguous()  # (B, W // cell) bool; contiguous: nonzero is faster
        rows, cells = torch.nonzero(hot, as_tuple=True)  # (C,) hot cells, by row
        if rows.numel() > self.DENSE_SHARE * hot.numel():  # mostly hot: the rows' bars are low
            cell = self.FINE[columns]  # raise the bars with this tile's finer cells, then screen again
            if cell != self.CELLS[columns]:
                whole, body, cell_max = _cells(sim, cell, columns)
            kth = self._raise_bars(r0, cell_max)
            hot = (cell_max > kth[:, None]).contiguous()
            rows, cells = torch.nonzero(hot, as_tuple=True)
        if rows.numel() > self.DENSE_SHARE * hot.numel():  # still mostly hot: all rows, dense
            g = torch.arange(r0, r0 + b, device=sim.device)
            top = sim.topk(min(self.k, w), dim=1, sorted=False)  # (B, k'); entries <= the bar change nothing
            self._merge(g, top.values, self.col_labels[top.indices + c0] == self.row_labels[g, None])
            return
        # (index_select below: on the CPU a gather several times faster than indexing with a tensor)
        vals = body[rows, cells]  # (C, cell): the hot cells' entries, gathered whole
        sub, slot = torch.nonzero(vals > kth.index_select(0, rows)[:, None], as_tuple=True)  # (P,) by row
        vals = vals.view(-1).index_select(0, sub * cell + slot)  # (P,) the candidates
        rows, cols = rows.index_select(0, sub), cells.index_select(0, sub) * cell + slot
        if whole < w:  # the edge: compared directly, then the candidates grouped by row again
            er, ec = torch.nonzero(sim[:, whole:] > kth[:, None], as_tuple=True)
            order = torch.argsort(torch.cat([rows, er]), stable=True)
            rows, cols = torch.cat([rows, er])[order], torch.cat([cols, ec + whole])[order]
            vals = torch.cat([vals, sim[er, ec + whole]])[order]
        if rows.numel():
            self._sparse(r0, c0, rows, cols, vals)

    def _raise_bars(self, r0: int, cell_max: torch.Tensor) -> torch.Tensor:
        """Raise the bars of rows ``r0..r0+B-1`` before a tile whose cells have maxima ``cell_max`` (B, C);
        returns the new bars (B,).

        The maxima, the rows' best and their pending candidates are distinct entries of each row, so the
        depth-th best of them all is a lower bound on the row's depth-th best once the tile is in: an entry
        below it can never rank.  The bar goes one step below that bound, so entries equal to it pass ``>``.
        """
        b = cell_max.shape[0]
        seen = torch.cat([self.val[r0 : r0 + b], self.pend_v[r0 : r0 + b], cell_max], dim=1)  # (B, k+PENDING+C)
        bound = seen.topk(self.k, dim=1).values.gather(1, self.kpos[r0 : r0 + b, None]).squeeze(1)  # (B,)
        bar = torch.maximum(self.kth[r0 : r0 + b], torch.nextafter(bound, bound.new_tensor(float("-inf"))))
        self.kth[r0 : r0 + b] = bar
        return bar

    def _sparse(self, r0: int, c0: int, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
        """Take the candidates ``vals`` (P,) at ``(rows, cols)`` of the tile (rows ascending): into the rows'
        pending buffers where they fit; a row whose buffer would overflow is merged now, with them."""
        # g (H,) the rows with candidates; which (P,) each candidate's row among them; counts (H,)
        g, which, counts = torch.unique_consecutive(rows, return_inverse=True, return_counts=True)
        g = g + r0
        rel = self.col_labels.index_select(0, cols + c0) == self.row_labels.index_select(0, rows + r0)  # (P,)
        slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts).index_select(0, which)
        fill = self.fill.index_select(0, g)  # (H,)
        fits = fill + counts <= self.PENDING  # (H,) rows whose candidates fit into their pending buffer
        fit_c = fits.index_select(0, which)  # (P,)
        into = flat_nonzero(fit_c) if not bool(fit_c.all()) else None  # None: all of them
        at = (g * self.PENDING + fill).index_select(0, which) + slot  # (P,) place in pend_v.view(-1)
        if into is not None:
            at, v_in, r_in = at.index_select(0, into), vals.index_select(0, into), rel.index_select(0, into)
        else:
            v_in, r_in = vals, rel
        self.pend_v.view(-1).index_copy_(0, at, v_in)
        self.pend_r.view(-1).index_copy_(0, at, r_in)
        self.fill.index_copy_(0, g, fill + counts * fits)
        if into is None:
            return
        # the rows that overflow: merged now with their pending ones and these, padded into one block per
        # row (-inf where a row has fewer)
        over = flat_nonzero(~fits)  # (H_o,) among g
        out = flat_nonzero(~fit_c)  # (P_o,) their candidates
        which_o = ((~fits).cumsum(0) - 1).index_select(0, which.index_select(0, out))  # (P_o,) row among them
        width = int(counts.index_select(0, over).max())
        at = which_o * width + slot.index_select(0, out)  # (P_o,) place in the (H_o, width) block
        block = vals.new_full((over.numel() * width,), float("-inf")).index_copy_(0, at, vals.index_select(0, out))
        rel_block = torch.zeros(over.numel() * width, dtype=torch.bool, device=rows.device)
        rel_block.index_copy_(0, at, rel.index_select(0, out))
        self._merge(g.index_select(0, over), block.view(-1, width), rel_block.view(-1, width))

    def _merge(self, g: torch.Tensor, vals: torch.Tensor, rel: torch.Tensor) -> None:
        """Merge candidates ``vals`` / ``rel`` (H, c) of rows ``g`` (H,), and their pending ones, into the
        top k; their pending buffers empty."""
        cand_v = torch.cat([self.val.index_select(0, g), self.pend_v.index_select(0, g), vals], dim=1)  # (H, k+P+c)
        cand_r = torch.cat([self.rel.index_select(0, g), self.pend_r.index_select(0, g), rel], dim=1)
        top = cand_v.topk(self.k, dim=1)  # sorted, most similar first
        self.val.index_copy_(0, g, top.values)
        self.rel.index_copy_(0, g, cand_r.gather(1, top.indices))
        self.kth.index_copy_(0, g, top.values.gather(1, self.kpos.index_select(0, g)[:, None]).squeeze(1))
        self.pend_v.index_fill_(0, g, float("-inf"))
        self.pend_r.index_fill_(0, g, False)
        self.fill.index_fill_(0, g, 0)
