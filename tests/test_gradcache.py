"""The embedding-gradient cache gives the full-batch gradient (network and loss parameters)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tcmlib.gradcache import cached_backward, direct_backward
from tcmlib.losses.combine import add_tcm
from tcmlib.losses.smooth_ap import SmoothAPLoss
from tcmlib.models import build_embedder


class ProxyLoss(nn.Module):
    """A small loss with its own parameters (class proxies), so their gradients are checked too."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = 16 * emb @ F.normalize(self.proxies, dim=1).T  # (B, C)
        return F.cross_entropy(logits, labels)


def _grads(*modules: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters() if p.requires_grad and p.grad is not None]


def _batch(b: int = 12, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, 1, 16, 16, generator=g, dtype=torch.float64)  # (B, 1, 16, 16)
    labels = torch.arange(classes).repeat_interleave(b // classes)
    return images, labels


@pytest.mark.parametrize("chunk_size", [1, 5, 12, 100])
@pytest.mark.parametrize("bn", ["eval", "frozen"])
def test_cached_equals_direct_float64(chunk_size: int, bn: str) -> None:
    torch.manual_seed(0)
    model = build_embedder("small_cnn", dim=8, in_channels=1, frozen_bn=(bn == "frozen")).double()
    model.train() if bn == "frozen" else model.eval()
    loss_fn = add_tcm(ProxyLoss(4, 8), margin_neg=0.2).double()
    images, labels = _batch()

    loss_d, emb_d = direct_backward(model, images, labels, loss_fn)
    g_direct = _grads(model, loss_fn)
    model.zero_grad(); loss_fn.zero_grad()
    loss_c, emb_c = cached_backward(model, images, labels, loss_fn, chunk_size)
    g_cached = _grads(model, loss_fn)

    assert len(g_direct) == len(g_cached) > 0
    torch.testing.assert_close(loss_c, loss_d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(emb_c, emb_d, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_cached, g_direct):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(float(g.abs().sum()) > 0 for g in g_cached[-1:])  # the proxies did get a gradient


def test_cached_equals_direct_float32_smooth_ap() -> None:
    torch.manual_seed(0)
    model = build_embedder("small_cnn", dim=16, in_channels=1).eval()
    loss_fn = add_tcm(SmoothAPLoss())
    images, labels = _batch(32, 8)  # 8 classes x 4
    images = images.float()
    direct_backward(model, images, labels, loss_fn)
    g_direct = _grads(model)
    model.zero_grad()
    cached_backward(model, images, labels, loss_fn, 7)
    for a, b in zip(_grads(model), g_direct):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_replayed_identically() -> None:
    """With dropout the cache equals a chunked forward *with* graph from the same RNG state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 64), nn.Dropout(0.5), nn.Linear(64, 8)).double().train()
    emb_model = lambda x: F.normalize(model(x), dim=1)  # noqa: E731
    loss_fn = ProxyLoss(4, 8).double()
    images, labels = _batch()

    torch.manual_seed(123)
    emb = torch.cat([emb_model(images[s : s + 5]) for s in range(0, 12, 5)])  # graph kept for all chunks
    loss_fn(emb, labels).backward()
    g_ref = _grads(model, loss_fn)
    rng_ref = torch.get_rng_state()
    model.zero_grad(); loss_fn.zero_grad()

    torch.manual_seed(123)
    cached_backward(emb_model, images, labels, loss_fn, 5)  # type: ignore[arg-type]
    for a, b in zip(_grads(model, loss_fn), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.equal(torch.get_rng_state(), rng_ref)  # RNG left where one pass leaves it


def test_bad_chunk_size() -> None:
    model = build_embedder("small_cnn", dim=8, in_channels=1)
    images, labels = _batch()
    with pytest.raises(ValueError, match="chunk_size"):
        cached_backward(model, images.float(), labels, ProxyLoss(4, 8), 0)
