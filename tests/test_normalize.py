"""Tests of tcmlib.normalize.l2_normalize: exact at any scale, bit-identical to F.normalize on
well-scaled data, and the losses / metrics that use it are scale-invariant at extreme scales."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tcmlib.losses.smooth_ap import smooth_ap_loss
from tcmlib.losses.tcm import tcm_loss
from tcmlib.metrics.retrieval import recall_at_k
from tcmlib.normalize import l2_normalize

# scales whose rows stay finite and non-zero (normal or subnormal) in each dtype
SCALES = {
    torch.float64: [1e-300, 1e-100, 1e-20, 1e-6, 1.0, 1e6, 1e20, 1e100, 1e300],
    torch.float32: [1e-40, 1e-30, 1e-20, 1e-13, 1e-6, 1.0, 1e6, 1e20, 1e30, 1e36],
    torch.bfloat16: [1e-36, 1e-20, 1e-6, 1.0, 1e6, 1e20, 1e36],
    torch.float16: [1e-4, 1e-2, 1.0, 1e2],
}
EPS = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _rows(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 9, generator=g, dtype=torch.float64).clamp(-3, 3).to(dtype)  # (12, 9)


@pytest.mark.parametrize("dtype", list(SCALES))
def test_equals_float64_reference_at_every_scale(dtype):
    x = _rows(dtype)
    ref = F.normalize(x.double(), dim=1)  # (12, 9): x is well scaled in float64
    for scale in SCALES[dtype]:
        xs = (x.double() * scale).to(dtype)  # rounding to dtype: relative error <= eps(dtype)
        assert torch.isfinite(xs).all() and (xs != 0).any(dim=1).all()
        out = l2_normalize(xs)
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=EPS[dtype] * 4), scale


def test_plain_f_normalize_fails_where_l2_normalize_does_not():
    x = _rows(torch.float32)
    for scale in (1e-20, 1e25):
        assert not torch.allclose(F.normalize(x * scale, dim=1), F.normalize(x, dim=1), atol=1e-3)
        torch.testing.assert_close(l2_normalize(x * scale), F.normalize(x, dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [1, 0, -1])
def test_bit_identical_to_f_normalize_on_well_scaled_data(dtype, dim):
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1.0, 30.0):
        x = (scale * torch.randn(64, 33, generator=g)).to(dtype)
        up = torch.randn(64, 33, generator=g).to(dtype)  # upstream gradient
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = l2_normalize(a, dim=dim), F.normalize(b, dim=dim)
        (out_a * up).sum().backward()
        (out_b * up).sum().backward()
        assert torch.equal(out_a, out_b)
        assert torch.equal(a.grad, b.grad)


def test_zero_row_stays_zero_and_checks_still_reject_it():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    torch.testing.assert_close(l2_normalize(x), torch.tensor([[0.0, 0.0], [0.6, 0.8]]))
    with pytest.raises(ValueError, match="all-zero rows"):
        tcm_loss(x, torch.tensor([0, 1]))


def _batch(dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 6, generator=g, dtype=torch.float64)  # (24, 6), clustered around a common direction
    x = x + 0.8 * torch.randn(1, 6, generator=g, dtype=torch.float64)
    y = torch.arange(24) % 5
    return x.to(dtype), y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_and_recall_are_scale_invariant_at_extreme_scales(dtype):
    x, y = _batch(dtype)
    scales = [1e-30, 1e-20, 1e20, 1e30] if dtype == torch.float32 else [1e-300, 1e-30, 1e30, 1e300]
    base_tcm = tcm_loss(x, y, margin_neg=0.2)
    base_ap = smooth_ap_loss(x, y)
    base_recall = recall_at_k(x, y, ks=(1, 2, 4))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for scale in scales:
        xs = x * scale  # power-of-ten scale: each entry rounded once
        torch.testing.assert_close(tcm_loss(xs, y, margin_neg=0.2), base_tcm, **tol)
        torch.testing.assert_close(smooth_ap_loss(xs, y), base_ap, **tol)
        torch.testing.assert_close(recall_at_k(xs, y, ks=(1, 2, 4)), base_recall, rtol=0, atol=0)
