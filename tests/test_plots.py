"""tcmlib.plots draws the values it is given (read back from the matplotlib artists)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import math  # noqa: E402
import re  # noqa: E402

from tcmlib.plots import SCHEMATIC_CLASSES, neighbour_grid, rate_bars, threshold_schematic  # noqa: E402


def test_rate_bars_heights_are_percentages() -> None:
    fig, ax = plt.subplots()
    far, frr = torch.tensor([0.0, 0.25, 0.5]), torch.tensor([1.0, 0.1, 0.02])
    rate_bars(ax, [3, 5, 7], far, frr, title="t")
    far_bars, frr_bars = ([bar.get_height() for bar in c] for c in ax.containers)
    assert far_bars == pytest.approx([0.0, 25.0, 50.0])
    assert frr_bars == pytest.approx([100.0, 10.0, 2.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3", "5", "7"]
    plt.close(fig)


@pytest.mark.parametrize("far, frr, match", [
    (torch.tensor([0.1, 0.2]), torch.tensor([0.1]), "one entry per class"),
    (torch.tensor([5.0, 0.2]), torch.tensor([0.1, 0.1]), "not percentages"),
])
def test_rate_bars_bad_input(far: torch.Tensor, frr: torch.Tensor, match: str) -> None:
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match=match):
        rate_bars(ax, [0, 1], far, frr)
    plt.close(fig)


def test_neighbour_grid_frames_match_a_brute_force_ranking() -> None:
    g = torch.Generator().manual_seed(0)
    n, n_show = 12, 4
    x = torch.nn.functional.normalize(torch.randn(n, 5, generator=g), dim=1)
    labels = torch.arange(3).repeat_interleave(4)
    images = torch.rand(n, 6, 6, generator=g)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    queries = [0, 5, 11]
    fig = neighbour_grid(images, labels, sim, queries, n_show)
    axes = fig.axes
    green, red = mcolors.to_rgba("tab:green"), mcolors.to_rgba("tab:red")
    for row, q in enumerate(queries):
        ranked = sorted((j for j in range(n) if j != q), key=lambda j: -float(sim[q, j]))
        for col, j in enumerate(ranked[:n_show], start=1):
            ax = axes[row * (n_show + 1) + col]
            assert ax.get_title() == f"{float(sim[q, j]):.2f}"
            want = green if labels[j] == labels[q] else red
            assert ax.spines["left"].get_edgecolor() == want
            assert torch.equal(torch.as_tensor(ax.images[0].get_array()), images[j])
    plt.close(fig)


def test_neighbour_grid_bad_input() -> None:
    sim = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="agree on N"):
        neighbour_grid(torch.zeros(3, 2, 2), torch.zeros(4), sim, [0])
    with pytest.raises(ValueError, match="n_show"):
        neighbour_grid(torch.zeros(4, 2, 2), torch.zeros(4), sim, [0], n_show=4)
    with pytest.raises(ValueError, match="queries"):
        neighbour_grid(torch.zeros(4, 2, 2), torch.zeros(4), sim, [7], n_show=2)


def _cut_normal_share_above(t: float, mean: float, std: float) -> float:
    """P(S >= t) for S normal(mean, std) cut to [-1, 1]: the closed form, via erf."""
    cdf = lambda v: 0.5 * (1 + math.erf((v - mean) / (std * math.sqrt(2))))  # noqa: E731
    return (cdf(1.0) - cdf(t)) / (cdf(1.0) - cdf(-1.0))


def _legend_utilities(ax) -> list[float]:
    return [float(re.search(r"U = ([0-9.]+)$", t.get_text()).group(1))
            for t in ax.get_legend().get_texts()]


@pytest.mark.parametrize("tcm", [False, True])
def test_threshold_schematic_utilities_match_the_closed_form(tcm: bool) -> None:
    """Each legend utility is the F1 of TAR and TRR of the drawn normals at the drawn threshold."""
    ax = threshold_schematic(tcm=tcm)
    t = float(ax.lines[2 * len(SCHEMATIC_CLASSES[tcm])].get_xdata()[0])   # the threshold line
    want = []
    for _, _, (mp, sp), (mn, sn) in SCHEMATIC_CLASSES[tcm]:
        tar = _cut_normal_share_above(t, mp, sp)
        trr = 1 - _cut_normal_share_above(t, mn, sn)
        want.append(2 * tar * trr / (tar + trr))
    assert _legend_utilities(ax) == pytest.approx(want, abs=0.0051)
    plt.close(ax.figure)


def test_threshold_schematic_shows_inconsistency_and_tcm_narrows_it() -> None:
    """Without TCM the classes get different utilities; with TCM every drawn density is narrower
    and the utilities nearly agree."""
    fig, (a0, a1) = plt.subplots(1, 2)
    assert threshold_schematic(a0) is a0 and threshold_schematic(a1, tcm=True) is a1
    u0, u1 = _legend_utilities(a0), _legend_utilities(a1)
    assert max(u0) - min(u0) > 0.5
    assert max(u1) - min(u1) < max(u0) - min(u0) and max(u1) - min(u1) < 0.02

    def drawn_std(line) -> float:
        x, w = torch.as_tensor(line.get_xdata()), torch.as_tensor(line.get_ydata())
        mean = (w * x).sum() / w.sum()
        return float(((w * (x - mean) ** 2).sum() / w.sum()).sqrt())

    n = len(SCHEMATIC_CLASSES[False])
    for k in range(2 * n):                      # every positive and negative density
        assert drawn_std(a1.lines[k]) < drawn_std(a0.lines[k]), k
    plt.close(fig)
