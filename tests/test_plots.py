"""tcmlib.plots draws the values it is given (read back from the matplotlib artists)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tcmlib.plots import neighbour_grid, rate_bars  # noqa: E402


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
