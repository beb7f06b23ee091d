"""WithTCM / add_tcm: value = base + TCM, each computed separately; parameters of the base exposed."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import ArcFaceLoss, ContrastiveLoss, ProxyAnchorLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

from tcmlib.losses.combine import WithTCM, add_tcm
from tcmlib.losses.tcm import tcm_loss


def _batch(seed: int, b: int = 24, d: int = 8, n_classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g) + 0.7 * torch.randn(1, d, generator=g)
    return x, torch.randint(0, n_classes, (b,), generator=g)


def test_plain_callable_base():
    def spread(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return embeddings.pow(2).sum(dim=1).mean()

    x, y = _batch(0)
    loss = WithTCM(spread, margin_neg=0.2)
    out = loss(x, y)
    torch.testing.assert_close(out, spread(x, y) + tcm_loss(x, y, margin_neg=0.2))
    torch.testing.assert_close(loss.last_base, spread(x, y))
    torch.testing.assert_close(loss.last_tcm, tcm_loss(x, y, margin_neg=0.2))
    assert list(loss.parameters()) == []


def test_logged_components_are_detached():
    x, y = _batch(1)
    x.requires_grad_()
    loss = WithTCM(ContrastiveLoss())
    loss(x, y).backward()
    assert not loss.last_base.requires_grad and not loss.last_tcm.requires_grad
    assert x.grad is not None


def test_pml_contrastive_value_and_gradient():
    x, y = _batch(2)
    base = ContrastiveLoss(pos_margin=0.9, neg_margin=0.4, distance=CosineSimilarity())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    add_tcm(base, margin_pos=0.8, lambda_neg=2.0)(x1, y).backward()
    (base(x2, y) + tcm_loss(x2, y, margin_pos=0.8, lambda_neg=2.0)).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_pml_indices_tuple_goes_to_base_only():
    x, y = _batch(3)
    miner = MultiSimilarityMiner(epsilon=0.1)
    idx = miner(x, y)
    out = WithTCM(ContrastiveLoss())(x, y, idx)
    torch.testing.assert_close(out, ContrastiveLoss()(x, y, idx) + tcm_loss(x, y))


def test_pml_ref_set_goes_to_both():
    x, y = _batch(4)
    r, ry = _batch(5, b=30)
    out = WithTCM(ContrastiveLoss())(x, y, ref_emb=r, ref_labels=ry)
    expected = ContrastiveLoss()(x, y, ref_emb=r, ref_labels=ry) + tcm_loss(x, y, ref_emb=r, ref_labels=ry)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("make_base", [lambda: ArcFaceLoss(4, 8), lambda: ProxyAnchorLoss(4, 8)])
def test_learnable_base_parameters_are_exposed_and_trained(make_base):
    torch.manual_seed(0)
    base = make_base()
    loss = add_tcm(base)
    base_params = {id(p) for p in base.parameters()}
    assert base_params and base_params <= {id(p) for p in loss.parameters()}

    x, y = _batch(6)
    torch.testing.assert_close(loss(x, y), base(x, y) + tcm_loss(x, y))

    before = [p.detach().clone() for p in base.parameters()]
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    opt.zero_grad()
    loss(x, y).backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, base.parameters()))


def test_rejects_non_callable_base_and_bad_margins():
    with pytest.raises(TypeError, match="callable"):
        WithTCM(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin_neg"):
        add_tcm(ContrastiveLoss(), margin_neg=1.5)


PML_KW = dict(margin_plus=0.8, margin_minus=0.3, lambda_plus=0.5, lambda_minus=2.0)


def test_pml_parameter_names_are_accepted():
    """Code written for pml's ThresholdConsistentMarginLoss keeps its keywords: oracle = pml itself."""
    from pytorch_metric_learning.losses import ThresholdConsistentMarginLoss

    from tcmlib.losses import TCMLoss, make_loss

    x, y = _batch(5)
    x = x.double()
    want = ThresholdConsistentMarginLoss(**PML_KW)(x, y)
    base = ContrastiveLoss()
    torch.testing.assert_close(TCMLoss(**PML_KW)(x, y), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(add_tcm(base, **PML_KW)(x, y) - base(x, y), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(WithTCM(base, **PML_KW)(x, y) - base(x, y), want, rtol=0, atol=1e-12)
    made = make_loss("contrastive", tcm=PML_KW)
    assert (made.tcm.margin_pos, made.tcm.margin_neg, made.tcm.lambda_pos, made.tcm.lambda_neg) == (
        0.8, 0.3, 0.5, 2.0)
    # mixed spellings, each parameter once: fine; defaults where nothing is given
    mixed = add_tcm(base, margin_pos=0.8, margin_minus=0.3).tcm
    assert (mixed.margin_pos, mixed.margin_neg, mixed.lambda_pos) == (0.8, 0.3, 1.0)


def test_pml_names_twice_or_misspelt_are_named_in_the_error():
    from tcmlib.losses import TCMLoss, make_loss

    with pytest.raises(TypeError, match="'margin_pos' and pml's 'margin_plus'.*pass one"):
        add_tcm(ContrastiveLoss(), margin_pos=0.8, margin_plus=0.8)
    with pytest.raises(TypeError, match="unknown TCM parameter 'margin_plu'.*margin_pos.*margin_plus"):
        TCMLoss(margin_plu=0.9)
    with pytest.raises(TypeError, match="WithTCM got an unknown TCM parameter 'm_pos'"):
        WithTCM(ContrastiveLoss(), m_pos=0.9)
    with pytest.raises(ValueError, match="margin_neg = 1.5"):  # pml's name, checked as ours
        add_tcm(ContrastiveLoss(), margin_minus=1.5)
    with pytest.raises(ValueError, match=r"no option\(s\) \['m_minus'\].*pml's names margin_plus"):
        make_loss("contrastive", tcm={"m_minus": 0.3})
