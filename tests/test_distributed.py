"""More than one process (gloo on CPU): training and evaluation equal the single-process results.

Ranks are spawned by the tests themselves (torch.multiprocessing, or torchrun for the SIGKILL test).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from tcmlib import distributed
from tcmlib.checkpoint import latest_checkpoint, read_checkpoint
from tcmlib.data import MPerClassBatchSampler
from tcmlib.data.arrays import ImageArrayDataset
from tcmlib.metrics import recall_and_map_at_r, utility_curves
from tcmlib.models import build_embedder
from tcmlib.train import evaluate_model, fit

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    distributed.shutdown()  # (torch < 2.8: a bare destroy could hang, see its docstring)


def _spawn(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined by a gloo group."""
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


# ---------------------------------------------------------------------------------------------
# sampler


def test_sampler_slices_concatenate_to_the_single_process_batches() -> None:
    labels = torch.arange(40) % 10
    one = MPerClassBatchSampler(labels, m=2, batch_size=12, seed=3)
    parts = [MPerClassBatchSampler(labels, m=2, batch_size=12, seed=3, num_replicas=3, rank=r)
             for r in range(3)]
    for s in [one, *parts]:
        s.set_epoch(1, start_batch=1)
    whole = list(one)
    sliced = [list(p) for p in parts]
    assert len(whole) >= 2
    for b, batch in enumerate(whole):
        assert sum((sliced[r][b] for r in range(3)), []) == batch
        assert all(len(sliced[r][b]) == 4 for r in range(3))
    with pytest.raises(ValueError, match="not divisible by the 5 processes"):
        MPerClassBatchSampler(labels, m=2, batch_size=12, num_replicas=5, rank=0)


# ---------------------------------------------------------------------------------------------
# evaluation


def _eval_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 2, 3, 5, 8, 13, 21, 9, 7, 4, 30, 11]  # uneven classes, one singleton
    y = torch.cat([torch.full((s,), c * 7) for c, s in enumerate(sizes)])  # sparse ids
    y = y[torch.randperm(len(y), generator=gen)]
    x = torch.randn(len(y), 6, generator=gen) + 0.8 * torch.randn(len(sizes) * 7, 6, generator=gen)[y]
    return x, y


def _eval_worker(rank: int, world: int, out: str) -> None:
    x, y = _eval_data()
    distributed.TILE_ROWS, distributed.TILE_COLS = 8, 16  # several tiles of rows and columns per shard
    lo, hi = distributed.shard_bounds(len(y), world, rank)
    recall, map_r = distributed.sharded_retrieval(x[lo:hi], y[lo:hi], (1, 2, 4, 8))
    curves = distributed.sharded_utility_curves(x[lo:hi], y[lo:hi], cols=16)  # several column tiles
    if rank == 0:
        torch.save({"recall": recall, "map_r": map_r, "curves": curves}, out)


def test_sharded_evaluation_equals_single_process(tmp_path: Path) -> None:
    out = tmp_path / "eval.pt"
    _spawn(_eval_worker, 3, str(out))  # odd world size: every shard pair is visited by one rank
    got = torch.load(out, weights_only=False)
    x, y = _eval_data()
    recall, map_r = recall_and_map_at_r(x, y, (1, 2, 4, 8))
    ref = utility_curves(x, y)
    assert got["recall"] == recall and got["map_r"] == pytest.approx(map_r, abs=1e-15)
    # thresholds: the far-range quantiles, against numpy on all negative distances (brute force)
    xn = torch.nn.functional.normalize(x.double(), dim=1).float()
    d = 1.0 - (xn @ xn.T).double().numpy()
    iu = np.triu_indices(len(y), 1)
    neg = (y[:, None] != y[None, :]).numpy()[iu]
    assert got["curves"].distance_range == tuple(np.quantile(d[iu][neg], [1e-2, 1e-1]))
    assert torch.equal(got["curves"].class_ids, ref.class_ids)
    for key in ("thresholds", "tar", "trr", "utility"):
        assert torch.allclose(getattr(got["curves"], key), getattr(ref, key), rtol=0, atol=1e-12), key
    assert got["curves"].opis == pytest.approx(ref.opis, abs=1e-15)
    assert got["curves"].eps_opis(0.1) == pytest.approx(ref.eps_opis(0.1), abs=1e-15)


def _tied_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Identical embeddings (one unit vector, exact cosines of 1), 10 random classes: ties everywhere."""
    gen = torch.Generator().manual_seed(11)
    y = torch.randint(0, 10, (230,), generator=gen)
    return torch.zeros(230, 5).index_fill_(1, torch.tensor([2]), 1.0), y


def _tied_worker(rank: int, world: int, out: str) -> None:
    x, y = _tied_data()
    distributed.TILE_ROWS, distributed.TILE_COLS = 16, 24  # ties across tile edges and shards
    lo, hi = distributed.shard_bounds(len(y), world, rank)
    recall, map_r = distributed.sharded_retrieval(x[lo:hi], y[lo:hi], (1, 2, 4, 8))
    if rank == 0:
        torch.save({"recall": recall, "map_r": map_r}, out)


def test_sharded_retrieval_ranks_ties_without_labels(tmp_path: Path) -> None:
    """Identical embeddings on 2 ranks: R@1 at chance, as the single-process retrieval and the brute force."""
    out = tmp_path / "tied.pt"
    _spawn(_tied_worker, 2, str(out))
    got = torch.load(out, weights_only=False)
    x, y = _tied_data()
    recall, map_r = recall_and_map_at_r(x, y, (1, 2, 4, 8))
    for k in (1, 2, 4, 8):
        assert got["recall"][k] == pytest.approx(recall[k], abs=1e-12), k
    assert got["map_r"] == pytest.approx(map_r, abs=1e-12)
    # chance: a random other sample shares the query's label with probability (n_c - 1) / (N - 1)
    n_c = torch.bincount(y)[y].double()
    valid = n_c > 1
    assert got["recall"][1] == pytest.approx(float(((n_c - 1) / (len(y) - 1))[valid].mean()), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# training: 2 processes on a global batch = 1 process on the same batch


def _images(n: int, classes: int, seed: int) -> ImageArrayDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    proto = torch.randint(0, 256, (classes, 16, 16), generator=gen)
    noise = torch.randint(-40, 40, (n, 16, 16), generator=gen)
    images = (proto[y] + noise).clamp(0, 255).to(torch.uint8)  # (n, 16, 16)
    return ImageArrayDataset(images, y, [str(c) for c in range(classes)])


def _fit_config(run_dir: Path, loss: str, chunk: int | None, amp: str | None = None) -> dict[str, Any]:
    return dict(dataset="glyphs", backbone="small_cnn", frozen_bn=True, image_size=16, dim=8, loss=loss,
                tcm=True, batch_size=16, m=4, epochs=1, steps_per_epoch=1, lr=1e-3, eval_ks=[1, 2],
                chunk_size=chunk, amp=amp, device="cpu", progress=False, run_dir=str(run_dir))


def _fit_worker(rank: int, world: int, configs: list[dict[str, Any]]) -> None:
    for cfg in configs:
        fit(cfg, train_data=_images(96, 12, 0), test_data=_images(40, 8, 1))


# direct step and a ranking loss; gradient cache and loss parameters (proxies); gradient cache under bf16
CASES = [("smooth_ap", None, None), ("arcface", 4, None), ("recall_surrogate", 4, "bf16")]


def test_two_process_training_step_equals_one_process(tmp_path: Path) -> None:
    _spawn(_fit_worker, 2, [_fit_config(tmp_path / f"two-{c[0]}", *c) for c in CASES])
    for loss, chunk, amp in CASES:
        one = fit(_fit_config(tmp_path / f"one-{loss}", loss, chunk, amp), train_data=_images(96, 12, 0),
                  test_data=_images(40, 8, 1))
        tol = 1e-5 if amp is None else 2e-2  # bf16: the slices' rounding differs from the whole batch's
        two = tmp_path / f"two-{loss}"
        rec = [json.loads(s) for s in (two / "metrics.jsonl").read_text().splitlines()]
        assert len(rec) == 1 and rec[0]["world_size"] == 2
        assert "# world_size: 2" in (two / "config.yaml").read_text()
        for key in ("loss", "loss_base", "loss_tcm"):
            assert rec[0][key] == pytest.approx(one.final[key], rel=tol / 10), (loss, key)
        a = read_checkpoint(latest_checkpoint(one.run_dir))  # type: ignore[arg-type]
        b = read_checkpoint(latest_checkpoint(two))  # type: ignore[arg-type]
        assert len(b["rng_ranks"]) == 2
        # after one Adam step, exp_avg = (1 - beta1) * gradient: every parameter's gradient (model and loss)
        for i, state in a["optimizer"]["state"].items():
            g1, g2 = state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"]
            assert float((g1 - g2).abs().max()) <= tol * float(g1.abs().max()) + 1e-12, (loss, i)
        for part in ("model", "loss") if amp is None else ():  # the updated weights
            for k, v in a[part].items():
                assert torch.allclose(b[part][k], v, rtol=1e-6, atol=1e-7), (loss, part, k)
        # the sharded evaluation in the 2-process run = the single-process evaluation of its weights
        model = build_embedder("small_cnn", 8, False, 1, image_size=16, frozen_bn=True)
        model.load_state_dict(b["model"])
        for key, value in evaluate_model(model, _images(40, 8, 1), ks=[1, 2], amp=amp).items():
            assert rec[0][key] == pytest.approx(value, rel=0, abs=1e-12), (loss, key)


# ---------------------------------------------------------------------------------------------
# SIGKILL of one rank, then resume


OVERRIDES = ["epochs=2", "steps_per_epoch=3", "batch_size=16", "dim=16", "checkpoint_every_steps=2",
             "deterministic=true", "num_workers=0", "progress=false", "eval_ks=[1,2]", "device=cpu"]


def _torchrun(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "tcmlib.train", "--config", "glyphs_tiny", *extra,
            "--override", f"run_dir={run_dir}", *OVERRIDES]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _rank_pid(agent: int, rank: int) -> int:
    """The pid of torchrun worker ``rank`` (a child of the agent process ``agent``)."""
    for _ in range(100):
        for task in Path(f"/proc/{agent}/task").iterdir():
            for child in (task / "children").read_text().split():
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in env:
                    return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under torchrun pid {agent}")


def _metrics(run_dir: Path) -> list[dict]:
    recs = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in recs]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank's pid through /proc")
def test_sigkill_of_one_rank_then_resume_is_exact(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = subprocess.run(_torchrun(full), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=240)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen(_torchrun(killed), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=_env(), cwd=ROOT, start_new_session=True)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("checkpoint step 2 "):  # mid epoch 1
                break
        else:
            pytest.fail("the run ended without writing the step-2 checkpoint")
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)  # rank 1 dies; torchrun then stops rank 0 and fails
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert read_checkpoint(latest_checkpoint(killed))["step"] < 6  # type: ignore[arg-type]

    res = subprocess.run(_torchrun(killed, "--resume"), capture_output=True, text=True, env=_env(), cwd=ROOT,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _metrics(killed) == _metrics(full)
    a, b = (read_checkpoint(latest_checkpoint(d)) for d in (full, killed))  # type: ignore[arg-type]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---------------------------------------------------------------------------------------------
# the same run on any number of processes and workers

def _launch(run_dir: Path, procs: int, *extra: str) -> list[str]:
    """``tcmlib.train`` on the tiny config: one process, or ``procs`` under torchrun."""
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
            if procs > 1 else [sys.executable])
    return [*head, "-m", "tcmlib.train", "--config", "glyphs_tiny", "--override", f"run_dir={run_dir}",
            "batch_size=48", "progress=false", "device=cpu", *extra]


def test_one_step_is_the_single_process_step_on_2_and_3_processes(tmp_path: Path) -> None:
    """Step 1 through ``fit``: same images (seeded per sample), BatchNorm over the global batch, so the
    gradient (Adam's first moment = 0.1 g) and BatchNorm's running statistics equal one process's to
    float32 rounding.  (Per-rank augmentation or per-rank BatchNorm statistics change both by far more.)"""
    states = {}
    for procs in (1, 2, 3):
        run = tmp_path / f"p{procs}"
        res = subprocess.run(_launch(run, procs, "epochs=1", "steps_per_epoch=1", "eval_ks=[1]"),
                             capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
        states[procs] = read_checkpoint(latest_checkpoint(run))  # type: ignore[arg-type]
    one = states[1]
    for procs in (2, 3):
        other = states[procs]
        for i, s in one["optimizer"]["state"].items():
            g1, g2 = s["exp_avg"], other["optimizer"]["state"][i]["exp_avg"]
            assert (g1 - g2).abs().max() <= 1e-3 * g1.abs().max(), (procs, i)
        for k, v in one["model"].items():
            if "running" in k:
                assert torch.allclose(v, other["model"][k], rtol=1e-5, atol=1e-6), (procs, k)


def test_dataloader_workers_do_not_change_a_run(tmp_path: Path) -> None:
    """0 or 2 DataLoader workers: every image is drawn from its own seeded generator, so the run is bit-identical."""
    out = {}
    for workers in (0, 2):
        res = subprocess.run(_launch(tmp_path / f"w{workers}", 1, f"num_workers={workers}", "steps_per_epoch=3"),
                             capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
        out[workers] = _metrics(tmp_path / f"w{workers}")
    assert out[0] == out[2]


def test_global_batchnorm_equals_batchnorm_over_the_whole_batch() -> None:
    """Two ranks with half the batch each: output, input gradient and running statistics of the whole batch."""
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    ref = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    xr = x.clone().requires_grad_(True)
    (ref(xr) * torch.arange(8.0, dtype=torch.float64).view(8, 1, 1, 1)).pow(2).sum().backward()
    state = {k: v.clone() for k, v in ref.state_dict().items()}  # after one training forward
    state["weight"], state["bias"] = ref.weight.detach().clone(), ref.bias.detach().clone()
    _spawn(_check_global_bn, 2, x, state, xr.grad)


def _check_global_bn(rank: int, world: int, x: torch.Tensor, state: dict, grad: torch.Tensor) -> None:
    bn = distributed.sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))[0].double()
    assert isinstance(bn, distributed.GlobalBatchNorm)
    with torch.no_grad():
        bn.weight.copy_(state["weight"])
        bn.bias.copy_(state["bias"])
    rows = slice(4 * rank, 4 * rank + 4)
    xs = x[rows].clone().requires_grad_(True)
    y = bn(xs)
    # the loss of the whole batch, as each rank's copy of it sees its own rows (the rest enter through the stats)
    (y * torch.arange(8.0, dtype=torch.float64)[rows].view(4, 1, 1, 1)).pow(2).sum().backward()
    torch.testing.assert_close(xs.grad, grad[rows])
    torch.testing.assert_close(bn.running_mean, state["running_mean"])
    torch.testing.assert_close(bn.running_var, state["running_var"])
