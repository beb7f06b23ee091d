"""pytorch-metric-learning's own distributed test pattern, with tcmlib's losses inside.

The pattern of pml's ``tests/utils/test_distributed.py``: two gloo processes started by
``torch.multiprocessing.spawn``, a ``DistributedDataParallel`` toy model, the loss in pml's
``DistributedLossWrapper`` (and the miner in ``DistributedMinerWrapper``), a few SGD steps on each
rank's half of every batch; the oracle is one process training a copy of the model on the whole
batch with the unwrapped loss (for ``efficient=True``, pml's oracle: the sum over ranks of each
rank's rows against the whole batch, the other ranks' rows detached).  The losses go to the
processes by pickling, as in pml's test, so ``as_pml_loss``'s wrapper must pickle.

Cases: TCM alone (all pairs; a miner's pairs with ``labels=None``, pml's
``pass_labels_to_loss_fn=False``; a reference set; ``efficient=True`` with and without a miner),
and a base loss + TCM (pml's ``ContrastiveLoss`` with a miner, tcmlib's Smooth-AP).  Float64
throughout, so the weights agree to rounding (pml's own test allows rtol 1e-2).  One spawn runs
every case in one process group, which ``tcmlib.distributed.shutdown`` tears down.
"""

from __future__ import annotations

import datetime
import socket
import time
from typing import Any

import pytest
import torch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

from pytorch_metric_learning.losses import ContrastiveLoss  # noqa: E402
from pytorch_metric_learning.miners import PairMarginMiner  # noqa: E402
from pytorch_metric_learning.utils import distributed as pml_dist  # noqa: E402

from tcmlib.losses import SmoothAPLoss, TCMLoss, WithTCM, as_pml_loss  # noqa: E402

WORLD, BATCH, ITERATIONS, LR = 2, 12, 6, 0.1  # BATCH rows per rank and step
DTYPE = torch.float64


class ToyMpModel(torch.nn.Module):
    """pml's test model: 10 -> 10 -> ReLU -> 5."""

    def __init__(self) -> None:
        super().__init__()
        self.net1 = torch.nn.Linear(10, 10)
        self.relu = torch.nn.ReLU()
        self.net2 = torch.nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(self.relu(self.net1(x)))


def _cases() -> list[dict[str, Any]]:
    """Each case: the loss (already wrapped for pml), the miner or None, and pml's test switches."""
    miner = lambda: PairMarginMiner(pos_margin=0.5, neg_margin=0.5)  # noqa: E731
    tcm = lambda: as_pml_loss(TCMLoss(margin_pos=0.8, margin_neg=0.2))  # noqa: E731
    return [
        dict(name="tcm", loss=tcm(), miner=None, efficient=False, labels=True, ref=False),
        dict(name="tcm, miner, labels=None", loss=tcm(), miner=miner(), efficient=False, labels=False,
             ref=False),
        dict(name="tcm, reference set", loss=tcm(), miner=None, efficient=False, labels=True, ref=True),
        dict(name="tcm, efficient", loss=tcm(), miner=None, efficient=True, labels=True, ref=False),
        dict(name="tcm, efficient, miner, labels=None", loss=tcm(), miner=miner(), efficient=True,
             labels=False, ref=False),
        dict(name="contrastive + tcm, miner", loss=as_pml_loss(WithTCM(ContrastiveLoss(), margin_neg=0.2)),
             miner=miner(), efficient=False, labels=True, ref=False),
        dict(name="smooth-ap + tcm",
             loss=as_pml_loss(WithTCM(SmoothAPLoss(temperature=0.05), margin_neg=0.2)), miner=None,
             efficient=False, labels=True, ref=False),
    ]


def _data(seed: int) -> dict[str, list[list[torch.Tensor]]]:
    """inputs[step][rank] (BATCH, 10) and labels[step][rank] (BATCH,) in 3 classes, and a reference set."""
    g = torch.Generator().manual_seed(seed)
    x = lambda: [[torch.randn(BATCH, 10, generator=g, dtype=DTYPE) for _ in range(WORLD)]  # noqa: E731
                 for _ in range(ITERATIONS)]
    y = lambda: [[torch.randint(0, 3, (BATCH,), generator=g) for _ in range(WORLD)]  # noqa: E731
                 for _ in range(ITERATIONS)]
    return dict(inputs=x(), labels=y(), ref_inputs=x(), ref_labels=y())


def _efficient_batch(all_x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pml's ``create_efficient_batch``: rank r's rows, and them followed by the others' rows detached."""
    s, e = r * BATCH, (r + 1) * BATCH
    curr = all_x[s:e]
    return curr, torch.cat([curr, torch.cat([all_x[:s], all_x[e:]]).detach()])


def _one_process(case: dict[str, Any], state: dict[str, torch.Tensor], data: dict[str, Any]
                 ) -> tuple[dict[str, torch.Tensor], list[list[float]]]:
    """The oracle: one model trained on the whole batch.  Returns its weights and, per step, the loss
    each rank should report (DistributedLossWrapper returns world size x the loss)."""
    model = ToyMpModel().to(DTYPE)
    model.load_state_dict(state)
    loss_fn, miner = case["loss"], case["miner"]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    expected = []
    for i in range(ITERATIONS):
        opt.zero_grad()
        out, lab = model(torch.cat(data["inputs"][i])), torch.cat(data["labels"][i])
        ref, ref_lab = None, None
        if case["ref"]:
            ref, ref_lab = model(torch.cat(data["ref_inputs"][i])), torch.cat(data["ref_labels"][i])
        if case["efficient"]:
            losses = []
            for r in range(WORLD):
                curr, others = _efficient_batch(out, r)
                curr_lab, other_lab = lab[r * BATCH:(r + 1) * BATCH], torch.cat(
                    [lab[r * BATCH:(r + 1) * BATCH], lab[:r * BATCH], lab[(r + 1) * BATCH:]])
                if miner is not None:
                    idx = pml_dist.get_indices_tuple(curr_lab, other_lab, curr, others, miner)
                else:
                    idx = pml_dist.get_indices_tuple(curr_lab, other_lab)
                losses.append(loss_fn(curr, curr_lab, idx, others, other_lab))
            loss = sum(losses)
            expected.append([WORLD * v.item() for v in losses])
        else:
            idx = None if miner is None else miner(out, lab, ref, ref_lab)
            loss = loss_fn(out, lab, idx, ref, ref_lab)
            expected.append([WORLD * loss.item()] * WORLD)
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, expected


def _worker(rank: int, port: int, cases: list[dict[str, Any]], state: dict[str, torch.Tensor],
            data: dict[str, Any], out_dir: str) -> None:
    """One rank of pml's ``single_process_function``, for every case in turn."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tcmlib import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for case in cases:
            model = ToyMpModel().to(DTYPE)
            model.load_state_dict(state)
            ddp = DDP(model)
            loss_fn = pml_dist.DistributedLossWrapper(case["loss"], efficient=case["efficient"])
            miner = case["miner"]
            if miner is not None:
                miner = pml_dist.DistributedMinerWrapper(miner, efficient=case["efficient"])
            opt = torch.optim.SGD(ddp.parameters(), lr=LR)
            losses = []
            for i in range(ITERATIONS):
                opt.zero_grad()
                out, lab = ddp(data["inputs"][i][rank]), data["labels"][i][rank]
                ref, ref_lab = None, None
                if case["ref"]:
                    ref, ref_lab = ddp(data["ref_inputs"][i][rank]), data["ref_labels"][i][rank]
                idx = None if miner is None else miner(out, lab, ref, ref_lab)
                if case["labels"]:
                    loss = loss_fn(out, lab, idx, ref, ref_lab)
                else:  # pml's pass_labels_to_loss_fn=False
                    loss = loss_fn(out, indices_tuple=idx, ref_emb=ref)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            results[case["name"]] = {"state": model.state_dict(), "losses": losses}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other rank may be gone
        raise
    distributed.shutdown()  # barrier, then destroy (a bare gloo destroy could hang before torch 2.8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: tuple[Any, ...], deadline_s: float = 120.0) -> None:
    """``mp.spawn`` of ``_worker`` on WORLD processes, killed (and the test failed) past the deadline."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(_worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {WORLD} processes did not finish within {deadline_s:.0f} s")


@pytest.mark.slow
def test_two_processes_train_as_one_process_on_the_whole_batch(tmp_path):
    torch.manual_seed(75210)  # pml's seed: the toy model's initial weights
    state = {k: v.clone() for k, v in ToyMpModel().to(DTYPE).state_dict().items()}
    data = _data(25)
    cases = _cases()
    oracle = {c["name"]: _one_process(c, state, data) for c in _cases()}  # fresh losses for the oracle
    _spawn((_free_port(), cases, state, data, str(tmp_path)))
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for case in cases:
        name = case["name"]
        want_state, want_losses = oracle[name]
        assert all(v > 0 for row in want_losses for v in row), f"{name}: a step with zero loss tests nothing"
        moved = any(not torch.allclose(want_state[k], state[k]) for k in state)
        assert moved, f"{name}: the weights did not move"
        for r in range(WORLD):
            res = got[r][name]
            for k in state:
                torch.testing.assert_close(res["state"][k], want_state[k], rtol=1e-9, atol=1e-12,
                                           msg=lambda m, k=k, r=r, name=name: f"{name}, rank {r}, {k}: {m}")
            torch.testing.assert_close(torch.tensor(res["losses"], dtype=DTYPE),
                                       torch.tensor([row[r] for row in want_losses], dtype=DTYPE),
                                       rtol=1e-9, atol=1e-12)
