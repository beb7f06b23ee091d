"""Train an embedder with a DML loss (optionally + TCM) and evaluate R@k, MAP@R, OPIS and eps-OPIS.

From a notebook::

    from tcmlib.train import TrainConfig, fit
    result = fit(TrainConfig(dataset="glyphs", glyph_size="tiny", backbone="small_cnn", loss="contrastive",
                             tcm=True, dim=64, batch_size=128, epochs=5, lr=1e-3, run_dir="runs/glyphs"))
    result.history[-1]["OPIS"]

From a shell (``tcmlib-train`` is the same)::

    python -m tcmlib.train --config glyphs_tiny [--resume] [--override epochs=3 tcm=true]

``--config`` takes the name of a config that ships with tcmlib (``tcmlib/configs/<name>.yaml``,
listed by :func:`available_configs`; no checkout needed, e.g. on Colab) or the path of a YAML file.

One epoch = m-per-class batches over the train classes (tqdm shows loss, base and TCM parts),
then the test classes (disjoint) are embedded and scored; one line per epoch goes to
``run_dir/metrics.jsonl`` and ``run_dir/metrics.csv``.  Checkpoints (``tcmlib.checkpoint``) are
written every ``checkpoint_every_steps`` steps and at each epoch end; ``resume=True`` continues
from the newest one exactly: same batches, same random numbers, same weights as a run that was
never interrupted.  Each image's augmentation is drawn from a generator seeded by (seed, epoch,
image index) (``tcmlib.data.seeded``), so any ``num_workers`` and any number of processes see
the same images.

A batch larger than memory goes through the embedding-gradient cache (``chunk_size``, see
``tcmlib.gradcache``).  On a GPU: ``amp="auto"`` (bf16 on a card that computes it natively,
compute capability >= 8.0; fp16 with a GradScaler on older cards such as a T4; see
:func:`resolve_amp`), ``channels_last=True``, pinned-memory loaders.

More than one GPU (or CPU process)::

    torchrun --nproc_per_node=4 -m tcmlib.train --config NAME [--resume]

runs the same ``fit`` in each process: DistributedDataParallel, each rank a slice of every global
batch of ``batch_size``, the embeddings all-gathered so the loss sees the global batch (the
gradient is the single-process one; see ``tcmlib.distributed``), BatchNorm synchronised over the
global batch, sharded exact evaluation; rank 0 writes checkpoints, metrics and progress.  The run is
the single-process run up to float rounding (dropout masks, where a backbone has dropout, are drawn
per rank).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.resources
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tcmlib import distributed
from tcmlib.distributed import sync_batchnorm
from tcmlib.checkpoint import (apply_checkpoint, latest_checkpoint, newest_loadable_checkpoint, read_checkpoint,
                               remove_stale_temporaries, rng_states, save_checkpoint)
from tcmlib.data import DATASET_NAMES, GLYPH_PRESETS, MPerClassBatchSampler, get_dataset
from tcmlib.data.arrays import hold_out_classes
from tcmlib.data.seeded import SeededAugmentation
from tcmlib.data.shapes import SMALL_DATASETS, input_size  # noqa: F401 (re-exported: tcmlib.train.input_size)
from tcmlib.data.transforms import small_train_transform, test_transform, train_transform
from tcmlib.embedding import AMP_DTYPES, _native_bf16, embed, resolve_amp  # noqa: F401 (tcmlib.train.embed etc.)
from tcmlib.gradcache import cached_backward, direct_backward
from tcmlib.losses.combine import WithTCM
from tcmlib.losses.registry import available_losses, loss_kwarg_names, loss_param_groups, make_loss
from tcmlib.losses.tcm import TCMLoss
from tcmlib.memory import HOST_SHARE, machine_loader_settings
from tcmlib.metrics import evaluate as evaluate_embeddings
from tcmlib.models import BACKBONES, Embedder, build_embedder
from tcmlib.runtime import default_device, seed_everything

__all__ = ["TrainConfig", "FitResult", "fit", "evaluate", "embed", "build_data", "build_splits", "load_config",
           "config_from_record", "LEGACY_VALUES", "available_configs", "main", "resolve_amp"]

# Fields a resumed run may change: where and how verbosely it runs, how often it saves, how big its
# evaluation batches are, and how many more epochs it trains.  None changes a training step's
# inputs or arithmetic (num_workers: the batches stay exact, see the module docstring).  Any other
# difference between a checkpoint's config and the resuming one is refused.
RESUME_SAFE_FIELDS = ("epochs", "progress", "run_dir", "device", "num_workers", "checkpoint_every_steps",
                      "eval_batch_size", "data_root")
# Divergence guard: training stops when the loss or the parameter norm exceeds DIVERGENCE_FACTOR times
# its reference (the loss of the run's first step, the norm of the initial weights; each at least 1).
# Healthy runs stay within a small factor of both (losses fall, weight decay bounds the weights);
# 1e6 is reached only by runaway growth, long before float overflow turns it into inf / NaN.
DIVERGENCE_FACTOR = 1e6
LR_SCHEDULES = ("step", "cosine")
AUGMENT_RNGS = ("sample", "process")
# What a field meant before it existed: a config (a results record, a checkpoint) written without the
# field ran with this value.  ``config_from_record`` fills them in, and ``tcmlib.experiments.config_key``
# leaves a field out of the hash while it has this value, so the keys of earlier runs stay what they were.
LEGACY_VALUES: dict[str, Any] = {"augment_rng": "process", "lr_schedule": "step"}


def config_from_record(values: dict[str, Any]) -> "TrainConfig":
    """The :class:`TrainConfig` of a recorded run's config dict (``runs.jsonl``, a checkpoint, ``config.yaml``).

    Fields the record predates get the value they had then (:data:`LEGACY_VALUES`), not today's default.
    """
    return load_config(None, **{**LEGACY_VALUES, **values})


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, (list, dict, tuple)) or value is None:
        raise ValueError(f"config key {name!r} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {name!r} must be a number, got {value!r}") from None


def _to_ints(name: str, value: Any) -> list[int]:
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"config key {name!r} must be a list of integers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, str)) and not (isinstance(v, float) and v.is_integer()):
            raise ValueError(f"config key {name!r} must be a list of integers, got {v!r} in {value!r}")
        try:
            out.append(int(v))
        except ValueError:
            raise ValueError(f"config key {name!r} must be a list of integers, got {v!r} in {value!r}") from None
    return out


# field -> (allowed types, None allowed); bools are not ints here, ints are accepted where floats are
_INT, _FLOAT, _BOOL, _STR = (int,), (float,), (bool,), (str,)
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    "dataset": (_STR, False), "data_root": ((str, os.PathLike), True), "glyph_size": (_STR, False), "data_seed": (_INT, False),
    "val_fraction": (_FLOAT, False), "image_size": (_INT, True), "backbone": (_STR, False),
    "pretrained": (_BOOL, False), "dim": (_INT, False), "small_input": (_BOOL, False), "frozen_bn": (_BOOL, True),
    "loss": (_STR, False), "loss_kwargs": ((dict,), False), "tcm": ((bool, dict), False),
    "batch_size": (_INT, False), "m": (_INT, False), "steps_per_epoch": (_INT, True), "epochs": (_INT, False),
    "optimizer": (_STR, False), "lr": (_FLOAT, False), "head_lr_mult": (_FLOAT, False),
    "loss_lr_mult": (_FLOAT, True), "weight_decay": (_FLOAT, False), "milestones": ((list,), False),
    "gamma": (_FLOAT, False), "lr_schedule": (_STR, False), "augment_rng": (_STR, False), "amp": (_STR, True), "channels_last": (_BOOL, False), "chunk_size": (_INT, True),
    "device": (_STR, False), "num_workers": (_INT, False), "deterministic": (_BOOL, False),
    "eval_ks": ((list,), False), "eval_every": (_INT, False), "eval_batch_size": (_INT, False),
    "checkpoint_every_steps": (_INT, False), "seed": (_INT, False), "run_dir": ((str, os.PathLike), False),
    "progress": (_BOOL, False),
}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
               list: "a list", os.PathLike: "a path"}
TCM_KEYS = ("margin_pos", "margin_neg", "lambda_pos", "lambda_neg")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _check_types(cfg: "TrainConfig") -> None:
    for f in dataclasses.fields(cfg):
        types, optional = _FIELD_TYPES[f.name]
        value = getattr(cfg, f.name)
        if value is None and optional:
            continue
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            want = " or ".join(_TYPE_NAMES[t] for t in types) + (" or null" if optional else "")
            raise ValueError(f"config key {f.name!r} must be {want}, got {value!r} ({type(value).__name__})")


def _check_ranges(cfg: "TrainConfig") -> None:
    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"config key {key!r} = {getattr(cfg, key)!r} is out of range; allowed: {allowed}")

    for key in ("dim", "batch_size", "epochs", "eval_every", "eval_batch_size"):
        need(getattr(cfg, key) >= 1, key, "an integer >= 1")
    for key in ("data_seed", "seed", "num_workers", "checkpoint_every_steps"):
        need(getattr(cfg, key) >= 0, key, "an integer >= 0")
    for key in ("image_size", "steps_per_epoch", "chunk_size"):
        need(getattr(cfg, key) is None or getattr(cfg, key) >= 1, key, "an integer >= 1, or null")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, "lr", "a finite number > 0")
    need(math.isfinite(cfg.head_lr_mult) and cfg.head_lr_mult >= 0, "head_lr_mult", "a finite number >= 0")
    need(cfg.loss_lr_mult is None or math.isfinite(cfg.loss_lr_mult) and cfg.loss_lr_mult >= 0, "loss_lr_mult",
         "a finite number >= 0, or null")
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", "a finite number >= 0")
    need(0.0 < cfg.gamma <= 1.0, "gamma", "a number in (0, 1] (the lr is multiplied by it at each milestone)")
    need(all(v >= 1 for v in cfg.milestones), "milestones", "a list of epoch numbers >= 1")
    need(len(cfg.eval_ks) > 0 and all(k >= 1 for k in cfg.eval_ks), "eval_ks", "a non-empty list of integers >= 1")
    need(bool(_DEVICE.match(cfg.device)), "device", "auto, cpu, mps, cuda or cuda:<index>")
    need(str(cfg.run_dir).strip() != "", "run_dir", "a non-empty path")
    if cfg.glyph_size not in GLYPH_PRESETS:
        need(False, "glyph_size", ", ".join(GLYPH_PRESETS))
    if not all(isinstance(k, str) for k in cfg.loss_kwargs):
        need(False, "loss_kwargs", "a mapping of option names (strings) to values")
    if isinstance(cfg.tcm, dict):
        bad = sorted(str(k) for k in cfg.tcm if k not in TCM_KEYS)
        if bad:
            raise ValueError(f"config key 'tcm' has unknown keys {bad}; allowed: {', '.join(TCM_KEYS)}")
        for k, v in cfg.tcm.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"config key 'tcm.{k}' must be a finite number, got {v!r}")
        try:
            TCMLoss(**cfg.tcm)
        except ValueError as e:
            raise ValueError(f"config key 'tcm': {e}; allowed: margin_pos, margin_neg in [-1, 1], "
                             "lambda_pos, lambda_neg finite >= 0") from None


@dataclass
class TrainConfig:
    """Everything a run needs; a YAML file in ``tcmlib/configs/`` holds a subset of these keys."""

    # data
    dataset: str = "glyphs"  # cub | cars | sop | inat | glyphs | digits | mnist
    data_root: str | None = None  # data directory (glyphs: cache dir, None = default)
    glyph_size: str = "tiny"  # glyph preset: tiny | small | default
    data_seed: int = 0  # glyph class split / digits split / validation classes
    val_fraction: float = 0.0  # >0: hold out this share of the train classes as validation classes
    image_size: int | None = None  # None: 224 (photos), 32 (glyphs), 16 (digits)
    # model
    backbone: str = "small_cnn"  # resnet50 | vit_b_16 | small_cnn | resnet18 | timm:<name>
    pretrained: bool = False  # ImageNet weights (needs internet or the torch hub cache)
    dim: int = 512  # embedding dimension
    small_input: bool = False  # resnet18/50: 3x3 stride-1 stem for 32x32 images
    frozen_bn: bool | None = None  # None: frozen for resnet50, live otherwise
    # loss
    loss: str = "smooth_ap"  # see tcmlib.losses.registry.available_losses()
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # override the base loss's defaults
    tcm: bool | dict[str, float] = False  # True, or {margin_pos, margin_neg, lambda_pos, lambda_neg}
    # batches
    batch_size: int = 128  # images per step (= classes per batch x m)
    m: int = 4  # samples per class in a batch
    steps_per_epoch: int | None = None  # cut epochs short (smoke runs); None = full epochs
    # optimisation
    epochs: int = 1
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-4  # backbone learning rate
    head_lr_mult: float = 0.0  # >0: LayerNorm + linear head at lr * mult; 0: same group, lr (RS@k)
    loss_lr_mult: float | None = None  # loss parameters (proxies): None = registry default
    weight_decay: float = 4e-4
    lr_schedule: str = "step"  # step: lr *= gamma at each milestone | cosine: cosine decay to 0 over `epochs`
    milestones: list[int] = field(default_factory=list)  # epochs where lr *= gamma (lr_schedule: step)
    gamma: float = 0.3
    augment_rng: str = "sample"  # sample: each image's augmentation seeded by (seed, epoch, index), the same
    # on any number of processes and workers | process: the process's generator (runs recorded before 2026-12-07)
    # speed and memory
    amp: str | None = None  # None | auto | bf16 | fp16 (auto: bf16 where native, else fp16 on CUDA; see resolve_amp)
    channels_last: bool = False
    chunk_size: int | None = None  # gradient-cache chunk; None = whole batch in one pass
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    num_workers: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (exact reruns, slower)
    # evaluation
    eval_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    eval_every: int = 1  # evaluate every n epochs (and always after the last)
    eval_batch_size: int = 256
    # bookkeeping
    checkpoint_every_steps: int = 0  # 0: only at epoch ends
    seed: int = 0
    run_dir: str = "runs/default"
    progress: bool = True  # tqdm bars

    def __post_init__(self) -> None:
        for name in ("lr", "head_lr_mult", "weight_decay", "gamma", "val_fraction"):  # YAML reads 1e-4 as a string
            setattr(self, name, _to_float(name, getattr(self, name)))
        if self.loss_lr_mult is not None:
            self.loss_lr_mult = _to_float("loss_lr_mult", self.loss_lr_mult)
        self.milestones = _to_ints("milestones", self.milestones)
        self.eval_ks = _to_ints("eval_ks", self.eval_ks)

    def validate(self) -> None:
        """Raise ``ValueError`` for any bad field, before any work: the key, the value and what is allowed.

        Types first (an int field takes an int, not a bool or a float; ``None`` only where the
        default is optional), then ranges and names, then the batch layout.  Whether a requested
        device exists is checked by :func:`fit` (a config for a GPU is valid on a laptop).
        """
        _check_types(self)
        _check_ranges(self)
        if self.dataset not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
        if self.backbone not in BACKBONES and not self.backbone.startswith("timm:"):
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)} or timm:<name>")
        if self.loss.strip().lower() not in available_losses():
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(available_losses())}")
        unknown = sorted(set(self.loss_kwargs) - loss_kwarg_names(self.loss))
        if unknown:
            raise ValueError(f"config key 'loss_kwargs' has options {unknown} that loss {self.loss!r} does not take; "
                             f"allowed: {', '.join(sorted(loss_kwarg_names(self.loss)))}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"config key 'lr_schedule' = {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.augment_rng not in AUGMENT_RNGS:
            raise ValueError(f"config key 'augment_rng' = {self.augment_rng!r}; choose one of {', '.join(AUGMENT_RNGS)} "
                             "('process' only to reproduce runs recorded before per-sample seeding)")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose adam or adamw")
        if self.amp not in (None, "auto", *AMP_DTYPES):
            raise ValueError(f"amp must be None, 'auto', 'bf16' or 'fp16', got {self.amp!r}")
        if self.m < 2:
            raise ValueError(f"config key 'm' = {self.m}: every class in a batch needs >= 2 samples (positives); "
                             "allowed: an integer >= 2")
        if self.batch_size % self.m:
            raise ValueError(f"batch_size = {self.batch_size} is not divisible by m = {self.m}; use a multiple of m")
        if self.batch_size // self.m < 2:
            raise ValueError(f"batch_size / m = {self.batch_size // self.m}: a batch needs >= 2 classes (negatives)")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1) (the share of train classes held out), "
                             f"got {self.val_fraction}")
        if self.val_fraction > 0 and self.dataset not in SMALL_DATASETS:
            raise ValueError(f"val_fraction > 0 needs an in-memory data set ({', '.join(SMALL_DATASETS)}), "
                             f"not {self.dataset!r}; use val_fraction: 0")


@dataclass
class FitResult:
    """What :func:`fit` returns: per-epoch records, the last evaluation, where the files are, the model."""

    history: list[dict[str, Any]]  # one dict per epoch: train loss parts, lr, R@k, MAP@R, OPIS, eps_OPIS
    final: dict[str, Any]  # the last epoch's record
    run_dir: Path
    model: Embedder
    checkpoint: Path | None  # the final checkpoint


def _packaged_configs() -> Any:
    """The folder of the configs that ship with tcmlib (package data; an importlib.resources Traversable)."""
    return importlib.resources.files("tcmlib").joinpath("configs")


def available_configs() -> list[str]:
    """The names of the training configs that ship with tcmlib (``tcmlib/configs/<name>.yaml``), sorted.

    Each loads with ``load_config(name)``: they are package data, so they are there after a plain
    ``pip install`` (Colab) as well as in a checkout.
    """
    folder = _packaged_configs()
    if not folder.is_dir():
        return []
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def _read_config(path: str | Path) -> dict[str, Any]:
    """The YAML mapping of ``path``: an existing file, else the packaged config of that name."""
    text = str(path)
    if Path(path).is_file() or "/" in text or "\\" in text:
        with open(path) as fh:  # a path (a missing one raises FileNotFoundError, as always)
            source = fh.read()
    else:
        name = text[: -len(".yaml")] if text.endswith(".yaml") else text
        names = available_configs()
        if name not in names:
            raise ValueError(f"no config file or packaged config named {text!r}; packaged configs: {', '.join(names)}")
        source = _packaged_configs().joinpath(f"{name}.yaml").read_text()
    try:
        loaded = yaml.safe_load(source)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ValueError(f"{path} must be a mapping of TrainConfig keys (key: value lines), got a {type(loaded).__name__}")
    return loaded or {}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), **kwargs: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file, then ``key=value`` overrides (values parsed as YAML), then kwargs.

    ``path`` is the path of a YAML file or the name of a config that ships with tcmlib
    (``load_config("glyphs_small_cnn_smooth_ap")``; ``.yaml`` may be added; see
    :func:`available_configs`).  An existing file wins over a packaged name; a name that is neither
    raises ``ValueError`` listing the packaged names; ``None`` starts from the defaults.

    A config read from a file must name its ``dataset`` (in the file or an override): the
    dataclass default (glyphs) is for Python callers, a file that forgot the key is an error.
    Bad YAML, a file that is not a mapping, unknown keys and bad values raise ``ValueError``.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_config(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value")
        try:
            values[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML: {' '.join(str(e).split())}") from None
    values.update(kwargs)
    if not all(isinstance(k, str) for k in values):
        raise ValueError(f"config keys must be strings, got {sorted(map(repr, values))}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {', '.join(sorted(known))}")
    if path is not None and "dataset" not in values:
        raise ValueError(f"{path} does not say which data set to train on: add 'dataset: <name>' "
                         f"({', '.join(DATASET_NAMES)}) or --override dataset=<name>")
    return TrainConfig(**values)


def build_data(cfg: TrainConfig) -> tuple[Dataset, Dataset, int]:
    """``(train split, test split, in_channels)`` of ``cfg.dataset`` with the standard transforms.

    With ``cfg.val_fraction > 0`` the train split lacks the validation classes (see :func:`build_splits`).
    """
    train, _, test, in_channels = build_splits(cfg)
    return train, test, in_channels


def build_splits(cfg: TrainConfig) -> tuple[Dataset, Dataset | None, Dataset, int]:
    """``(train, validation or None, test, in_channels)``: three disjoint sets of classes.

    The validation classes are ``cfg.val_fraction`` of the train classes, drawn once with
    ``cfg.data_seed`` (``tcmlib.data.arrays.hold_out_classes``); they are embedded without
    augmentation, like the test classes.  Models train on the rest.
    """
    train, test, in_channels = _load_splits(cfg)
    if cfg.val_fraction <= 0:
        return train, None, test, in_channels
    kept, val = hold_out_classes(train, cfg.val_fraction, seed=cfg.data_seed)  # type: ignore[arg-type]
    val.transform = test.transform  # type: ignore[attr-defined]
    return kept, val, test, in_channels


def _load_splits(cfg: TrainConfig) -> tuple[Dataset, Dataset, int]:
    if cfg.dataset in SMALL_DATASETS:
        size = input_size(cfg)
        kw: dict[str, Any] = {"image_size": size} if cfg.dataset != "mnist" else {}
        if cfg.dataset == "glyphs":
            kw.update(size=cfg.glyph_size, seed=cfg.data_seed)
        elif cfg.dataset == "digits":
            kw.update(seed=cfg.data_seed)
        train = get_dataset(cfg.dataset, cfg.data_root, "train", transform=small_train_transform(), **kw)
        test = get_dataset(cfg.dataset, cfg.data_root, "test", transform=None, **kw)
        return train, test, 1
    size = cfg.image_size or 224
    train = get_dataset(cfg.dataset, cfg.data_root, "train", transform=train_transform(size))
    test = get_dataset(cfg.dataset, cfg.data_root, "test", transform=test_transform(size, int(size * 256 / 224)))
    return train, test, 3


def evaluate(
    model: nn.Module, dataset: Dataset, *, ks: Sequence[int] = (1, 2, 4, 8), batch_size: int = 256,
    device: str | torch.device = "cpu", amp: str | None = None, num_workers: int = 0, channels_last: bool = False,
) -> dict[str, float]:
    """Embed ``dataset`` and score it: ``{"R@k": ..., "MAP@R": ..., "OPIS": ..., "eps_OPIS": ...}``.

    One :func:`tcmlib.metrics.evaluation.evaluate` call (the retrieval rides on OPIS's first pass). OPIS and
    eps-OPIS (eps = 0.1) use its defaults: 100 thresholds between the global-FAR 1e-2 and 1e-1
    quantiles of the negative-pair distances. Units: R@k, MAP@R fractions in [0, 1]; OPIS in [0, 0.25].
    """
    emb, labels = embed(model, dataset, batch_size=batch_size, device=device, amp=amp, num_workers=num_workers,
                        channels_last=channels_last)
    too_big = [k for k in ks if k >= emb.shape[0]]
    if too_big:
        raise ValueError(f"eval_ks {too_big} >= N = {emb.shape[0]} samples: a query has only N - 1 others; "
                         f"use ks < {emb.shape[0]}")
    return evaluate_embeddings(emb, labels, ks=ks, eps=0.1).as_dict()


def _make_optimizer(cfg: TrainConfig, model: Embedder, criterion: nn.Module) -> torch.optim.Optimizer:
    """Adam / AdamW over backbone (lr), head (lr or lr * head_lr_mult) and loss parameters."""
    head_ids = {id(p) for p in model.head_parameters()}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    if cfg.head_lr_mult > 0:
        groups = [{"params": backbone, "lr": cfg.lr}, {"params": model.head_parameters(), "lr": cfg.lr * cfg.head_lr_mult}]
    else:  # as the RS@k / Smooth-AP code with fc_lr_mul = 0: one group, one lr
        groups = [{"params": backbone + model.head_parameters(), "lr": cfg.lr}]
    groups += loss_param_groups(criterion, cfg.lr, cfg.loss_lr_mult)
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return opt_cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule: ``step`` (x gamma at each milestone) or ``cosine``.

    cosine: epoch e (0-based) trains at ``lr * (1 + cos(pi e / E)) / 2`` for E = ``epochs``: the full
    rate first, then a smooth decay towards 0 in the last epoch (torch's ``CosineAnnealingLR``).
    """
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma)


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from the whole history (small; keeps resumes consistent)."""
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for rec in history:
            fh.write(json.dumps(rec) + "\n")
    keys = list(dict.fromkeys(k for rec in history for k in rec))
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def _all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if torch.is_floating_point(t))


@torch.no_grad()
def _param_norm(*modules: nn.Module) -> float:
    """The L2 norm of all parameters of ``modules`` together (read only; float64 accumulation)."""
    sq = [torch.linalg.vector_norm(p.detach(), dtype=torch.float64).pow(2).to("cpu") for m in modules
          for p in m.parameters()]
    return math.sqrt(float(torch.stack(sq).sum())) if sq else 0.0


def _resolve_device(name: str) -> torch.device:
    """``auto`` -> the best available; otherwise the device named, if this machine has it (else ValueError)."""
    if name == "auto":
        return torch.device(default_device())
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"config key 'device' = {name!r}, but torch sees no CUDA GPU here; use device: auto "
                             "or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"config key 'device' = {name!r}, but there are only {torch.cuda.device_count()} "
                             "CUDA devices")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"config key 'device' = {name!r}, but MPS is not available here; use device: auto or cpu")
    return device


def _check_resume_config(saved: dict[str, Any] | None, cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume a checkpoint under a config that differs in a field not in RESUME_SAFE_FIELDS."""
    if saved is None:
        warnings.warn(f"{path} stores no config; cannot check that the resumed run matches it")
        return
    now = dataclasses.asdict(cfg)
    saved = {**LEGACY_VALUES, **saved}  # a checkpoint written before a field existed ran with its old meaning
    try:  # the checkpoint's values through the same normalisation (YAML strings -> floats, ...)
        saved = dataclasses.asdict(TrainConfig(**{k: v for k, v in saved.items() if k in now}))
    except (TypeError, ValueError):
        pass
    # a cosine schedule spans `epochs`: changing it changes every later learning rate
    safe = [f for f in RESUME_SAFE_FIELDS if not (f == "epochs" and cfg.lr_schedule == "cosine")]
    differ = sorted(k for k in now if k not in safe and saved.get(k) != now[k])
    if differ:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in differ)
        raise ValueError(f"cannot resume {path}: the config differs in {differ} ({detail}). Only "
                         f"{', '.join(safe)} may change on resume; use the run's own config "
                         f"({Path(cfg.run_dir) / 'config.yaml'} before this call) or a new run_dir")


def fit(config: TrainConfig | dict[str, Any] | None = None, *, resume: bool = False,
        train_data: Dataset | None = None, test_data: Dataset | None = None, val_data: Dataset | None = None,
        **kwargs: Any) -> FitResult:
    """Train and evaluate as ``config`` says (a :class:`TrainConfig`, a dict, or keyword arguments).

    Args:
        config: the run; keyword arguments override its fields.
        resume: continue from the newest checkpoint in ``run_dir`` (start fresh if there is none).
            Without it, a ``run_dir`` that already holds checkpoints is an error.
        train_data, test_data: use these data sets (items ``(image tensor, label)``, a ``labels``
            attribute on the train set) instead of loading ``config.dataset``.
        val_data: validation classes to score at every evaluation (keys ``val_R@1``, ``val_OPIS``,
            ...); default: the ``val_fraction`` split of ``config.dataset``, if any.  With validation
            classes, the test classes are scored once, after the last epoch (keys ``R@1``, ``OPIS``,
            ...), so nothing chosen on validation numbers has seen them.

    Returns:
        :class:`FitResult`.  Raises ``ValueError`` for bad names / batch layouts and
        ``FloatingPointError`` when the loss or the weights stop being finite (the last good
        checkpoint is kept).
    """
    if isinstance(config, TrainConfig):
        cfg = dataclasses.replace(config, **kwargs)
    else:
        cfg = load_config(None, **{**(config or {}), **kwargs})
    cfg.validate()
    ddp = distributed.launched()  # under torchrun: one process per device, see tcmlib.distributed
    if ddp:
        device, own_group = distributed.setup(cfg.device)
    else:
        device, own_group = _resolve_device(cfg.device), False
    rank, world = distributed.rank(), distributed.world_size()
    master = rank == 0  # writes checkpoints, metrics and progress
    say: Callable[[str], None] = tqdm.write if master else (lambda _: None)
    run_dir = Path(cfg.run_dir)
    ckpt_path = latest_checkpoint(run_dir)
    if ckpt_path is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints ({ckpt_path.name}); pass resume=True "
                              "(--resume) to continue that run, or choose a new run_dir")
    if master:
        for stale in remove_stale_temporaries(run_dir):
            say(f"removed {stale}, the temporary file of an interrupted checkpoint write")
    ckpt: dict[str, Any] | None = None
    if ckpt_path is not None:  # resume: the newest checkpoint that reads whole, under a compatible config
        if master:  # (it may set unreadable files aside, so one process chooses)
            found = newest_loadable_checkpoint(run_dir, map_location=device)
            assert found is not None
            ckpt_path, ckpt = found
        if ddp:
            ckpt_path = distributed.broadcast_object(ckpt_path)
            ckpt = ckpt if master else read_checkpoint(ckpt_path, map_location=device)
        assert ckpt is not None and ckpt_path is not None
        _check_resume_config(ckpt.get("config"), cfg, ckpt_path)
        if ckpt["extra"].get("world_size", 1) != world:
            raise ValueError(f"cannot resume {ckpt_path} with {world} processes: it was written by a run of "
                             f"{ckpt['extra'].get('world_size', 1)}; resume with that many (--nproc_per_node)")
        in_progress = (ckpt.get("sampler") or {}).get("start_batch", 0) > 0
        if ckpt["epoch"] > cfg.epochs or (in_progress and ckpt["epoch"] >= cfg.epochs):
            raise ValueError(f"cannot resume {ckpt_path} with epochs = {cfg.epochs}: the run has already trained "
                             f"{ckpt['epoch']} epochs{' and part of the next' if in_progress else ''}; "
                             f"pass epochs >= {ckpt['epoch'] + int(in_progress)}")
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "config.yaml", "w") as fh:
            yaml.safe_dump(dataclasses.asdict(cfg), fh, sort_keys=False)
            if ddp:  # how the run was launched, not what it trains: a comment, so the file still loads
                fh.write(f"# world_size: {world}\n")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:  # bit-exact reruns and resumes (restored to the previous setting on return)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":  # every batch has the same shape: let cuDNN time its kernels once and keep the fastest
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed)

    # data: m-per-class batches from the train classes; the test classes are disjoint
    if train_data is None or test_data is None:
        train_data, split_val, test_data, in_channels = build_splits(cfg)
        val_data = split_val if val_data is None else val_data
    else:
        in_channels = int(train_data[0][0].shape[0])
    if not hasattr(train_data, "labels"):
        raise ValueError("train_data must expose a .labels array (one class id per sample) for m-per-class "
                         "batch sampling; tcmlib's datasets do, wrap yours or add the attribute")
    train_labels = torch.as_tensor(getattr(train_data, "labels"))  # (N_train,)
    for name, data in (("test", test_data), ("validation", val_data)):
        n_eval = len(data) if data is not None and hasattr(data, "__len__") else None
        if n_eval is not None and max(cfg.eval_ks) >= n_eval:
            raise ValueError(f"config key 'eval_ks' = {cfg.eval_ks}: the {name} split has only {n_eval} samples, "
                             f"so R@k needs k < {n_eval}; drop the larger ks")
    n_classes = int(train_labels.unique().numel())
    if n_classes < cfg.batch_size // cfg.m:
        raise ValueError(f"batch_size / m = {cfg.batch_size // cfg.m} classes per batch, but the train split "
                         f"has only {n_classes} classes; lower batch_size or raise m")
    if cfg.batch_size % world:
        raise ValueError(f"config key 'batch_size' = {cfg.batch_size} must be a multiple of the {world} "
                         "processes (each takes an equal slice of every batch)")
    sampler = MPerClassBatchSampler(train_labels, cfg.m, cfg.batch_size, seed=cfg.seed, num_replicas=world,
                                    rank=rank)
    seeded = SeededAugmentation(train_data, cfg.seed) if cfg.augment_rng == "sample" else None
    train_data = seeded or train_data  # each image's augmentation: a function of (seed, epoch, index) alone
    # The loader's own generator: creating an iterator draws a worker base seed from it, which would
    # otherwise come from the global RNG and shift every later draw after a mid-epoch resume.
    loader_gen = torch.Generator()
    workers, prefetch = machine_loader_settings(cfg, world)  # <= the CPUs, the batches in flight fit the host
    if workers < cfg.num_workers:
        say(f"num_workers {cfg.num_workers} -> {workers} (prefetch {prefetch}): {os.cpu_count()} CPUs, batches of "
            f"{cfg.batch_size // world} images in flight within {HOST_SHARE:.0%} of the host memory (tcmlib.memory)")
    loader = DataLoader(train_data, batch_sampler=sampler, num_workers=workers, prefetch_factor=prefetch or None,
                        pin_memory=device.type == "cuda", generator=loader_gen)

    # model, loss, optimiser, schedule, AMP
    model = build_embedder(cfg.backbone, cfg.dim, cfg.pretrained, in_channels, small_input=cfg.small_input,
                           image_size=input_size(cfg), frozen_bn=cfg.frozen_bn).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model  # what the training step runs: the model, or its DDP wrapper
    if ddp:  # BatchNorm that trains sees the global batch, as in one process
        sync_batchnorm(model, device)
    if ddp:  # (DDP copies rank 0's weights to every rank)
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    criterion = make_loss(cfg.loss, tcm=cfg.tcm, num_classes=int(train_labels.max()) + 1, embedding_size=cfg.dim,
                          **cfg.loss_kwargs).to(device)
    optimizer = _make_optimizer(cfg, model, criterion)
    scheduler = _make_scheduler(cfg, optimizer)
    amp_dtype, use_scaler = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    local_batch = cfg.batch_size // world
    chunk = cfg.chunk_size if cfg.chunk_size is not None and cfg.chunk_size < local_batch else None
    if chunk is not None and any(isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training
                                 for mod in model.modules()):
        warnings.warn("gradient cache with BatchNorm in train mode: BN statistics are per chunk, so the gradient "
                      "is not exactly the full-batch one (freeze BN for exactness, see tcmlib.gradcache)")

    if ddp:
        distributed.broadcast_module(criterion)  # the loss's parameters (proxies) as rank 0 drew them
        if rank > 0:  # from here on each rank draws its own dropout numbers (augment_rng process: augmentation too)
            seed_everything(cfg.seed + 1_000_003 * rank)

    norm_ref = max(_param_norm(model, criterion), 1.0)  # divergence guard: the initial weights' norm
    loss_ref: float | None = None  # and the first step's loss

    # resume
    epoch0, step, history, best, sums = 0, 0, [], {}, {}
    sampler_state: dict[str, Any] | None = None
    if ckpt_path is not None and ckpt is not None:
        apply_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, loss=criterion,
                         rank=rank)
        epoch0, step, best = ckpt["epoch"], ckpt["step"], ckpt["best"]
        history, sums, sampler_state = ckpt["extra"]["history"], ckpt["extra"]["sums"], ckpt["sampler"]
        loss_ref = ckpt["extra"].get("loss_ref")
        assert sampler_state is not None
        if master:
            _write_metrics(run_dir, history)  # drop lines written after that checkpoint
        if epoch0 >= cfg.epochs:
            say(f"{run_dir} holds a finished run ({epoch0} of {cfg.epochs} epochs, step {step}, {ckpt_path}); "
                "nothing to train. Raise epochs to train on")
        else:
            say(f"resumed from {ckpt_path} (epoch {epoch0 + 1}, batch {sampler_state['start_batch']}, "
                f"step {step})")
        sys.stdout.flush()
    cfg_dict = dataclasses.asdict(cfg)

    def guard_weights() -> None:
        if not _all_finite(model) or not _all_finite(criterion):
            raise FloatingPointError(f"training diverged: weights are NaN/inf at step {step}; not saving them. The "
                                     f"last good checkpoint, {latest_checkpoint(run_dir)}, is kept")
        norm = _param_norm(model, criterion)
        if norm > DIVERGENCE_FACTOR * norm_ref:
            raise FloatingPointError(
                f"training diverged: the weight norm is {norm:.4g} at step {step}, more than {DIVERGENCE_FACTOR:g} "
                f"times the initial {norm_ref:.4g}; not saving them. The last good checkpoint, "
                f"{latest_checkpoint(run_dir)}, is kept. Lower lr or raise weight_decay")

    def checkpoint(epoch: int, batches_done: int) -> Path:
        guard_weights()
        rngs = distributed.all_objects(rng_states()) if ddp else None  # every rank's, for an exact resume
        path = run_dir / "checkpoints" / f"step-{step:08d}.pt"
        if master:
            path = save_checkpoint(
                run_dir, model=model, step=step, epoch=epoch, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                loss=criterion, sampler_state={"epoch": epoch, "start_batch": batches_done, "seed": cfg.seed},
                best=best, config=cfg_dict, rank_rngs=rngs,
                extra={"history": history, "sums": sums, "loss_ref": loss_ref}
                | ({"world_size": world} if ddp else {}))
            say(f"checkpoint step {step} -> {path}")
            sys.stdout.flush()
        distributed.barrier()
        return path

    def loss_fn(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if ddp:  # the loss sees the global batch; see tcmlib.distributed for why the gradient is exact
            emb, labels = distributed.gather_batch(emb, labels)
        if not bool(torch.isfinite(emb).all()):  # (after the gather, so that every rank stops alike)
            raise FloatingPointError("the embeddings contain NaN/inf")
        return criterion(emb, labels)

    last_path = ckpt_path
    for epoch in range(epoch0, cfg.epochs):
        start = sampler_state["start_batch"] if sampler_state is not None and epoch == epoch0 else 0
        if start == 0:
            sums = {"loss": 0.0, "base": 0.0, "tcm": 0.0, "n": 0, "time": 0.0}
        sampler.set_epoch(epoch, start_batch=start)
        if seeded is not None:
            seeded.set_epoch(epoch)  # (before the loader's iterator copies the data set into its workers)
        loader_gen.manual_seed(cfg.seed * 100_003 + epoch * 1_009 + start)  # worker seeds: a function of the position
        n_batches = len(sampler.plan(epoch))
        if cfg.steps_per_epoch is not None:
            n_batches = min(n_batches, cfg.steps_per_epoch)
        model.train()
        t0 = time.perf_counter()
        bar = tqdm(total=n_batches, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and master), leave=False, dynamic_ncols=True)
        for b, (x, y) in enumerate(loader, start=start):
            if b >= n_batches:
                break
            x = x.to(device, non_blocking=True)  # (B, C, H, W)
            y = torch.as_tensor(y).to(device, non_blocking=True)  # (B,)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            try:
                if chunk is None:
                    loss, _ = direct_backward(net, x, y, loss_fn, amp_dtype=amp_dtype, scaler=scaler)
                else:
                    loss, _ = cached_backward(net, x, y, loss_fn, chunk, amp_dtype=amp_dtype, scaler=scaler)
                parts = isinstance(criterion, WithTCM) and criterion.last_base is not None
                read: list[torch.Tensor] = [loss]
                if parts:
                    read += [criterion.last_base, criterion.last_tcm]  # type: ignore[list-item]
                values = torch.stack([t.detach().double().reshape(()) for t in read]).tolist()  # one device read
                loss_value = values[0]
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"the loss is {loss_value}")
                if loss_ref is None:
                    loss_ref = max(abs(loss_value), 1.0)
                elif abs(loss_value) > DIVERGENCE_FACTOR * loss_ref:
                    raise FloatingPointError(f"the loss is {loss_value:.4g}, more than {DIVERGENCE_FACTOR:g} times "
                                             f"the first step's {loss_ref:.4g}")
            except FloatingPointError as e:
                raise FloatingPointError(
                    f"training diverged at step {step + 1} (epoch {epoch + 1}, batch {b + 1}): {e}. Stopped before "
                    f"the optimiser step; the last good checkpoint is kept: {latest_checkpoint(run_dir)}. "
                    "Lower lr, use amp='bf16' instead of 'fp16', or check the input data"
                ) from None
            if ddp:  # the loss's own parameters are outside DDP: keep them equal on every rank
                distributed.average_gradients(criterion)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            base, tcm = (values[1], values[2]) if parts else (loss_value, 0.0)
            sums["loss"] += loss_value
            sums["base"] += base
            sums["tcm"] += tcm
            sums["n"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", base=f"{base:.4f}", tcm=f"{tcm:.4f}")
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                sums["time"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                last_path = checkpoint(epoch, b + 1)
        bar.close()
        sums["time"] += time.perf_counter() - t0
        scheduler.step()

        n = max(sums["n"], 1)
        rec: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                               "loss": sums["loss"] / n, "loss_base": sums["base"] / n, "loss_tcm": sums["tcm"] / n,
                               "train_time_s": round(sums["time"], 3)} | ({"world_size": world} if ddp else {})
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last:
            guard_weights()
            t1 = time.perf_counter()
            eval_kw: dict[str, Any] = dict(ks=cfg.eval_ks, batch_size=cfg.eval_batch_size, device=device, amp=cfg.amp,
                           num_workers=min(cfg.num_workers, os.cpu_count() or 1), channels_last=cfg.channels_last)
            score_fn = distributed.evaluate_sharded if ddp else evaluate  # ddp: each rank embeds a shard
            if val_data is not None:  # validation every time; the test classes only after the last epoch
                rec.update({f"val_{k}": v for k, v in score_fn(model, val_data, **eval_kw).items()})
            if val_data is None or last:
                rec.update(score_fn(model, test_data, **eval_kw))
            rec["eval_time_s"] = round(time.perf_counter() - t1, 3)
            score = "val_R@1" if val_data is not None else "R@1"
            if rec.get(score, -1.0) > best.get(score, -1.0):
                best = {k: v for k, v in rec.items() if k[0].isupper() or k.startswith(("eps", "val_"))} | {"epoch": epoch + 1}
            summary = ", ".join(f"{k} {rec[k]:.4g}" for k in rec if k[0].isupper() or k.startswith(("eps", "val_")))
            say(f"epoch {epoch + 1}: loss {rec['loss']:.4f} (base {rec['loss_base']:.4f}, "
                       f"tcm {rec['loss_tcm']:.4f}); {summary}")
        history.append(rec)
        if master:
            _write_metrics(run_dir, history)
        last_path = checkpoint(epoch + 1, 0)
    torch.use_deterministic_algorithms(was_deterministic)
    if own_group:
        distributed.shutdown()
    return FitResult(history=history, final=history[-1] if history else {}, run_dir=run_dir, model=model,
                     checkpoint=last_path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tcmlib.train --config NAME_OR_PATH [--resume] [--override key=value ...]``."""
    parser = argparse.ArgumentParser(prog="tcmlib-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True,
                        help="a packaged config name (glyphs_tiny, glyphs_small_cnn_smooth_ap, ...; "
                             "tcmlib.train.available_configs()) or the path of a YAML file of TrainConfig keys")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys; values are parsed as YAML (epochs=3, tcm=true, amp=null)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.override)
        result = fit(cfg, resume=args.resume)
    except (ValueError, OSError, FloatingPointError) as e:  # user errors: one line, no traceback
        # (ValueError covers bad configs, YAML and corrupt checkpoints; OSError missing / unreadable files)
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"tcmlib-train: error: {msg}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: rank 0 only
        print(json.dumps(result.final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
