"""Train a small model once, keyed by its settings, and load its weights on every later call.

For pages that train their own small networks (the book's chapter 6): ``load_or_train(settings,
train, make, namespace=...)`` returns the trained network, running ``train()`` only when no weights
for exactly these ``settings`` are cached.  (Full training runs use :func:`tcmlib.experiments.run_cached`.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_or_train", "settings_key"]


def settings_key(settings: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-1 of ``settings`` as sorted JSON; ``ValueError`` if it is not JSON."""
    try:
        text = json.dumps(dict(settings), sort_keys=True)
    except TypeError as e:
        raise ValueError(f"settings must hold only JSON values (numbers, strings, lists, dicts): {e}") from None
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _default_dir() -> Path:
    from tcmlib.experiments import default_runs_dir

    return default_runs_dir().parent  # beside the run cache: <repo>/.cache/tcm-book, or ~/.cache/tcmlib


def load_or_train(
    settings: Mapping[str, Any],
    train: Callable[[], nn.Module],
    make: Callable[[], nn.Module],
    *,
    namespace: str,
    cache_dir: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """The network trained under ``settings``: ``train()`` once, then ``make()`` with the cached weights.

    Args:
        settings: every setting that determines the trained weights (JSON values); a changed setting
            trains anew, so a forgotten one would load the wrong model.
        train: trains from scratch and returns the network.
        make: builds an untrained network of the same shape, to load the weights into.
        namespace: a folder name for this page's models.
        cache_dir: the cache root; default: beside :func:`tcmlib.experiments.default_runs_dir`.

    Weights go to ``<cache_dir>/<namespace>/<settings_key(settings)>.pt`` (written atomically).
    Returns the network in eval mode.
    """
    root = Path(cache_dir) if cache_dir is not None else _default_dir()
    path = root / namespace / f"{settings_key(settings)}.pt"
    if path.is_file():
        net = make()
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    net = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    return net.eval()
