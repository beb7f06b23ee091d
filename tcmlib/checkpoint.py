"""Checkpoints that survive a crash and resume a run exactly.

A checkpoint is one ``torch.save`` dict::

    {"model", "optimizer", "scheduler", "scaler", "loss"}   # state_dicts (None where absent)
    {"rng": {"python", "numpy", "torch", "cuda"}}           # every random generator we use
    {"rng_ranks": [rng of rank 0, rank 1, ...]}             # only for runs of several processes
    {"sampler"}                                             # where the batch sampler resumes
    {"epoch", "step", "best", "config", "extra", "version"} # bookkeeping

It is written *atomically*: to a temporary file in the same directory, flushed to disk, then
``os.replace``-d onto its final name.  A run killed at any moment (even SIGKILL mid-write) leaves
either the previous checkpoints or the complete new one, never a torn file.  Files are named
``run_dir/checkpoints/step-00001234.pt``; :func:`latest_checkpoint` picks the highest step, and
only the newest ``keep`` are kept.

The files are pickles (optimiser and scheduler states hold Python objects): load only
checkpoints you wrote yourself (``load_checkpoint`` uses ``weights_only=False``).

When to write one mid-epoch: every ``checkpoint_every_steps`` steps, or by time with
:class:`TimedCheckpoints` (``checkpoint_every_minutes``), which every process of a run decides alike.
"""

from __future__ import annotations

import math
import os
import random
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["rng_states", "set_rng_states", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "read_checkpoint", "apply_checkpoint", "newest_loadable_checkpoint", "remove_stale_temporaries", "CorruptCheckpointError",
           "TimedCheckpoints"]

VERSION = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")
_TEMP = re.compile(r"^\.step-.*\.tmp$")  # what an interrupted save_checkpoint leaves behind
_REQUIRED = ("model", "rng", "epoch", "step")


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, empty, not a checkpoint)."""


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
    rank_rngs: list[dict[str, Any]] | None = None,
) -> Path:
    """Atomically write ``run_dir/checkpoints/step-<step>.pt``; delete all but the newest ``keep``.

    ``epoch`` / ``sampler_state`` describe where training *resumes*: the epoch in progress and
    the sampler's ``state_dict`` with the batches already consumed; ``extra`` holds anything
    else the loop needs to continue (running sums, history).  ``rank_rngs``: in a run of several
    processes, every rank's :func:`rng_states` (rank 0 writes the file for all).  Returns the file's path.
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
    if rank_rngs is not None:
        state["rng_ranks"] = list(rank_rngs)
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


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files interrupted :func:`save_checkpoint` calls left in ``run_dir/checkpoints``.

    Call it only while no other process writes checkpoints into ``run_dir`` (``fit`` does, at start).
    Returns the paths removed.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    stale = [p for p in ckpt_dir.iterdir() if _TEMP.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file into its dict; :class:`CorruptCheckpointError` if it is not a whole one."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)  # our own file: trusted
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, empty file, garbage bytes, unpickling errors
        raise CorruptCheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                                     "it is truncated or corrupt") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED):
        raise CorruptCheckpointError(f"checkpoint {path} is not a tcmlib checkpoint (keys {_REQUIRED} missing)")
    return ckpt


def newest_loadable_checkpoint(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
                               ) -> tuple[Path, dict[str, Any]] | None:
    """``(path, dict)`` of the newest checkpoint of ``run_dir`` that reads whole, or None when there is none.

    Unreadable newer files are skipped with a warning and renamed ``step-<n>.pt.corrupt`` (kept for
    inspection, ignored from then on).  Raises :class:`CorruptCheckpointError` when checkpoints exist
    but none of them reads.
    """
    found = _checkpoints(Path(run_dir) / "checkpoints")
    errors = []
    for path in reversed(found):
        try:
            ckpt = read_checkpoint(path, map_location)
        except CorruptCheckpointError as e:
            errors.append(str(e))
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)  # out of the way of latest_checkpoint and the rotation; kept for inspection
            warnings.warn(f"{e}; moved it to {aside.name} and falling back to an older checkpoint", stacklevel=2)
            continue
        return path, ckpt
    if errors:
        raise CorruptCheckpointError(f"no checkpoint of {run_dir} can be read: " + "; ".join(errors)
                                     + ". Delete the checkpoints directory to start the run afresh")
    return None


def apply_checkpoint(
    ckpt: dict[str, Any],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    loss: torch.nn.Module | None = None,
    restore_rng: bool = True,
    rank: int = 0,
) -> dict[str, Any]:
    """Load the states of a checkpoint dict (from :func:`read_checkpoint`) into the objects given; restore RNGs.

    ``rank``: in a run of several processes, restore that rank's generators (``rng_ranks``).
    """
    for obj, key in ((model, "model"), (optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler"),
                     (loss, "loss")):
        if obj is not None and ckpt.get(key) is not None:
            obj.load_state_dict(ckpt[key])
    if restore_rng:
        set_rng_states(ckpt["rng_ranks"][rank] if ckpt.get("rng_ranks") else ckpt["rng"])
    return ckpt


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
    A truncated or foreign file raises :class:`CorruptCheckpointError` (a ``ValueError``).
    """
    ckpt = read_checkpoint(path, map_location)
    return apply_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, loss=loss,
                            restore_rng=restore_rng)


def clock() -> float:
    """Seconds on a monotonic clock: what :class:`TimedCheckpoints` reads (tests put a fake one here)."""
    return time.monotonic()


class TimedCheckpoints:
    """When to checkpoint so that about ``minutes`` of training pass between checkpoints, the same step on every rank.

    Each rank reading its own clock would, sooner or later, see the time come one step apart from the
    others: one rank would enter the checkpoint's collective calls while another trains on, and the run
    would hang.  So the decision is a step number all ranks share.  :meth:`due` compares the step with
    it (no clock, no communication); only when that step is reached does rank 0 read its clock and one
    broadcast (``share``) hand every rank rank 0's number

        n = max(1, floor(T / r)),   r = (seconds since the window opened) / (steps since then),

    T = ``60 * minutes``.  The checkpoint is due when ``n <= steps since then`` (about T seconds have
    passed: within one step of it); otherwise the next decision is at the window's first step + n,
    when T will have passed at the rate seen so far.  The first decision comes ``probe_steps`` steps
    after :meth:`restart` (the first steps, slow with warm-up, only make it come earlier, never make a
    checkpoint early).  A window opens at :meth:`restart`: at the start of training and after every
    checkpoint, so neither a checkpoint's write nor the evaluation before an epoch-end checkpoint counts.
    A decision costs one broadcast, about once per checkpoint; steps in between cost nothing.

    Args:
        minutes: T in minutes (> 0).
        share: ``share(value)`` returns rank 0's ``value`` on every rank (``tcmlib.distributed.broadcast_object``);
            None in a single process.
        probe_steps: steps timed before the first decision.
    """

    def __init__(self, minutes: float, share: Callable[[int], int] | None = None, probe_steps: int = 3) -> None:
        if not (math.isfinite(minutes) and minutes > 0):
            raise ValueError(f"checkpoint_every_minutes must be a finite number > 0, got {minutes!r}")
        self.seconds = 60.0 * float(minutes)
        self.probe_steps = int(probe_steps)
        self._share = share
        self._clock = clock  # (read at construction: a test's fake clock is in place by then)
        self._t0, self._s0, self.due_step = 0.0, 0, 0

    def restart(self, step: int) -> None:
        """Open a window at ``step`` (start, resume, after any checkpoint); the first decision ``probe_steps`` on."""
        self._t0, self._s0 = self._clock(), int(step)
        self.due_step = self._s0 + self.probe_steps

    def due(self, step: int) -> bool:
        """Whether to checkpoint after ``step`` steps; every rank must call it at every step (the same answer)."""
        if step < self.due_step:
            return False
        done = step - self._s0  # >= probe_steps >= 1
        rate = max(self._clock() - self._t0, 1e-9) / done  # seconds per step in this window (rank 0's is shared)
        n = max(1, math.floor(self.seconds / rate))
        if self._share is not None:
            n = int(self._share(n))
        self.due_step = self._s0 + n
        return n <= done
