"""A run killed by a real SIGKILL mid-epoch and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tcmlib.checkpoint import latest_checkpoint, load_checkpoint, rng_states, save_checkpoint, set_rng_states

ROOT = Path(__file__).resolve().parents[1]
TINY = "glyphs_tiny"  # a config that ships with tcmlib, loaded by name
# 2 epochs x 6 steps of 16 images, a checkpoint every 2 steps, deterministic kernels, no workers
OVERRIDES = ["epochs=2", "steps_per_epoch=6", "batch_size=16", "dim=16", "checkpoint_every_steps=2",
             "deterministic=true", "num_workers=0", "progress=false", "eval_ks=[1,2]"]
TIME_KEYS = ("train_time_s", "eval_time_s")


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tcmlib.train", "--config", TINY, *extra,
            "--override", f"run_dir={run_dir}", *OVERRIDES]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _metrics(run_dir: Path) -> list[dict]:
    recs = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in recs]


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = subprocess.run(_cmd(full), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=240)
    assert ref.returncode == 0, ref.stderr[-2000:]

    # start the same run, wait for the step-4 checkpoint (mid epoch 1), then SIGKILL it
    proc = subprocess.Popen(_cmd(killed), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=_env(), cwd=ROOT)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("checkpoint step 4 "):
                break
        else:
            pytest.fail("the run ended without writing the step-4 checkpoint")
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpt = latest_checkpoint(killed)
    assert ckpt is not None
    state = load_checkpoint(ckpt, restore_rng=False)
    assert state["epoch"] == 0 and 0 < state["sampler"]["start_batch"] < 6  # really mid epoch 1
    assert not (killed / "metrics.jsonl").exists() or len(_metrics(killed)) == 0

    res = subprocess.run(_cmd(killed, "--resume"), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout

    a = load_checkpoint(latest_checkpoint(full), restore_rng=False)
    b = load_checkpoint(latest_checkpoint(killed), restore_rng=False)
    assert a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert _metrics(full) == _metrics(killed)  # losses, R@k, MAP@R, OPIS, eps-OPIS: equal floats
    assert len(_metrics(full)) == 2


def test_atomic_save_latest_and_keep(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".step-junk.tmp").write_bytes(b"torn write")  # a killed writer's leftover
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 10, 20):
        save_checkpoint(tmp_path, model=model, step=step, epoch=0, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert names == ["step-00000010.pt", "step-00000020.pt"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000020.pt"


def test_rng_states_round_trip(tmp_path: Path) -> None:
    def draws() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    model = torch.nn.Linear(2, 2)
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    saved = rng_states()
    path = save_checkpoint(tmp_path, model=model, step=1, epoch=0)
    first = draws()
    random.seed(99); np.random.seed(99); torch.manual_seed(99)
    load_checkpoint(path)  # restores the generators as they were when saved
    assert draws() == first
    set_rng_states(saved)
    assert draws() == first
