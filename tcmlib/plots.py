"""Small figures the Part I chapters draw more than once.

Each function draws on matplotlib axes (or makes its own figure) and returns them, so a chapter
cell stays one call long and a test can read the drawn values back.  ``rate_bars`` and
``neighbour_grid`` compute no metric: the numbers come in as tensors.  ``threshold_schematic``
draws made-up pair-similarity densities and computes each class's utility from the curves it
draws (chapter 4's F1 of TAR and TRR).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tcmlib.metrics.opis import utility

__all__ = ["neighbour_grid", "rate_bars", "threshold_schematic", "SCHEMATIC_CLASSES"]


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


# The schematic's made-up classes: (name, colour, positive-pair (mean, std), negative-pair
# (mean, std)) of the cosine similarity, without TCM and with TCM.  Without TCM the classes
# differ in spread; with TCM every positive density sits above m+ and every negative one below m-.
SCHEMATIC_CLASSES: dict[bool, list[tuple[str, str, tuple[float, float], tuple[float, float]]]] = {
    False: [("A (tight)", "tab:blue", (0.86, 0.05), (0.15, 0.12)),
            ("B", "tab:orange", (0.70, 0.10), (0.25, 0.15)),
            ("C (loose)", "tab:green", (0.52, 0.15), (0.33, 0.17))],
    True: [("A (tight)", "tab:blue", (0.96, 0.02), (0.12, 0.10)),
           ("B", "tab:orange", (0.95, 0.025), (0.17, 0.11)),
           ("C (loose)", "tab:green", (0.94, 0.03), (0.22, 0.12))],
}
_M_POS, _M_NEG = 0.9, 0.5                      # TCM's default margins (tcmlib.losses.tcm_loss)
_THRESHOLD = (_M_POS + _M_NEG) / 2             # the global threshold on s, inside the band


def _schematic_curves(tcm: bool) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Similarity grid (G,) and per class the drawn (positive, negative) densities (G,) each.

    Each density is a normal density cut to s in [-1, 1] and scaled to peak 1 (shape only).
    """
    s = torch.linspace(-1.0, 1.0, 2001, dtype=torch.float64)
    curves = []
    for _, _, (mp, sp), (mn, sn) in SCHEMATIC_CLASSES[tcm]:
        pos, neg = (torch.exp(-0.5 * ((s - m) / sd) ** 2) for m, sd in ((mp, sp), (mn, sn)))
        curves.append((pos / pos.max(), neg / neg.max()))
    return s, curves


def _share_at_or_above(s: torch.Tensor, density: torch.Tensor, t: float) -> float:
    """The share of a drawn density's area at s >= t (trapezoid rule on the grid)."""
    total = torch.trapezoid(density, s)
    keep = s >= t
    return float(torch.trapezoid(density[keep], s[keep]) / total)


def threshold_schematic(ax: Any = None, *, tcm: bool = False) -> Any:
    """The book's picture of the idea: per-class pair similarities, one threshold, TCM's margins.

    Three made-up classes (``SCHEMATIC_CLASSES``) of different spread; for each, the density of
    the cosine similarity s of its positive pairs (solid) and of its negative pairs (dashed),
    each scaled to peak 1.  One global threshold accepts a pair when s >= 0.7 (distance
    d = 1 - s <= 0.3), the middle of TCM's band between m- = 0.5 and m+ = 0.9 (shaded; TCM
    penalises positive pairs with s <= m+ and negative pairs with s >= m-).  The legend gives each
    class's utility at that threshold, computed from the drawn curves (chapter 4):

        TAR_i = area of i's positive density at s >= 0.7 / its whole area
        TRR_i = area of i's negative density at s <  0.7 / its whole area
        U_i   = 2 TAR_i TRR_i / (TAR_i + TRR_i)

    With ``tcm=True`` the densities are those TCM aims for: positives above m+, negatives
    below m-, so every class gets nearly the same utility at any threshold in the band.

    Args:
        ax: matplotlib axes to draw on; ``None`` makes a new 7 x 3.2 inch figure.
        tcm: draw the classes as TCM pulls them (True) or as a base loss leaves them (False).

    Returns:
        The axes.  ``ax.lines[2 * i]`` / ``[2 * i + 1]`` are class i's positive / negative
        density (x: s, y: scaled density); legend entry i reads ``"<name>: U = <U_i>"``.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    s, curves = _schematic_curves(tcm)
    ax.axvspan(_M_NEG, _M_POS, color="0.9", zorder=0)
    for (name, colour, _, _), (pos, neg) in zip(SCHEMATIC_CLASSES[tcm], curves):
        tar = _share_at_or_above(s, pos, _THRESHOLD)
        trr = 1.0 - _share_at_or_above(s, neg, _THRESHOLD)
        u = float(utility(torch.tensor(tar), torch.tensor(trr)))
        ax.plot(s.numpy(), pos.numpy(), color=colour, lw=1.8, label=f"{name}: U = {u:.2f}")
        ax.plot(s.numpy(), neg.numpy(), color=colour, lw=1.2, ls="--")
    ax.axvline(_THRESHOLD, color="black", lw=1.5)
    ax.text(_THRESHOLD, 1.2, f"one threshold\naccept if s $\\geq$ {_THRESHOLD:g}", ha="center",
            va="bottom", fontsize=8, bbox=dict(fc="white", ec="none", pad=1))
    for m, label, side in ((_M_NEG, f"$m^-$ = {_M_NEG:g} ", "right"),
                           (_M_POS, f"$m^+$ = {_M_POS:g} ", "right")):
        ax.axvline(m, color="0.4", lw=1, ls=":")
        ax.text(m, 1.02, label, ha=side, va="bottom", fontsize=8, color="0.3")
    if tcm:
        arrow = dict(arrowstyle="->", color="0.3", lw=1.2)
        for start, end in ((_M_POS - 0.1, _M_POS + 0.06), (_M_NEG + 0.02, _M_NEG - 0.18)):
            ax.annotate("", xy=(end, 0.4), xytext=(start, 0.4), arrowprops=arrow)
            ax.text((start + end) / 2, 0.45, "TCM's pull", ha="center", va="bottom",
                    fontsize=8, color="0.3")
    ax.set(xlim=(-0.4, 1.0), ylim=(0, 1.6), yticks=[],
           xlabel="cosine similarity s of a pair  (distance d = 1 - s)",
           ylabel="pairs (each curve scaled)",
           title=("with TCM: every class pulled inside the margins" if tcm else
                  "without TCM: one threshold, a different utility per class")
           + "\nsolid: positive pairs, dashed: negative pairs")
    ax.legend(fontsize=8, loc="upper left", title="utility at the threshold", title_fontsize=8)
    return ax
