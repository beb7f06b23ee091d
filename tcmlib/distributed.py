"""More than one GPU: the few torch.distributed helpers ``tcmlib.train`` needs, and exact sharded evaluation.

Training (``torchrun --nproc_per_node=N -m tcmlib.train --config ...``).  Every rank holds a
DistributedDataParallel copy of the model and a disjoint slice of each *global* batch
(``MPerClassBatchSampler(num_replicas=N, rank=r)``).  The batch-global losses (TCM, Smooth-AP,
RS@k, pml's) must see all B embeddings, so :func:`gather_batch` all-gathers them *with gradient*
(as ``torch.distributed.nn.functional.all_gather`` does) in rank order: the loss sees exactly the tensor a
single process would see, and every rank computes the same loss L.

Why the gradient comes out right.  Let E_r (B/N, D) be rank r's embeddings, g_r = dL/dE_r.
Each of the N ranks backpropagates its own copy of L; the all-gather's backward *sums* the N
copies' gradients for slice r onto rank r (a reduce-scatter), so rank r gets N g_r and its
parameter gradient is N J_r^T g_r.  DDP then averages over ranks:
(1/N) sum_r N J_r^T g_r = sum_r J_r^T g_r = dL/dtheta, the single-process gradient.
(pytorch-metric-learning's ``DistributedLossWrapper`` gathers *without* the other ranks' gradient
and multiplies the loss by N instead; the factor N is the same, it just sits elsewhere.)  The
loss's own parameters (proxies, ArcFace centres) get the full dL/dp on every rank already;
:func:`average_gradients` keeps them identical across ranks.

The same run on any number of processes.  BatchNorm layers that train are synchronised
(:func:`sync_batchnorm`: torch's ``SyncBatchNorm`` on a GPU, :class:`GlobalBatchNorm` on the CPU),
so they normalise over the global batch as one process does; each sample's augmentation is drawn
from a generator seeded by (run seed, epoch, sample index) (``tcmlib.data.seeded``), so every rank
draws what one process would.  1, 2 or 3 processes then train the same run up to float rounding
(sums taken in another order).  Not synchronised: dropout (a backbone that has it draws its masks
per rank, so those runs are equal in distribution only).

Evaluation (:func:`sharded_retrieval`, :func:`sharded_utility_curves`, :func:`evaluate_sharded`):
each rank embeds a contiguous shard of the test set.  Then

* R@k, MAP@R: each rank ranks its own queries against every shard in turn (shards are broadcast
  one at a time) and merges the per-shard top-K lists into the global top-K; the per-class
  counts (R = class size - 1) are all-reduced.
* OPIS, eps-OPIS: the negative-distance quantiles that set the thresholds are found exactly by a
  two-pass radix select (all-reduced histograms of the similarities' float32 bit patterns), then
  per-class accept counts at each threshold are all-reduced.  Each unordered pair is visited by
  exactly one rank (a cyclic schedule of shard pairs, balanced across ranks).

No rank ever holds more than one tile of similarities (``TILE_ROWS`` x ``TILE_COLS``, 16 MiB in
float32, whatever N); per rank, memory is its shard, one other shard, one tile and the retrieval's
running top-K (n x K, K = max(ks, largest class size) + 1).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from tcmlib._heap import bound_heap
from tcmlib.embedding import embed
from tcmlib.normalize import l2_normalize

__all__ = ["launched", "setup", "shutdown", "world_size", "rank", "gather_batch", "GlobalBatchNorm", "sync_batchnorm", "average_gradients", "broadcast_module",
           "all_objects", "broadcast_object", "barrier", "shard_bounds", "sharded_retrieval",
           "sharded_utility_curves", "evaluate_sharded"]


# ----------------------------------------------------------------------------------------------
# process group


def launched() -> bool:
    """True when this process was started by ``torchrun`` (or a SLURM script) with more than one rank,
    or a process group is already up (tests that spawn ranks themselves)."""
    return (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def setup(device: str) -> tuple[torch.device, bool]:
    """Join the process group torchrun describes (env ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...).

    ``device`` is the config's: ``cpu`` uses gloo; ``auto`` / ``cuda`` take GPU ``LOCAL_RANK`` with
    NCCL when CUDA is there (gloo on CPU otherwise).  Returns ``(this rank's device, whether this
    call created the group)``; a group that is already initialised is used as it is.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and not device.startswith("mps") and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"config key 'device' = {device!r}, but torch sees no CUDA GPU here; "
                         "use device: cpu")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return dev, created


def shutdown() -> None:
    """``dist.destroy_process_group()``, after a barrier and a short pause on gloo.

    Before torch 2.8 (pytorch/pytorch#154976) the gloo group's destructor holds the GIL while it
    joins gloo's worker threads, and a worker that drops the last reference to a tensor Python
    created waits for the GIL: an occasional hang at the end of a run.  The barrier (whose wait
    releases the GIL) and the pause let the workers finish first; harmless where it is fixed.
    """
    if dist.get_backend() == "gloo":
        dist.barrier()
        time.sleep(0.1)  # releases the GIL
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# training


class _GatherWithGrad(torch.autograd.Function):
    """All-gather (B/N, D) slices into (B, D); backward: the sum over ranks of dL/dE, sliced to ours."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's copy of the loss contributes (a reduce-scatter, written simply)
        return grad[rank() * ctx.rows : (rank() + 1) * ctx.rows]


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum a tensor over ranks; backward: the sum over ranks of the gradient (every rank's copy of L)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the *global* batch of every rank, on any device (torch's ``SyncBatchNorm`` is GPU-only).

    In training under an initialised process group of more than one rank, the per-channel mean and
    (biased) variance are those of all ranks' inputs together, in two all-reduces with gradient
    (sum, then sum of squared deviations): ``mu = sum x / n``, ``var = sum (x - mu)^2 / n`` over
    the n = B x H x W values of a channel; the running statistics take the unbiased variance, as
    ``nn.BatchNorm2d`` does.  Otherwise (one process, or eval mode) it is ``nn.BatchNorm2d``.
    Input (B, C, H, W) or (B, C).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (B, C, ...), got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.ndim)]  # every axis but the channels
        shape = [1, -1] + [1] * (x.ndim - 2)  # (1, C, 1, 1): broadcast per channel
        n = _AllReduceWithGrad.apply(torch.tensor(float(x.numel() // x.shape[1]), device=x.device))
        mean = _AllReduceWithGrad.apply(x.sum(dims)) / n  # (C,)
        var = _AllReduceWithGrad.apply((x - mean.view(shape)).pow(2).sum(dims)) / n  # (C,) biased
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr, operator]
                f = (1.0 / float(self.num_batches_tracked) if self.momentum is None  # type: ignore[arg-type]
                     else self.momentum)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * n / (n - 1), alpha=f)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm of ``model`` by one that normalises over the global batch.

    CUDA: ``nn.SyncBatchNorm.convert_sync_batchnorm``; other devices: :class:`GlobalBatchNorm`.
    Weights, buffers and train/eval modes are kept (frozen BatchNorm stays frozen: in eval mode
    both are plain BatchNorm).  Returns the model (changed in place where possible).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats).to(device)
            new.load_state_dict(child.state_dict())
            for p_new, p_old in zip(new.parameters(), child.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


def gather_batch(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch from every rank's slice, in rank order: ``(E (B, D), y (B,))``.

    ``emb`` (B/N, D) keeps its gradient path: the backward sums every rank's gradient for this
    slice, as ``torch.distributed.nn.functional.all_gather`` does (module docstring: with DDP's
    averaging that gives the single-process gradient).  Every rank must pass a slice of the same shape.
    """
    if world_size() == 1:
        return emb, labels
    ys = [torch.empty_like(labels) for _ in range(world_size())]
    dist.all_gather(ys, labels.contiguous())
    return _GatherWithGrad.apply(emb), torch.cat(ys)


def average_gradients(module: nn.Module) -> None:
    """All-reduce-average the ``.grad`` of ``module``'s parameters (those outside DDP: the loss's)."""
    n = world_size()
    for p in module.parameters():
        if p.grad is not None and n > 1:
            dist.all_reduce(p.grad)
            p.grad /= n


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers of ``module`` to every rank (in place)."""
    if world_size() > 1:
        for t in module.state_dict().values():
            dist.broadcast(t, src)


def all_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# exact evaluation over shards


def shard_bounds(n: int, world: int, r: int) -> tuple[int, int]:
    """``(start, end)`` of rank ``r``'s contiguous share of ``n`` items (sizes differ by at most one)."""
    return r * n // world, (r + 1) * n // world


def _shards(x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    """Yield ``(src, offset, x_src (n_src, D), y_src (n_src,))`` for every rank's shard, one at a time.

    Rank ``src`` broadcasts its shard; ``offset`` is the global index of its first row.
    """
    sizes = all_objects(int(x.shape[0]))
    offset = 0
    for src, n_src in enumerate(sizes):
        if src == rank():
            xs, ys = x, y
        else:
            xs = torch.empty((n_src,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            ys = torch.empty(n_src, dtype=y.dtype, device=y.device)
        if world_size() > 1:
            dist.broadcast(xs, src)
            dist.broadcast(ys, src)
        yield src, offset, xs, ys
        offset += n_src


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def _class_counts(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classes (C,) ascending, counts (C,))`` over all ranks: the union of labels, counts all-reduced."""
    union = sorted(set().union(*all_objects(y.unique().tolist())))
    classes = torch.tensor(union, dtype=torch.long, device=y.device)
    counts = torch.bincount(torch.searchsorted(classes, y), minlength=len(union))  # (C,) this shard's
    return classes, _all_reduce(counts)


def _unit_rows(emb: torch.Tensor) -> torch.Tensor:
    """(n, D) float32 unit rows, normalised in float64 as ``tcmlib.metrics.utility_curves`` does."""
    x64 = emb.detach().double()
    return (x64 / torch.linalg.vector_norm(x64, dim=1, keepdim=True)).float()


TILE_ROWS, TILE_COLS = 1024, 4096  # a (rows x columns) tile of similarities: 16 MiB in float32


def _tiles(n: int, n_src: int, rows: int | None = None, cols: int | None = None):  # type: ignore[no-untyped-def]
    """``(r0, c0)`` of the tiles of an (n, n_src) block, ``rows`` x ``cols`` at a time (default
    ``TILE_ROWS`` x ``TILE_COLS``); for large blocks their buffers are unmapped when freed
    (:func:`tcmlib._heap.bound_heap`)."""
    bound_heap(max(n, n_src))
    for r0 in range(0, n, rows or TILE_ROWS):
        for c0 in range(0, n_src, cols or TILE_COLS):
            yield r0, c0


def _not_self(sim: torch.Tensor, r0: int, c0: int, fill: float) -> torch.Tensor:
    """``sim`` (b, w), tile (r0, c0) of this rank's own shard, with its pairs (q, q) set to ``fill`` (in place)."""
    i = torch.arange(sim.shape[0], device=sim.device)
    j = i + r0 - c0  # column of row i's own item
    ok = (j >= 0) & (j < sim.shape[1])
    sim[i[ok], j[ok]] = fill
    return sim


@torch.no_grad()
def sharded_retrieval(emb: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 2, 4, 8)
                      ) -> tuple[dict[int, float], float]:
    """Recall@k and MAP@R of the whole set, from this rank's shard ``emb`` (n, D), ``labels`` (n,).

    Same protocol as ``tcmlib.metrics.recall_and_map_at_r`` (leave-one-out, cosine similarity,
    singletons left out; MAP@R = Musgrave et al. 2020, eq. 2), ties included: equal similarities count as
    the expectation over a random order of the tied candidates, never by label
    (``tcmlib.metrics.retrieval.ranked_per_query``), so identical embeddings score at chance.  Each rank
    ranks its queries against every shard, one (``TILE_ROWS`` x ``TILE_COLS``) tile at a time, merging each
    tile's top-K into the running top-K (K = max(ks, largest R) + 1, one rank deeper to see a tie); R =
    global class size - 1 (counts all-reduced); a tie reaching past the kept ranks is counted in full by a
    second pass over the tiles that hold its row.  Every rank returns the same ``({k: recall}, map_at_r)``;
    call it on all ranks.  Memory per rank: its shard, one other shard, one tile and the (n, K) top-K.
    """
    from tcmlib.metrics.retrieval import ranked_per_query

    x, y = l2_normalize(emb.detach().float(), dim=1), labels.long().to(emb.device)  # as recall_and_map_at_r
    classes, counts = _class_counts(y)
    n_all = int(counts.sum())
    bad = [k for k in ks if k < 1 or k >= n_all]
    if bad:
        raise ValueError(f"ks {bad}: every k must satisfy 1 <= k < N = {n_all} (a query has N - 1 others)")
    r = counts[torch.searchsorted(classes, y)] - 1  # (n,) relevant others of each query
    depth = r.clamp(min=max(ks))  # (n,) ranks each query needs
    k1 = max(list(ks) + [int(counts.max()) - 1]) + 1  # the deepest rank any query needs, plus one
    n = x.shape[0]
    best_s = torch.full((n, k1), float("-inf"), device=x.device)  # (n, K + 1) best similarities so far
    best_r = torch.zeros(n, k1, dtype=torch.bool, device=x.device)  # (n, K + 1) relevant?
    for src, _, xs, ys in _shards(x, y):
        for r0, c0 in _tiles(n, xs.shape[0]):
            sim = x[r0 : r0 + TILE_ROWS] @ xs[c0 : c0 + TILE_COLS].T  # (b, w)
            if src == rank():
                _not_self(sim, r0, c0, float("-inf"))  # a query is not its own neighbour
            top = sim.topk(min(k1, sim.shape[1]), dim=1)
            rel = ys[c0 + top.indices] == y[r0 : r0 + sim.shape[0], None]
            merged = torch.cat([best_s[r0 : r0 + TILE_ROWS], top.values], 1).topk(k1, dim=1)  # the best of both
            best_r[r0 : r0 + TILE_ROWS] = torch.cat([best_r[r0 : r0 + TILE_ROWS], rel], 1).gather(1, merged.indices)
            best_s[r0 : r0 + TILE_ROWS] = merged.values

    def count_equal(rows: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All candidates of rows ``rows`` (S,) equal to ``target`` (S,), and the relevant ones, over every
        shard: the same tiles recomputed (bit for bit), on every rank while any rank has such rows."""
        count, relevant = torch.zeros_like(rows), torch.zeros_like(rows)
        if not any(all_objects(bool(rows.numel()))):
            return count, relevant
        goal = torch.full((n,), math.nan, device=x.device)  # NaN equals nothing
        goal[rows] = target.float()
        where = torch.full((n,), -1, dtype=torch.long, device=x.device)
        where[rows] = torch.arange(rows.numel(), device=x.device)  # (n,) place of a row in ``rows``
        for src, _, xs, ys in _shards(x, y):
            for r0, c0 in _tiles(n, xs.shape[0]):
                at = where[r0 : r0 + TILE_ROWS]
                if not bool((at >= 0).any()):
                    continue
                sim = x[r0 : r0 + TILE_ROWS] @ xs[c0 : c0 + TILE_COLS].T
                if src == rank():
                    _not_self(sim, r0, c0, math.nan)
                eq = sim == goal[r0 : r0 + TILE_ROWS, None]  # (b, w)
                same = ys[None, c0 : c0 + TILE_COLS] == y[r0 : r0 + TILE_ROWS, None]
                ok = at >= 0
                count.index_add_(0, at[ok], eq[ok].sum(dim=1))
                relevant.index_add_(0, at[ok], (eq & same)[ok].sum(dim=1))
        return count, relevant

    pq = ranked_per_query(best_s, best_r, r, depth, list(ks), count_equal)
    hits, ap = pq.hits, pq.ap  # (n, len(ks)), (n,): AP@R NaN for singletons
    # every query's values, in global order, averaged exactly as the single-process code averages them
    hits_all = torch.cat([h for h in all_objects(hits.cpu())])  # (N, len(ks))
    ap_all = torch.cat([a for a in all_objects(ap.cpu())])  # (N,)
    valid = ~torch.isnan(ap_all)
    if not bool(valid.any()):
        raise ValueError("every label occurs only once: Recall@k and MAP@R are undefined")
    recall = hits_all[valid].double().mean(dim=0)
    return {k: float(v) for k, v in zip(ks, recall.tolist())}, float(ap_all[valid].mean())


def _pair_blocks(x: torch.Tensor, y: torch.Tensor, cols: int):  # type: ignore[no-untyped-def]
    """Yield ``(r0, sim (b, c), pos (b, c), neg (b, c), y_cols (c,))`` tiles of the pairs this rank visits:
    rows ``r0 .. r0 + b - 1`` of this rank's shard (``TILE_ROWS`` at a time) against ``cols`` columns.

    Every unordered pair {a, b} of the whole set is visited by exactly one rank: rank r compares its
    rows with shard s when j = (s - r) mod W is 0 (its own shard, pairs col > row only), below W/2,
    or W/2 with r < W/2 (a cyclic schedule: about W/2 + 1 of the W shards per rank).  ``pos`` /
    ``neg`` mark the visited same-label / different-label pairs of the tile.
    """
    w, me = world_size(), rank()
    for src, _, xs, ys in _shards(x, y):
        j = (src - me) % w
        if not (j == 0 or 2 * j < w or (2 * j == w and me < w // 2)):
            continue
        for r0, c0 in _tiles(x.shape[0], xs.shape[0], TILE_ROWS, cols):
            if j == 0 and c0 + cols <= r0 + 1:  # own shard, every column <= every row: no pair col > row
                continue
            y_rows, y_cols = y[r0 : r0 + TILE_ROWS], ys[c0 : c0 + cols]
            sim = x[r0 : r0 + TILE_ROWS] @ xs[c0 : c0 + cols].T  # (b, c)
            same = y_rows[:, None] == y_cols[None, :]  # (b, c)
            visit = torch.ones_like(same)
            if j == 0:  # own shard: each pair once, col > row
                rows = torch.arange(r0, r0 + len(y_rows), device=x.device)[:, None]
                visit = torch.arange(c0, c0 + len(y_cols), device=x.device)[None, :] > rows
            yield r0, sim, same & visit, ~same & visit, y_cols


def _float_key(s: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys in [0, 2^32) of float32 values (their bit patterns, sign-flipped)."""
    u = s.contiguous().view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(u >= 2**31, 2**32 - 1 - u, u + 2**31)


def _key_float(key: int) -> float:
    """The float32 value (as a Python float) whose :func:`_float_key` is ``key``."""
    u = key - 2**31 if key >= 2**31 else 2**32 - 1 - key
    return float(torch.tensor([u - 2**32 if u >= 2**31 else u], dtype=torch.int32).view(torch.float32))


def _negative_distance_quantiles(x: torch.Tensor, y: torch.Tensor, qs: Sequence[float], num_neg: int,
                                 cols: int) -> list[float]:
    """Exact ``numpy.quantile(d_neg, q, method="linear")`` over all M negative pairs of all shards.

    d = 1 - s (float64 of the float32 similarity).  The order statistics come from a radix select on
    the similarities' 32-bit keys: pass 1 all-reduces a histogram of the high 16 bits, pass 2 one of
    the low 16 bits inside the few buckets that hold the wanted ranks.
    """
    need = []  # (j0, j1, gamma): value = lerp(d_(j0), d_(j1), gamma), 0-based ascending distance ranks
    for q in qs:
        h = (num_neg - 1) * q
        j0 = math.floor(h)
        need.append((j0, min(j0 + 1, num_neg - 1), h - j0))
    # ascending distance rank j = descending similarity rank j = ascending key position M - 1 - j
    pos = sorted({num_neg - 1 - j for j0, j1, _ in need for j in (j0, j1)})
    hist = torch.zeros(1 << 16, dtype=torch.long, device=x.device)
    for _, sim, _, neg, _ in _pair_blocks(x, y, cols):
        hist += torch.bincount(_float_key(sim[neg]) >> 16, minlength=1 << 16)
    cum = _all_reduce(hist).cumsum(0)
    high = {p: int(torch.searchsorted(cum, p, right=True)) for p in pos}  # bucket holding position p
    buckets = sorted(set(high.values()))
    low = torch.zeros(len(buckets), 1 << 16, dtype=torch.long, device=x.device)
    for _, sim, _, neg, _ in _pair_blocks(x, y, cols):
        key = _float_key(sim[neg])
        for i, b in enumerate(buckets):
            low[i] += torch.bincount(key[(key >> 16) == b] & 0xFFFF, minlength=1 << 16)
    low_cum = _all_reduce(low).cumsum(1)
    value = {}
    for p in pos:
        b = high[p]
        before = int(cum[b - 1]) if b > 0 else 0
        lo_bits = int(torch.searchsorted(low_cum[buckets.index(b)], p - before, right=True))
        value[p] = 1.0 - _key_float((b << 16) | lo_bits)  # the distance, in float64
    out = []
    for j0, j1, gamma in need:
        lo_v, hi_v = value[num_neg - 1 - j0], value[num_neg - 1 - j1]
        # numpy's _lerp, so that the result matches numpy.quantile to the last bit
        out.append(lo_v + (hi_v - lo_v) * gamma if gamma < 0.5 else hi_v - (hi_v - lo_v) * (1 - gamma))
    return out


@torch.no_grad()
def sharded_utility_curves(emb: torch.Tensor, labels: torch.Tensor, *,
                           far_range: tuple[float, float] = (1e-2, 1e-1), num_thresholds: int = 100,
                           beta: float = 1.0, cols: int = 4096) -> Any:
    """Per-class TAR / TRR / utility curves of the whole set from this rank's shard (n, D), (n,).

    The definitions and result are those of ``tcmlib.metrics.utility_curves`` (a
    ``UtilityCurves``; ``.opis``, ``.eps_opis(0.1)``), for classes (no groups) and float32
    similarities: thresholds ``linspace`` between the ``far_range`` quantiles of all negative-pair
    distances (exact, :func:`_negative_distance_quantiles`), then for each pair the first threshold
    t_k with d <= t_k, counted per class into (2, C, K) histograms that are all-reduced.  Pair
    totals per class come in closed form from the all-reduced class sizes.  Call it on all ranks.
    """
    from tcmlib.metrics.opis import UtilityCurves, utility

    x, y = _unit_rows(emb), labels.long().to(emb.device)
    classes, n_c = _class_counts(y)
    n_all, n_cls, k_thr = int(n_c.sum()), len(classes), int(num_thresholds)
    num_pos, num_neg = n_c * (n_c - 1) // 2, n_c * (n_all - n_c)  # (C,) pairs touching each class
    m = n_all * (n_all - 1) // 2 - int(num_pos.sum())  # all negative pairs
    eligible = (num_pos > 0) & (num_neg > 0)
    t_cls = int(eligible.sum())
    if m == 0 or t_cls < 2:
        raise ValueError(f"OPIS compares classes: it needs at least 2 eligible classes (>= 2 samples, "
                         f"and samples of other classes); got {t_cls}")
    t_lo, t_hi = _negative_distance_quantiles(x, y, far_range, m, cols)
    if not t_lo < t_hi:
        raise ValueError(f"the calibration range is empty: the far_range {far_range} quantiles are both "
                         f"{t_lo}; pass a wider far_range")
    thresholds = torch.linspace(t_lo, t_hi, k_thr, dtype=torch.float64)  # (K,)
    thr = thresholds.to(x.device)
    hist = torch.zeros(2, n_cls, k_thr + 1, dtype=torch.long, device=x.device)  # k = K: not accepted at t_max
    cls = torch.searchsorted(classes, y)  # (n,) class index of each row
    for r0, sim, pos, neg, y_cols in _pair_blocks(x, y, cols):
        col_cls = torch.searchsorted(classes, y_cols)  # (c,)
        for kind, mask, members in ((0, pos, (0,)), (1, neg, (0, 1))):
            rows, cs = torch.nonzero(mask, as_tuple=True)
            k0 = torch.searchsorted(thr, 1.0 - sim[rows, cs].double())  # first k with d <= t_k
            for member in members:  # a negative pair counts for both of its classes
                c = cls[rows + r0] if member == 0 else col_cls[cs]
                hist[kind].view(-1).index_add_(0, c * (k_thr + 1) + k0, torch.ones_like(k0))
    acc = _all_reduce(hist)[:, :, :k_thr].cumsum(dim=2)  # (2, C, K) pairs accepted at t_k
    acc = acc[:, eligible].transpose(1, 2).double().cpu()  # (2, K, T)
    pos_t, neg_t = num_pos[eligible].double().cpu(), num_neg[eligible].double().cpu()
    tar, trr = acc[0] / pos_t, (neg_t - acc[1]) / neg_t  # (K, T)
    return UtilityCurves(thresholds=thresholds, tar=tar, trr=trr, utility=utility(tar, trr, beta),
                         class_ids=classes[eligible].cpu(), num_pos=num_pos[eligible].cpu(),
                         num_neg=num_neg[eligible].cpu(), num_eligible=t_cls, num_excluded=n_cls - t_cls,
                         distance_range=(float(t_lo), float(t_hi)),
                         far_range=(float(far_range[0]), float(far_range[1])), beta=float(beta))


def evaluate_sharded(model: nn.Module, dataset: Any, *, ks: Sequence[int] = (1, 2, 4, 8),
                     batch_size: int = 256, device: str | torch.device = "cpu", amp: str | None = None,
                     num_workers: int = 0, channels_last: bool = False) -> dict[str, float]:
    """``tcmlib.train.evaluate_model`` over ranks: each embeds a contiguous shard of ``dataset``, then the
    sharded exact metrics; the same dict on every rank (R@k, MAP@R, OPIS, eps_OPIS at eps = 0.1)."""
    from torch.utils.data import Subset

    lo, hi = shard_bounds(len(dataset), world_size(), rank())
    shard = Subset(dataset, range(lo, hi))
    shard.batch_transform = getattr(dataset, "batch_transform", None)  # type: ignore[attr-defined]  # (uint8 photos)
    emb, labels = embed(model, shard, batch_size=batch_size, device=device, amp=amp,
                        num_workers=num_workers, channels_last=channels_last)
    emb, labels = emb.to(device), labels.to(device)
    recall, map_r = sharded_retrieval(emb, labels, ks)
    curves = sharded_utility_curves(emb, labels)
    out = {f"R@{k}": v for k, v in recall.items()}
    out.update({"MAP@R": map_r, "OPIS": curves.opis, "eps_OPIS": curves.eps_opis(0.1)})
    return out
