"""Smooth-AP, RS@k and TCM compute in float32 whatever autocast their caller is in.

A user who calls a loss inside their own ``torch.autocast`` (bf16 here, on the CPU) must get the
float32 value and gradient, bit for bit: the rank sums of Smooth-AP / RS@k need more than bf16's 8
bits (a bf16 Smooth-AP is 0.65625 where float32 gives 0.65784) and TCM's gradient entries l/n
underflow half precision.  The oracle is the same call outside autocast; without the losses
switching autocast off, the similarity GEMM would run in bf16 and the numbers would differ.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from tcmlib.losses.combine import WithTCM
from tcmlib.losses.recall_surrogate import recall_surrogate_loss
from tcmlib.losses.smooth_ap import SmoothAPLoss, smooth_ap_loss
from tcmlib.losses.tcm import tcm_loss


def _batch(seed: int = 0, classes: int = 8, m: int = 4, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(m)  # (B,)
    x = torch.randn(classes, dim, generator=g)[y] + 0.6 * torch.randn(len(y), dim, generator=g)  # (B, D)
    return x, y


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "smooth_ap": lambda x, y: smooth_ap_loss(x, y),
    "smooth_ap_chunked": lambda x, y: smooth_ap_loss(x, y, chunk_size=3),  # checkpointed chunks, recomputed
    "recall_surrogate": lambda x, y: recall_surrogate_loss(x, y),
    "recall_surrogate_chunked": lambda x, y: recall_surrogate_loss(x, y, chunk_size=5),
    "recall_surrogate_simix": lambda x, y: recall_surrogate_loss(
        x, y, simix=True, generator=torch.Generator().manual_seed(1)),
    "tcm": lambda x, y: tcm_loss(x, y, margin_pos=0.8, margin_neg=0.1),
    "tcm_reference_set": lambda x, y: tcm_loss(x[:20], y[:20], ref_emb=x[12:], ref_labels=y[12:], margin_neg=0.1),
    "tcm_mined_pairs": lambda x, y: tcm_loss(x, y, indices_tuple=(torch.tensor([0, 1, 4]), torch.tensor([2, 3, 5]),
                                                                  torch.tensor([0, 9, 30])), margin_neg=-0.5),
    "smooth_ap_with_tcm": lambda x, y: WithTCM(SmoothAPLoss(), margin_neg=0.1)(x, y),
}


def _value_and_grad(fn: Callable, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, ...]:
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(xg, y)
    loss.backward()
    assert xg.grad is not None
    return loss.detach(), xg.grad


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_under_bf16_autocast_equals_float32(name: str) -> None:
    x, y = _batch()
    ref, ref_grad = _value_and_grad(LOSSES[name], x, y, autocast=False)
    out, grad = _value_and_grad(LOSSES[name], x, y, autocast=True)
    assert out.dtype == torch.float32 and grad.dtype == torch.float32
    assert ref.item() > 0 and ref_grad.abs().sum() > 0  # a loss with something to compare
    assert torch.equal(out, ref), (out.item(), ref.item())
    assert torch.equal(grad, ref_grad), (grad - ref_grad).abs().max()


@pytest.mark.parametrize("name", ["smooth_ap", "recall_surrogate", "tcm"])
def test_half_inputs_compute_in_float32(name: str) -> None:
    x, y = _batch(seed=3)
    for half in (torch.float16, torch.bfloat16):
        xh = x.to(half)
        assert torch.equal(LOSSES[name](xh, y), LOSSES[name](xh.float(), y))  # cast up first, then float32 throughout


def test_bf16_gemm_would_differ() -> None:
    """The premise: on these batches a bf16 similarity GEMM does change the losses (so the tests above can fail)."""
    x, y = _batch()
    xn = torch.nn.functional.normalize(x, dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = xn @ xn.T
    assert sim.dtype == torch.bfloat16 and not torch.equal(sim.float(), xn @ xn.T)
