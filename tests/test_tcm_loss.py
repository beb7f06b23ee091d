"""Tests of tcmlib.losses.tcm against independent oracles.

Oracles: the hand-computed example of pytorch-metric-learning's own test, a brute-force loop over
*unordered* pairs in plain Python floats (ours uses ordered pairs in a matrix), pml's
``ThresholdConsistentMarginLoss`` (gathers every pair; value and gradient), and finite
differences (``torch.autograd.gradcheck``) for the reference-set path, which pml gets wrong.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import ContrastiveLoss, ThresholdConsistentMarginLoss

from tcmlib.losses.tcm import TCMLoss, tcm_loss


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(u * v for u, v in zip(a, b))
    return dot / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)))


def brute_force_tcm(x, y, r=None, ry=None, m_pos=0.9, m_neg=0.5, l_pos=1.0, l_neg=1.0) -> float:
    """Double loop over pairs in Python floats.

    Without a reference set: unordered pairs i < j.  With one: every (query i, reference j).
    """
    x, y = x.tolist(), y.tolist()
    if r is None:
        pairs = [(x[i], x[j], y[i] == y[j]) for i in range(len(x)) for j in range(i + 1, len(x))]
    else:
        r, ry = r.tolist(), ry.tolist()
        pairs = [(x[i], r[j], y[i] == ry[j]) for i in range(len(x)) for j in range(len(r))]
    hard_pos = [m_pos - _cos(a, b) for a, b, same in pairs if same and _cos(a, b) <= m_pos]
    hard_neg = [_cos(a, b) - m_neg for a, b, same in pairs if not same and _cos(a, b) >= m_neg]
    pos = sum(hard_pos) / len(hard_pos) if hard_pos else 0.0
    neg = sum(hard_neg) / len(hard_neg) if hard_neg else 0.0
    return l_pos * pos + l_neg * neg


def _batch(seed: int, b: int, d: int, n_classes: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # a shared offset makes many pairs similar, so both terms have hard pairs
    x = torch.randn(b, d, generator=g, dtype=dtype) + 0.7 * torch.randn(1, d, generator=g, dtype=dtype)
    y = torch.randint(0, n_classes, (b,), generator=g)
    return x, y


# ---------------------------------------------------------------- the worked example of pml's test
EXAMPLE_X = [[0.00, 1.00], [0.43, 0.90], [1.00, 0.00], [0.50, 0.50]]
EXAMPLE_Y = [0, 0, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_worked_example(dtype):
    x = torch.tensor(EXAMPLE_X, dtype=dtype)
    y = torch.tensor(EXAMPLE_Y)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-5, atol=1e-4)
    # positive part: only pair (2, 3), s = 0.7071: (0.9 - 0.7071) / 1 = 0.1929
    assert torch.isclose(tcm_loss(x, y, lambda_neg=0.0).double(), torch.tensor(0.1929, dtype=torch.float64), **tol)
    # negative part: pairs (0, 3), s = 0.7071, and (1, 3), s = 0.9429 ((1, 2) has s = 0.431 < 0.5)
    # -> (0.7071 - 0.5 + 0.9429 - 0.5) / 2 = 0.325
    assert torch.isclose(tcm_loss(x, y, lambda_pos=0.0).double(), torch.tensor(0.325, dtype=torch.float64), **tol)
    assert torch.isclose(tcm_loss(x, y).double(), torch.tensor(0.5179, dtype=torch.float64), **tol)


def test_worked_example_with_pml_contrastive():
    x = torch.tensor(EXAMPLE_X)
    y = torch.tensor(EXAMPLE_Y)
    base = ContrastiveLoss(pos_margin=0.9, neg_margin=0.4, distance=CosineSimilarity())(x, y)
    assert abs(base.item() - 0.4866) < 1e-4
    assert abs((base + tcm_loss(x, y)).item() - 1.0045) < 1e-4


# ---------------------------------------------------------------- equality with pml (value + grad)
@pytest.mark.parametrize("b", [8, 33, 64])
@pytest.mark.parametrize("n_classes", [2, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_pml_value_and_gradient(b, n_classes, dtype):
    params = [(0.9, 0.5, 1.0, 1.0), (0.6, 0.2, 0.5, 2.0), (0.95, -0.1, 3.0, 0.25)]
    for seed, (mp, mn, lp, ln) in enumerate(params):
        x, y = _batch(100 * b + 10 * n_classes + seed, b, 16, n_classes, dtype)
        x1 = x.clone().requires_grad_()
        x2 = x.clone().requires_grad_()
        ours = tcm_loss(x1, y, margin_pos=mp, margin_neg=mn, lambda_pos=lp, lambda_neg=ln)
        pml = ThresholdConsistentMarginLoss(lambda_plus=lp, lambda_minus=ln, margin_plus=mp, margin_minus=mn)(x2, y)
        ours.backward()
        pml.backward()
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours, pml.to(ours.dtype), **tol)
        torch.testing.assert_close(x1.grad, x2.grad, **tol)


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(seed):
    x, y = _batch(seed, 20, 6, 3)
    kw = dict(m_pos=0.8, m_neg=0.3, l_pos=1.5, l_neg=0.5)
    ours = tcm_loss(x, y, margin_pos=0.8, margin_neg=0.3, lambda_pos=1.5, lambda_neg=0.5)
    assert ours.item() == pytest.approx(brute_force_tcm(x, y, **kw), rel=1e-12, abs=1e-14)
    assert TCMLoss(0.8, 0.3, 1.5, 0.5)(x, y).item() == pytest.approx(ours.item(), rel=1e-14)


# ---------------------------------------------------------------- reference set
def test_ref_set_matches_brute_force_and_finite_differences():
    x, y = _batch(7, 9, 5, 3)
    r, ry = _batch(8, 12, 5, 4)
    ours = tcm_loss(x, y, ref_emb=r, ref_labels=ry, margin_neg=0.2)
    assert ours.item() == pytest.approx(brute_force_tcm(x, y, r, ry, m_neg=0.2), rel=1e-12)
    # gradient w.r.t. both sets, by finite differences (random points are far from the hinge kinks)
    f = lambda a, b: tcm_loss(a, y, ref_emb=b, ref_labels=ry, margin_neg=0.2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(), r.clone().requires_grad_()))


def test_ref_same_object_excludes_self_pairs_but_a_copy_includes_them():
    x, y = _batch(3, 15, 4, 3)
    no_ref = tcm_loss(x, y, margin_neg=0.1)
    assert tcm_loss(x, y, ref_emb=x, ref_labels=y, margin_neg=0.1).item() == no_ref.item()
    # a copy is a separate reference set: all B x B pairs, self pairs (s = 1) included;
    # they are never hard for m+ < 1, and each other pair appears twice, so the value is equal
    copy = tcm_loss(x, y, ref_emb=x.clone(), ref_labels=y.clone(), margin_neg=0.1)
    ordered = brute_force_tcm(x, y, x.clone(), y.clone(), m_neg=0.1)
    assert copy.item() == pytest.approx(ordered, rel=1e-12)
    assert copy.item() == pytest.approx(no_ref.item(), rel=1e-12)


def test_pml_ref_path_differs_and_ours_is_right():
    """pml indexes ``embeddings`` for both members even when ``ref_emb`` is given (pml 2.9)."""
    x, y = _batch(11, 12, 5, 3)
    r, ry = _batch(12, 9, 5, 3)  # M <= B, otherwise pml's indexing fails outright
    pml = ThresholdConsistentMarginLoss()(x, y, ref_emb=r, ref_labels=ry).item()
    # what pml computes: pairs (x_i, x_j) for query i and reference index j, labels (y_i, ry_j)
    xl, yl, ryl = x.tolist(), y.tolist(), ry.tolist()
    sims = [(_cos(xl[i], xl[j]), yl[i] == ryl[j]) for i in range(12) for j in range(9)]
    pos = [0.9 - s for s, same in sims if same and s <= 0.9]
    neg = [s - 0.5 for s, same in sims if not same and s >= 0.5]
    wrong = (sum(pos) / len(pos) if pos else 0.0) + (sum(neg) / len(neg) if neg else 0.0)
    assert pml == pytest.approx(wrong, rel=1e-12)
    right = brute_force_tcm(x, y, r, ry)
    ours = tcm_loss(x, y, ref_emb=r, ref_labels=ry).item()
    assert ours == pytest.approx(right, rel=1e-12)
    assert abs(ours - pml) > 1e-3


# ---------------------------------------------------------------- empty terms
def test_no_hard_pairs_is_exactly_zero_with_zero_gradient():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    loss = tcm_loss(x, y)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_only_positive_pairs_hard():
    # positives at 60 degrees (s = 0.5 <= 0.9), negatives orthogonal-ish (s < 0.5)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.866, 0.0], [0.0, 0.0, 1.0], [0.0, 0.5, 0.866]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    expected = brute_force_tcm(x, y)
    assert expected > 0
    assert tcm_loss(x, y).item() == pytest.approx(expected, rel=1e-12)
    assert tcm_loss(x, y, lambda_neg=7.0).item() == pytest.approx(expected, rel=1e-12)  # neg term empty


def test_only_negative_pairs_hard():
    # positives identical direction (s = 1 > 0.9), the two classes close (s ~ 0.99 >= 0.5)
    x = torch.tensor([[1.0, 0.1], [2.0, 0.2], [1.0, 0.2], [3.0, 0.6]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    expected = brute_force_tcm(x, y)
    assert expected > 0
    assert tcm_loss(x, y).item() == pytest.approx(expected, rel=1e-12)
    assert tcm_loss(x, y, lambda_pos=7.0).item() == pytest.approx(expected, rel=1e-12)  # pos term empty


def test_single_class_batch_has_positive_term_only():
    x, _ = _batch(5, 10, 4, 1)
    y = torch.zeros(10, dtype=torch.long)
    assert tcm_loss(x, y).item() == pytest.approx(brute_force_tcm(x, y), rel=1e-12)
    assert tcm_loss(x, y, lambda_neg=5.0).item() == tcm_loss(x, y).item()


def test_single_sample_is_zero():
    x = torch.randn(1, 4, requires_grad=True)
    loss = tcm_loss(x, torch.tensor([3]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


# ---------------------------------------------------------------- dtypes and devices
def test_low_precision_inputs_and_autocast_return_float32_close_to_float32():
    x, y = _batch(2, 32, 16, 4, torch.float32)
    ref = tcm_loss(x, y, margin_pos=0.95, margin_neg=0.2)
    for out in (
        tcm_loss(x.bfloat16(), y, margin_pos=0.95, margin_neg=0.2),
        tcm_loss(x.half(), y, margin_pos=0.95, margin_neg=0.2),
    ):
        assert out.dtype == torch.float32
        assert abs(out.item() - ref.item()) < 2e-2
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tcm_loss(xg, y, margin_pos=0.95, margin_neg=0.2)
    out.backward()
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) < 2e-2
    assert torch.isfinite(xg.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, y = _batch(4, 64, 32, 5)
    cpu = tcm_loss(x, y)
    gpu = tcm_loss(x.cuda(), y.cuda())
    assert gpu.device.type == "cuda"
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-10)
    with torch.autocast("cuda", dtype=torch.float16):
        half = tcm_loss(x.float().cuda(), y.cuda())
    assert half.dtype == torch.float32 and abs(half.item() - cpu.item()) < 2e-2


# ---------------------------------------------------------------- invalid input
X4 = torch.tensor(EXAMPLE_X)
Y4 = torch.tensor(EXAMPLE_Y)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.ones(4), Y4), {}, "2-D"),
        ((torch.ones(0, 2), torch.ones(0, dtype=torch.long)), {}, "empty"),
        ((torch.tensor([[0.0, 1.0], [float("nan"), 1.0]]), Y4[:2]), {}, "NaN"),
        ((torch.tensor([[0.0, 1.0], [float("inf"), 1.0]]), Y4[:2]), {}, "inf"),
        ((torch.tensor([[0.0, 1.0], [0.0, 0.0]]), Y4[:2]), {}, "all-zero"),
        ((X4, Y4[:3]), {}, "one label per"),
        ((X4, Y4[:, None]), {}, "1-D"),
        ((X4, Y4.float() + 0.5), {}, "integer"),
        ((X4, Y4), {"margin_pos": 1.5}, "margin_pos"),
        ((X4, Y4), {"margin_neg": -1.01}, "margin_neg"),
        ((X4, Y4), {"lambda_pos": -1.0}, "lambda_pos"),
        ((X4, Y4), {"lambda_neg": float("nan")}, "lambda_neg"),
        ((X4, Y4), {"ref_emb": X4}, "together"),
        ((X4, Y4), {"ref_labels": Y4}, "together"),
        ((X4, Y4), {"ref_emb": torch.ones(3, 5), "ref_labels": Y4[:3]}, "dimension"),
        ((X4, Y4), {"ref_emb": torch.ones(3, 2), "ref_labels": Y4}, "ref_labels has 4"),
        ((X4, Y4), {"ref_emb": torch.zeros(3, 2), "ref_labels": Y4[:3]}, "ref_emb has 3 all-zero"),
    ],
)
def test_invalid_input_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tcm_loss(*args, **kwargs)


def test_module_checks_parameters_at_construction():
    with pytest.raises(ValueError, match="margin_pos"):
        TCMLoss(margin_pos=2.0)
    with pytest.raises(ValueError, match="lambda_neg"):
        TCMLoss(lambda_neg=-0.5)
    assert "margin_pos=0.9" in repr(TCMLoss())


# ---------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(2, 24), n_classes=st.integers(1, 6))
def test_invariant_to_order_renaming_and_scale(seed, b, n_classes):
    x, y = _batch(seed, b, 5, n_classes)
    g = torch.Generator().manual_seed(seed + 1)
    base = tcm_loss(x, y, margin_neg=0.2).item()
    perm = torch.randperm(b, generator=g)
    assert tcm_loss(x[perm], y[perm], margin_neg=0.2).item() == pytest.approx(base, rel=1e-9, abs=1e-12)
    new_names = torch.randperm(1000, generator=g)[:n_classes] * 7 - 3000  # any distinct integers
    assert tcm_loss(x, new_names[y], margin_neg=0.2).item() == pytest.approx(base, rel=1e-9, abs=1e-12)
    scale = torch.exp(torch.empty(b, 1, dtype=x.dtype).uniform_(-5, 5, generator=g))  # per-row, positive
    assert tcm_loss(x * scale, y, margin_neg=0.2).item() == pytest.approx(base, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------- gradient: hand-made W vs autograd
def test_several_row_blocks_match_pml():
    x, y = _batch(21, 300, 8, 40)  # 300 x 300 entries: 2 row blocks of <= 218 rows
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    tcm_loss(x1, y, margin_neg=0.3).backward()
    ThresholdConsistentMarginLoss(margin_minus=0.3)(x2, y).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


def _naive_autograd_tcm(x, y, r=None, ry=None, m_pos=0.9, m_neg=0.2):
    """The masked matrix form, differentiated by autograd (the oracle for our hand-made W)."""
    xn = torch.nn.functional.normalize(x, dim=1)
    rn = xn if r is None else torch.nn.functional.normalize(r, dim=1)
    ry = y if ry is None else ry
    sim = xn @ rn.T
    same = y[:, None] == ry[None, :]
    if r is None:
        same = same & ~torch.eye(len(y), dtype=torch.bool)
    hp, hn = same & (sim <= m_pos), ~(y[:, None] == ry[None, :]) & (sim >= m_neg)
    pos = torch.where(hp, m_pos - sim, 0).sum() / hp.sum().clamp(min=1)
    return pos + torch.where(hn, sim - m_neg, 0).sum() / hn.sum().clamp(min=1)


def test_value_and_gradients_match_autograd_of_the_naive_form():
    x, y = _batch(22, 20, 5, 4)
    r, ry = _batch(23, 11, 5, 4)
    for with_ref in (False, True):
        xa, xb, ra, rb = (t.clone().requires_grad_() for t in (x, x, r, r))
        kw = {"ref_emb": ra, "ref_labels": ry} if with_ref else {}
        ours = tcm_loss(xa, y, margin_neg=0.2, **kw)
        naive = _naive_autograd_tcm(xb, y, rb if with_ref else None, ry if with_ref else None)
        ours.backward()
        naive.backward()
        torch.testing.assert_close(ours, naive, rtol=1e-12, atol=0)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-15)
        if with_ref:
            torch.testing.assert_close(ra.grad, rb.grad, rtol=1e-12, atol=1e-15)
    with torch.no_grad():  # no gradient wanted: the same value
        assert tcm_loss(xa, y, margin_neg=0.2).item() == tcm_loss(xa.detach(), y, margin_neg=0.2).item()


def test_second_derivative_equals_autograd_of_the_naive_form() -> None:
    """Hessian-vector products (create_graph=True) equal those of the plain autograd matrix form."""
    torch.manual_seed(0)
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    v = torch.randn(10, 4, dtype=torch.float64)

    def naive(e: torch.Tensor) -> torch.Tensor:
        en = e / e.norm(dim=1, keepdim=True)
        s = en @ en.T
        same = (y[:, None] == y[None, :]) & ~torch.eye(10, dtype=torch.bool)
        hp, hn = same & (s <= 0.9), (y[:, None] != y[None, :]) & (s >= -1.0)
        return (0.9 - s)[hp].sum() / hp.sum().clamp(min=1) + (s + 1.0)[hn].sum() / hn.sum().clamp(min=1)

    hvps = []
    for f in (lambda e: tcm_loss(e, y, margin_neg=-1.0), naive):
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), x)
        hvps.append(hv)
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- pml's calling convention, miners
def _miners():
    from pytorch_metric_learning import miners

    return [miners.MultiSimilarityMiner(epsilon=0.1), miners.TripletMarginMiner(margin=0.2),
            miners.PairMarginMiner(pos_margin=0.8, neg_margin=0.3),
            miners.BatchEasyHardMiner(), miners.BatchHardMiner()]


@pytest.mark.parametrize("miner", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mined_pairs_match_pml_value_and_gradient(miner, dtype):
    """With a real pml miner's tuple (pairs or triplets) TCMLoss equals pml's TCM on the same tuple."""
    for seed, (mp, mn) in enumerate([(0.9, 0.5), (0.6, 0.1)]):
        x, y = _batch(40 + seed, 48, 16, 6, dtype)
        idx = _miners()[miner](x, y)
        assert sum(len(t) for t in idx) > 0
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = TCMLoss(margin_pos=mp, margin_neg=mn, lambda_neg=2.0)(x1, y, idx)
        pml = ThresholdConsistentMarginLoss(margin_plus=mp, margin_minus=mn, lambda_minus=2.0)(x2, y, idx)
        ours.backward()
        pml.backward()
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours, pml.to(ours.dtype), **tol)
        torch.testing.assert_close(x1.grad, x2.grad, **tol)
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    mined, every = lmu.convert_to_pairs(idx, y), lmu.get_all_pairs_indices(y)
    key = lambda a, b: sorted(zip(a.tolist(), b.tolist()))  # noqa: E731
    assert (key(*mined[:2]), key(*mined[2:])) != (key(*every[:2]), key(*every[2:]))  # not every pair


def test_mined_pairs_match_brute_force_with_repeats_and_a_reference_set():
    """Anchors index embeddings, partners index ref_emb; a repeated pair counts twice."""
    x, y = _batch(7, 5, 3, 2)
    r, ry = _batch(8, 4, 3, 2)
    a1, p = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 1, 3, 0])
    a2, n = torch.tensor([3, 4]), torch.tensor([2, 2])
    cos = lambda u, v: float(torch.nn.functional.cosine_similarity(u, v, dim=0))  # noqa: E731
    sp = [cos(x[i], r[j]) for i, j in zip(a1.tolist(), p.tolist())]
    sn = [cos(x[i], r[j]) for i, j in zip(a2.tolist(), n.tolist())]
    hp, hn = [0.95 - s for s in sp if s <= 0.95], [s + 0.9 for s in sn if s >= -0.9]
    expected = sum(hp) / max(len(hp), 1) + sum(hn) / max(len(hn), 1)
    out = tcm_loss(x, y, indices_tuple=(a1, p, a2, n), ref_emb=r, ref_labels=ry, margin_pos=0.95, margin_neg=-0.9)
    assert out.item() == pytest.approx(expected, rel=1e-9)
    f = lambda u, v: tcm_loss(u, y, indices_tuple=(a1, p, a2, n), ref_emb=v, ref_labels=ry,  # noqa: E731
                              margin_pos=0.95, margin_neg=-0.9)
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(), r.clone().requires_grad_()))


@pytest.mark.parametrize("miner", range(5))
def test_labels_none_with_mined_pairs_matches_pml(miner):
    """pml's losses take labels=None with a tuple (pass_labels_to_loss_fn=False): so does TCMLoss."""
    x, y = _batch(60 + miner, 40, 8, 5)
    idx = _miners()[miner](x, y)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = TCMLoss(margin_neg=0.3)(x1, None, idx)
    pml = ThresholdConsistentMarginLoss(margin_minus=0.3)(x2, None, idx)
    ours.backward()
    pml.backward()
    torch.testing.assert_close(ours, pml, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    assert ours.item() == TCMLoss(margin_neg=0.3)(x, y, idx).item()  # the labels were not used anyway
    # keyword form, as pml's distributed test calls it: loss(outputs, indices_tuple=..., ref_emb=...)
    assert TCMLoss(margin_neg=0.3)(x, indices_tuple=idx).item() == ours.item()


def test_labels_none_with_mined_pairs_and_a_reference_set_needs_no_ref_labels():
    """With a tuple neither labels nor ref_labels are needed; value as the brute force over the tuple."""
    x, _ = _batch(17, 6, 3, 2)
    r, _ = _batch(18, 5, 3, 2)
    a1, p = torch.tensor([0, 1, 5]), torch.tensor([4, 0, 2])
    a2, n = torch.tensor([2, 3]), torch.tensor([1, 1])
    cos = lambda u, v: float(torch.nn.functional.cosine_similarity(u, v, dim=0))  # noqa: E731
    sp = [cos(x[i], r[j]) for i, j in zip(a1.tolist(), p.tolist())]
    sn = [cos(x[i], r[j]) for i, j in zip(a2.tolist(), n.tolist())]
    hp, hn = [0.9 - s for s in sp if s <= 0.9], [s + 0.5 for s in sn if s >= -0.5]
    assert hp and hn
    expected = sum(hp) / len(hp) + sum(hn) / len(hn)
    out = TCMLoss(margin_neg=-0.5)(x, None, (a1, p, a2, n), ref_emb=r)
    assert out.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "needs labels.*indices_tuple"),
        ({"ref_emb": X4}, "needs labels"),
        ({"indices_tuple": (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])), "ref_labels": Y4},
         "ref_labels without ref_emb"),
    ],
)
def test_labels_none_without_a_tuple_raises_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tcm_loss(X4, None, **kwargs)


def test_reducer_is_refused_because_pml_leaves_tcm_unchanged():
    """pml's reducers pass its TCM value through (already reduced); TCMLoss(reducer=) says so."""
    from pytorch_metric_learning import reducers

    x, y = _batch(21, 24, 8, 4)
    plain = ThresholdConsistentMarginLoss()(x, y)
    for reducer in (reducers.MeanReducer(), reducers.SumReducer(), reducers.ThresholdReducer(low=10.0),
                    reducers.AvgNonZeroReducer(), reducers.ClassWeightedReducer(torch.arange(4.0))):
        assert ThresholdConsistentMarginLoss(reducer=reducer)(x, y).item() == plain.item()
        with pytest.raises(ValueError, match="TCMLoss takes no reducer.*already reduced.*drop reducer="):
            TCMLoss(reducer=reducer)
    TCMLoss(reducer=None)  # the default


def test_empty_mined_tuple_is_zero_like_pml():
    x, y = _batch(3, 8, 4, 2)
    e = torch.zeros(0, dtype=torch.long)
    assert TCMLoss()(x, y, (e, e, e)).item() == 0.0
    assert float(ThresholdConsistentMarginLoss()(x, y, (e, e, e))) == 0.0


def test_in_pml_multiple_losses_with_miners():
    from pytorch_metric_learning.losses import MultipleLosses, MultiSimilarityLoss
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    x, y = _batch(5, 32, 8, 4)
    miner = MultiSimilarityMiner(epsilon=0.1)
    idx = miner(x, y)
    ms = MultiSimilarityLoss()
    out = MultipleLosses([ms, TCMLoss()])(x, y, idx)  # pml passes indices_tuple third
    torch.testing.assert_close(out, ms(x, y, idx) + ThresholdConsistentMarginLoss()(x, y, idx))
    out = MultipleLosses([ms, TCMLoss()], miners=[miner, None])(x, y)
    torch.testing.assert_close(out, ms(x, y, idx) + tcm_loss(x, y))


def test_pml_keyword_names_and_the_deprecated_one():
    x, y = _batch(6, 10, 4, 3)
    r, ry = _batch(7, 6, 4, 3)
    new = TCMLoss()(x, y, indices_tuple=None, ref_emb=r, ref_labels=ry)
    with pytest.warns(DeprecationWarning, match="ref_emb"):
        old = tcm_loss(x, y, ref_embeddings=r, ref_labels=ry)
    assert new.item() == old.item()
    assert new.item() == pytest.approx(brute_force_tcm(x, y, r, ry), rel=1e-9)


@pytest.mark.parametrize(
    "idx, err, match",
    [
        (X4, TypeError, "third argument is indices_tuple"),  # the old positional ref_embeddings
        ((torch.tensor([0]),) * 2, TypeError, "miner's output"),
        ([torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2])], TypeError, "integer"),
        ((torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2])), ValueError, "2 anchors but 1 positive"),
        ((torch.tensor([0]), torch.tensor([4]), torch.tensor([2])), ValueError, r"positive indices must lie in \[0, 3\]"),
        ((torch.tensor([-1]), torch.tensor([1]), torch.tensor([2])), ValueError, "anchor indices"),
    ],
)
def test_bad_indices_tuple_raises(idx, err, match):
    with pytest.raises(err, match=match):
        TCMLoss()(X4, Y4, idx)


def test_distributed_loss_wrapper_accepts_the_adapted_loss():
    """pml's DistributedLossWrapper takes only pml losses: as_pml_loss makes one, value unchanged."""
    import os
    import warnings

    import torch.distributed as dist
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    from tcmlib.losses import as_pml_loss

    x, y = _batch(9, 16, 8, 3)
    with pytest.raises(TypeError, match="BaseMetricLossFunction"):
        DistributedLossWrapper(TCMLoss())
    wrapped = DistributedLossWrapper(as_pml_loss(TCMLoss(margin_neg=0.3)))
    assert not dist.is_initialized()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "used in a non-distributed setting"
        torch.testing.assert_close(wrapped(x, y), tcm_loss(x, y, margin_neg=0.3))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        idx = (torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0]), torch.tensor([5]))
        for efficient in (False, True):
            out = DistributedLossWrapper(as_pml_loss(TCMLoss()), efficient=efficient)(x, y, idx)
            torch.testing.assert_close(out, ThresholdConsistentMarginLoss()(x, y, idx))
    finally:
        from tcmlib import distributed

        distributed.shutdown()  # one rank: the barrier waits for no one


def test_as_pml_loss_pickles_and_takes_labels_none():
    """mp.spawn pickles the loss: the wrapper class lives at module level, the copy computes the same."""
    import pickle
    import warnings

    from pytorch_metric_learning.losses import BaseMetricLossFunction
    from pytorch_metric_learning.miners import PairMarginMiner
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    from tcmlib.losses import WithTCM, as_pml_loss

    x, y = _batch(31, 20, 8, 3)
    idx = PairMarginMiner(pos_margin=0.5, neg_margin=0.5)(x, y)
    for loss in (TCMLoss(margin_neg=0.3), WithTCM(ContrastiveLoss())):
        wrapped = as_pml_loss(loss)
        copy = pickle.loads(pickle.dumps(DistributedLossWrapper(wrapped)))
        assert isinstance(copy.loss, BaseMetricLossFunction)
        assert type(copy.loss) is type(wrapped)
        assert copy.loss.state_dict().keys() == wrapped.state_dict().keys()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "used in a non-distributed setting"
            assert copy(x, y).item() == loss(x, y).item()
            assert copy(x, y, idx).item() == loss(x, y, idx).item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = DistributedLossWrapper(as_pml_loss(TCMLoss()))(x, indices_tuple=idx)
    torch.testing.assert_close(out, ThresholdConsistentMarginLoss()(x, None, idx), rtol=1e-10, atol=1e-12)


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    from tcmlib.losses import as_pml_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, y = _batch(11, 24, 8, 4)
        mine = slice(12 * rank, 12 * rank + 12)
        local = x[mine].clone().requires_grad_()
        loss = DistributedLossWrapper(as_pml_loss(TCMLoss(margin_neg=0.3)))(local, y[mine])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, f"{out}/rank{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    from tcmlib import distributed

    distributed.shutdown()  # (torch < 2.8: a bare destroy could hang, see its docstring)


@pytest.mark.slow
def test_distributed_loss_wrapper_on_two_processes(tmp_path):
    """Two gloo ranks, half a batch each: pml gathers the batch, TCM sees all of it (x world size, pml's scale)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    x, y = _batch(11, 24, 8, 4)
    full = x.clone().requires_grad_()
    expected = 2 * tcm_loss(full, y, margin_neg=0.3)
    expected.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], expected.detach())
        # all_gather passes no gradient back to other ranks: each rank's own rows get their own part
        torch.testing.assert_close(got["grad"], full.grad[12 * rank:12 * rank + 12])
