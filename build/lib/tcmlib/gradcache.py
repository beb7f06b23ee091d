"""The embedding-gradient cache: train on a batch larger than memory with exactly the same gradient.

A ranking loss such as Smooth-AP or RS@k needs the whole batch (up to 4000 images) at once, but a
network's activations for 4000 images do not fit in GPU memory.  The Recall@k-surrogate code
(Patel et al., CVPR 2022) splits one step in four:

1. forward the batch in chunks **without** a graph, keep only the embeddings E (B, D);
2. compute the loss on a detached copy of E that requires grad, backward: this gives
   G = dL/dE (B, D) and the gradients of the loss's own parameters (proxies, ArcFace centres);
3. re-forward each chunk **with** a graph and call ``emb_chunk.backward(G[chunk])``: by the
   chain rule dL/dtheta = sum_chunks (dE_chunk/dtheta)^T G_chunk, accumulated in ``.grad``;
4. one optimiser step (the caller's).

Memory: one chunk's activations plus B x D embeddings.  Time: one extra forward pass.

Exactness.  The result equals the full-batch gradient whenever the loss depends on the batch
only through its embeddings and both forwards compute the same embeddings.  We make random
layers (dropout, stochastic depth, augmentation inside the model) draw the same numbers in both
forwards by saving the torch RNG state before each chunk of pass 1 and restoring it before the
same chunk of pass 2.  **BatchNorm in train mode breaks exactness**: its statistics are per
chunk, not per batch (and pass 1 already updated the running statistics once).  Frozen BN
(``build_embedder("resnet50")``, as in the original code) or a model in eval mode is exact;
a from-scratch ``small_cnn`` with live BN trains fine with the cache but is not bit-equivalent.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["cached_backward", "direct_backward"]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU RNG state and, for a CUDA batch, that device's RNG state."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _full(x: torch.Tensor) -> torch.Tensor:
    """Half-precision autocast outputs to float32; float32 / float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def direct_backward(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain step: forward the whole batch with a graph, loss, backward. Returns (loss, embeddings), detached."""
    amp = torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with amp:
        emb = model(images)  # (B, D)
    loss = loss_fn(_full(emb), labels)  # losses run in float32, outside autocast
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach(), emb.detach()


def cached_backward(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int,
    *,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(model(images), labels)`` chunk by chunk.

    Args:
        model: maps (b, C, H, W) images to (b, D) embeddings.
        images: (B, C, H, W) the whole batch, on the model's device.
        labels: (B,) class ids.
        loss_fn: ``loss_fn(embeddings (B, D), labels (B,)) -> 0-dim tensor``; an ``nn.Module``
            with parameters gets their gradients too.
        chunk_size: images per forward pass (the memory knob).
        amp_dtype: run the model under ``torch.autocast`` with this dtype (bf16 / fp16), or None.
        scaler: a ``GradScaler`` for fp16: the loss is scaled before step 2, so every gradient
            (network and loss parameters) carries the same scale and ``scaler.step`` unscales it.

    Returns:
        ``(loss, embeddings)``: the 0-dim loss and (B, D) embeddings, both detached.
        The caller zeroes gradients before and steps the optimiser after.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = images.device
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    starts = list(range(0, images.shape[0], chunk_size))

    # 1. forward every chunk without a graph; remember the RNG state each chunk started from
    states, embs = [], []
    with torch.no_grad():
        for s in starts:
            states.append(_rng_state(device))
            with amp():
                embs.append(_full(model(images[s : s + chunk_size])))  # (b, D)
    after = _rng_state(device)

    # 2. loss on detached full-batch embeddings: G = dL/dE, plus the loss parameters' gradients
    emb = torch.cat(embs).requires_grad_(True)  # (B, D) leaf
    loss = loss_fn(emb, labels)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    grad = emb.grad  # (B, D), scaled like the loss
    if grad is None:  # the loss does not depend on the embeddings at all
        grad = torch.zeros_like(emb)

    # 3. re-forward each chunk with a graph (same RNG draws as in pass 1), backward with its slice of G
    for s, state in zip(starts, states):
        _set_rng_state(state, device)
        with amp():
            e = model(images[s : s + chunk_size])  # (b, D)
        _full(e).backward(grad[s : s + chunk_size])
    _set_rng_state(after, device)  # leave the RNG where one pass left it
    return loss.detach(), emb.detach()
