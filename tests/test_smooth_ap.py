"""Smooth-AP against independent oracles.

* ``original_smooth_ap``: a transcription of the authors' ``SmoothAP.forward``
  (Andrew-Brown1/Smooth_AP, src/Smooth_AP_loss.py): (B, B, B) tensors, a class-sorted batch of
  ``num_id`` blocks of equal size, inputs already L2-normalised.
* ``loop_smooth_ap``: a plain Python loop over (q, i, j) for any labels.
* a 4-point case computed by hand, and pytorch-metric-learning's SmoothAPLoss, whose relation to
  the original is documented in ``test_pml_groups_by_position``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmlib.losses.smooth_ap import SmoothAPLoss, smooth_ap_loss

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-12)}


def _sigmoid(t: torch.Tensor, temp: float) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(torch.clamp(-t / temp, min=-50, max=50)))


def original_smooth_ap(preds: torch.Tensor, num_id: int, anneal: float = 0.01) -> torch.Tensor:
    """The authors' forward, line by line (``.cuda()`` dropped, dtype kept)."""
    batch_size, feat_dims = preds.shape
    mask = 1.0 - torch.eye(batch_size, dtype=preds.dtype)
    mask = mask.unsqueeze(dim=0).repeat(batch_size, 1, 1)
    sim_all = preds @ preds.t()
    sim_all_repeat = sim_all.unsqueeze(dim=1).repeat(1, batch_size, 1)
    sim_diff = sim_all_repeat - sim_all_repeat.permute(0, 2, 1)
    sim_sg = _sigmoid(sim_diff, temp=anneal) * mask
    sim_all_rk = torch.sum(sim_sg, dim=-1) + 1
    group = batch_size // num_id
    xs = preds.view(num_id, group, feat_dims)
    pos_mask = 1.0 - torch.eye(group, dtype=preds.dtype)
    pos_mask = pos_mask.unsqueeze(dim=0).unsqueeze(dim=0).repeat(num_id, group, 1, 1)
    sim_pos = torch.bmm(xs, xs.permute(0, 2, 1))
    sim_pos_repeat = sim_pos.unsqueeze(dim=2).repeat(1, 1, group, 1)
    sim_pos_diff = sim_pos_repeat - sim_pos_repeat.permute(0, 1, 3, 2)
    sim_pos_sg = _sigmoid(sim_pos_diff, temp=anneal) * pos_mask
    sim_pos_rk = torch.sum(sim_pos_sg, dim=-1) + 1
    ap = torch.zeros(1, dtype=preds.dtype)
    for ind in range(num_id):
        block = slice(ind * group, (ind + 1) * group)
        pos_divide = torch.sum(sim_pos_rk[ind] / sim_all_rk[block, block])
        ap = ap + ((pos_divide / group) / batch_size)
    return (1 - ap)[0]


def loop_smooth_ap(x: torch.Tensor, labels: list[int], tau: float = 0.01) -> float:
    """Smooth-AP by explicit loops in float64 (positives by label, q included)."""
    aps = loop_aps(x, labels, tau)
    return 1.0 - sum(aps) / len(aps)


def loop_aps(x: torch.Tensor, labels: list[int], tau: float = 0.01) -> list[float]:
    """AP_q of every query q, by explicit loops in float64."""
    x = F.normalize(x.double(), dim=1)
    s = (x @ x.T).tolist()
    n = len(labels)
    sig = lambda t: 1.0 / (1.0 + math.exp(max(-50.0, min(50.0, -t / tau))))  # noqa: E731
    aps = []
    for q in range(n):
        pos = [i for i in range(n) if labels[i] == labels[q]]
        ratios = []
        for i in pos:
            r_all = 1 + sum(sig(s[q][j] - s[q][i]) for j in range(n) if j != i)
            r_pos = 1 + sum(sig(s[q][j] - s[q][i]) for j in pos if j != i)
            ratios.append(r_pos / r_all)
        aps.append(sum(ratios) / len(pos))
    return aps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_id,per_class", [(6, 4), (3, 5), (8, 2), (4, 4)])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_matches_original_value_and_gradient(dtype, seed, num_id, per_class, chunk_size):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_id * per_class, 16, generator=g, dtype=dtype) * 0.3
    x[:, 0] += 1.0                         # correlated directions: sigmoid arguments in range
    x.requires_grad_(True)
    labels = torch.arange(num_id).repeat_interleave(per_class)
    ours = smooth_ap_loss(x, labels, chunk_size=chunk_size)
    (g_ours,) = torch.autograd.grad(ours, x)
    ref = original_smooth_ap(F.normalize(x, dim=1), num_id)
    (g_ref,) = torch.autograd.grad(ref, x)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    torch.testing.assert_close(g_ours, g_ref, **TOL[dtype])
    assert g_ref.abs().max() > 1e-4        # the comparison is not between two zero gradients


def test_shuffled_batch_equals_original_on_sorted_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(5).repeat_interleave(4)
    perm = torch.randperm(20, generator=g)
    ours = smooth_ap_loss(x[perm], labels[perm])
    ref = original_smooth_ap(F.normalize(x, dim=1), 5)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_unequal_classes_and_singletons_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    labels = [3, 3, 3, 3, 3, 7, 7, 1, 9, 9, 9, 4]            # sizes 5, 2, 1, 3, 1; unsorted
    perm = torch.randperm(len(labels), generator=g).tolist()
    labels = [labels[p] for p in perm]
    x = torch.randn(len(labels), 6, generator=g, dtype=torch.float64)
    for chunk_size in (None, 1, 5):
        ours = smooth_ap_loss(x, torch.tensor(labels), chunk_size=chunk_size)
        assert ours.item() == pytest.approx(loop_smooth_ap(x, labels), rel=1e-10, abs=1e-12)


def test_hand_computed_four_points():
    """Unit vectors at 0, 20, 50, 90 degrees, labels 0, 1, 0, 1; tau -> 0 gives exact ranks.

    Sorted by similarity (self first): q0: 0,1,2,3  q1: 1,0,2,3  q2: 2,1,3,0  q3: 3,2,1,0.
    AP_q = mean over i in P_q (q included) of rank among positives / rank among all:
    q0 = (1/1 + 2/3)/2 = 5/6, q1 = (1/1 + 2/4)/2 = 3/4, q2 = (1 + 2/4)/2 = 3/4, q3 = (1 + 2/3)/2 = 5/6.
    mean AP = 19/24, loss = 5/24.
    """
    deg = torch.tensor([0.0, 20.0, 50.0, 90.0], dtype=torch.float64) * math.pi / 180
    x = torch.stack([deg.cos(), deg.sin()], dim=1)
    labels = torch.tensor([0, 1, 0, 1])
    assert smooth_ap_loss(x, labels, temperature=1e-4).item() == pytest.approx(5 / 24, abs=1e-12)
    # a larger temperature smooths the ranks: the loss moves but stays a loss in [0, 1)
    assert 0 < smooth_ap_loss(x, labels, temperature=0.5).item() < 1


def test_all_singletons_give_almost_zero_loss():
    """Each query alone in its class: P_q = {q}, AP_q = 1 / (1 + sum_j sigma(s_qj - 1)) ~ 1."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    assert smooth_ap_loss(x, torch.tensor([0, 1, 2])).item() == pytest.approx(0.0, abs=1e-12)


def test_pml_groups_by_position():
    """How pytorch-metric-learning 2.9's SmoothAPLoss relates to the original and to ours.

    pml computes ``num_classes_batch = B // #classes`` -- that is the number of samples *per
    class*, m -- and then views the batch as ``(m, B // m, D)`` = m blocks of size C = #classes.
    So its positive sets are consecutive blocks of C samples, not the class blocks of m samples:
    pml(x, labels) == ours(x, arange(B) // C) == original(x, num_id=m) on a class-sorted batch.
    It agrees with the original (and ours) only when C == m; for C != m its value is wrong.
    pml also requires equal class sizes (ValueError otherwise) and computes ``ap`` in float32.
    """
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    if not hasattr(pml_losses, "SmoothAPLoss"):  # tcmlib needs pml >= 2.7; its SmoothAPLoss came later
        pytest.skip("this pytorch-metric-learning has no SmoothAPLoss")
    pml = pml_losses.SmoothAPLoss(temperature=0.01)
    g = torch.Generator().manual_seed(0)

    # C == m == 4: pml, ours and the original agree
    x = torch.randn(16, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(4)
    ours = smooth_ap_loss(x, labels)
    torch.testing.assert_close(pml(x, labels), ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(original_smooth_ap(F.normalize(x, dim=1), 4), ours, rtol=1e-5, atol=1e-6)

    # C = 6 classes, m = 4 samples each: pml groups blocks of 6 consecutive samples
    x = torch.randn(24, 8, generator=g)
    labels = torch.arange(6).repeat_interleave(4)
    ours = smooth_ap_loss(x, labels)
    torch.testing.assert_close(ours, original_smooth_ap(F.normalize(x, dim=1), 6), rtol=1e-5, atol=1e-6)
    p = pml(x, labels)
    assert abs(p.item() - ours.item()) > 1e-3
    torch.testing.assert_close(p, smooth_ap_loss(x, torch.arange(24) // 6), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p, original_smooth_ap(F.normalize(x, dim=1), 4), rtol=1e-5, atol=1e-6)


def test_backward_keeps_memory_quadratic():
    """With several chunks, autograd saves O(B^2) elements, not one (c, P, B) block per chunk."""
    b = 128
    x = torch.randn(b, 16, requires_grad=True)
    labels = torch.arange(b) // 64                       # P = 64: each chunk block is c * 64 * B
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = smooth_ap_loss(x, labels, chunk_size=8)
    assert sum(saved) < 8 * b * b                        # without checkpointing: > b * 64 * b
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_module_matches_functional_and_repr():
    x = torch.randn(12, 5)
    labels = torch.arange(3).repeat(4)
    module = SmoothAPLoss(temperature=0.05, chunk_size=4)
    torch.testing.assert_close(module(x, labels), smooth_ap_loss(x, labels, temperature=0.05))
    assert "temperature=0.05" in repr(module)


@pytest.mark.parametrize(
    "x,labels,kwargs",
    [
        (torch.randn(4), torch.zeros(4), {}),                          # 1-D embeddings
        (torch.randn(4, 3), torch.zeros(5), {}),                       # length mismatch
        (torch.full((4, 3), float("nan")), torch.zeros(4), {}),        # NaN
        (torch.zeros(4, 3), torch.zeros(4), {}),                       # zero rows
        (torch.randn(4, 3), torch.tensor([0.5, 1, 2, 3]), {}),         # non-integer labels
        (torch.randn(4, 3), torch.zeros(4), {"temperature": 0.0}),
        (torch.randn(4, 3), torch.zeros(4), {"temperature": -1.0}),
        (torch.randn(4, 3), torch.zeros(4), {"chunk_size": 0}),
    ],
)
def test_invalid_input_raises(x, labels, kwargs):
    with pytest.raises(ValueError):
        smooth_ap_loss(x, labels, **kwargs)


def test_module_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        SmoothAPLoss(temperature=0)


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=2, max_size=12),
    seed=st.integers(0, 2**16),
    offset=st.integers(-5, 100),
)
def test_invariant_to_order_and_label_names(labels, seed, offset):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 4, generator=g, dtype=torch.float64)
    y = torch.tensor(labels)
    base = smooth_ap_loss(x, y)
    perm = torch.randperm(len(labels), generator=g)
    renamed = (y * 7 + offset) % 1000                     # injective relabelling of 0..3
    torch.testing.assert_close(smooth_ap_loss(x[perm], y[perm]), base, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(smooth_ap_loss(x, renamed), base, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- pml's calling convention
def test_pml_calling_convention_in_multiple_losses():
    """Called as pml calls a loss; in MultipleLosses with a miner for the other loss only."""
    from pytorch_metric_learning.losses import MultipleLosses, MultiSimilarityLoss
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 8, generator=g), torch.randint(0, 4, (24,), generator=g)
    ours = SmoothAPLoss()
    assert ours(x, y, None, None, None).item() == smooth_ap_loss(x, y).item()
    assert ours(x, y, indices_tuple=None, ref_emb=x, ref_labels=y).item() == smooth_ap_loss(x, y).item()
    miner, ms = MultiSimilarityMiner(epsilon=0.1), MultiSimilarityLoss()
    out = MultipleLosses([ms, ours], miners=[miner, None])(x, y)
    torch.testing.assert_close(out, ms(x, y, miner(x, y)) + smooth_ap_loss(x, y))


def test_mined_pairs_or_a_reference_set_raise_clearly():
    from pytorch_metric_learning.losses import MultipleLosses
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    idx = MultiSimilarityMiner()(x, y)
    with pytest.raises(ValueError, match="whole batch.*indices_tuple"):
        SmoothAPLoss()(x, y, idx)
    with pytest.raises(ValueError, match="whole batch.*indices_tuple"):
        MultipleLosses([SmoothAPLoss()])(x, y, idx)
    with pytest.raises(ValueError, match="reference set.*torch.cat"):
        SmoothAPLoss()(x, y, ref_emb=x.clone(), ref_labels=y)
    with pytest.raises(ValueError, match="reference set"):
        SmoothAPLoss()(x, y, ref_labels=y)


# ---------------------------------------------------------------- pml reducers, labels=None
def _pml_reducers():
    from pytorch_metric_learning import reducers

    return {
        "mean": reducers.MeanReducer(), "sum": reducers.SumReducer(),
        "threshold": reducers.ThresholdReducer(low=0.05, high=0.3),
        "avg_non_zero": reducers.AvgNonZeroReducer(),
        "class_weighted": reducers.ClassWeightedReducer(torch.tensor([0.5, 1.0, 2.0, 4.0])),
        "per_anchor": reducers.PerAnchorReducer(reducers.SumReducer()),
        "multiple": reducers.MultipleReducers({"ap_loss": reducers.SumReducer()}),
    }


@pytest.mark.parametrize("name", ["mean", "sum", "threshold", "avg_non_zero", "class_weighted", "per_anchor",
                                  "multiple"])
def test_reducers_match_pml(name):
    """Where pml's SmoothAPLoss is right (C == m), ours with a pml reducer equals it (value, gradient)."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    if not hasattr(pml_losses, "SmoothAPLoss"):
        pytest.skip("this pytorch-metric-learning has no SmoothAPLoss")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(4)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = SmoothAPLoss(reducer=_pml_reducers()[name])(x1, labels)
    pml = pml_losses.SmoothAPLoss(reducer=_pml_reducers()[name])(x2, labels)
    ours.backward()
    pml.backward()
    torch.testing.assert_close(ours, pml, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    if name == "threshold":  # the band keeps some queries and drops others
        per_query = 1.0 - torch.tensor(loop_aps(x, labels.tolist()))
        kept = (per_query > 0.05) & (per_query < 0.3)
        assert 0 < int(kept.sum()) < 16
        assert ours.item() == pytest.approx(float(per_query[kept].mean()), rel=1e-5)


def test_do_nothing_reducer_gives_the_per_query_losses():
    """DoNothingReducer: pml's dict of 1 - AP_q for every query, any class sizes (loop oracle)."""
    from pytorch_metric_learning.reducers import DoNothingReducer, MeanReducer

    g = torch.Generator().manual_seed(4)
    labels = [5, 1, 5, 5, 2, 1, 9, 2, 2, 2]
    x = torch.randn(len(labels), 6, generator=g, dtype=torch.float64)
    out = SmoothAPLoss(reducer=DoNothingReducer())(x, torch.tensor(labels))
    info = out["ap_loss"]
    assert info["reduction_type"] == "element" and info["indices"].tolist() == list(range(len(labels)))
    expected = [1.0 - ap for ap in loop_aps(x, labels)]
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(info["losses"], expected, rtol=1e-9, atol=1e-12)
    mean = SmoothAPLoss(reducer=MeanReducer(), chunk_size=3)(x, torch.tensor(labels))
    assert mean.item() == pytest.approx(loop_smooth_ap(x, labels), rel=1e-9)


def test_bad_reducer_or_labels_none_raise_clearly():
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    with pytest.raises(TypeError, match="SmoothAPLoss.*pytorch-metric-learning reducer.*got str"):
        SmoothAPLoss(reducer="mean")
    x, y = torch.randn(12, 4), torch.arange(12) % 3
    with pytest.raises(ValueError, match="SmoothAPLoss needs labels.*pass_labels_to_loss_fn=True"):
        SmoothAPLoss()(x, None)
    with pytest.raises(ValueError, match="SmoothAPLoss needs labels"):
        SmoothAPLoss()(x, None, MultiSimilarityMiner()(x, y))
