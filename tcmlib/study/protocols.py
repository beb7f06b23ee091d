"""Part II's protocol: does adding TCM to a base loss lower OPIS and keep accuracy?

Written down before any test number is seen; chapter 7 states it, and
``python -m tcmlib.experiments reproduce ch07`` carries it out.  Per *cell* (a backbone and a base
loss), on the glyph benchmark:

1. **Splits.**  ``val_fraction`` of the train classes are held out once (fixed by ``data_seed``) as
   validation classes; models train on the rest.  Every choice below reads validation numbers
   only; the test classes are scored once, after a run's last epoch, and only the *final* stage's
   test scores are reported.
2. **Training length** (stage ``curves``): the base loss and base + TCM (the paper's margins) train
   for ``max_epochs`` with validation R@1 / OPIS after every epoch, ``curve_seeds`` seeds each.
   The length is the first epoch at which the seed-mean validation R@1 of *both* variants is
   within ``plateau_tol`` (absolute) of that variant's best epoch (:func:`plateau_epoch`).
3. **Margins and weights** (stage ``tune``): the base loss and every setting of ``tcm_grid`` (two-
   and one-sided TCM) train for that length with ``tune_seeds`` (seeds not used later).  The rule
   (:func:`select_setting`): among settings whose mean validation R@1 is at least the base's minus
   ``r1_tol``, the lowest mean validation OPIS; if none qualifies, the paper's default.
4. **Final** (stage ``final``): base, base + TCM with the paper's margins, and base + TCM with the
   selected setting, ``final_seeds`` seeds each; a base run and its TCM twins with one seed share
   initial weights and batch order.  Per comparison :func:`tcmlib.stats.paired_comparison` and
   Holm's correction across the comparisons of the study.

Each finished run appends one JSON line to ``tcmlib/results/<study>/runs.jsonl`` (package data, so
a plain ``pip install`` has the committed study too; :func:`run_record`):
stage, cell, variant, seed, the full config and its key, per-epoch history, the test metrics, the
test OPIS's bootstrap interval over classes, and provenance (commit, command, torch, device,
threads, wall time, date).  A run already in the file is never retrained; the command can stop and
continue later, on another machine.  ``scale`` (``cpu`` or ``gpu``, :func:`tcmlib.runtime.scale`)
sizes the study; smoke mode shrinks it to seconds without changing the code path.

Two more studies use the same machinery with a fixed training length (chapter 7's) and fewer stages:
``ch08`` (the frontier: the paper's five base losses, each without and with TCM, one batch size,
several seeds, stage ``final``) and ``ch10`` (the ablation of TCM's margins and weights, on
validation classes, stage ``tune``).  Each reuses chapter 7's recorded runs where the config is the
same (``reused_from`` in the record) instead of training them again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from tcmlib.experiments import config_key
from tcmlib.runtime import is_smoke, scale as default_scale
from tcmlib.train import TrainConfig, load_config

__all__ = ["Protocol", "protocol", "STUDIES", "PAPER_TCM", "FRONTIER_LOSSES", "ABLATION_MARGINS", "ABLATION_WEIGHTS",
           "ABLATION_TERMS", "PRIMARY", "EFFECT_OF_INTEREST", "TARGET_POWER", "SELECTED_SEEDS", "for_backbone", "cells",
           "variant_name", "make_config", "stage_configs", "plateau_epoch", "converged_length", "cell_length",
           "training_length", "select_setting", "tuning_means", "selected_setting", "tuning_fell_back", "power_plan",
           "smoke_plan", "final_seeds", "with_plan"]

PAPER_TCM = {"margin_pos": 0.9, "margin_neg": 0.5, "lambda_pos": 1.0, "lambda_neg": 1.0}
STUDIES = ("ch07", "ch08", "ch10", "converged", "ch08_converged", "converged_long", "ch10_converged")


@dataclass(frozen=True)
class Protocol:
    """Every choice of the study, fixed before training (see the module docstring)."""

    backbones: tuple[str, ...]
    losses: tuple[str, ...]
    glyph_size: str  # glyph preset: its number of test classes sets how stable OPIS is
    val_fraction: float  # share of the train classes held out for validation
    max_epochs: int  # learning curves run this long
    curve_seeds: tuple[int, ...]
    tune_seeds: tuple[int, ...]
    final_seeds: tuple[int, ...]
    plateau_tol: float  # validation R@1 within this (absolute) of the best epoch counts as plateaued
    r1_tol: float  # a TCM setting may cost at most this much validation R@1 (absolute)
    tcm_grid: tuple[tuple[float, float, float, float], ...]  # (m+, m-, l+, l-); l = 0: one-sided
    train: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig fields shared by every run
    backbone_train: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per-backbone overrides
    stages: tuple[str, ...] = ("curves", "tune", "final")  # the stages this study runs, in order
    epochs: int | None = None  # a fixed training length (no ``curves`` stage); None: the plateau rule
    reuse: tuple[str, ...] = ()  # studies whose recorded runs of the same stage and config key are reused
    test: str = "wilcoxon"  # the paired test Holm's correction adjusts: "wilcoxon" (signed-rank) or "t"
    backbone_protocol: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per-backbone overrides of
    # these fields (e.g. fewer losses or seeds for a costlier backbone): see :func:`for_backbone`
    # -- the converged study (``converged``): training lengths tried in turn, each with its own cosine schedule
    horizons: tuple[int, ...] = ()  # non-empty: the length rule of :func:`converged_length` instead of the plateau
    length_metric: str = "val_R@1"  # what the length rule reads (validation classes only)
    length_tol: float = 0.0  # doubling the length must gain no more than this (absolute) to count as converged
    planned: bool = False  # final seeds from the committed power plan (:func:`power_plan`), not ``final_seeds``
    budget_cpu_h: Mapping[str, float] = field(default_factory=dict)  # cell "backbone/loss" -> CPU hours for its finals
    cell_seeds: Mapping[str, int] = field(default_factory=dict)  # planned: cell -> final seeds, from plan.json
    class_curves_every: int = 0  # k > 0: a final run keeps every k-th threshold of its per-class utility curves
    # (``classes/<key>.npz``, float16), what a bootstrap over seeds *and* test classes needs (:func:`class_utility`)
    length_from: Mapping[str, str] = field(default_factory=dict)  # cell -> the cell (same backbone) whose curves
    # decide its length: it trains no curves of its own
    min_seeds: int = 10  # planned: the fewest final seeds a cell gets, whatever its budget affords


def for_backbone(p: Protocol, backbone: str) -> Protocol:
    """The protocol one backbone's cells follow: ``p`` with ``p.backbone_protocol[backbone]`` applied."""
    return dataclasses.replace(p, **p.backbone_protocol.get(backbone, {}))


_TRAIN = {"dataset": "glyphs", "augment_rng": "process", "dim": 64, "batch_size": 128, "m": 4, "optimizer": "adam", "lr": 1e-3,
          "weight_decay": 0.0, "milestones": [], "eval_ks": [1, 2, 4, 8], "data_seed": 0, "progress": False,
          "checkpoint_every_steps": 0, "num_workers": 0}
_GRID = ((0.9, 0.5, 1.0, 1.0),  # the paper's default
         (0.8, 0.5, 1.0, 1.0), (0.9, 0.3, 1.0, 1.0),
         (0.9, 0.5, 1.0, 0.0),  # positive term only
         (0.8, 0.3, 1.0, 1.0),
         (0.9, 0.5, 0.0, 1.0))  # negative term only
_GRID_CPU = _GRID[:4]  # what two CPU cores afford: the default, one step in each margin, the positive term alone
# the second family at CPU scale: the conv-stem ViT costs about 2.5x the small CNN per epoch (over a minute a
# run), so it studies the paper's first loss only, with 5 final seeds (the floor for runs over a minute);
# with 5 pairs the signed-rank test cannot go below p = 1/16, so its comparisons use the paired t-test (as
# chapter 8).  Fixed before any conv_vit_tiny run was trained.
_VIT_CPU = {"losses": ("smooth_ap",), "final_seeds": tuple(range(5)), "test": "t"}


def protocol(study: str = "ch07", scale: str | None = None, smoke: bool | None = None) -> Protocol:
    """The protocol of ``study`` at ``scale`` (``cpu`` | ``gpu``; default :func:`tcmlib.runtime.scale`).

    ``cpu``: the glyph ``small`` preset (300 train / 300 test classes), the small CNN, 4 TCM
    settings tuned on 2 seeds, 10 final seeds (fixed before the final stage ran: with 5 pairs the
    signed-rank test cannot reach p < 0.05); and the conv-stem ViT (``conv_vit_tiny``; a plain small
    ViT from scratch does not reach a useful accuracy within a CPU budget) on Smooth-AP only, with 5
    final seeds and the paired t-test, since its epoch costs about 2.5x the CNN's
    (``backbone_protocol``).  ``gpu``: the ``default`` preset (1,000 / 1,000), small CNN, the
    conv-stem ViT and ResNet-18 with its 32x32 stem, 6 TCM settings (two- and both one-sided) on 3
    seeds, 10 final seeds.  Smoke mode: the ``tiny`` preset, a handful
    of steps, 2 seeds, two grid settings; the same code path.
    """
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose one of {', '.join(STUDIES)}")
    scale = scale or default_scale()
    smoke = is_smoke() if smoke is None else smoke
    if study == "ch08":
        return _frontier_protocol(scale, smoke)
    if study == "ch10":
        return _ablation_protocol(scale, smoke)
    if study == "converged":
        return _converged_protocol(scale, smoke)
    if study == "ch08_converged":
        return _frontier_converged_protocol(scale, smoke)
    if study == "converged_long":
        return _longer_protocol(scale, smoke)
    if study == "ch10_converged":
        return _terms_converged_protocol(scale, smoke)
    losses = ("smooth_ap", "recall_surrogate")
    if smoke:
        return Protocol(backbones=("small_cnn",), losses=losses[:1], glyph_size="tiny", val_fraction=0.25,
                        max_epochs=2, curve_seeds=(0,), tune_seeds=(100,), final_seeds=(0, 1), plateau_tol=0.01,
                        r1_tol=0.005, tcm_grid=_GRID[:2],
                        train={**_TRAIN, "dim": 32, "batch_size": 32, "steps_per_epoch": 4})
    if scale == "cpu":
        # a plain small ViT (vit_tiny) stays far below the small CNN's validation R@1 after several times its
        # training time; with a convolutional stem (conv_vit_tiny) it learns, at about 2.5x the CNN's cost an
        # epoch, so it gets the smaller plan _VIT_CPU
        return Protocol(backbones=("small_cnn", "conv_vit_tiny"), losses=losses, glyph_size="small", val_fraction=0.25,
                        max_epochs=8, curve_seeds=(0, 1), tune_seeds=(100, 101), final_seeds=tuple(range(10)),
                        plateau_tol=0.01, r1_tol=0.005, tcm_grid=_GRID_CPU, train=_TRAIN,
                        backbone_protocol={"conv_vit_tiny": _VIT_CPU})
    if scale == "gpu":
        return Protocol(backbones=("small_cnn", "conv_vit_tiny", "resnet18"), losses=losses, glyph_size="default",
                        val_fraction=0.2, max_epochs=20, curve_seeds=(0, 1, 2), tune_seeds=(100, 101, 102),
                        final_seeds=tuple(range(10)), plateau_tol=0.01, r1_tol=0.005, tcm_grid=_GRID,
                        train={**_TRAIN, "amp": "bf16", "channels_last": True},
                        backbone_train={"resnet18": {"small_input": True, "lr": 3e-4}})
    raise ValueError(f"unknown scale {scale!r}; choose 'cpu' or 'gpu'")


_SMOKE_TRAIN = {**_TRAIN, "dim": 32, "batch_size": 32, "steps_per_epoch": 4}
FRONTIER_LOSSES = ("smooth_ap", "recall_surrogate", "proxy_anchor", "multi_similarity", "contrastive")


def _frontier_protocol(scale: str, smoke: bool) -> Protocol:
    """Chapter 8: the paper's five base losses, each without and with TCM at the paper's margins.

    Five seeds a cell (what the CPU budget affords for 50 runs): the exact signed-rank test cannot
    go below p = 1/16 with five pairs, so this study's Holm correction adjusts the paired t-test's p.
    One batch size and one training length for every loss (the length chapter 7's learning curves
    chose for its two losses), so no loss gets more steps or more images than another; the test
    classes are scored once, after the last epoch, and validation after every epoch (the frontier
    along training).  Runs with the same config as chapter 7's (Smooth-AP and RS@k, same seeds) are
    reused from its results file, not retrained.
    """
    if smoke:
        return Protocol(backbones=("small_cnn",), losses=("smooth_ap", "proxy_anchor", "contrastive"),
                        glyph_size="tiny", val_fraction=0.25, max_epochs=2, curve_seeds=(), tune_seeds=(),
                        final_seeds=(0, 1), plateau_tol=0.01, r1_tol=0.005, tcm_grid=(_GRID[0],),
                        train=_SMOKE_TRAIN, stages=("final",), epochs=2, reuse=("ch07",), test="t")
    if scale == "cpu":
        return Protocol(backbones=("small_cnn",), losses=FRONTIER_LOSSES, glyph_size="small", val_fraction=0.25,
                        max_epochs=5, curve_seeds=(), tune_seeds=(), final_seeds=tuple(range(5)), plateau_tol=0.01,
                        r1_tol=0.005, tcm_grid=(_GRID[0],), train=_TRAIN, stages=("final",), epochs=5,
                        reuse=("ch07",), test="t")
    if scale == "gpu":
        gpu = protocol("ch07", "gpu", smoke=False)
        return dataclasses.replace(gpu, losses=FRONTIER_LOSSES, curve_seeds=(), tune_seeds=(), tcm_grid=(_GRID[0],),
                                   stages=("final",), epochs=15, reuse=("ch07",))
    raise ValueError(f"unknown scale {scale!r}; choose 'cpu' or 'gpu'")


ABLATION_MARGINS = tuple((mp, mn, 1.0, 1.0) for mp in (0.7, 0.8, 0.9) for mn in (0.3, 0.5, 0.7))
ABLATION_WEIGHTS = tuple((0.9, 0.5, w, w) for w in (0.25, 0.5, 2.0, 4.0)) + ((0.9, 0.5, 1.0, 0.0), (0.9, 0.5, 0.0, 1.0))


def _ablation_protocol(scale: str, smoke: bool) -> Protocol:
    """Chapter 10: TCM's margins (3 x 3 grid, both weights 1) and weights (lambda+ = lambda-, and each
    term alone) around the paper's default, on Smooth-AP with the small CNN.

    An exploration, so on the *validation* classes only (stage ``tune``), with chapter 7's training
    length and its two tuning seeds plus a third on the CPU (102, added after the first two were read: the
    page's sentences draw their conclusions from three seeds); the settings chapter 7 already tuned are reused
    from its file.
    """
    grid = ABLATION_MARGINS + ABLATION_WEIGHTS
    if smoke:
        return Protocol(backbones=("small_cnn",), losses=("smooth_ap",), glyph_size="tiny", val_fraction=0.25,
                        max_epochs=2, curve_seeds=(), tune_seeds=(100,), final_seeds=(), plateau_tol=0.01,
                        r1_tol=0.005, tcm_grid=tuple((mp, mn, 1.0, 1.0) for mp in (0.8, 0.9) for mn in (0.3, 0.5))
                        + ((0.9, 0.5, 2.0, 2.0), (0.9, 0.5, 1.0, 0.0), (0.9, 0.5, 0.0, 1.0)),
                        train=_SMOKE_TRAIN, stages=("tune",), epochs=2, reuse=("ch07",))
    if scale == "cpu":
        return Protocol(backbones=("small_cnn",), losses=("smooth_ap",), glyph_size="small", val_fraction=0.25,
                        max_epochs=5, curve_seeds=(), tune_seeds=(100, 101, 102), final_seeds=(), plateau_tol=0.01,
                        r1_tol=0.005, tcm_grid=grid, train=_TRAIN, stages=("tune",), epochs=5, reuse=("ch07",))
    if scale == "gpu":
        gpu = protocol("ch07", "gpu", smoke=False)
        return dataclasses.replace(gpu, backbones=("small_cnn",), losses=("smooth_ap",), curve_seeds=(),
                                   final_seeds=(), tcm_grid=grid, stages=("tune",), epochs=15, reuse=("ch07",))
    raise ValueError(f"unknown scale {scale!r}; choose 'cpu' or 'gpu'")


# ---- the converged study ---------------------------------------------------------------------------------------
# Chapter 7's first study (``ch07``, now the pilot) stopped training while validation R@1 still rose, at a constant
# learning rate, and its 10 seeds could not see a 10 % change of OPIS.  This study, fixed before any of its runs:
# * every run decays its learning rate on a cosine over its own length (``lr_schedule: cosine``) and draws each
#   image's augmentation from (seed, epoch, index) (``augment_rng: sample``);
# * the length rule reads validation MAP@R (far from its ceiling, unlike validation R@1): lengths 8, 16, 32, 64
#   epochs are trained in turn (2 seeds, base and base + TCM at the paper's margins); the length is the first L
#   whose doubling gains at most ``length_tol`` for both (:func:`converged_length`), so the length chosen is never
#   the longest one tried;
# * the final stage's seeds come from a power plan computed, written to ``plan.json`` and committed before any final
#   run (:func:`power_plan`): the number of pairs that gives the primary test 80 % power for a 10 % reduction of
#   OPIS, from the pilot's paired spread, within a CPU budget per cell;
# * the primary test (:data:`PRIMARY`): small CNN x Smooth-AP, base vs base + TCM at the paper's margins, test OPIS,
#   paired t-test, two-sided, alpha 0.05.  Everything else is secondary (Holm) or exploratory.  Stages run in the
#   order curves, final, tune: the primary pairs need no tuning; the margins tuning selects join the final stage
#   (on the first SELECTED_SEEDS seeds) once it has chosen them.
# * the glyph preset ``small_wide``: the pilot's 300 train classes, 1,000 test classes (OPIS is a spread over test
#   classes; three times as many classes steady it at the same training cost).
# Changed on the CPU scale after the primary cell's curves and plan, before any final run's test number was read,
# because the declared programme cost ~25 CPU-hours against Part II's 16 (curves 2.95 h, primary pairs 6.9 h,
# margin tuning + its selected margins 7 h, the second loss's curves 2.6 h + pairs, the ViT):
# * no margin tuning at CPU scale: every comparison is base vs the paper's margins (chapter 10 explores margins on
#   validation classes); the GPU scale keeps the tuning stage;
# * the second loss (RS@k) trains for the length the primary cell's curves chose (``length_from``) instead of
#   running curves of its own, and its pairs are what 3.5 CPU-hours buy (at least ``min_seeds`` = 5);
# * the ViT (exploratory): its own curves (one seed, 8/16/32 epochs), then at least 2 pairs.
PRIMARY: dict[str, Any] = {"backbone": "small_cnn", "loss": "smooth_ap", "variant": "tcm(m+=0.9, m-=0.5, l+=1, l-=1)", "metric": "OPIS",
           "test": "paired t-test, two-sided", "alpha": 0.05}
EFFECT_OF_INTEREST = -0.10  # the smallest change of OPIS (relative to the base's mean) worth detecting
TARGET_POWER = 0.80
_TRAIN_CONVERGED = {**_TRAIN, "augment_rng": "sample", "lr_schedule": "cosine"}


def _converged_protocol(scale: str, smoke: bool) -> Protocol:
    """The converged, power-planned study (see the comment above :data:`PRIMARY`)."""
    if smoke:
        return Protocol(backbones=("small_cnn",), losses=("smooth_ap",), glyph_size="tiny", val_fraction=0.25,
                        max_epochs=2, curve_seeds=(0,), tune_seeds=(100,), final_seeds=(), plateau_tol=0.0,
                        r1_tol=0.005, tcm_grid=_GRID[:2], train={**_SMOKE_TRAIN, "augment_rng": "sample",
                                                                "lr_schedule": "cosine"},
                        test="t", stages=("curves", "final", "tune"), horizons=(1, 2), length_metric="val_MAP@R",
                        length_tol=1.0, planned=True,
                        budget_cpu_h={"small_cnn/smooth_ap": 0.002}, class_curves_every=4)
    if scale == "cpu":
        return Protocol(backbones=("small_cnn", "conv_vit_tiny"), losses=("smooth_ap", "recall_surrogate"),
                        glyph_size="small_wide", val_fraction=0.25, max_epochs=64, curve_seeds=(0, 1),
                        tune_seeds=(), final_seeds=(), plateau_tol=0.0, r1_tol=0.005, tcm_grid=(),
                        train=_TRAIN_CONVERGED, test="t", stages=("curves", "final"),
                        horizons=(8, 16, 32, 64), length_metric="val_MAP@R",
                        length_tol=0.005, planned=True, class_curves_every=4, min_seeds=5,
                        budget_cpu_h={"small_cnn/smooth_ap": 7.0, "small_cnn/recall_surrogate": 3.5,
                                      "conv_vit_tiny/smooth_ap": 1.7},
                        length_from={"small_cnn/recall_surrogate": "small_cnn/smooth_ap"},
                        # the conv-stem ViT costs ~2.5x the CNN an epoch: one loss, one curve seed, 8/16/32 epochs,
                        # at least 2 pairs; its comparisons are exploratory
                        backbone_protocol={"conv_vit_tiny": {"losses": ("smooth_ap",), "curve_seeds": (0,),
                                                             "horizons": (8, 16, 32), "min_seeds": 2}})
    if scale == "gpu":
        return Protocol(backbones=("small_cnn", "conv_vit_tiny", "resnet18"), losses=("smooth_ap", "recall_surrogate"),
                        glyph_size="default", val_fraction=0.2, max_epochs=80, curve_seeds=(0, 1, 2),
                        tune_seeds=(100, 101, 102), final_seeds=(), plateau_tol=0.0, r1_tol=0.005, tcm_grid=_GRID,
                        train={**_TRAIN_CONVERGED, "amp": "bf16", "channels_last": True}, stages=("curves", "final", "tune"),
                        backbone_train={"resnet18": {"small_input": True, "lr": 3e-4}}, test="t",
                        horizons=(10, 20, 40, 80), length_metric="val_MAP@R", length_tol=0.005, planned=True,
                        class_curves_every=4,
                        budget_cpu_h={f"{b}/{loss}": 4.0 for b in ("small_cnn", "conv_vit_tiny", "resnet18")
                                      for loss in ("smooth_ap", "recall_surrogate")})
    raise ValueError(f"unknown scale {scale!r}; choose 'cpu' or 'gpu'")


def _frontier_converged_protocol(scale: str, smoke: bool) -> Protocol:
    """Chapter 8's five base losses trained like the converged study's final runs (its glyph preset, cosine
    learning rate, per-sample augmentation, its length: 64 epochs on the CPU), each without and with TCM at the
    paper's margins.

    Exploratory: two seeds a loss on the CPU (a pair cost about 0.4 CPU-hours in the converged study's final
    stage; three losses x two pairs fit what Part II's 16 CPU-hours had left), three on a GPU.  Smooth-AP's and
    RS@k's runs are the converged study's own (``reuse``), not trained again.  Fixed before any of its runs, with
    one seed; the second was added while the first trained, before any of its numbers was read.
    """
    conv = _converged_protocol(scale, smoke)
    common: dict[str, Any] = dict(
        backbones=("small_cnn",), losses=FRONTIER_LOSSES, curve_seeds=(), tune_seeds=(), planned=False, horizons=(),
        tcm_grid=(_GRID[0],), stages=("final",), reuse=("converged",), test="t", length_from={}, budget_cpu_h={},
        backbone_protocol={})
    if smoke:
        return dataclasses.replace(conv, **{**common, "losses": ("smooth_ap", "proxy_anchor", "contrastive")},
                                   final_seeds=(0, 1), epochs=2)
    if scale == "cpu":
        return dataclasses.replace(conv, **common, final_seeds=(0, 1), epochs=64)
    if scale == "gpu":
        return dataclasses.replace(conv, **common, final_seeds=(0, 1, 2), epochs=conv.max_epochs)
    raise ValueError(f"unknown scale {scale!r}; choose 'cpu' or 'gpu'")


def _longer_protocol(scale: str, smoke: bool) -> Protocol:
    """The converged study's length rule taken one doubling further, on its primary cell (small CNN x Smooth-AP).

    The converged study's longest pair of lengths (32 -> 64 epochs on the CPU) still gained more validation MAP@R
    than ``length_tol``, so its rule returned its longest length *not* converged.  This study trains the primary
    cell's curves at that length (the converged study's own runs, ``reuse``) and at twice it (128 epochs on the CPU:
    2 seeds x base and base + TCM, each with its own cosine schedule), and applies the same rule with the same
    tolerance to the pair: converged at 64 epochs if doubling gains at most ``length_tol`` for both variants.  Its
    runs also answer "does TCM only train faster?" one doubling further (base at 128 epochs against TCM at 64), and
    give two exploratory test pairs at 128 epochs.  Fixed before any of its runs, with 2.1 of Part II's 16 CPU-hours
    (the 4.6 left could not re-make the final pairs at a longer length: ~0.6 CPU-hours a pair).
    """
    conv = _converged_protocol(scale, smoke)
    h = conv.horizons[-1]
    common: dict[str, Any] = dict(
        backbones=("small_cnn",), losses=("smooth_ap",), stages=("curves",), reuse=("converged",), planned=False,
        horizons=(h, 2 * h), max_epochs=2 * h, final_seeds=(), tune_seeds=(), tcm_grid=(), length_from={},
        budget_cpu_h={}, backbone_protocol={})
    return dataclasses.replace(conv, **common)


# chapter 10 at the converged length: both terms (the paper's setting), the positive term alone, the negative alone
ABLATION_TERMS = (_GRID[0], *ABLATION_WEIGHTS[-2:])


def _terms_converged_protocol(scale: str, smoke: bool) -> Protocol:
    """Chapter 10's two terms at the converged study's settings: Smooth-AP x small CNN, the baseline, both TCM terms
    (the paper's margins and weights), the positive term alone and the negative term alone, on the validation
    classes (stage ``tune``), three tuning seeds, at the converged study's length (64 epochs on the CPU) with its
    cosine schedule, per-sample augmentation and glyph preset.

    Exploratory, like chapter 10's sweeps.  Its question is the one chapter 10's pilot-length runs answered most
    sharply (the two terms moved OPIS in opposite directions); the other 13 settings of the sweep at this length
    would cost ~6 CPU-hours more than Part II's budget had left (12 runs here: ~1.8 CPU-hours).  Fixed before any
    of its runs.
    """
    conv = _converged_protocol(scale, smoke)
    common: dict[str, Any] = dict(
        backbones=("small_cnn",), losses=("smooth_ap",), stages=("tune",), reuse=(), planned=False, horizons=(),
        curve_seeds=(), final_seeds=(), tcm_grid=ABLATION_TERMS, length_from={}, budget_cpu_h={},
        backbone_protocol={}, class_curves_every=0)
    seeds = (100,) if smoke else (100, 101, 102)
    return dataclasses.replace(conv, **common, tune_seeds=seeds, epochs=conv.horizons[-1])


def converged_length(ends: Mapping[str, Mapping[int, float]], horizons: Sequence[int], tol: float
                     ) -> tuple[int | None, bool]:
    """The length rule of the converged study: ``(length, converged)``.

    ``ends[variant][H]`` is the seed-mean validation metric at the end of the runs trained for H epochs (each
    with its own cosine schedule).  The length is the first ``horizons[i]`` whose doubling
    ``horizons[i + 1]`` gains at most ``tol`` for every variant; ``(None, False)`` while a needed horizon is
    unrecorded; ``(horizons[-1], False)`` when even the longest pair still gains more (not converged).
    """
    if len(ends) < 2:  # both variants (base and base + TCM) must be on record
        return None, False
    for h, h2 in zip(horizons, horizons[1:]):
        if any(h not in e or h2 not in e for e in ends.values()):
            return None, False
        if all(e[h2] - e[h] <= tol for e in ends.values()):
            return h, True
    return (horizons[-1], False) if len(horizons) > 0 else (None, False)


def _curve_ends(p: Protocol, runs: Sequence[Mapping[str, Any]], backbone: str, loss: str
                ) -> dict[str, dict[int, float]]:
    """``{variant: {H: seed-mean length metric at the end}}`` of a cell's recorded curves runs (complete seeds only)."""
    paper = variant_name(PAPER_TCM)
    have = {(r["stage"], r["key"]): r for r in runs}
    ends: dict[str, dict[int, float]] = {}
    for h in p.horizons:
        for v, t in (("base", None), (paper, PAPER_TCM)):
            found = [have.get(("curves", config_key(make_config(p, backbone, loss, t, s, h)))) for s in p.curve_seeds]
            if all(f is not None for f in found):
                ends.setdefault(v, {})[h] = sum(f["final"][p.length_metric] for f in found) / len(found)  # type: ignore[index]
    return ends


def cell_length(p: Protocol, runs: Sequence[Mapping[str, Any]], backbone: str, loss: str) -> tuple[int | None, bool]:
    """``(length, converged)`` of a cell of the converged study: its own curves' :func:`converged_length`, or those
    of the cell ``p.length_from`` names for it."""
    loss = _length_cell(p, backbone, loss)
    cp = for_backbone(p, backbone)
    return converged_length(_curve_ends(cp, runs, backbone, loss), cp.horizons, cp.length_tol)


def _length_cell(p: Protocol, backbone: str, loss: str) -> str:
    """The loss whose curves decide the length of the cell ``backbone/loss``."""
    donor = p.length_from.get(f"{backbone}/{loss}")
    if donor is None:
        return loss
    b, _, other = donor.partition("/")
    if b != backbone:
        raise ValueError(f"length_from: {backbone}/{loss} can take its length only from a cell of its own backbone, "
                         f"not {donor!r}")
    return other


def _wanted_horizons(p: Protocol, runs: Sequence[Mapping[str, Any]], backbone: str, loss: str) -> tuple[int, ...]:
    """The lengths the curves stage trains so far: pairs in turn, until the rule has its answer."""
    ends = _curve_ends(p, runs, backbone, loss)
    for i, (h, h2) in enumerate(zip(p.horizons, p.horizons[1:])):
        done = all(h in e and h2 in e for e in ends.values()) and len(ends) == 2
        if not done or converged_length(ends, p.horizons[: i + 2], p.length_tol)[1]:
            return p.horizons[: i + 2]
    return p.horizons


def power_plan(p: Protocol, runs: Sequence[Mapping[str, Any]], pilot: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The number of final seeds per cell, from the pilot's spread and the cost of a run at the chosen length.

    * ``ratio``: the sd of the paired change of test OPIS over the pilot's mean base OPIS (``pilot``: chapter 7's
      first study, small CNN x Smooth-AP, base vs paper margins, 10 pairs);
    * ``n_power``: pairs for ``TARGET_POWER`` at the effect ``EFFECT_OF_INTEREST`` (Cohen's d = 0.10 / ratio),
      paired t-test, two-sided, alpha 0.05 (``statsmodels``' ``TTestPower``);
    * per cell, ``cost_pair_h``: two runs at the chosen length (:func:`_run_cost_s`); ``seeds`` = min(n_power, what
      ``budget_cpu_h`` affords), at least 10; ``detectable_rel``: the relative effect the cell's seeds detect with
      80 % power.  Every number is from recorded runs; nothing here reads a final run.
    """
    import numpy as np
    from statsmodels.stats.power import TTestPower

    pairs: dict[int, dict[str, float]] = {}
    for r in pilot:
        if (r["stage"], r["backbone"], r["loss"]) == ("final", PRIMARY["backbone"], PRIMARY["loss"]):
            pairs.setdefault(r["seed"], {})[r["variant"]] = r["final"]["OPIS"]
    done = [v for v in pairs.values() if "base" in v and PRIMARY["variant"] in v]
    if len(done) < 3:
        raise ValueError("the pilot needs >= 3 recorded base / paper-TCM pairs of the primary cell")
    base = np.array([v["base"] for v in done])
    diff = np.array([v[PRIMARY["variant"]] - v["base"] for v in done])
    ratio = float(diff.std(ddof=1) / base.mean())
    power = TTestPower()
    d = abs(EFFECT_OF_INTEREST) / ratio
    n_power = int(np.ceil(power.solve_power(effect_size=d, alpha=PRIMARY["alpha"], power=TARGET_POWER,
                                            alternative="two-sided")))
    cells_out = {}
    for backbone, loss in cells(p):
        cp = for_backbone(p, backbone)
        length, converged = cell_length(p, runs, backbone, loss)
        if length is None:
            raise ValueError(f"{backbone}/{loss}: its training length is not decided yet (curves stage unfinished)")
        cost_pair_h = 2 * _run_cost_s(runs, pilot, backbone, loss, length, _length_cell(p, backbone, loss)) / 3600
        budget = p.budget_cpu_h.get(f"{backbone}/{loss}", 0.0)
        seeds = max(cp.min_seeds if not smoke_plan(p) else 2, min(n_power, math.floor(budget / cost_pair_h + 1e-9)))
        detect = float(power.solve_power(nobs=seeds, alpha=PRIMARY["alpha"], power=TARGET_POWER,
                                         alternative="two-sided")) * ratio
        cells_out[f"{backbone}/{loss}"] = {"length": length, "converged": converged, "cost_pair_h": cost_pair_h,
                                           "budget_cpu_h": budget, "seeds": seeds, "detectable_rel": -detect,
                                           "power_at_effect": float(power.power(effect_size=d, nobs=seeds,
                                                                                alpha=PRIMARY["alpha"]))}
    return {"primary": PRIMARY, "effect_of_interest_rel": EFFECT_OF_INTEREST, "target_power": TARGET_POWER,
            "pilot": {"study": "ch07", "pairs": len(done), "base_mean": float(base.mean()),
                      "paired_sd": float(diff.std(ddof=1)), "ratio": ratio},
            "cohens_d": d, "n_power": n_power, "cells": cells_out}


def _run_cost_s(runs: Sequence[Mapping[str, Any]], pilot: Sequence[Mapping[str, Any]], backbone: str, loss: str,
                length: int, curves_loss: str | None = None) -> float:
    """Seconds one run of a cell costs at ``length`` epochs on one quiet core.

    ``length`` x the pilot's median epoch (training + validation scoring, same train and validation classes, same
    backbone and loss) + the test scoring the cell's curves runs at that length did after their last epoch (their
    last evaluation minus their median validation-only one).  The pilot's epochs are used because the curves runs
    may share the machine with other work; where the pilot lacks the cell, the curves runs' own median epoch.
    ``curves_loss``: the loss whose curves runs the cell's length came from (default ``loss``).
    """
    import numpy as np

    def epoch_s(rs: Sequence[Mapping[str, Any]]) -> float:
        return float(np.median([h["train_time_s"] + h.get("eval_time_s", 0.0) for r in rs for h in r["history"][:-1]]))

    curves_loss = curves_loss or loss
    mine = [r for r in runs if r["stage"] == "curves" and (r["backbone"], r["loss"]) == (backbone, curves_loss)
            and r["config"]["epochs"] == length]
    if not mine:
        raise ValueError(f"{backbone}/{curves_loss}: no curves run of {length} epochs recorded")
    theirs = [r for r in pilot if r["stage"] == "final" and (r.get("backbone"), r["loss"]) == (backbone, loss)]
    per_epoch = epoch_s(theirs) if theirs else epoch_s(mine)
    test_s = float(np.median([r["history"][-1].get("eval_time_s", 0.0)
                              - float(np.median([h.get("eval_time_s", 0.0) for h in r["history"][:-1]] or [0.0]))
                              for r in mine]))
    return length * per_epoch + max(test_s, 0.0)


def smoke_plan(p: Protocol) -> bool:
    """A smoke-mode protocol (tiny glyphs): its plan may go below 10 seeds."""
    return p.glyph_size == "tiny"


def cells(p: Protocol) -> list[tuple[str, str]]:
    """``(backbone, loss)`` pairs in the order the study runs them (all losses of a backbone first)."""
    return [(b, loss) for b in p.backbones for loss in for_backbone(p, b).losses]


def variant_name(tcm: Mapping[str, float] | None) -> str:
    """``"base"``, or ``"tcm(m+=0.9, m-=0.5, l+=1, l-=1)"`` for a TCM setting."""
    if not tcm:
        return "base"
    return "tcm(m+={margin_pos:g}, m-={margin_neg:g}, l+={lambda_pos:g}, l-={lambda_neg:g})".format(**tcm)


def _tcm(setting: Sequence[float]) -> dict[str, float]:
    return dict(zip(("margin_pos", "margin_neg", "lambda_pos", "lambda_neg"), map(float, setting)))


def make_config(p: Protocol, backbone: str, loss: str, tcm: Mapping[str, float] | None, seed: int,
                epochs: int) -> TrainConfig:
    """The :class:`TrainConfig` of one run of the study."""
    values = {**p.train, **p.backbone_train.get(backbone, {}), "glyph_size": p.glyph_size,
              "val_fraction": p.val_fraction, "backbone": backbone, "loss": loss,
              "tcm": dict(tcm) if tcm else False, "seed": seed, "epochs": epochs, "eval_every": 1}
    return load_config(None, **values)


def plateau_epoch(curves: Mapping[str, Sequence[Sequence[float]]], tol: float) -> int:
    """The training length: the first epoch (1-based) where every variant has plateaued.

    ``curves[variant]`` holds one validation-R@1 curve per seed (equal lengths).  A variant has
    plateaued at epoch e when its seed-mean R@1 at e is within ``tol`` of its best seed-mean epoch;
    the length is the largest of those first epochs over the variants.
    """
    first = []
    for variant, runs in curves.items():
        t = torch.tensor([list(r) for r in runs], dtype=torch.float64)  # (seeds, epochs)
        if t.ndim != 2 or t.numel() == 0:
            raise ValueError(f"curves[{variant!r}] must be one non-empty R@1 list per seed, of equal length")
        mean = t.mean(dim=0)  # (epochs,)
        first.append(int((mean >= mean.max() - tol).nonzero()[0]) + 1)
    return max(first)


def select_setting(base_r1: float, settings: Mapping[str, tuple[float, float]], r1_tol: float,
                   default: str) -> str:
    """The tuning rule: among settings with mean val R@1 >= ``base_r1 - r1_tol``, the lowest mean val OPIS.

    ``settings[name] = (mean val R@1, mean val OPIS)``.  Ties go to the earlier setting; when no
    setting qualifies, ``default`` (the paper's margins).
    """
    ok = [(settings[name][1], i, name) for i, name in enumerate(_keeping_r1(base_r1, settings, r1_tol))]
    return min(ok)[2] if ok else default


def _keeping_r1(base_r1: float, settings: Mapping[str, tuple[float, float]], r1_tol: float) -> list[str]:
    """The settings (``{name: (mean val R@1, mean val OPIS)}``) within ``r1_tol`` of the base's val R@1."""
    return [name for name, (r1, _) in settings.items() if r1 >= base_r1 - r1_tol]


def stage_configs(p: Protocol, runs: Sequence[Mapping[str, Any]], backbone: str, loss: str, stage: str
                  ) -> list[tuple[str, TrainConfig]] | None:
    """``(variant, config)`` of every run of ``stage`` for one cell, or None while an earlier stage is unfinished.

    The training length of ``tune`` and ``final`` comes from the recorded ``curves`` runs
    (:func:`plateau_epoch`); the selected setting of ``final`` from the recorded ``tune`` runs.
    """
    paper = variant_name(PAPER_TCM)
    p = for_backbone(p, backbone)
    if stage not in p.stages:
        raise ValueError(f"this study has no stage {stage!r}; its stages: {', '.join(p.stages)}")
    if stage == "curves":
        if f"{backbone}/{loss}" in p.length_from:
            return []  # its length comes from another cell's curves
        lengths = _wanted_horizons(p, runs, backbone, loss) if p.horizons else (p.max_epochs,)
        return [(v, make_config(p, backbone, loss, t, s, h))
                for h in lengths for s in p.curve_seeds for v, t in (("base", None), (paper, PAPER_TCM))]
    epochs = p.epochs if p.epochs is not None else training_length(p, runs, backbone, loss)
    if epochs is None:
        return None
    grid = {variant_name(_tcm(g)): _tcm(g) for g in p.tcm_grid}
    if stage == "tune":
        return [(v, make_config(p, backbone, loss, t, s, epochs))
                for s in p.tune_seeds for v, t in (("base", None), *grid.items())]
    if stage == "final":
        chosen = selected_setting(p, runs, backbone, loss) if "tune" in p.stages and grid else paper
        if chosen is None and p.planned:
            chosen = paper  # the primary pairs first; the selected margins join once tuning has chosen them
        elif chosen is None:
            return None
        seeds = final_seeds(p, backbone, loss)
        if seeds is None:
            return None  # a planned study waits for its committed power plan
        out = [(v, make_config(p, backbone, loss, t, s, epochs)) for s in seeds
               for v, t in (("base", None), (paper, PAPER_TCM))]
        if chosen != paper:  # the selected margins: on every seed, or the first SELECTED_SEEDS of a planned study
            out += [(chosen, make_config(p, backbone, loss, grid[chosen], s, epochs))
                    for s in (seeds[:SELECTED_SEEDS] if p.planned else seeds)]
        return out
    raise ValueError(f"unknown stage {stage!r}; choose curves, tune or final")


SELECTED_SEEDS = 20  # planned studies: the margins the tuning rule selects are trained on this many final seeds


def final_seeds(p: Protocol, backbone: str, loss: str) -> tuple[int, ...] | None:
    """The final seeds of a cell: ``p.final_seeds``, or those of the power plan (None while it has no entry)."""
    if not p.planned:
        return for_backbone(p, backbone).final_seeds
    n = p.cell_seeds.get(f"{backbone}/{loss}")
    return None if n is None else tuple(range(int(n)))


def with_plan(p: Protocol, plan: Mapping[str, Any] | None) -> Protocol:
    """``p`` with the final seeds of a power plan (``plan.json``) filled in; ``p`` itself without one."""
    if plan is None:
        return p
    return dataclasses.replace(p, cell_seeds={c: v["seeds"] for c, v in plan["cells"].items()})


def _complete(p: Protocol, runs: Sequence[Mapping[str, Any]], backbone: str, loss: str, stage: str
              ) -> list[Mapping[str, Any]] | None:
    wanted = stage_configs(p, runs, backbone, loss, stage)
    if wanted is None:
        return None
    have = {(r["stage"], r["key"]): r for r in runs}
    found = [have.get((stage, config_key(cfg))) for _, cfg in wanted]
    return None if any(f is None for f in found) else [f for f in found if f is not None]


def training_length(p: Protocol, runs: Sequence[Mapping[str, Any]], backbone: str, loss: str) -> int | None:
    """The plateau epoch of a cell from its recorded learning curves (None until all are recorded)."""
    if "curves" not in p.stages:
        return p.epochs
    if p.horizons:
        p = for_backbone(p, backbone)
        return cell_length(p, runs, backbone, loss)[0]
    curve_runs = _complete(p, runs, backbone, loss, "curves")
    if curve_runs is None:
        return None
    curves: dict[str, list[list[float]]] = {}
    for r in curve_runs:
        curves.setdefault(r["variant"], []).append([h["val_R@1"] for h in r["history"]])
    return plateau_epoch(curves, p.plateau_tol)


def tuning_means(p: Protocol, runs: Sequence[Mapping[str, Any]], backbone: str, loss: str
                 ) -> dict[str, dict[str, float]] | None:
    """Seed means of a cell's tuning runs, per setting: ``{variant: {"seeds", "val_R@1", "val_OPIS"}}``.

    Settings in the order they were recorded (``"base"`` among them); None until all are recorded.
    These are the numbers the tuning rule (:func:`select_setting`) reads.
    """
    if "tune" not in p.stages or "final" not in p.stages:
        return None  # this study selects nothing
    tune_runs = _complete(p, runs, backbone, loss, "tune")
    if tune_runs is None:
        return None
    by_variant: dict[str, list[Mapping[str, Any]]] = {}
    for r in tune_runs:
        by_variant.setdefault(r["variant"], []).append(r["final"])
    return {v: {"seeds": len(fs), "val_R@1": sum(f["val_R@1"] for f in fs) / len(fs),
                "val_OPIS": sum(f["val_OPIS"] for f in fs) / len(fs)} for v, fs in by_variant.items()}


def selected_setting(p: Protocol, runs: Sequence[Mapping[str, Any]], backbone: str, loss: str) -> str | None:
    """The TCM setting the rule picks from a cell's recorded tuning runs (None until all are recorded)."""
    means = tuning_means(p, runs, backbone, loss)
    if means is None:
        return None
    return select_setting(means["base"]["val_R@1"], _settings(means), p.r1_tol, variant_name(PAPER_TCM))


def _settings(means: Mapping[str, Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """:func:`tuning_means` as the rule reads it: ``{TCM setting: (mean val R@1, mean val OPIS)}``."""
    return {v: (m["val_R@1"], m["val_OPIS"]) for v, m in means.items() if v != "base"}


def tuning_fell_back(p: Protocol, runs: Sequence[Mapping[str, Any]], backbone: str, loss: str) -> bool | None:
    """Did the tuning rule fall back to the paper's margins (no setting kept val R@1 within ``r1_tol``)?

    None until the cell's tuning runs are all recorded.
    """
    means = tuning_means(p, runs, backbone, loss)
    if means is None:
        return None
    return not _keeping_r1(means["base"]["val_R@1"], _settings(means), p.r1_tol)
