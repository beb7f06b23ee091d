"""make_loss / available_losses / loss_param_groups: every name builds, runs, adds TCM, trains."""

from __future__ import annotations

import pytest
import torch

from tcmlib.losses.registry import available_losses, loss_param_groups, make_loss
from tcmlib.losses.tcm import TCMLoss

pytest.importorskip("pytorch_metric_learning")

NUM_CLASSES, DIM = 4, 8
EXTRA = {"num_classes": NUM_CLASSES, "embedding_size": DIM}


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, DIM, generator=g, requires_grad=True)
    labels = torch.arange(NUM_CLASSES).repeat(3)                       # 3 samples per class
    return x, labels


def _build(name: str, **kwargs):
    torch.manual_seed(0)                                               # same proxies every time
    return make_loss(name, **EXTRA, **kwargs) if name in ("proxy_anchor", "arcface") else make_loss(name, **kwargs)


def test_available_losses():
    names = available_losses()
    assert names == sorted(names)
    assert {"smooth_ap", "recall_surrogate", "rs@k", "contrastive", "multi_similarity",
            "proxy_anchor", "arcface", "ntxent"} == set(names)


@pytest.mark.parametrize("name", available_losses())
def test_every_loss_builds_runs_and_backpropagates(name):
    x, labels = _batch()
    loss = _build(name)(x, labels)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", available_losses())
def test_tcm_true_adds_the_tcm_value(name):
    x, labels = _batch(1)
    base = _build(name)(x, labels)
    both = _build(name, tcm=True)(x, labels)
    torch.testing.assert_close(both, base + TCMLoss()(x, labels))


def test_tcm_dict_passes_kwargs():
    x, labels = _batch(2)
    wrapped = make_loss("smooth_ap", tcm={"margin_neg": 0.3, "lambda_pos": 2.0})
    expected = make_loss("smooth_ap")(x, labels) + TCMLoss(margin_neg=0.3, lambda_pos=2.0)(x, labels)
    torch.testing.assert_close(wrapped(x, labels), expected)
    assert make_loss("rs@k", tcm=False).__class__.__name__ == "RecallAtKSurrogateLoss"


def test_defaults_and_overrides():
    assert make_loss("smooth_ap").temperature == 0.01
    assert make_loss("smooth_ap", temperature=0.1).temperature == 0.1
    assert make_loss("RS@K", ks=(1, 4)).ks == (1, 4)                  # case-insensitive alias
    assert make_loss("contrastive").neg_margin == 0.5
    assert make_loss("proxy_anchor", **EXTRA, margin=0.2).margin == 0.2


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: arcface, contrastive"):
        make_loss("triplet")


@pytest.mark.parametrize("name", ["proxy_anchor", "arcface"])
def test_proxy_losses_need_num_classes(name):
    with pytest.raises(ValueError, match="num_classes"):
        make_loss(name)
    with pytest.raises(ValueError, match="embedding_size"):
        make_loss(name, num_classes=3)


def test_bad_tcm_argument():
    with pytest.raises(TypeError):
        make_loss("smooth_ap", tcm="yes")


def test_param_groups():
    lr = 1e-4
    assert loss_param_groups(make_loss("smooth_ap"), lr) == []
    assert loss_param_groups(make_loss("multi_similarity", tcm=True), lr) == []
    pa = make_loss("proxy_anchor", **EXTRA)
    (group,) = loss_param_groups(pa, lr)
    assert group["lr"] == pytest.approx(lr * 100) and group["params"][0] is pa.proxies
    (group,) = loss_param_groups(make_loss("proxy_anchor", tcm=True, **EXTRA), lr)
    assert group["lr"] == pytest.approx(lr * 100)                     # multiplier seen through WithTCM
    arc = make_loss("arcface", **EXTRA)
    (group,) = loss_param_groups(arc, lr)
    assert group["lr"] == pytest.approx(lr) and group["params"][0] is arc.W
    (group,) = loss_param_groups(arc, lr, lr_mult=10.0)
    assert group["lr"] == pytest.approx(lr * 10)


def test_param_groups_train_the_proxies():
    x, labels = _batch(3)
    loss = make_loss("proxy_anchor", tcm=True, **EXTRA)
    before = loss.base.proxies.detach().clone()
    opt = torch.optim.SGD([{"params": [x], "lr": 0.1}, *loss_param_groups(loss, 0.1)])
    loss(x, labels).backward()
    opt.step()
    assert not torch.equal(loss.base.proxies, before)


def test_unknown_tcm_option_is_named() -> None:
    with pytest.raises(ValueError, match=r"tcm has no option\(s\) \['margin'\]; valid: lambda_neg"):
        make_loss("smooth_ap", tcm={"margin": 0.3})
