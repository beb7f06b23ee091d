"""Train an embedder with a DML loss (optionally + TCM) and evaluate R@k, MAP@R, OPIS and eps-OPIS.

From a notebook::

    from tcmlib.train import TrainConfig, fit
    result = fit(TrainConfig(dataset="glyphs", glyph_size="tiny", backbone="small_cnn", loss="contrastive",
                             tcm=True, dim=64, batch_size=128, epochs=5, lr=1e-3, run_dir="runs/glyphs"))
    result.history[-1]["OPIS"]

From a shell (``tcmlib-train`` is the same)::

    python -m tcmlib.train --config glyphs_tiny [--resume] [--restart] [--override epochs=3 tcm=true]

``--config`` takes the name of a config that ships with tcmlib (``tcmlib/configs/<name>.yaml``,
listed by :func:`available_configs`; no checkout needed, e.g. on Colab) or the path of a YAML file.

One epoch = m-per-class batches over the train classes (tqdm shows loss, base and TCM parts),
then the test classes (disjoint) are embedded and scored; one line per epoch goes to
``run_dir/metrics.jsonl`` and ``run_dir/metrics.csv``.  Checkpoints (``tcmlib.checkpoint``) are
written at each epoch end, and within an epoch every ``checkpoint_every_steps`` steps and/or every
``checkpoint_every_minutes`` of training (the step decided by rank 0 for all processes, see
``tcmlib.checkpoint.TimedCheckpoints``); ``resume=True`` continues
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
import functools
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
from tcmlib.checkpoint import (TimedCheckpoints, apply_checkpoint, latest_checkpoint, newest_loadable_checkpoint,
                               read_checkpoint, remove_stale_temporaries, rng_states, save_checkpoint)
from tcmlib.data import DATASET_NAMES, GLYPH_PRESETS, MPerClassBatchSampler, get_dataset
from tcmlib.data.arrays import hold_out_classes
from tcmlib.data.seeded import SeededAugmentation
from tcmlib.data.shapes import SMALL_DATASETS, input_size  # noqa: F401 (re-exported: tcmlib.train.input_size)
from tcmlib.data.transforms import DeviceNormalize, small_train_transform, test_transform, train_transform
from tcmlib.embedding import AMP_DTYPES, _native_bf16, _usable_device, embed, resolve_amp  # noqa: F401 (tcmlib.train.embed etc.)
from tcmlib.gradcache import cached_backward, direct_backward
from tcmlib.losses.combine import WithTCM
from tcmlib.losses.registry import available_losses, loss_kwarg_names, loss_param_groups, make_loss
from tcmlib.losses.tcm import TCMLoss
from tcmlib.memory import HOST_SHARE, machine_loader_settings
from tcmlib.metrics import evaluate_embeddings
from tcmlib.models import BACKBONES, Embedder, build_embedder
from tcmlib.runtime import default_device, seed_everything

__all__ = ["TrainConfig", "FitResult", "fit", "evaluate_model", "evaluate", "embed", "build_data", "build_splits", "load_config",
           "config_from_record", "LEGACY_VALUES", "available_configs", "main", "resolve_amp"]

# Fields a resumed run may change: where and how verbosely it runs, how often it saves, how big its
# evaluation batches are, and how many more epochs it trains.  None changes a training step's
# inputs or arithmetic (num_workers: the batches stay exact, see the module docstring).  Any other
# difference between a checkpoint's config and the resuming one is refused.
RESUME_SAFE_FIELDS = ("epochs", "progress", "run_dir", "device", "num_workers", "checkpoint_every_steps",
                      "checkpoint_every_minutes", "eval_batch_size", "data_root")
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
    "checkpoint_every_steps": (_INT, False), "checkpoint_every_minutes": (_FLOAT, True), "seed": (_INT, False), "run_dir": ((str, os.PathLike), False),
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
    need(cfg.checkpoint_every_minutes is None or math.isfinite(cfg.checkpoint_every_minutes)
         and cfg.checkpoint_every_minutes > 0, "checkpoint_every_minutes", "a finite number > 0, or null")
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
    checkpoint_every_minutes: float | None = None  # also within an epoch, about every this many minutes of training
    seed: int = 0
    run_dir: str = "runs/default"
    progress: bool = True  # tqdm bars

    def __post_init__(self) -> None:
        for name in ("lr", "head_lr_mult", "weight_decay", "gamma", "val_fraction"):  # YAML reads 1e-4 as a string
            setattr(self, name, _to_float(name, getattr(self, name)))
        for name in ("loss_lr_mult", "checkpoint_every_minutes"):
            if getattr(self, name) is not None:
                setattr(self, name, _to_float(name, getattr(self, name)))
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


class _DuplicateKeyError(ValueError):
    """A YAML mapping gives one key twice (PyYAML would silently keep the last value)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping giving a key twice, naming the key and both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" may be overridden, that is its point
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise _DuplicateKeyError(f"key {key!r} is given twice (lines {first[key]} and {line}); keep one")
                first[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                break
        return super().construct_mapping(node, deep=deep)


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
        loaded = yaml.load(source, Loader=_UniqueKeyLoader)
    except _DuplicateKeyError as e:
        raise _DuplicateKeyError(f"{path}: {e}") from None
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
    # photos travel as uint8 (a quarter of the bytes through the loader and to the GPU) and are normalised on the
    # device the model runs on: fit and embed apply a data set's ``batch_transform`` to each batch there
    train = get_dataset(cfg.dataset, cfg.data_root, "train", transform=train_transform(size, uint8=True))
    test = get_dataset(cfg.dataset, cfg.data_root, "test",
                       transform=test_transform(size, int(size * 256 / 224), uint8=True))
    for split in (train, test):
        setattr(split, "batch_transform", DeviceNormalize())
    return train, test, 3


def evaluate_model(
    model: nn.Module, dataset: Dataset, *, ks: Sequence[int] = (1, 2, 4, 8), batch_size: int = 256,
    device: str | torch.device = "cpu", amp: str | None = None, num_workers: int = 0, channels_last: bool = False,
) -> dict[str, float]:
    """Embed ``dataset`` and score it: ``{"R@k": ..., "MAP@R": ..., "OPIS": ..., "eps_OPIS": ...}``.

    One :func:`tcmlib.metrics.evaluation.evaluate_embeddings` call (the retrieval rides on OPIS's first pass), on ``device``:
    the embeddings stay where the model made them. OPIS and eps-OPIS (eps = 0.1) use its defaults: 100 thresholds
    between the global-FAR 1e-2 and 1e-1 quantiles of the negative-pair distances. Units: R@k, MAP@R fractions in
    [0, 1]; OPIS in [0, 0.25].
    """
    emb, labels = embed(model, dataset, batch_size=batch_size, device=device, amp=amp, num_workers=num_workers,
                        channels_last=channels_last, out_device=None)
    too_big = [k for k in ks if k >= emb.shape[0]]
    if too_big:
        raise ValueError(f"eval_ks {too_big} >= N = {emb.shape[0]} samples: a query has only N - 1 others; "
                         f"use ks < {emb.shape[0]}")
    return evaluate_embeddings(emb, labels, ks=ks, eps=0.1).as_dict()


@functools.wraps(evaluate_model, assigned=("__annotations__", "__type_params__"))
def evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
    """Deprecated name of :func:`evaluate_model` (four functions were once called ``evaluate``)."""
    warnings.warn("tcmlib.train.evaluate is now tcmlib.train.evaluate_model", DeprecationWarning, stacklevel=2)
    return evaluate_model(*args, **kwargs)


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


def _config_differences(saved: dict[str, Any], cfg: TrainConfig, label: str,
                        safe: Sequence[str] = RESUME_SAFE_FIELDS) -> tuple[list[str], str]:
    """``(keys, detail)``: the fields outside ``safe`` where a stored config differs from ``cfg``.

    ``detail`` reads ``"lr: <label> 0.001, now 0.01; ..."``.
    """
    now = dataclasses.asdict(cfg)
    saved = {**LEGACY_VALUES, **saved}  # a config written before a field existed ran with its old meaning
    try:  # the stored values through the same normalisation (YAML strings -> floats, ...)
        saved = dataclasses.asdict(TrainConfig(**{k: v for k, v in saved.items() if k in now}))
    except (TypeError, ValueError):
        pass
    differ = sorted(k for k in now if k not in safe and saved.get(k) != now[k])
    return differ, "; ".join(f"{k}: {label} {saved.get(k)!r}, now {now[k]!r}" for k in differ)


def _check_resume_config(saved: dict[str, Any] | None, cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume a checkpoint under a config that differs in a field not in RESUME_SAFE_FIELDS."""
    if saved is None:
        warnings.warn(f"{path} stores no config; cannot check that the resumed run matches it")
        return
    # a cosine schedule spans `epochs`: changing it changes every later learning rate
    safe = tuple(f for f in RESUME_SAFE_FIELDS if not (f == "epochs" and cfg.lr_schedule == "cosine"))
    differ, detail = _config_differences(saved, cfg, "checkpoint", safe)
    if differ:
        raise ValueError(f"cannot resume {path}: the config differs in {differ} ({detail}). Only "
                         f"{', '.join(safe)} may change on resume; use the run's own config "
                         f"({Path(cfg.run_dir) / 'config.yaml'} before this call) or a new run_dir")


def _check_run_dir(run_dir: Path, cfg: TrainConfig, *, resume: bool) -> None:
    """Refuse to start a run over a folder (without checkpoints) that holds another run's record.

    A run folder is a record: ``config.yaml`` that differs from ``cfg`` (outside RESUME_SAFE_FIELDS),
    or that cannot be read, and any ``metrics.jsonl`` results would be overwritten by a fresh start,
    so both raise ``FileExistsError`` naming what is there; ``fit(..., restart=True)`` (``--restart``)
    is the explicit way to start over.  A folder holding only this run's own ``config.yaml`` (a run
    stopped before its first result) starts again without a word.
    """
    found = []
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        try:
            saved = yaml.safe_load(saved_path.read_text())
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            saved = None
        if not isinstance(saved, dict):
            found.append("a config.yaml that does not read as a run config")
        else:
            differ, detail = _config_differences(saved, cfg, "config.yaml")
            if differ:
                found.append(f"another run's config.yaml (it differs in {differ}: {detail})")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        n = sum(1 for line in metrics.read_text(errors="replace").splitlines() if line.strip())
        found.append(f"the results of a run (metrics.jsonl, {n} epoch record{'s' * (n != 1)})")
    if not found:
        return
    what = " and ".join(found)
    head = (f"cannot resume {run_dir}: it holds {what}, but no checkpoint to resume from" if resume
            else f"{run_dir} holds {what}")
    raise FileExistsError(f"{head}; starting over would overwrite them. Pass --restart (fit(..., restart=True)) to "
                          "train from scratch there, replacing its config.yaml and metrics, or choose a new run_dir")


@dataclass
class _Parts:
    """What a training run is made of: built once by :func:`_build_parts`, never saved (the weights are)."""

    model: Embedder  # the embedder; ``net`` is it or its DDP wrapper (what a step runs)
    net: nn.Module
    criterion: nn.Module  # base loss (+ TCM)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16 only
    amp_dtype: torch.dtype | None
    chunk: int | None  # gradient-cache chunk, None: the whole local batch in one pass
    sampler: MPerClassBatchSampler
    seeded: SeededAugmentation | None  # per-image augmentation seeds (augment_rng: sample)
    loader: DataLoader
    loader_gen: torch.Generator
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None  # on the device (uint8 photos -> normalised)


@dataclass
class _State:
    """What a run has done so far: saved in every checkpoint and restored on resume."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimiser steps taken
    start_batch: int = 0  # batches of epoch ``epoch`` already trained (a mid-epoch checkpoint)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    best: dict[str, Any] = field(default_factory=dict)  # the best evaluation so far (by val R@1, else R@1)
    sums: dict[str, Any] = field(default_factory=dict)  # running sums of the epoch in progress
    loss_ref: float | None = None  # the first step's loss (divergence guard)
    norm_ref: float = 1.0  # the initial weights' norm (divergence guard; not saved: rebuilt from the seed)


def fit(config: TrainConfig | dict[str, Any] | None = None, *, resume: bool = False, restart: bool = False,
        train_data: Dataset | None = None, test_data: Dataset | None = None, val_data: Dataset | None = None,
        **kwargs: Any) -> FitResult:
    """Train and evaluate as ``config`` says (a :class:`TrainConfig`, a dict, or keyword arguments).

    Args:
        config: the run; keyword arguments override its fields.
        resume: continue from the newest checkpoint in ``run_dir`` (start fresh if there is none).
            Without it, a ``run_dir`` that already holds checkpoints is an error.
        restart: start over in a ``run_dir`` without checkpoints that holds another run's
            ``config.yaml`` or any ``metrics.jsonl`` (removed first); without it, such a folder is an
            error (``FileExistsError``), with or without ``resume``.  Checkpoints are never deleted.
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
    cfg = dataclasses.replace(config, **kwargs) if isinstance(config, TrainConfig) else \
        load_config(None, **{**(config or {}), **kwargs})
    cfg.validate()
    ddp = distributed.launched()  # under torchrun: one process per device, see tcmlib.distributed
    device, own_group = distributed.setup(cfg.device) if ddp else (_resolve_device(cfg.device), False)
    master = distributed.rank() == 0  # writes checkpoints, metrics and progress
    say: Callable[[str], None] = tqdm.write if master else (lambda _: None)
    run_dir = Path(cfg.run_dir)
    ckpt_path, ckpt = _open_run_dir(cfg, run_dir, device, resume=resume, restart=restart, say=say)
    was_deterministic = _set_determinism(cfg, device)
    seed_everything(cfg.seed)

    # data, model, loss, optimiser (in this order: the model's initial weights come from the seeded generator)
    if train_data is None or test_data is None:
        train_data, split_val, test_data, in_channels = build_splits(cfg)
        val_data = split_val if val_data is None else val_data
    else:
        in_channels = int(train_data[0][0].shape[0])
    _check_data(cfg, train_data, test_data, val_data)
    parts = _build_parts(cfg, train_data, in_channels, device, say)
    state = _State(norm_ref=max(_param_norm(parts.model, parts.criterion), 1.0))
    if ckpt is not None:
        state = _restore(ckpt, parts, state, cfg, run_dir, ckpt_path, say)
    last_path = ckpt_path

    for epoch in range(state.epoch, cfg.epochs):
        _train_epoch(cfg, parts, state, epoch, device, run_dir, say)
        rec = _epoch_record(parts, state, epoch)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            _guard_weights(parts, state, run_dir)
            rec |= _evaluate_epoch(cfg, parts.model, val_data, test_data, device, last=epoch + 1 == cfg.epochs)
            _keep_best(state, rec, epoch, val_data is not None, say)
        state.history.append(rec)
        state.epoch, state.start_batch = epoch + 1, 0
        if master:
            _write_metrics(run_dir, state.history)
        last_path = _checkpoint(cfg, parts, state, run_dir, say)

    torch.use_deterministic_algorithms(was_deterministic)
    if own_group:
        distributed.shutdown()
    return FitResult(history=state.history, final=state.history[-1] if state.history else {}, run_dir=run_dir,
                     model=parts.model, checkpoint=last_path)


def _open_run_dir(cfg: TrainConfig, run_dir: Path, device: torch.device, *, resume: bool, restart: bool,
                  say: Callable[[str], None]) -> tuple[Path | None, dict[str, Any] | None]:
    """Check ``run_dir`` (a record: nothing overwritten by mistake), choose the checkpoint to resume, write
    ``config.yaml``.  Returns ``(checkpoint path, checkpoint)`` or ``(None, None)`` for a fresh start."""
    master, world = distributed.rank() == 0, distributed.world_size()
    ckpt_path = latest_checkpoint(run_dir)
    if ckpt_path is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints ({ckpt_path.name}); pass resume=True "
                              "(--resume) to continue that run, or choose a new run_dir"
                              + (" (restart does not delete checkpoints)" if restart else ""))
    if ckpt_path is None:
        if not restart:
            _check_run_dir(run_dir, cfg, resume=resume)
        distributed.barrier()  # every rank has read the folder before rank 0 writes to it
        if master and restart:
            for replaced in (run_dir / "metrics.jsonl", run_dir / "metrics.csv"):
                if replaced.is_file():
                    replaced.unlink()
                    say(f"restart: removed {replaced}")
    if master:
        for stale in remove_stale_temporaries(run_dir):
            say(f"removed {stale}, the temporary file of an interrupted checkpoint write")
    ckpt: dict[str, Any] | None = None
    if ckpt_path is not None:  # resume: the newest checkpoint that reads whole, under a compatible config
        if master:  # (it may set unreadable files aside, so one process chooses)
            found = newest_loadable_checkpoint(run_dir, map_location=device)
            assert found is not None
            ckpt_path, ckpt = found
        if distributed.launched():
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
            if distributed.launched():  # how the run was launched, not what it trains: a comment, so the file loads
                fh.write(f"# world_size: {world}\n")
    return ckpt_path, ckpt


def _set_determinism(cfg: TrainConfig, device: torch.device) -> bool:
    """Deterministic kernels when ``cfg.deterministic`` (bit-exact reruns), else cuDNN's autotuner on CUDA (every
    batch has the same shape).  Returns the previous deterministic setting, restored when ``fit`` returns."""
    was = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return was


def _check_data(cfg: TrainConfig, train_data: Dataset, test_data: Dataset, val_data: Dataset | None) -> None:
    """Refuse data sets the run cannot use: no ``labels``, splits too small for ``eval_ks``, too few classes for a
    batch, a batch that does not split evenly over the processes."""
    if not hasattr(train_data, "labels"):
        raise ValueError("train_data must expose a .labels array (one class id per sample) for m-per-class "
                         "batch sampling; tcmlib's datasets do, wrap yours or add the attribute")
    for name, data in (("test", test_data), ("validation", val_data)):
        n_eval = len(data) if data is not None and hasattr(data, "__len__") else None
        if n_eval is not None and max(cfg.eval_ks) >= n_eval:
            raise ValueError(f"config key 'eval_ks' = {cfg.eval_ks}: the {name} split has only {n_eval} samples, "
                             f"so R@k needs k < {n_eval}; drop the larger ks")
    n_classes = int(torch.as_tensor(getattr(train_data, "labels")).unique().numel())
    if n_classes < cfg.batch_size // cfg.m:
        raise ValueError(f"batch_size / m = {cfg.batch_size // cfg.m} classes per batch, but the train split "
                         f"has only {n_classes} classes; lower batch_size or raise m")
    if cfg.batch_size % distributed.world_size():
        raise ValueError(f"config key 'batch_size' = {cfg.batch_size} must be a multiple of the "
                         f"{distributed.world_size()} processes (each takes an equal slice of every batch)")


def _build_parts(cfg: TrainConfig, train_data: Dataset, in_channels: int, device: torch.device,
                 say: Callable[[str], None]) -> _Parts:
    """Batches (m per class, this rank's slice), the model (DDP-wrapped under torchrun), loss, optimiser, schedule
    and AMP.  The random draws happen in a fixed order (model, then loss), after ``seed_everything(cfg.seed)``."""
    rank, world, ddp = distributed.rank(), distributed.world_size(), distributed.launched()
    train_labels = torch.as_tensor(getattr(train_data, "labels"))  # (N_train,)
    sampler = MPerClassBatchSampler(train_labels, cfg.m, cfg.batch_size, seed=cfg.seed, num_replicas=world, rank=rank)
    seeded = SeededAugmentation(train_data, cfg.seed) if cfg.augment_rng == "sample" else None
    # The loader's own generator: creating an iterator draws a worker base seed from it, which would
    # otherwise come from the global RNG and shift every later draw after a mid-epoch resume.
    loader_gen = torch.Generator()
    workers, prefetch = machine_loader_settings(cfg, world)  # <= the CPUs, the batches in flight fit the host
    if workers < cfg.num_workers:
        say(f"num_workers {cfg.num_workers} -> {workers} (prefetch {prefetch}): {os.cpu_count()} CPUs, batches of "
            f"{cfg.batch_size // world} images in flight within {HOST_SHARE:.0%} of the host memory (tcmlib.memory)")
    loader = DataLoader(seeded or train_data, batch_sampler=sampler, num_workers=workers,
                        prefetch_factor=prefetch or None, pin_memory=device.type == "cuda", generator=loader_gen)

    model = build_embedder(cfg.backbone, cfg.dim, cfg.pretrained, in_channels, small_input=cfg.small_input,
                           image_size=input_size(cfg), frozen_bn=cfg.frozen_bn).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if ddp:  # BatchNorm that trains sees the global batch, as in one process; DDP copies rank 0's weights
        sync_batchnorm(model, device)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = make_loss(cfg.loss, tcm=cfg.tcm, num_classes=int(train_labels.max()) + 1, embedding_size=cfg.dim,
                          **cfg.loss_kwargs).to(device)
    optimizer = _make_optimizer(cfg, model, criterion)
    amp_dtype, use_scaler = resolve_amp(cfg.amp, device)
    chunk = cfg.chunk_size if cfg.chunk_size is not None and cfg.chunk_size < cfg.batch_size // world else None
    if chunk is not None and any(isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training
                                 for mod in model.modules()):
        warnings.warn("gradient cache with BatchNorm in train mode: BN statistics are per chunk, so the gradient "
                      "is not exactly the full-batch one (freeze BN for exactness, see tcmlib.gradcache)")
    if ddp:
        distributed.broadcast_module(criterion)  # the loss's parameters (proxies) as rank 0 drew them
        if rank > 0:  # from here on each rank draws its own dropout numbers (augment_rng process: augmentation too)
            seed_everything(cfg.seed + 1_000_003 * rank)
    return _Parts(model=model, net=net, criterion=criterion, optimizer=optimizer,
                  scheduler=_make_scheduler(cfg, optimizer),
                  scaler=torch.amp.GradScaler(device.type) if use_scaler else None, amp_dtype=amp_dtype, chunk=chunk,
                  sampler=sampler, seeded=seeded, loader=loader, loader_gen=loader_gen,
                  batch_transform=getattr(train_data, "batch_transform", None))


def _restore(ckpt: dict[str, Any], parts: _Parts, state: _State, cfg: TrainConfig, run_dir: Path,
             ckpt_path: Path | None, say: Callable[[str], None]) -> _State:
    """Load a checkpoint into the parts and return the state it saved (metrics.jsonl rewritten to match it)."""
    apply_checkpoint(ckpt, model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler,
                     scaler=parts.scaler, loss=parts.criterion, rank=distributed.rank())
    state = _State(epoch=ckpt["epoch"], step=ckpt["step"], start_batch=ckpt["sampler"]["start_batch"],
                   history=ckpt["extra"]["history"], best=ckpt["best"], sums=ckpt["extra"]["sums"],
                   loss_ref=ckpt["extra"].get("loss_ref"), norm_ref=state.norm_ref)
    if distributed.rank() == 0:
        _write_metrics(run_dir, state.history)  # drop lines written after that checkpoint
    if state.epoch >= cfg.epochs:
        say(f"{run_dir} holds a finished run ({state.epoch} of {cfg.epochs} epochs, step {state.step}, {ckpt_path}); "
            "nothing to train. Raise epochs to train on")
    else:
        say(f"resumed from {ckpt_path} (epoch {state.epoch + 1}, batch {state.start_batch}, step {state.step})")
    sys.stdout.flush()
    return state


def _guard_weights(parts: _Parts, state: _State, run_dir: Path) -> None:
    """Raise ``FloatingPointError`` (nothing saved) when a weight is NaN / inf or the weights' norm ran away."""
    model, criterion = parts.model, parts.criterion
    if not _all_finite(model) or not _all_finite(criterion):
        raise FloatingPointError(f"training diverged: weights are NaN/inf at step {state.step}; not saving them. The "
                                 f"last good checkpoint, {latest_checkpoint(run_dir)}, is kept")
    norm = _param_norm(model, criterion)
    if norm > DIVERGENCE_FACTOR * state.norm_ref:
        raise FloatingPointError(
            f"training diverged: the weight norm is {norm:.4g} at step {state.step}, more than {DIVERGENCE_FACTOR:g} "
            f"times the initial {state.norm_ref:.4g}; not saving them. The last good checkpoint, "
            f"{latest_checkpoint(run_dir)}, is kept. Lower lr or raise weight_decay")


def _checkpoint(cfg: TrainConfig, parts: _Parts, state: _State, run_dir: Path, say: Callable[[str], None]) -> Path:
    """Save everything an exact resume needs (every rank's random state under torchrun); rank 0 writes."""
    _guard_weights(parts, state, run_dir)
    ddp = distributed.launched()
    rngs = distributed.all_objects(rng_states()) if ddp else None  # every rank's, for an exact resume
    path = run_dir / "checkpoints" / f"step-{state.step:08d}.pt"
    if distributed.rank() == 0:
        path = save_checkpoint(
            run_dir, model=parts.model, step=state.step, epoch=state.epoch, optimizer=parts.optimizer,
            scheduler=parts.scheduler, scaler=parts.scaler, loss=parts.criterion,
            sampler_state={"epoch": state.epoch, "start_batch": state.start_batch, "seed": cfg.seed},
            best=state.best, config=dataclasses.asdict(cfg), rank_rngs=rngs,
            extra={"history": state.history, "sums": state.sums, "loss_ref": state.loss_ref}
            | ({"world_size": distributed.world_size()} if ddp else {}))
        say(f"checkpoint step {state.step} -> {path}")
        sys.stdout.flush()
    distributed.barrier()
    return path


def _loss_fn(criterion: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss a step minimises: on the global batch under torchrun (see tcmlib.distributed for why the gradient
    is exact), refusing non-finite embeddings (checked after the gather, so that every rank stops alike)."""
    def loss_fn(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if distributed.launched():
            emb, labels = distributed.gather_batch(emb, labels)
        if not bool(torch.isfinite(emb).all()):
            raise FloatingPointError("the embeddings contain NaN/inf")
        return criterion(emb, labels)
    return loss_fn


def _train_step(parts: _Parts, state: _State, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """One optimiser step on a batch (x (B, C, H, W), y (B,)): ``(loss, base part, TCM part)``.

    The loss is checked before the step (finite, within ``DIVERGENCE_FACTOR`` of the first step's); a bad one
    raises ``FloatingPointError`` and leaves the weights as they were.
    """
    p = parts
    p.optimizer.zero_grad(set_to_none=True)
    backward = direct_backward if p.chunk is None else cached_backward
    extra = () if p.chunk is None else (p.chunk,)
    loss, _ = backward(p.net, x, y, _loss_fn(p.criterion), *extra, amp_dtype=p.amp_dtype,  # type: ignore[operator]
                       scaler=p.scaler)
    split = isinstance(p.criterion, WithTCM) and p.criterion.last_base is not None
    read: list[torch.Tensor] = [loss]
    if split:
        read += [p.criterion.last_base, p.criterion.last_tcm]  # type: ignore[list-item]
    values = torch.stack([t.detach().double().reshape(()) for t in read]).tolist()  # one device read
    if not math.isfinite(values[0]):
        raise FloatingPointError(f"the loss is {values[0]}")
    if state.loss_ref is None:
        state.loss_ref = max(abs(values[0]), 1.0)
    elif abs(values[0]) > DIVERGENCE_FACTOR * state.loss_ref:
        raise FloatingPointError(f"the loss is {values[0]:.4g}, more than {DIVERGENCE_FACTOR:g} times "
                                 f"the first step's {state.loss_ref:.4g}")
    if distributed.launched():  # the loss's own parameters are outside DDP: keep them equal on every rank
        distributed.average_gradients(p.criterion)
    if p.scaler is not None:
        p.scaler.step(p.optimizer)
        p.scaler.update()
    else:
        p.optimizer.step()
    state.step += 1
    return (values[0], values[1], values[2]) if split else (values[0], values[0], 0.0)


def _train_epoch(cfg: TrainConfig, parts: _Parts, state: _State, epoch: int, device: torch.device, run_dir: Path,
                 say: Callable[[str], None]) -> None:
    """Train epoch ``epoch`` from batch ``state.start_batch`` on (a resume), checkpointing every
    ``checkpoint_every_steps`` steps and every ``checkpoint_every_minutes`` (rank 0 decides, one broadcast
    hands every rank the same step: :class:`tcmlib.checkpoint.TimedCheckpoints`); the epoch's loss sums and
    time go to ``state.sums``."""
    start = state.start_batch if epoch == state.epoch else 0
    if start == 0:
        state.sums = {"loss": 0.0, "base": 0.0, "tcm": 0.0, "n": 0, "time": 0.0}
    parts.sampler.set_epoch(epoch, start_batch=start)
    if parts.seeded is not None:
        parts.seeded.set_epoch(epoch)  # (before the loader's iterator copies the data set into its workers)
    parts.loader_gen.manual_seed(cfg.seed * 100_003 + epoch * 1_009 + start)  # worker seeds: a function of the position
    n_batches = len(parts.sampler.plan(epoch))
    if cfg.steps_per_epoch is not None:
        n_batches = min(n_batches, cfg.steps_per_epoch)
    parts.model.train()
    sums, t0 = state.sums, time.perf_counter()
    timed = None
    if cfg.checkpoint_every_minutes:
        timed = TimedCheckpoints(cfg.checkpoint_every_minutes,
                                 share=distributed.broadcast_object if distributed.launched() else None)
        timed.restart(state.step)
    bar = tqdm(total=n_batches, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not (cfg.progress and distributed.rank() == 0), leave=False, dynamic_ncols=True)
    for b, (x, y) in enumerate(parts.loader, start=start):
        if b >= n_batches:
            break
        x = x.to(device, non_blocking=True)  # (B, C, H, W)
        if parts.batch_transform is not None:
            x = parts.batch_transform(x)  # e.g. uint8 photos -> normalised float32, on the device
        y = torch.as_tensor(y).to(device, non_blocking=True)  # (B,)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            loss, base, tcm = _train_step(parts, state, x, y)
        except FloatingPointError as e:
            raise FloatingPointError(
                f"training diverged at step {state.step + 1} (epoch {epoch + 1}, batch {b + 1}): {e}. Stopped before "
                f"the optimiser step; the last good checkpoint is kept: {latest_checkpoint(run_dir)}. "
                "Lower lr, use amp='bf16' instead of 'fp16', or check the input data"
            ) from None
        for k, v in (("loss", loss), ("base", base), ("tcm", tcm), ("n", 1)):
            sums[k] += v
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", base=f"{base:.4f}", tcm=f"{tcm:.4f}")
        if (cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0
                or timed is not None and b + 1 < n_batches and timed.due(state.step)):  # (the epoch's end saves anyway)
            sums["time"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            state.epoch, state.start_batch = epoch, b + 1
            _checkpoint(cfg, parts, state, run_dir, say)
            if timed is not None:
                timed.restart(state.step)
    bar.close()
    sums["time"] += time.perf_counter() - t0
    parts.scheduler.step()


def _epoch_record(parts: _Parts, state: _State, epoch: int) -> dict[str, Any]:
    """The epoch's line of ``metrics.jsonl`` before evaluation: lr, mean loss and its parts, training time."""
    n = max(state.sums["n"], 1)
    return {"epoch": epoch + 1, "step": state.step, "lr": parts.optimizer.param_groups[0]["lr"],
            "loss": state.sums["loss"] / n, "loss_base": state.sums["base"] / n, "loss_tcm": state.sums["tcm"] / n,
            "train_time_s": round(state.sums["time"], 3)} \
        | ({"world_size": distributed.world_size()} if distributed.launched() else {})


def _evaluate_epoch(cfg: TrainConfig, model: nn.Module, val_data: Dataset | None, test_data: Dataset,
                    device: torch.device, *, last: bool) -> dict[str, Any]:
    """Validation classes every time (keys ``val_...``); the test classes only after the last epoch when there
    are validation classes (every time otherwise).  Sharded over the processes under torchrun."""
    t1 = time.perf_counter()
    kw: dict[str, Any] = dict(ks=cfg.eval_ks, batch_size=cfg.eval_batch_size, device=device, amp=cfg.amp,
                              num_workers=min(cfg.num_workers, os.cpu_count() or 1), channels_last=cfg.channels_last)
    score = distributed.evaluate_sharded if distributed.launched() else evaluate_model  # ddp: each rank embeds a shard
    rec: dict[str, Any] = {}
    if val_data is not None:
        rec.update({f"val_{k}": v for k, v in score(model, val_data, **kw).items()})
    if val_data is None or last:
        rec.update(score(model, test_data, **kw))
    rec["eval_time_s"] = round(time.perf_counter() - t1, 3)
    return rec


def _keep_best(state: _State, rec: dict[str, Any], epoch: int, has_val: bool, say: Callable[[str], None]) -> None:
    """Remember the best evaluation (by validation R@1, else test R@1) and print the epoch's line."""
    score = "val_R@1" if has_val else "R@1"
    metrics = {k: v for k, v in rec.items() if k[0].isupper() or k.startswith(("eps", "val_"))}
    if rec.get(score, -1.0) > state.best.get(score, -1.0):
        state.best = metrics | {"epoch": epoch + 1}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    say(f"epoch {epoch + 1}: loss {rec['loss']:.4f} (base {rec['loss_base']:.4f}, tcm {rec['loss_tcm']:.4f}); {summary}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tcmlib.train --config NAME_OR_PATH [--resume] [--restart] [--override key=value ...]``."""
    parser = argparse.ArgumentParser(prog="tcmlib-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True,
                        help="a packaged config name (glyphs_tiny, glyphs_small_cnn_smooth_ap, ...; "
                             "tcmlib.train.available_configs()) or the path of a YAML file of TrainConfig keys")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")
    parser.add_argument("--restart", action="store_true",
                        help="start over in a run_dir without checkpoints that holds another run's config.yaml "
                             "or results (metrics.jsonl), replacing them")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys; values are parsed as YAML (epochs=3, tcm=true, amp=null)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.override)
        result = fit(cfg, resume=args.resume, restart=args.restart)
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
