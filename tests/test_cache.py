"""tcmlib.cache.load_or_train: trains once per settings, loads the same weights after, keys by every setting."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tcmlib.cache import load_or_train, settings_key


def _factory(calls: list[int]):
    def make() -> nn.Module:
        return nn.Linear(3, 2)

    def train() -> nn.Module:
        calls.append(1)
        net = make()
        with torch.no_grad():
            net.weight.fill_(float(len(calls)))  # each training run leaves its own mark
        return net

    return make, train


def test_trains_once_then_loads_the_same_weights(tmp_path: Path) -> None:
    calls: list[int] = []
    make, train = _factory(calls)
    settings = {"dim": 2, "seed": 0, "margins": {"pos": 0.9}}
    first = load_or_train(settings, train, make, namespace="page", cache_dir=tmp_path)
    again = load_or_train(dict(reversed(list(settings.items()))), train, make, namespace="page",
                          cache_dir=tmp_path)  # the same settings in another order
    assert len(calls) == 1 and not again.training
    assert torch.equal(first.weight, again.weight) and again.weight[0, 0].item() == 1.0
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]  # by hand
    assert settings_key(settings) == key and (tmp_path / "page" / f"{key}.pt").is_file()
    other = load_or_train({**settings, "seed": 1}, train, make, namespace="page", cache_dir=tmp_path)
    assert len(calls) == 2 and other.weight[0, 0].item() == 2.0
    assert not list((tmp_path / "page").glob("*.tmp"))


def test_settings_must_be_json(tmp_path: Path) -> None:
    make, train = _factory([])
    with pytest.raises(ValueError, match="settings must hold only JSON values"):
        load_or_train({"device": torch.device("cpu")}, train, make, namespace="p", cache_dir=tmp_path)
