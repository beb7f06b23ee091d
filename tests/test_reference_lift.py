"""The dense references of tcmlib.metrics.reference work when lifted alone, and equal the streamed code.

Each reference function's source (``inspect.getsource``) is written alone, after ``import torch``, into
a module of its own in a temporary directory and imported from there: a function that used another
name of tcmlib would fail here.  The lifted copies are then compared with the streamed implementations
(several sizes, one tile or many), and with values computed by hand on tiny cases.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from tcmlib.losses.tcm import tcm_loss
from tcmlib.metrics import _pairs, reference
from tcmlib.metrics import eps_opis as streamed_eps_opis
from tcmlib.metrics import opis as streamed_opis
from tcmlib.metrics import recall_and_map_at_r, utility_curves

opis_module = importlib.import_module("tcmlib.metrics.opis")
retrieval_module = importlib.import_module("tcmlib.metrics.retrieval")

NAMES = ["recall_at_k", "map_at_r", "utility_curves", "opis", "eps_opis", "tcm_loss"]


@pytest.fixture(scope="module")
def lifted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each reference function, copied alone into its own module file and imported from there."""
    folder = tmp_path_factory.mktemp("lifted")
    out = {}
    for name in NAMES:
        source = inspect.getsource(getattr(reference, name))
        path = Path(folder) / f"lifted_{name}.py"
        path.write_text("import torch\n\n\n" + source)
        spec = importlib.util.spec_from_file_location(f"lifted_{name}", path)
        assert spec is not None and spec.loader is not None
        module: ModuleType = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.__file__ == str(path) and "tcmlib" not in vars(module)
        out[name] = getattr(module, name)
    return out


def test_every_public_reference_is_lifted() -> None:
    assert sorted(reference.__all__) == sorted(NAMES)


def test_the_lifted_source_imports_nothing_but_torch() -> None:
    for name in NAMES:
        source = inspect.getsource(getattr(reference, name))
        assert "tcmlib" not in source and "import" not in source, name


def clustered(seed: int, n: int, dim: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uneven classes (one singleton at least), noisy clusters, float64, no tied similarities."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    y[0] = classes  # a singleton: left out of retrieval, not eligible for OPIS
    centres = torch.randn(classes + 1, dim, generator=g, dtype=torch.float64)
    return centres[y] + 1.2 * torch.randn(n, dim, generator=g, dtype=torch.float64), y


SIZES = [(0, 40, 4, 5), (1, 97, 6, 9), (2, 230, 8, 20)]


@pytest.fixture(params=[None, 5], ids=["one tile", "many tiles"])
def tile_cols(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int | None:
    """None: the default tiles; 5: tiles of 5 columns, so each row block spans many tiles."""
    if request.param is not None:
        monkeypatch.setattr(_pairs, "TILE_COLS", request.param)
    return request.param


@pytest.mark.parametrize("seed,n,dim,classes", SIZES)
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_retrieval_matches_streamed(lifted, tile_cols, seed, n, dim, classes, chunk_size) -> None:
    x, y = clustered(seed, n, dim, classes)
    ks = (1, 2, 4, 8, n - 1)
    recall, m = recall_and_map_at_r(x, y, ks, chunk_size=chunk_size)
    ref = lifted["recall_at_k"](x, y, ks)
    assert list(ref) == list(ks)
    for k in ks:
        assert ref[k] == pytest.approx(recall[k], abs=1e-12)
    assert lifted["map_at_r"](x, y) == pytest.approx(m, abs=1e-12)


@pytest.mark.parametrize("seed,n,dim,classes", SIZES)
@pytest.mark.parametrize("chunk_size", [7, 1024])
@pytest.mark.parametrize("kwargs", [{}, {"far_range": (0.05, 0.5), "num_thresholds": 17, "beta": 0.5}])
def test_utility_curves_opis_and_eps_opis_match_streamed(lifted, tile_cols, seed, n, dim, classes, chunk_size,
                                                         kwargs) -> None:
    x, y = clustered(seed, n, dim, classes)
    res = utility_curves(x, y, chunk_size=chunk_size, **kwargs)
    t, cls, tar, trr, util = lifted["utility_curves"](x, y, **kwargs)
    assert torch.equal(cls, res.class_ids)
    for name, ours, theirs in (("thresholds", t, res.thresholds), ("tar", tar, res.tar), ("trr", trr, res.trr),
                               ("utility", util, res.utility)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12, msg=name)
    assert lifted["opis"](util) == pytest.approx(streamed_opis(x, y, chunk_size=chunk_size, **kwargs), abs=1e-14)
    for eps in (0.1, 0.25):
        assert lifted["eps_opis"](util, eps) == pytest.approx(
            streamed_eps_opis(x, y, eps=eps, chunk_size=chunk_size, **kwargs), abs=1e-14)
        assert lifted["eps_opis"](res.utility, eps) == pytest.approx(res.eps_opis(eps), abs=1e-15)
    assert lifted["opis"](res.utility) == pytest.approx(res.opis, abs=1e-15)


@pytest.mark.parametrize("seed,b,classes", [(0, 12, 3), (1, 40, 6), (2, 64, 16)])
def test_tcm_loss_matches_value_and_gradient(lifted, seed, b, classes) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 8, generator=g, dtype=torch.float64) + 0.7 * torch.randn(1, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (b,), generator=g)
    for kw in ({}, {"m_pos": 0.6, "m_neg": 0.2, "l_pos": 0.5, "l_neg": 2.0}):
        a, c = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ref = lifted["tcm_loss"](a, y, **kw)
        ours = tcm_loss(c, y, **{{"m_pos": "margin_pos", "m_neg": "margin_neg", "l_pos": "lambda_pos",
                                  "l_neg": "lambda_neg"}[k]: v for k, v in kw.items()})
        ref.backward()
        ours.backward()
        assert ref.item() == pytest.approx(ours.item(), abs=1e-12)
        torch.testing.assert_close(a.grad, c.grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- by hand
def circle(degrees: list[float]) -> torch.Tensor:
    r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(r), torch.sin(r)], dim=1)


def test_retrieval_by_hand(lifted) -> None:
    # A A B B A C at 0, 20, 50, 90, 175, 200 degrees (tests/test_retrieval.py works out the ranks):
    # R@1 = 3/5, R@2 = 4/5, R@4 = 5/5, MAP@R = (0.5 + 0.5 + 0 + 1 + 0) / 5 = 0.4 (C, a singleton, left out).
    x, y = circle([0, 20, 50, 90, 175, 200]), torch.tensor([0, 0, 1, 1, 0, 2])
    assert lifted["recall_at_k"](x, y, (1, 2, 4)) == pytest.approx({1: 0.6, 2: 0.8, 4: 1.0}, abs=1e-15)
    assert lifted["map_at_r"](x, y) == pytest.approx(0.4, abs=1e-15)


def test_retrieval_with_ties_by_hand(lifted) -> None:
    # Four copies of one point, labels A A B B: every query's 3 others tie; 1 of them relevant (R = 1).
    # R@1 = P(the relevant one drawn first of 3) = 1/3; R@2 = 1 - P(both of 2 drawn irrelevant)
    # = 1 - (2/3)(1/2) = 2/3; AP@R = E[rel(1)] = 1/3.
    x, y = torch.ones(4, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1])
    assert lifted["recall_at_k"](x, y, (1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0}, abs=1e-15)
    assert lifted["map_at_r"](x, y) == pytest.approx(1 / 3, abs=1e-15)
    # Labels A A A B: A's 3 others tie with 2 relevant (R = 2):
    # AP@R = (1/2) (E[rel(1)] + E[rel(2) (rel(1) + rel(2))] / 2) = (1/2) (2/3 + (2/3 + 1/3) / 2) = 7/12
    # (E[rel(2)] = 2/3, E[rel(1) rel(2)] = (2/3)(1/2) = 1/3); B has R = 0 and is left out.
    y = torch.tensor([0, 0, 0, 1])
    assert lifted["map_at_r"](x, y) == pytest.approx(7 / 12, abs=1e-15)
    assert lifted["recall_at_k"](x, y, (1,))[1] == pytest.approx(2 / 3, abs=1e-15)


def test_utility_and_opis_by_hand(lifted) -> None:
    # Classes A = {0, 10 deg}, B = {90, 130 deg}, one threshold range given by FAR bounds (0, 1):
    # negatives (4 pairs) at 80, 90, 120, 130 degrees; t_min = 1 - cos 80, t_max = 1 - cos 130.
    # A's positive pair (10 deg) and B's (40 deg) lie below t_min: TAR = 1 for both at every threshold.
    # Every negative pair touches both classes, so TRR_A = TRR_B and U_A = U_B: OPIS = 0.
    x, y = circle([0, 10, 90, 130]), torch.tensor([0, 0, 1, 1])
    t, cls, tar, trr, util = lifted["utility_curves"](x, y, far_range=(0.0, 1.0), num_thresholds=3)
    assert cls.tolist() == [0, 1]
    torch.testing.assert_close(t[[0, -1]], 1 - torch.cos(torch.tensor([80.0, 130.0], dtype=torch.float64) * math.pi / 180))
    assert tar.eq(1).all()
    # at t_min one negative (80 deg) is accepted, so TRR = 3/4; at t_max all are: TRR = 0, U = 0
    assert trr[0].tolist() == [0.75, 0.75] and trr[-1].tolist() == [0.0, 0.0]
    assert util[0].tolist() == pytest.approx([2 * 0.75 / 1.75] * 2)
    assert lifted["opis"](util) == 0.0
    # two classes with utilities 1 and 0 at one threshold, 0.5 and 0.5 at the other: variance 1/4 and 0
    u = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    assert lifted["opis"](u) == pytest.approx(0.125)
    # eps = 0.1 of 2 classes: W = the class of lower mean (B, 0.25), R = A (0.75): gaps -1 and 0
    assert lifted["eps_opis"](u, 0.1) == pytest.approx(0.5)


def test_tcm_loss_by_hand(lifted) -> None:
    # pml's worked example (paper-notes.md): positive part 0.1929, negative part 0.325
    x = torch.tensor([[0.0, 1.0], [0.43, 0.9], [1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    assert float(lifted["tcm_loss"](x, y)) == pytest.approx(0.1929 + 0.325, abs=1e-4)


def test_the_lift_would_fail_for_a_function_that_needs_its_module(tmp_path: Path) -> None:
    """The lift is a real check: a function using a module-level helper fails once copied alone."""
    path = tmp_path / "lifted_bad.py"
    path.write_text("import torch\n\n\ndef f(x):\n    return helper(x)\n")
    spec = importlib.util.spec_from_file_location("lifted_bad", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(NameError):
        module.f(torch.ones(1))
    assert "lifted_bad" not in sys.modules and np is not None
