"""The retrieval pass on a GPU waits for the device a fixed number of times, whatever the number of tiles.

A GPU runs kernels asynchronously; an operation whose result the host must read (``nonzero``, a value
as a Python number, ``unique``) stalls the host until the device has caught up.  On a GPU the running
top-k is :class:`~tcmlib.metrics._pairs.DenseTopK` (chosen by the device type).  Here its code path runs
on CPU tensors under the dispatch-mode counter of ``test_train_syncs.py`` (counting every frame), and
the count must not grow with the number of tiles: no host synchronisation per tile.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tcmlib.metrics import _pairs, evaluate_embeddings, per_query_retrieval, reference, utility_curves
from tcmlib.metrics.retrieval import retrieval_metrics
from test_train_syncs import SyncCounter

retrieval_module = importlib.import_module("tcmlib.metrics.retrieval")


class AllSyncs(SyncCounter):
    """Every sync-forcing operation, wherever it was issued (the metrics included)."""

    def _count(self, name: str) -> None:
        self.counts[name] += 1


def clustered(n: int, classes: int, dim: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, dim, generator=g, dtype=torch.float64)[y] + torch.randn(n, dim, generator=g,
                                                                                      dtype=torch.float64)
    return x.to(dtype), y


@pytest.fixture
def dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's running top-k, on the CPU."""
    monkeypatch.setattr(_pairs, "_dense", lambda device: True)


def count_syncs(monkeypatch: pytest.MonkeyPatch, x: torch.Tensor, y: torch.Tensor, chunk: int, cols: int,
                reference_set: bool = False) -> tuple[int, int]:
    """``(sync-forcing operations, tiles)`` of one retrieval pass with tiles of ``chunk`` rows by ``cols``."""
    monkeypatch.setattr(_pairs, "TILE_COLS", cols)
    tiles = []
    real = _pairs.Tile.__init__
    monkeypatch.setattr(_pairs.Tile, "__init__", lambda self, *a: tiles.append(1) or real(self, *a))
    kw = {"reference": x[200:], "reference_labels": y[200:]} if reference_set else {}
    with AllSyncs() as counter:
        per_query_retrieval(x[:200] if reference_set else x, y[:200] if reference_set else y, (1, 4),
                            chunk_size=chunk, **kw)
    return sum(counter.counts.values()), len(tiles)


@pytest.mark.parametrize("reference_set", [False, True])
def test_dense_topk_syncs_do_not_grow_with_the_tiles(dense, monkeypatch, reference_set) -> None:
    x, y = clustered(600, 12, 16, seed=0)
    few, few_tiles = count_syncs(monkeypatch, x, y, 600, 4096, reference_set)
    many, many_tiles = count_syncs(monkeypatch, x, y, 40, 40, reference_set)
    assert many_tiles >= 50 * few_tiles  # the test is about the tiles: many more of them
    assert many == few, f"{many} syncs over {many_tiles} tiles, {few} over {few_tiles}: the pass syncs per tile"


def test_the_cpu_screening_syncs_per_tile(monkeypatch) -> None:
    """The counter sees the screening path's per-tile reads (why it stays on the CPU)."""
    x, y = clustered(600, 12, 16, seed=0)
    few, few_tiles = count_syncs(monkeypatch, x, y, 600, 4096)
    many, many_tiles = count_syncs(monkeypatch, x, y, 40, 40)
    assert many - few >= many_tiles - few_tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_and_screened_topk_give_the_same_bits(dense, monkeypatch, dtype) -> None:
    x, y = clustered(700, 15, 12, seed=1, dtype=dtype)
    monkeypatch.setattr(_pairs, "TILE_COLS", 128)
    got = retrieval_metrics(x, y, (1, 2, 8), chunk_size=96)
    got_ref = retrieval_metrics(x[:300], y[:300], (1, 3), chunk_size=64, reference=x[300:],
                                reference_labels=y[300:])
    got_eval = evaluate_embeddings(x, y, chunk_size=96)
    monkeypatch.setattr(_pairs, "_dense", lambda device: False)
    want = retrieval_metrics(x, y, (1, 2, 8), chunk_size=96)
    want_ref = retrieval_metrics(x[:300], y[:300], (1, 3), chunk_size=64, reference=x[300:],
                                 reference_labels=y[300:])
    want_eval = evaluate_embeddings(x, y, chunk_size=96)
    for a, b in ((got, want), (got_ref, want_ref)):
        for name in a.per_query._fields:
            assert torch.equal(getattr(a.per_query, name).nan_to_num(-1), getattr(b.per_query, name).nan_to_num(-1))
    assert got_eval.as_dict() == want_eval.as_dict()


@pytest.mark.parametrize("chunk_size", [7, 64])
def test_dense_topk_with_ties_matches_the_dense_reference(dense, monkeypatch, chunk_size) -> None:
    """Identical embeddings of 5 kinds: ties everywhere, across tile edges (and the second pass)."""
    monkeypatch.setattr(_pairs, "TILE_COLS", 5)
    g = torch.Generator().manual_seed(3)
    x = torch.eye(5, dtype=torch.float64)[torch.randint(0, 5, (150,), generator=g)]
    y = torch.randint(0, 6, (150,), generator=g)
    ks = (1, 2, 4, 31)
    got = retrieval_metrics(x, y, ks, chunk_size=chunk_size)
    want = reference.recall_at_k(x, y, ks)
    for k in ks:
        assert got.recall[k] == pytest.approx(want[k], abs=1e-12)
    assert got.map_at_r == pytest.approx(reference.map_at_r(x, y), abs=1e-12)


def count_curve_syncs(monkeypatch: pytest.MonkeyPatch, x: torch.Tensor, y: torch.Tensor, chunk: int, cols: int,
                      **kw) -> tuple[int, int]:
    """``(sync-forcing operations, tiles)`` of one counting pass of ``utility_curves`` (a given distance range:
    no calibration pass) with tiles of ``chunk`` rows by ``cols``."""
    monkeypatch.setattr(_pairs, "TILE_COLS", cols)
    tiles = []
    real = _pairs.Tile.__init__
    monkeypatch.setattr(_pairs.Tile, "__init__", lambda self, *a: tiles.append(1) or real(self, *a))
    with AllSyncs() as counter:
        utility_curves(x, y, distance_range=(0.3, 1.1), num_thresholds=9, chunk_size=chunk, **kw)
    return sum(counter.counts.values()), len(tiles)


@pytest.mark.parametrize("kw", [{}, {"groups": "g"}, {"reference": True}])
def test_dense_counting_pass_syncs_do_not_grow_with_the_tiles(dense, monkeypatch, kw) -> None:
    x, y = clustered(600, 12, 16, seed=0)
    if kw.get("groups"):
        kw = {"groups": torch.arange(600) % 5}
    if kw.get("reference"):
        x, y, kw = x[:200], y[:200], {"reference": x[200:], "reference_labels": y[200:]}
    few, few_tiles = count_curve_syncs(monkeypatch, x, y, 600, 4096, **kw)
    many, many_tiles = count_curve_syncs(monkeypatch, x, y, 40, 40, **kw)
    assert many_tiles >= 50 * few_tiles
    assert many == few, f"{many} syncs over {many_tiles} tiles, {few} over {few_tiles}: the counting pass syncs per tile"


def test_the_cpu_counting_pass_syncs_per_tile(monkeypatch) -> None:
    """The counter sees the listing path's per-tile reads (why the dense binning is for a GPU)."""
    x, y = clustered(600, 12, 16, seed=0)
    few, few_tiles = count_curve_syncs(monkeypatch, x, y, 600, 4096)
    many, many_tiles = count_curve_syncs(monkeypatch, x, y, 40, 40)
    assert many - few >= many_tiles - few_tiles


@pytest.mark.parametrize("kw", [{}, {"groups": True}, {"reference": True}, {"given": True}])
def test_dense_and_listed_counts_give_the_same_bits(dense, monkeypatch, kw) -> None:
    x, y = clustered(700, 15, 12, seed=1)
    monkeypatch.setattr(_pairs, "TILE_COLS", 128)
    args: dict = {"num_thresholds": 11, "chunk_size": 96}
    if kw.get("groups"):
        args["groups"] = torch.arange(700) % 7
    if kw.get("reference"):
        x, y, args = x[:300], y[:300], {**args, "reference": x[300:], "reference_labels": y[300:]}
    if kw.get("given"):
        args["distance_range"] = (0.2, 1.0)
    got = utility_curves(x, y, **args)
    monkeypatch.setattr(_pairs, "_dense", lambda device: False)
    want = utility_curves(x, y, **args)
    for name in ("thresholds", "tar", "trr", "utility"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
