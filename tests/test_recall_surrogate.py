"""RS@k (Recall@k surrogate) against independent oracles.

* ``original_rs_query``: a transcription of the authors' ``RecallatK.forward(preds, q_id)``
  (yash0307/RecallatK_surrogate, src/losses.py), summed over ``q`` as their training loop does,
  on a class-sorted batch of ``num_id`` equal blocks, inputs already L2-normalised.
* ``original_pos_mixup``: the authors' ``pos_mixup`` (src/mixup.py) for blocks of 3 and 4, with
  the alphas passed in instead of drawn from NumPy.
* ``loop_rs``: a plain Python loop for any labels; a 4-point case computed by hand.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmlib.losses.recall_surrogate import RecallAtKSurrogateLoss, recall_surrogate_loss, simix_samples

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-12)}


def _sigmoid(t: torch.Tensor, temp: float = 1.0) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(torch.clamp(-t / temp, min=-50, max=50)))


def original_rs_query(preds, q_id, num_id, k_vals, k_temperatures, anneal=0.01):
    """The authors' forward for one query (``.cuda()`` dropped, in-place writes kept as masks)."""
    batch_size = preds.shape[0]
    samples_per_class = batch_size // num_id
    norm_vals = torch.tensor([min(k, samples_per_class - 1) for k in k_vals], dtype=preds.dtype)
    group_num = q_id // samples_per_class
    sim_all = (preds[q_id] * preds).sum(1)
    sim_all_g = sim_all.view(num_id, samples_per_class)
    sim_diff_all = sim_all.unsqueeze(-1) - sim_all_g[group_num, :].unsqueeze(0).repeat(batch_size, 1)
    sim_sg = _sigmoid(sim_diff_all, temp=anneal)
    keep = torch.ones_like(sim_sg)
    for i in range(samples_per_class):
        keep[group_num * samples_per_class + i, i] = 0.0
    sim_all_rk = (1.0 + torch.sum(sim_sg * keep, dim=0)).unsqueeze(dim=0)
    not_q = torch.ones_like(sim_all_rk)
    not_q[:, q_id % samples_per_class] = 0.0
    sim_all_rk = (sim_all_rk * not_q).unsqueeze(dim=-1).repeat(1, 1, len(k_vals))
    kv = torch.tensor(k_vals, dtype=preds.dtype).unsqueeze(0).unsqueeze(0).repeat(1, samples_per_class, 1)
    sim_all_rk = kv - sim_all_rk
    sim_all_rk = torch.stack(
        [_sigmoid(sim_all_rk[:, :, k], temp=float(k_temperatures[k])) for k in range(len(k_vals))], dim=-1
    )
    sim_all_rk = sim_all_rk * not_q.unsqueeze(-1)
    recall = torch.sum(sim_all_rk, dim=1)
    recall = torch.minimum(recall, torch.tensor(k_vals, dtype=preds.dtype).unsqueeze(0))
    recall = torch.sum(recall, dim=0) / norm_vals
    recall = torch.sum(recall) / len(k_vals)
    return (1.0 - recall) / batch_size


def original_rs(preds, num_id, ks=(1, 2, 4, 8, 16), batch_size=None, tau2=1.0):
    """Training-loop total: sum over every query; ``k`` clipped with the loader's batch size."""
    k_vals = [min(batch_size or preds.shape[0], k) for k in ks]
    return sum(original_rs_query(preds, q, num_id, k_vals, [tau2] * len(k_vals)) for q in range(preds.shape[0]))


def original_pos_mixup(tensor, num_id, alphas):
    """The authors' pos_mixup for blocks of 3 or 4: each block is followed by its fakes."""
    num_pos = tensor.shape[0] // num_id
    pairs = {3: [(0, 1), (1, 2), (0, 2)], 4: [(0, 1), (1, 2), (2, 3), (0, 3), (0, 2), (1, 3)]}[num_pos]
    out = []
    for c in range(num_id):
        block = tensor[c * num_pos:(c + 1) * num_pos]
        fakes = [alphas[c][(a, b)] * block[a] + (1 - alphas[c][(a, b)]) * block[b] for a, b in pairs]
        out += [block, torch.stack(fakes)]
    return torch.cat(out)


def loop_rs(x, labels, ks=(1, 2, 4, 8, 16), tau1=0.01, tau2=1.0) -> float:
    """RS@k by explicit loops in float64; queries without a positive are skipped."""
    losses = loop_rs_per_query(x, labels, ks, tau1, tau2)
    return sum(losses.values()) / len(losses)


def loop_rs_per_query(x, labels, ks=(1, 2, 4, 8, 16), tau1=0.01, tau2=1.0) -> dict[int, float]:
    """``{q: 1 - mean_k rho_k}`` for every query q with a positive, by explicit loops in float64."""
    x = F.normalize(x.double(), dim=1)
    s = (x @ x.T).tolist()
    n = len(labels)
    sig = lambda t, tau: 1.0 / (1.0 + math.exp(max(-50.0, min(50.0, -t / tau))))  # noqa: E731
    kk = [min(k, n) for k in ks]
    losses = {}
    for q in range(n):
        pos = [i for i in range(n) if labels[i] == labels[q] and i != q]
        if not pos:
            continue
        r = {i: 1 + sum(sig(s[q][j] - s[q][i], tau1) for j in range(n) if j != i) for i in pos}
        rho = [min(sum(sig(k - r[i], tau2) for i in pos), k) / min(k, len(pos)) for k in kk]
        losses[q] = 1 - sum(rho) / len(kk)
    return losses


def _batch(seed, n, dim, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype) * 0.3
    x[:, 0] += 1.0                         # correlated directions: ranks near the k of interest
    return x.requires_grad_(True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_id,per_class", [(6, 4), (3, 5), (4, 3), (8, 2)])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_matches_original_value_and_gradient(dtype, seed, num_id, per_class, chunk_size):
    x = _batch(seed, num_id * per_class, 16, dtype)
    labels = torch.arange(num_id).repeat_interleave(per_class)
    ours = recall_surrogate_loss(x, labels, chunk_size=chunk_size)
    (g_ours,) = torch.autograd.grad(ours, x)
    ref = original_rs(F.normalize(x, dim=1), num_id)      # B = 12 or 15 or 16: k = 16 is clipped
    (g_ref,) = torch.autograd.grad(ref, x)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    torch.testing.assert_close(g_ours, g_ref, **TOL[dtype])
    assert g_ref.abs().max() > 1e-4


@pytest.mark.parametrize("tau2", [0.5, 4.0])
def test_other_temperatures_and_ks_match_original(tau2):
    x = _batch(5, 20, 8, torch.float64)
    labels = torch.arange(5).repeat_interleave(4)
    ours = recall_surrogate_loss(x, labels, ks=(1, 3, 10), tau2=tau2)
    ref = original_rs(F.normalize(x, dim=1), 5, ks=(1, 3, 10), tau2=tau2)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_shuffled_batch_equals_original_on_sorted_batch():
    x = _batch(3, 20, 8, torch.float64)
    labels = torch.arange(5).repeat_interleave(4)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    ours = recall_surrogate_loss(x[perm], labels[perm])
    torch.testing.assert_close(ours, original_rs(F.normalize(x, dim=1), 5), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_unequal_classes_and_singletons_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    labels = [3, 3, 3, 3, 3, 7, 7, 1, 9, 9, 9, 4]            # sizes 5, 2, 1, 3, 1; unsorted
    perm = torch.randperm(len(labels), generator=g).tolist()
    labels = [labels[p] for p in perm]
    x = torch.randn(len(labels), 6, generator=g, dtype=torch.float64)
    for chunk_size in (None, 1, 4):
        ours = recall_surrogate_loss(x, torch.tensor(labels), ks=(1, 2, 4, 8), chunk_size=chunk_size)
        assert ours.item() == pytest.approx(loop_rs(x, labels, ks=(1, 2, 4, 8)), rel=1e-10, abs=1e-12)


def test_hand_computed_four_points():
    """Unit vectors at 0, 20, 50, 90 degrees, labels 0, 1, 0, 1, ks = (1, 2, 4); tau1, tau2 -> 0.

    r_i = 1 + #(items above i, the query included).  Orders (query first): q0: 0,1,2,3
    q1: 1,0,2,3  q2: 2,1,3,0  q3: 3,2,1,0.  Each query has one positive:
    q0: r_2 = 3 -> sigma(k - 3) = 0, 0, 1 for k = 1, 2, 4 -> loss 1 - 1/3 = 2/3
    q1: r_3 = 4 -> 0, 0, sigma(0) = 1/2 (the "+1" of the query makes r = k)  -> 1 - 1/6 = 5/6
    q2: r_0 = 4 -> 5/6;  q3: r_1 = 3 -> 2/3.   mean = (2/3 + 5/6 + 5/6 + 2/3) / 4 = 3/4.
    """
    deg = torch.tensor([0.0, 20.0, 50.0, 90.0], dtype=torch.float64) * math.pi / 180
    x = torch.stack([deg.cos(), deg.sin()], dim=1)
    labels = torch.tensor([0, 1, 0, 1])
    loss = recall_surrogate_loss(x, labels, ks=(1, 2, 4), tau1=1e-4, tau2=1e-3)
    assert loss.item() == pytest.approx(3 / 4, abs=1e-12)
    # k = 16 is clipped to B = 4: ks (1, 2, 16) -> (1, 2, 4), same value
    loss16 = recall_surrogate_loss(x, labels, ks=(1, 2, 16), tau1=1e-4, tau2=1e-3)
    assert loss16.item() == pytest.approx(3 / 4, abs=1e-12)


def test_no_positive_pair_gives_zero_loss_and_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    loss = recall_surrogate_loss(x, torch.arange(5))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_simix_samples_pairs_and_reproducibility():
    x = torch.randn(7, 3, dtype=torch.float64)
    labels = torch.tensor([2, 0, 2, 2, 0, 5, 2])              # classes of 4, 2, 1 -> 6 + 1 + 0 pairs
    xm, ym = simix_samples(x, labels, torch.Generator().manual_seed(0))
    assert xm.shape == (14, 3) and torch.equal(xm[:7], x)
    pairs = [(a, b) for a, b in itertools.combinations(range(7), 2) if labels[a] == labels[b]]
    assert ym[7:].tolist() == [int(labels[a]) for a, _ in pairs]
    for v, (a, b) in zip(xm[7:], pairs):                    # each row is on the segment x_a -- x_b
        alpha = float((v - x[b]) @ (x[a] - x[b]) / (x[a] - x[b]).pow(2).sum())
        assert 0 <= alpha <= 1
        torch.testing.assert_close(v, alpha * x[a] + (1 - alpha) * x[b])
    xm2, _ = simix_samples(x, labels, torch.Generator().manual_seed(0))
    assert torch.equal(xm, xm2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_id,per_class", [(4, 4), (5, 3)])
def test_simix_matches_original_mixup(dtype, num_id, per_class):
    """Alphas are drawn in the order of the pairs (a < b) by batch position (documented)."""
    x = _batch(7, num_id * per_class, 8, dtype)
    labels = torch.arange(num_id).repeat_interleave(per_class)
    ours = recall_surrogate_loss(x, labels, simix=True, generator=torch.Generator().manual_seed(1))
    (g_ours,) = torch.autograd.grad(ours, x)
    n_pairs = per_class * (per_class - 1) // 2
    draws = torch.rand(num_id * n_pairs, generator=torch.Generator().manual_seed(1)).tolist()
    pairs = list(itertools.combinations(range(per_class), 2))
    alphas = [dict(zip(pairs, draws[c * n_pairs:(c + 1) * n_pairs])) for c in range(num_id)]
    mixed = original_pos_mixup(F.normalize(x, dim=1), num_id, alphas)
    ref = original_rs(mixed, num_id, batch_size=x.shape[0])
    (g_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    torch.testing.assert_close(g_ours, g_ref, **TOL[dtype])


def test_backward_keeps_memory_quadratic():
    """With several chunks, autograd saves O(B^2) elements, not one (c, P, B) block per chunk."""
    b = 128
    x = torch.randn(b, 16, requires_grad=True)
    labels = torch.arange(b) // 64
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = recall_surrogate_loss(x, labels, chunk_size=8)
    assert sum(saved) < 8 * b * b                        # without checkpointing: > b * 64 * b
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_module_matches_functional_and_repr():
    x = torch.randn(12, 5)
    labels = torch.arange(3).repeat(4)
    module = RecallAtKSurrogateLoss(ks=(1, 4), tau2=2.0, chunk_size=5)
    torch.testing.assert_close(module(x, labels), recall_surrogate_loss(x, labels, ks=(1, 4), tau2=2.0))
    assert "ks=(1, 4)" in repr(module)


@pytest.mark.parametrize(
    "x,labels,kwargs",
    [
        (torch.randn(4), torch.zeros(4), {}),
        (torch.randn(4, 3), torch.zeros(5), {}),
        (torch.full((4, 3), float("inf")), torch.zeros(4), {}),
        (torch.zeros(4, 3), torch.zeros(4), {}),
        (torch.randn(4, 3), torch.zeros(4), {"tau1": 0.0}),
        (torch.randn(4, 3), torch.zeros(4), {"tau2": -1.0}),
        (torch.randn(4, 3), torch.zeros(4), {"ks": ()}),
        (torch.randn(4, 3), torch.zeros(4), {"ks": (1, 0)}),
        (torch.randn(4, 3), torch.zeros(4), {"ks": (1.5,)}),
        (torch.randn(4, 3), torch.zeros(4), {"chunk_size": 0}),
    ],
)
def test_invalid_input_raises(x, labels, kwargs):
    with pytest.raises(ValueError):
        recall_surrogate_loss(x, labels, **kwargs)


@pytest.mark.parametrize("kwargs", [{"tau1": 0}, {"tau2": 0}, {"ks": []}, {"ks": (-2,)}])
def test_module_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        RecallAtKSurrogateLoss(**kwargs)


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
    base = recall_surrogate_loss(x, y)
    perm = torch.randperm(len(labels), generator=g)
    renamed = (y * 7 + offset) % 1000
    torch.testing.assert_close(recall_surrogate_loss(x[perm], y[perm]), base, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(recall_surrogate_loss(x, renamed), base, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- pml's calling convention
def test_pml_calling_convention_in_multiple_losses():
    """Called as pml calls a loss; in MultipleLosses with a miner for the other loss only."""
    from pytorch_metric_learning.losses import MultipleLosses, MultiSimilarityLoss
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 8, generator=g), torch.randint(0, 4, (24,), generator=g)
    ours = RecallAtKSurrogateLoss()
    assert ours(x, y, None, None, None).item() == recall_surrogate_loss(x, y).item()
    assert ours(x, y, indices_tuple=None, ref_emb=x, ref_labels=y).item() == recall_surrogate_loss(x, y).item()
    miner, ms = MultiSimilarityMiner(epsilon=0.1), MultiSimilarityLoss()
    out = MultipleLosses([ms, ours], miners=[miner, None])(x, y)
    torch.testing.assert_close(out, ms(x, y, miner(x, y)) + recall_surrogate_loss(x, y))


def test_mined_pairs_or_a_reference_set_raise_clearly():
    from pytorch_metric_learning.losses import MultipleLosses
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    idx = MultiSimilarityMiner()(x, y)
    with pytest.raises(ValueError, match="whole batch.*indices_tuple"):
        RecallAtKSurrogateLoss()(x, y, idx)
    with pytest.raises(ValueError, match="whole batch.*indices_tuple"):
        MultipleLosses([RecallAtKSurrogateLoss()])(x, y, idx)
    with pytest.raises(ValueError, match="reference set.*torch.cat"):
        RecallAtKSurrogateLoss()(x, y, ref_emb=x.clone(), ref_labels=y)
    with pytest.raises(ValueError, match="reference set"):
        RecallAtKSurrogateLoss()(x, y, ref_labels=y)


# ---------------------------------------------------------------- pml reducers, labels=None
LABELS_WITH_SINGLETONS = [3, 3, 3, 7, 7, 1, 9, 9, 9, 9, 4, 0]  # 1, 4 and 0 have no positive


def test_do_nothing_reducer_gives_the_per_query_losses_of_queries_with_a_positive():
    from pytorch_metric_learning.reducers import DoNothingReducer

    g = torch.Generator().manual_seed(5)
    x = torch.randn(len(LABELS_WITH_SINGLETONS), 6, generator=g, dtype=torch.float64)
    expected = loop_rs_per_query(x, LABELS_WITH_SINGLETONS, ks=(1, 2, 4))
    loss = RecallAtKSurrogateLoss(ks=(1, 2, 4), reducer=DoNothingReducer())
    out = loss(x, torch.tensor(LABELS_WITH_SINGLETONS))
    info = out["loss"]
    assert info["reduction_type"] == "element" and info["indices"].tolist() == sorted(expected)
    torch.testing.assert_close(info["losses"], torch.tensor([expected[q] for q in sorted(expected)],
                                                            dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_reducers_reduce_the_per_query_losses():
    """pml's reducers over the loop's per-query losses: sum, a threshold band, class weights."""
    from pytorch_metric_learning import reducers

    g = torch.Generator().manual_seed(6)
    labels = torch.tensor(LABELS_WITH_SINGLETONS)
    x = torch.randn(len(labels), 6, generator=g, dtype=torch.float64)
    per_q = loop_rs_per_query(x, LABELS_WITH_SINGLETONS, ks=(1, 2, 4))
    vals = torch.tensor(list(per_q.values()), dtype=torch.float64)
    lo, hi = float(vals.quantile(0.2)), float(vals.quantile(0.8))
    band = [v for v in per_q.values() if lo < v < hi]
    assert 0 < len(band) < len(per_q)
    weights = torch.arange(10, dtype=torch.float64) / 3 + 0.5  # by label id
    cases = [
        (reducers.MeanReducer(), sum(per_q.values()) / len(per_q)),
        (reducers.SumReducer(), sum(per_q.values())),
        (reducers.ThresholdReducer(low=lo, high=hi), sum(band) / len(band)),
        (reducers.ClassWeightedReducer(weights),
         sum(v * float(weights[LABELS_WITH_SINGLETONS[q]]) for q, v in per_q.items()) / len(per_q)),
    ]
    for reducer, expected in cases:
        out = RecallAtKSurrogateLoss(ks=(1, 2, 4), reducer=reducer, chunk_size=2)(x, labels)
        assert out.item() == pytest.approx(expected, rel=1e-9), type(reducer).__name__
    mean = RecallAtKSurrogateLoss(ks=(1, 2, 4), reducer=reducers.MeanReducer())
    plain = recall_surrogate_loss(x, labels, ks=(1, 2, 4))
    assert mean(x, labels).item() == pytest.approx(plain.item(), rel=1e-12)


def test_reducer_with_simix_indexes_the_virtual_rows():
    """SiMix rows are queries too: indices run past the batch, labels extended to match."""
    from pytorch_metric_learning import reducers

    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    loss = RecallAtKSurrogateLoss(simix=True, generator=gen(), reducer=reducers.DoNothingReducer())
    info = loss(x, y)["loss"]
    assert info["indices"].tolist() == list(range(9 + 3 * 3))  # 9 real + C(3, 2) = 3 virtual per class
    mean = RecallAtKSurrogateLoss(simix=True, generator=gen(), reducer=reducers.MeanReducer())(x, y)
    plain = recall_surrogate_loss(x, y, simix=True, generator=gen())
    assert mean.item() == pytest.approx(plain.item(), rel=1e-12)
    # ClassWeightedReducer looks the virtual rows' labels up: only class 2 weighs
    w = RecallAtKSurrogateLoss(simix=True, generator=gen(), reducer=reducers.ClassWeightedReducer(
        torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)))(x, y)
    cls2 = [q for q in range(18) if (q >= 6 and q < 9) or q >= 15]  # real rows 6-8, virtual rows 15-17
    assert w.item() == pytest.approx(float(info["losses"][cls2].sum()) / 18, rel=1e-12)


def test_no_positive_pair_with_a_reducer_is_pml_zero_loss():
    from pytorch_metric_learning import reducers

    x = torch.randn(5, 3, requires_grad=True)
    out = RecallAtKSurrogateLoss(reducer=reducers.SumReducer())(x, torch.arange(5))
    out.backward()
    assert out.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    info = RecallAtKSurrogateLoss(reducer=reducers.DoNothingReducer())(x, torch.arange(5))["loss"]
    assert info["losses"] == 0 and info["reduction_type"] == "already_reduced"


def test_bad_reducer_or_labels_none_raise_clearly():
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    with pytest.raises(TypeError, match="RecallAtKSurrogateLoss.*pytorch-metric-learning reducer"):
        RecallAtKSurrogateLoss(reducer=torch.mean)
    x, y = torch.randn(12, 4), torch.arange(12) % 3
    with pytest.raises(ValueError, match="RecallAtKSurrogateLoss needs labels.*pass_labels_to_loss_fn=True"):
        RecallAtKSurrogateLoss()(x, None, MultiSimilarityMiner()(x, y))
