"""Small figures the Part I chapters draw more than once.

Each function draws on matplotlib axes (or makes its own figure) and returns them, so a chapter
cell stays one call long and a test can read the drawn values back.  Nothing here computes a
metric: the numbers come in as tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["neighbour_grid", "rate_bars"]


def rate_bars(ax: Any, class_ids: Sequence[int] | torch.Tensor, far: torch.Tensor,
              frr: torch.Tensor, *, title: str = "") -> Any:
    """Grouped bars of per-class FAR (red) and FRR (blue) in percent, on one matplotlib axes.

    Args:
        ax: matplotlib axes to draw on.
        class_ids: (T,) the class of each column; used as tick labels.
        far, frr: (T,) false-accept / false-reject rates in [0, 1] (chapter 3:
            FAR_i = accepted negative pairs of i / negative pairs of i, FRR_i likewise).
        title: axes title.

    Returns:
        ``ax``; bar ``k`` of ``ax.containers[0]`` has height ``100 * far[k]``,
        of ``ax.containers[1]`` ``100 * frr[k]``.
    """
    far, frr = torch.as_tensor(far).flatten().cpu(), torch.as_tensor(frr).flatten().cpu()
    ids = [int(c) for c in class_ids]
    if not (len(ids) == len(far) == len(frr)):
        raise ValueError(f"class_ids, far and frr must have one entry per class; got "
                         f"{len(ids)}, {len(far)} and {len(frr)}")
    if len(far) and (min(far.min(), frr.min()) < 0 or max(far.max(), frr.max()) > 1):
        raise ValueError("far and frr are rates in [0, 1], not percentages: pass them unscaled")
    xs = torch.arange(len(ids)).numpy()
    ax.bar(xs - 0.2, 100 * far.numpy(), width=0.4, color="tab:red", label="FAR")
    ax.bar(xs + 0.2, 100 * frr.numpy(), width=0.4, color="tab:blue", label="FRR")
    ax.set(xticks=xs, xticklabels=[str(c) for c in ids], xlabel="class", ylabel="%", title=title)
    return ax


def neighbour_grid(images: torch.Tensor, labels: torch.Tensor, sim: torch.Tensor,
                   queries: Sequence[int], n_show: int = 8, *, title: str = "") -> Any:
    """Each query image followed by its ``n_show`` most similar images, framed by relevance.

    Args:
        images: (N, H, W) images, any dtype ``imshow`` accepts.
        labels: (N,) class labels.
        sim: (N, N) similarities; row ``q`` ranks the neighbours of ``q``.  Set the
            diagonal to ``-inf`` so that a query is not its own neighbour.
        queries: indices of the query rows to draw.
        n_show: neighbours per query (at most N - 1).
        title: figure title.

    Returns:
        The matplotlib Figure; axes ``[row, 1 + i]`` shows the ``i``-th neighbour of
        ``queries[row]``, titled with its similarity and framed green when its label
        equals the query's, red otherwise.
    """
    import matplotlib.pyplot as plt

    n = len(labels)
    if images.shape[0] != n or tuple(sim.shape) != (n, n):
        raise ValueError(f"images (N, H, W), labels (N,) and sim (N, N) must agree on N; got "
                         f"{tuple(images.shape)}, {tuple(labels.shape)}, {tuple(sim.shape)}")
    if not 1 <= n_show <= n - 1:
        raise ValueError(f"n_show = {n_show} must lie between 1 and N - 1 = {n - 1}")
    if not queries or not all(0 <= int(q) < n for q in queries):
        raise ValueError(f"queries must be a non-empty list of row indices in [0, {n})")
    images, labels, sim = images.cpu(), labels.cpu(), sim.detach().cpu()
    fig, axes = plt.subplots(len(queries), n_show + 1, squeeze=False,
                             figsize=(n_show + 1, 1.1 * len(queries)))
    for row, q in enumerate(int(q) for q in queries):
        axes[row, 0].imshow(images[q], cmap="gray_r")
        axes[row, 0].set_title("query", fontsize=8)
        for col, j in enumerate(sim[q].topk(n_show).indices.tolist(), start=1):
            ax = axes[row, col]
            ax.imshow(images[j], cmap="gray_r")
            ax.set_title(f"{sim[q, j]:.2f}", fontsize=7)
            color = "tab:green" if labels[j] == labels[q] else "tab:red"
            for spine in ax.spines.values():
                spine.set(color=color, linewidth=2.5)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
