"""Embedder: shapes, unit norm, frozen BatchNorm, GeM, and the offline pretrained-weights error."""

from __future__ import annotations

import urllib.error
from unittest import mock

import pytest
import torch
import torch.nn as nn

from tcmlib.models import BACKBONES, GeM, build_embedder


@pytest.mark.parametrize(
    "backbone, in_ch, size, kw",
    [
        ("small_cnn", 1, 32, {}),
        ("small_cnn", 3, 32, {}),
        ("resnet18", 1, 32, {"small_input": True}),
        ("resnet18", 3, 64, {}),
        ("resnet50", 3, 64, {}),
        ("vit_b_16", 3, 32, {"image_size": 32}),
        ("vit_tiny", 1, 32, {"image_size": 32}),
        ("conv_vit_tiny", 1, 32, {"image_size": 32}),
        ("conv_vit_tiny", 3, 48, {"image_size": 48}),
    ],
)
def test_shapes_and_unit_norm(backbone: str, in_ch: int, size: int, kw: dict) -> None:
    torch.manual_seed(0)
    model = build_embedder(backbone, dim=16, pretrained=False, in_channels=in_ch, **kw).eval()
    with torch.no_grad():
        z = model(torch.randn(2, in_ch, size, size))
    assert z.shape == (2, 16)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))


def test_frozen_bn_stays_frozen_after_train() -> None:
    model = build_embedder("resnet50", dim=8, pretrained=False)  # resnet50 freezes BN by default
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 53
    assert all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    assert model.head.training and model.backbone[0][0].training  # the rest does train
    before = bns[0].running_mean.clone()
    model(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert torch.equal(before, bns[0].running_mean)  # running statistics untouched
    # the optimiser sees no BN parameter
    n_bn = sum(p.numel() for m in bns for p in m.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_all - n_bn


def test_small_cnn_bn_trains_by_default() -> None:
    model = build_embedder("small_cnn", dim=8, in_channels=1).train()
    assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_gem_matches_hand_formula() -> None:
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.1  # (B, C, H, W), positive
    gem = GeM(p=3.0).double()
    expected = torch.empty(2, 3, dtype=torch.float64)
    for b in range(2):
        for c in range(3):
            expected[b, c] = (sum(float(v) ** 3 for v in x[b, c].flatten()) / 20) ** (1 / 3)
    torch.testing.assert_close(gem(x), expected)
    assert gem.p.requires_grad
    # p = 1 is average pooling
    torch.testing.assert_close(GeM(p=1.0).double()(x), x.mean(dim=(-2, -1)))


@pytest.mark.parametrize("backbone", ["resnet50", "resnet18", "vit_b_16"])
def test_pretrained_offline_gives_clear_error(backbone: str) -> None:
    err = urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    with mock.patch("torch.hub.load_state_dict_from_url", side_effect=err):
        with pytest.raises(RuntimeError) as info:
            build_embedder(backbone, pretrained=True)
    msg = str(info.value)
    assert "could not load" in msg and "internet" in msg
    assert torch.hub.get_dir() in msg and "pretrained=False" in msg


def test_unknown_backbone_lists_names() -> None:
    with pytest.raises(ValueError) as info:
        build_embedder("resnet51")
    for name in BACKBONES:
        assert name in str(info.value)


def test_conv_vit_tokens_gradients_and_bad_sizes() -> None:
    from tcmlib.models import ConvViT

    torch.manual_seed(0)
    net = ConvViT(in_channels=1, image_size=32)
    assert net.stem(torch.zeros(1, 1, 32, 32)).shape == (1, 128, 8, 8)  # an 8x8 grid of 128-d tokens
    assert net.pos.shape == (1, 64, 128)
    net(torch.randn(4, 1, 32, 32)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    # tokens carry their position: moving the glyph changes the features
    x = torch.zeros(1, 1, 32, 32)
    x[..., 4:12, 4:12] = 1.0
    with torch.no_grad():
        a, b = net.eval()(x), net(torch.roll(x, shifts=(16, 16), dims=(-2, -1)))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_embedder("conv_vit_tiny", image_size=30)
    with pytest.raises(ValueError, match="pretrained=False"):
        build_embedder("conv_vit_tiny", pretrained=True)
