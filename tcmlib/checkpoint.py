"""Checkpoints that survive a crash and resume a run exactly.

A checkpoint is one ``torch.save`` dict::

    {"model", "optimizer", "scheduler", "scaler", "loss"}   # state_dicts (None where absent)
    {"rng": {"python", "numpy", "torch", "cuda"}}           # every random generator we use
    {"sampler"}                                             # where the batch sampler resumes
    {"epoch", "step", "best", "config", "extra", "version"} # bookkeeping

It is written *atomically*: to a temporary file in the same directory, flushed to disk, then
``os.replace``-d onto its final name.  A run killed at any moment (even SIGKILL mid-write) leaves
either the previous checkpoints or the complete new one, never a torn file.  Files are named
``run_dir/checkpoints/step-00001234.pt``; :func:`latest_checkpoint` picks the highest step, and
only the newest ``keep`` are kept.

The files are pickles (optimiser and scheduler states hold Python objects): load only
checkpoints you wrote yourself (``load_checkpoint`` uses ``weights_only=False``).
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["rng_states", "set_rng_states", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]

VERSION = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


def rng_states() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and every CUDA device's) global generators."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA states only where CUDA is available)."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _state(obj: Any) -> Any:
    return None if obj is None else obj.state_dict()


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    model: torch.nn.Module,
    step: int,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    loss: torch.nn.Module | None = None,
    sampler_state: dict[str, Any] | None = None,
    best: dict[str, float] | None = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Atomically write ``run_dir/checkpoints/step-<step>.pt``; delete all but the newest ``keep``.

    ``epoch`` / ``sampler_state`` describe where training *resumes*: the epoch in progress and
    the sampler's ``state_dict`` with the batches already consumed; ``extra`` holds anything
    else the loop needs to continue (running sums, history).  Returns the file's path.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "version": VERSION,
        "model": model.state_dict(),
        "optimizer": _state(optimizer),
        "scheduler": _state(scheduler),
        "scaler": _state(scaler),
        "loss": _state(loss),
        "rng": rng_states(),
        "sampler": sampler_state,
        "epoch": int(epoch),
        "step": int(step),
        "best": dict(best or {}),
        "config": config,
        "extra": dict(extra or {}),
    }
    path = ckpt_dir / f"step-{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(dir=ckpt_dir, prefix=".step-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for old in _checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint files in ``ckpt_dir``, oldest step first (temporary files ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of ``run_dir`` with the highest step, or None when there is none."""
    found = _checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    loss: torch.nn.Module | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Read a checkpoint, load the states into the objects given, restore RNGs; return the dict.

    The caller restores the sampler from ``ckpt["sampler"]`` and continues at ``ckpt["epoch"]``.
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=False)  # our own file: trusted
    for obj, key in ((model, "model"), (optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler"),
                     (loss, "loss")):
        if obj is not None and ckpt.get(key) is not None:
            obj.load_state_dict(ckpt[key])
    if restore_rng:
        set_rng_states(ckpt["rng"])
    return ckpt
