"""How often one training step of ``fit`` waits for the GPU, counted on the CPU.

A GPU runs its kernels asynchronously; an operation whose result the host must read (a tensor's
value as a Python number, the size of a boolean selection, ``unique``) stalls the host until the
GPU has caught up.  A ``TorchDispatchMode`` sees every operation a step dispatches, so on the CPU
we count the ones that would force such a wait, and hold the count under a ceiling: a new
``float(tensor)`` in the training step fails this test.

Not counted: the optimiser's step counters (``torch.optim`` keeps them on the host unless
``capturable``), the data set's item reads (``tcmlib.data``, in the loader, before the batch goes
to the device) and the evaluation after each epoch (``tcmlib.metrics``).  One step = the difference between ``fit`` runs of two steps and one step.
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tcmlib.train import fit, load_config

# operations that read a device value on the host (or need it to size their output)
SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive", "equal"}
NOT_THE_STEP = ("/torch/optim/", "/tcmlib/data/", "/tcmlib/metrics/")  # host counters, item reads, evaluation


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    if name in SYNC_OPS:
        return True
    if name in ("index", "index_put", "index_put_"):  # a boolean mask index is a nonzero inside
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
    if name == "repeat_interleave":  # without output_size its length is read from the device
        return kwargs.get("output_size") is None and len(args) > 1 and isinstance(args[1], torch.Tensor)
    return False


class SyncCounter(TorchDispatchMode):
    """Counts sync-forcing operations by (operation, the tcmlib line that issued it)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def _count(self, name: str) -> None:
        frames = traceback.extract_stack()[:-2]
        if not any(part in f.filename for f in frames for part in NOT_THE_STEP):
            mine = [f for f in frames if "/tcmlib/" in f.filename]
            where = f"{Path(mine[-1].filename).name}:{mine[-1].lineno}" if mine else "?"
            self.counts[name, where] += 1

    def __enter__(self) -> "SyncCounter":
        # Tensor.tolist / .numpy read a tensor's values without dispatching an operation on a CPU
        # tensor (on a GPU they copy it to the host): wrap them so that they count too
        self._saved = {m: getattr(torch.Tensor, m) for m in ("tolist", "numpy")}
        for m, fn in self._saved.items():
            def wrapper(t: torch.Tensor, *a: Any, _fn: Any = fn, _m: str = m, **k: Any) -> Any:
                self._count(_m)
                return _fn(t, *a, **k)
            setattr(torch.Tensor, m, wrapper)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for m, fn in self._saved.items():
            setattr(torch.Tensor, m, fn)
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if _is_sync(name, args, kwargs):
            self._count(name)
        return func(*args, **kwargs)


def _step_syncs(tmp_path: Path, loss: str, **kw: Any) -> collections.Counter:
    counts = []
    for steps in (1, 2):
        cfg = load_config("glyphs_tiny", run_dir=str(tmp_path / f"{loss}-{steps}"), epochs=1, batch_size=16, m=4,
                          dim=8, steps_per_epoch=steps, progress=False, loss=loss, device="cpu", **kw)
        with SyncCounter() as counter:
            fit(cfg)
        counts.append(counter.counts)
    return counts[1] - counts[0]


# Per step, with TCM (glyphs_tiny), measured: fit's finiteness check of the embeddings (1) and one read of
# the loss and its parts for the log and the divergence guard (1; was 3: loss, base, TCM apart); each
# loss's input check (1 each, base loss and TCM: 2; was 4: finite and zero rows apart); Smooth-AP / RS@k's
# positives table (unique and the largest class: 2); RS@k's queries with a positive (1); TCM's hard pairs
# (2 boolean selections).  The pml-based contrastive loss adds WithTCM's selections and pml's own (6).
# Before the reductions: smooth_ap 12, recall_surrogate 13, contrastive 15.
CEILING = {"smooth_ap": 8, "recall_surrogate": 9, "contrastive": 12}


@pytest.mark.parametrize("loss", sorted(CEILING))
def test_one_training_step_stays_under_its_sync_ceiling(tmp_path: Path, loss: str) -> None:
    per_step = _step_syncs(tmp_path, loss)
    total = sum(per_step.values())
    print(loss, total, dict(per_step))
    assert 0 < total <= CEILING[loss], f"{total} syncs in one step (ceiling {CEILING[loss]}): {dict(per_step)}"
    from_fit = sum(n for (_, where), n in per_step.items() if where.startswith("train.py"))
    assert from_fit <= 2, per_step  # the embedding check and one read of the loss parts


def test_the_counter_sees_a_sync() -> None:
    x = torch.randn(5)
    with SyncCounter() as counter:
        float(x.sum())
        x[x > 0]
        torch.unique(x)
        x.tolist()
        (x * 2).exp()
    assert sum(counter.counts.values()) == 4
    assert torch.Tensor.tolist(torch.ones(2)) == [1.0, 1.0]  # restored
