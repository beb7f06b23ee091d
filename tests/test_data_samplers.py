"""MPerClassBatchSampler: batch structure, coverage, determinism, exact resumption, errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tcmlib.data.samplers import MPerClassBatchSampler


def make_labels(seed: int = 0) -> np.ndarray:
    """30 classes with 1 to 13 samples each (imbalanced, some smaller than m), shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(1 + (c * 7) % 13, c) for c in range(30)])
    return rng.permutation(labels)


def test_batches_hold_k_classes_with_m_each():
    labels = make_labels()
    s = MPerClassBatchSampler(labels, m=4, batch_size=32, seed=0)
    batches = list(s)
    assert len(batches) == len(s.plan(0)) > 0
    for b in batches:
        assert len(b) == 32
        counts = Counter(labels[b].tolist())
        assert len(counts) == 8 and set(counts.values()) == {4}


def test_epoch_covers_every_sample():
    labels = make_labels()
    s = MPerClassBatchSampler(labels, m=4, batch_size=32, seed=0, drop_last=False)
    seen = np.concatenate([np.asarray(b) for b in s])
    assert set(seen.tolist()) == set(range(len(labels)))
    # padding only fills each class's last chunk of m: at most m - 1 extra samples a class
    assert len(seen) < len(labels) + 30 * 3 + 1
    assert s.n_small_classes == sum(np.bincount(labels) < 4)
    # drop_last=True loses at most the chunks that could not fill a batch
    kept = np.concatenate([np.asarray(b) for b in MPerClassBatchSampler(labels, 4, 32, seed=0)])
    assert len(set(kept.tolist())) > 0.8 * len(labels)


def test_deterministic_and_varies_with_epoch_and_seed():
    labels = make_labels()
    a = MPerClassBatchSampler(labels, 4, 32, seed=3)
    b = MPerClassBatchSampler(torch.as_tensor(labels), 4, 32, seed=3)
    assert list(a) == list(b)  # both now in epoch 1
    assert a.epoch == b.epoch == 1
    assert list(a) == list(b)
    c = MPerClassBatchSampler(labels, 4, 32, seed=4)
    assert [x.tolist() for x in c.plan(0)] != [x.tolist() for x in a.plan(0)]
    assert [x.tolist() for x in a.plan(0)] != [x.tolist() for x in a.plan(1)]
    np.random.seed(123)
    torch.manual_seed(123)  # global state plays no part
    assert [x.tolist() for x in MPerClassBatchSampler(labels, 4, 32, seed=3).plan(0)] == \
        [x.tolist() for x in a.plan(0)]


def test_resume_mid_epoch_exactly():
    labels = make_labels()
    ref = MPerClassBatchSampler(labels, 4, 16, seed=7)
    ref.set_epoch(2)
    full = list(ref)

    run = MPerClassBatchSampler(labels, 4, 16, seed=7)
    run.set_epoch(2)
    it = iter(run)
    first = [next(it) for _ in range(3)]
    state = run.state_dict()
    assert state == {"epoch": 2, "start_batch": 3, "seed": 7}

    resumed = MPerClassBatchSampler(labels, 4, 16, seed=7)  # a fresh process
    resumed.load_state_dict(state)
    assert len(resumed) == len(full) - 3
    assert first + list(resumed) == full
    assert resumed.epoch == 3 and resumed.start_batch == 0  # a complete pass moves on


def test_resume_through_dataloader_with_explicit_count():
    labels = make_labels()
    ds = TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    s = MPerClassBatchSampler(labels, 2, 8, seed=1)
    loader = DataLoader(ds, batch_sampler=s)
    full = [x.tolist() for x, _ in loader]  # epoch 0
    s.set_epoch(0, start_batch=5)
    assert len(loader) == len(full) - 5
    assert [x.tolist() for x, _ in loader] == full[5:]
    assert s.state_dict(batches_done=2) == {"epoch": 1, "start_batch": 2, "seed": 1}


def test_errors():
    labels = make_labels()
    with pytest.raises(ValueError, match="not divisible"):
        MPerClassBatchSampler(labels, 3, 32)
    with pytest.raises(ValueError, match="distinct classes"):
        MPerClassBatchSampler(labels, 2, 62)  # 31 classes a batch, 30 exist
    with pytest.raises(ValueError, match="seed"):
        state = {"epoch": 0, "start_batch": 0, "seed": 1}
        MPerClassBatchSampler(labels, 4, 32, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="1-D"):
        MPerClassBatchSampler(np.zeros((2, 2)), 1, 1)
