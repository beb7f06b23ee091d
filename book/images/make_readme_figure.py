"""Draw the README's picture: per-class utility curves, Smooth-AP vs Smooth-AP + TCM.

The same two runs as chapter 9 (and chapter 7, seed 0): glyphs-small test classes, small CNN,
64-d, batch 64, one epoch, Adam 1e-3, TCM m+ = 0.9, m- = 0.5.  ``run_cached`` loads them when
the book has been built, and trains them (about two minutes on a CPU) otherwise.

    python book/images/make_readme_figure.py   # writes book/images/utility_curves.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tcmlib.experiments import run_cached  # noqa: E402
from tcmlib.metrics import utility_curves  # noqa: E402
from tcmlib.train import load_config  # noqa: E402

OUT = Path(__file__).with_name("utility_curves.png")
TCM = dict(margin_pos=0.9, margin_neg=0.5, lambda_pos=1.0, lambda_neg=1.0)


def config(tcm: bool):
    name = f"glyphs_small_cnn_smooth_ap{'_tcm' if tcm else ''}"  # a config that ships with tcmlib
    return load_config(name, glyph_size="small", data_seed=0, dim=64, batch_size=64, epochs=1, steps_per_epoch=None,
                       lr=1e-3, tcm=dict(TCM) if tcm else False, checkpoint_every_steps=0, progress=False,
                       small_input=False, seed=0)


def main() -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, tcm in zip(axes, (False, True)):
        emb, labels = run_cached(config(tcm)).test_embeddings()
        calib = utility_curves(emb, labels)                                   # the calibration range (FAR 1-10 %)
        wide = utility_curves(emb, labels, distance_range=(0.0, 1.2), num_thresholds=121)
        u = wide.utility.numpy()                                              # (K, T)
        worst = calib.worst_classes(0.1).numpy()
        ax.plot(wide.thresholds, u, color="0.6", lw=0.5, alpha=0.35)
        ax.plot(wide.thresholds, u[:, worst], color="tab:red", lw=0.8, alpha=0.7)
        ax.plot(wide.thresholds, u.mean(axis=1), color="k", lw=2)
        ax.axvspan(*calib.distance_range, color="tab:blue", alpha=0.15)
        ax.set(xlabel="distance threshold  d = 1 - cosine", xlim=(0.0, 1.2),
               title=f"Smooth-AP{' + TCM' if tcm else ''}:  OPIS {calib.opis:.2e},  0.1-OPIS {calib.eps_opis(0.1):.2e}")
        ax.title.set_fontsize(10)
    axes[0].set_ylabel("per-class utility (F1 of TAR, TRR)")
    fig.text(0.5, -0.04, "One line per test class (300 unseen glyph classes); red: worst 10 %; black: mean; "
             "blue: calibration range.  small CNN, 1 epoch, seed 0 (book chapter 9).", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110, bbox_inches="tight")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
