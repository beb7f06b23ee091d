"""Checkpoints by time (``checkpoint_every_minutes``): the decision rule by hand, the steps ``fit`` saves at
under a clock that advances with the images read, a resume from a timed checkpoint that is exact, and two
processes whose clocks disagree taking rank 0's decisions (otherwise the checkpoint's collectives would
pair with different steps and the run would hang or fail)."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

import tcmlib.checkpoint
import tcmlib.train
from tcmlib import distributed
from tcmlib.checkpoint import TimedCheckpoints, latest_checkpoint, read_checkpoint
from tcmlib.data.arrays import ImageArrayDataset
from tcmlib.train import TrainConfig, fit, load_config


class Clock:
    """A fake clock: the time is whatever the test sets; counts how often it is read."""

    def __init__(self) -> None:
        self.now, self.reads = 0.0, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def test_decision_rule_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(tcmlib.checkpoint, "clock", clock)
    timed = TimedCheckpoints(10.0)  # T = 600 s
    timed.restart(0)  # t = 0
    # steps 1, 2: before the probe's end nothing is read
    assert [timed.due(s) for s in (1, 2)] == [False, False] and clock.reads == 1
    # a slow warm-up: 3 steps in 100 s, 33.3 s a step -> n = floor(600 / 33.3) = 18: decide again at step 18
    clock.now = 100.0
    assert not timed.due(3) and timed.due_step == 18
    assert not any(timed.due(s) for s in range(4, 18)) and clock.reads == 2  # no clock read in between
    # then 10 s a step: step 18 at t = 250 -> 250 / 18 = 13.9 s a step, n = 43
    clock.now = 250.0
    assert not timed.due(18) and timed.due_step == 43
    clock.now = 500.0  # step 43: 500 / 43 = 11.63 s a step, n = floor(51.6) = 51
    assert not timed.due(43) and timed.due_step == 51
    clock.now = 580.0  # step 51: 580 / 51 = 11.37, n = floor(52.76) = 52
    assert not timed.due(51) and timed.due_step == 52
    clock.now = 590.0  # step 52: 590 / 52 = 11.346, n = floor(52.88) = 52 <= 52 steps done: save
    assert timed.due(52)  # 590 s: within one step (10 s) of the 600 s asked for, and not before
    assert clock.reads == 6  # one read per decision, 5 decisions for 52 steps
    # after the checkpoint a new window opens: the next decision is 3 steps on
    clock.now = 600.0
    timed.restart(52)
    assert timed.due_step == 55 and not timed.due(54)


def test_rank_zero_number_decides() -> None:
    timed = TimedCheckpoints(1.0, share=lambda n: 2)  # whatever this rank measures, rank 0 says n = 2
    timed.restart(0)
    assert timed.due(3)  # 2 <= 3 steps: save, though this rank's own clock says 60 s have not passed
    timed.restart(10)
    timed = TimedCheckpoints(1.0, share=lambda n: 1000)
    timed.restart(0)
    assert not timed.due(3) and timed.due_step == 1000


@pytest.mark.parametrize("minutes", [0, -1, float("nan"), float("inf")])
def test_bad_minutes_are_refused(minutes: float) -> None:
    with pytest.raises(ValueError, match="checkpoint_every_minutes"):
        TrainConfig(checkpoint_every_minutes=minutes).validate()
    with pytest.raises(ValueError, match="checkpoint_every_minutes"):
        TimedCheckpoints(minutes)


def test_minutes_are_read_from_yaml_and_overrides() -> None:
    assert load_config("glyphs_tiny", ["checkpoint_every_minutes=2.5"]).checkpoint_every_minutes == 2.5
    assert load_config("glyphs_tiny", ["checkpoint_every_minutes=1e1"]).checkpoint_every_minutes == 10.0
    with pytest.raises(ValueError, match="checkpoint_every_minutes.*must be a number"):
        load_config("glyphs_tiny", ["checkpoint_every_minutes=[1]"])
    assert load_config("sop_resnet50_smooth_ap").checkpoint_every_minutes == 10.0
    assert load_config("sop_resnet50_smooth_ap").checkpoint_every_steps == 0


# ---------------------------------------------------------------------------------------------
# fit: time passes as images are read (one second an image)


class TimedImages(Dataset):
    """Random 16x16 grey images of 12 classes; reading one advances ``clock`` by ``seconds`` (training takes time)."""

    def __init__(self, clock: Clock, seconds: float, n: int = 192, classes: int = 12, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % classes
        proto = torch.randint(0, 256, (classes, 16, 16), generator=gen)
        noise = torch.randint(-40, 40, (n, 16, 16), generator=gen)
        self.data = ImageArrayDataset((proto[y] + noise).clamp(0, 255).to(torch.uint8), y,
                                      [str(c) for c in range(classes)])
        self.labels = self.data.labels
        self.clock, self.seconds = clock, seconds

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        self.clock.now += self.seconds
        return self.data[i]


def _config(run_dir: Path, minutes: float | None, **kw: Any) -> TrainConfig:
    return TrainConfig(**{**dict(dataset="glyphs", backbone="small_cnn", image_size=16, dim=8, loss="smooth_ap",
                                 tcm=True, batch_size=16, m=4, epochs=2, steps_per_epoch=10, lr=1e-3, eval_ks=[1, 2],
                                 deterministic=True, device="cpu", progress=False, run_dir=str(run_dir),
                                 checkpoint_every_minutes=minutes), **kw})


def _record_saves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The steps ``fit`` writes checkpoints at (and every file kept)."""
    steps: list[int] = []
    save = tcmlib.train.save_checkpoint

    def recording(run_dir: Any, **kw: Any) -> Path:
        steps.append(kw["step"])
        return save(run_dir, **{**kw, "keep": 0})

    monkeypatch.setattr(tcmlib.train, "save_checkpoint", recording)
    return steps


def _numbers(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in rec.items() if not k.endswith("time_s")} for rec in history]


def _fit(cfg: TrainConfig, clock: Clock, resume: bool = False) -> tcmlib.train.FitResult:
    test = TimedImages(Clock(), 0.0, n=40, classes=8, seed=1)  # evaluation: not on the training clock
    return fit(cfg, resume=resume, train_data=TimedImages(clock, 1.0), test_data=test)


def test_fit_saves_every_two_minutes_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(tcmlib.checkpoint, "clock", clock)
    saves = _record_saves(monkeypatch)
    # 16 images a step = 16 s a step; T = 120 s -> n = floor(120 / 16) = 7: a checkpoint 7 steps after each
    # window opens (112 s <= 120 s < 128 s), then the epoch-end one at step 10 (epoch 2: 17 and 20)
    timed = _fit(_config(tmp_path / "timed", 2.0), clock)
    assert saves == [7, 10, 17, 20]
    saves.clear()
    plain = _fit(_config(tmp_path / "plain", None), clock)
    assert saves == [10, 20]
    # when a run saves does not change what it computes
    a, b = (read_checkpoint(latest_checkpoint(r.run_dir)) for r in (plain, timed))  # type: ignore[arg-type]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _numbers(timed.history) == _numbers(plain.history)

    # a run stopped after its mid-epoch-2 timed checkpoint (step 17) resumes to the same end, bit for bit
    resumed = tmp_path / "resumed"
    shutil.copytree(timed.run_dir, resumed)
    for path in (resumed / "checkpoints").iterdir():
        if path.name != "step-00000017.pt":
            path.unlink()
    ckpt = read_checkpoint(resumed / "checkpoints" / "step-00000017.pt")
    assert ckpt["epoch"] == 1 and ckpt["sampler"]["start_batch"] == 7  # really mid epoch 2
    saves.clear()
    again = _fit(_config(resumed, 2.0), clock, resume=True)
    assert saves == [20]  # 3 steps left: the probe would decide at step 20, the epoch's end saves there anyway
    c = read_checkpoint(latest_checkpoint(again.run_dir))  # type: ignore[arg-type]
    for k in a["model"]:
        assert torch.equal(a["model"][k], c["model"][k]), k
    for sa, sc in zip(a["optimizer"]["state"].values(), c["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert _numbers(again.history) == _numbers(plain.history)  # losses, R@k, MAP@R, OPIS: equal floats


def test_steps_and_minutes_together_save_at_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(tcmlib.checkpoint, "clock", clock)
    saves = _record_saves(monkeypatch)
    # every 4 steps (4, 8) and by time: the window opens at 0, 4 and 8, never reaching 7 steps; epoch end 10
    _fit(_config(tmp_path / "both", 2.0, epochs=1, checkpoint_every_steps=4), clock)
    assert saves == [4, 8, 10]
    saves.clear()
    # 1 minute: n = floor(60 / 16) = 3 -> decided at the probe's end, step 3; then 6, 9; epoch end 10
    _fit(_config(tmp_path / "minute", 1.0, epochs=1), clock)
    assert saves == [3, 6, 9, 10]


# ---------------------------------------------------------------------------------------------
# two processes whose clocks disagree


def _worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a short timeout: ranks that disagree would fail here rather than hang the test suite
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    clock = Clock()
    tcmlib.checkpoint.clock = clock  # (this process only)
    decisions: list[tuple[int, bool]] = []
    due = TimedCheckpoints.due

    def recording(self: TimedCheckpoints, step: int) -> bool:
        decides = step >= self.due_step  # (the steps before only compare numbers)
        answer = due(self, step)
        if decides:
            decisions.append((step, answer))
        return answer

    TimedCheckpoints.due = recording  # type: ignore[method-assign]
    saves: list[int] = []
    save = tcmlib.train.save_checkpoint
    tcmlib.train.save_checkpoint = lambda d, **kw: (saves.append(kw["step"]), save(d, **kw))[1]  # type: ignore
    try:
        # rank 0 reads its 8 images of a step in 8 s, rank 1 in 40 s (5 s an image)
        train = TimedImages(clock, 1.0 if rank == 0 else 5.0)
        fit(_config(Path(run_dir), 1.0, epochs=1), train_data=train, test_data=TimedImages(Clock(), 0.0, 40, 8, 1))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"decisions": decisions, "saves": saves}))
    finally:
        distributed.shutdown()


def test_two_processes_take_rank_zero_decisions(tmp_path: Path) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(_worker, args=(2, port, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # rank 0: 8 s a step, T = 60 s -> n = floor(60 / 8) = 7: probe at 3 (no), save at 7 (56 s), epoch end 10.
    # Rank 1 alone (40 s a step) would have saved at step 3 (n = 1).
    assert r0["decisions"] == [[3, False], [7, True]] == r1["decisions"]
    assert r0["saves"] == [7, 10] and r1["saves"] == []  # rank 0 writes
    assert read_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 10  # type: ignore[arg-type]


def test_minutes_are_not_part_of_a_run_key_and_may_change_on_resume() -> None:
    from tcmlib.experiments import config_key
    from tcmlib.train import RESUME_SAFE_FIELDS
    base = load_config("glyphs_tiny")
    assert config_key(base) == config_key(load_config("glyphs_tiny", ["checkpoint_every_minutes=5"]))
    assert config_key(base) != config_key(load_config("glyphs_tiny", ["seed=1"]))  # (a field that counts does)
    assert "checkpoint_every_minutes" in RESUME_SAFE_FIELDS
