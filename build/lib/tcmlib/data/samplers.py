"""M-per-class batches: every batch holds ``batch_size / m`` distinct classes with ``m`` samples each.

:class:`MPerClassBatchSampler` is a ``batch_sampler`` for ``torch.utils.data.DataLoader``:

* One epoch covers every sample about once: each class's samples are shuffled and cut into
  chunks of ``m``; a last short chunk is filled up with other samples of the same class
  (a class with fewer than ``m`` samples repeats some).  The chunks of each class are spread
  evenly over the epoch, then packed into batches of distinct classes.
* Deterministic: epoch ``e`` depends only on ``(seed, e)``, never on global random state.
* Resumable: ``set_epoch(e, start_batch=b)`` makes the next iteration yield batches ``b, b+1,
  ...`` of epoch ``e``, exactly those an uninterrupted run would have produced.

Resuming after a crash (the training loop counts what it *consumed*; with ``num_workers > 0``
the DataLoader asks the sampler for batches ahead of time, so the sampler's own count runs ahead)::

    sampler = MPerClassBatchSampler(labels, m=4, batch_size=128, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    for epoch in range(ckpt["epoch"], n_epochs):
        start = ckpt["batch"] if epoch == ckpt["epoch"] else 0
        sampler.set_epoch(epoch, start_batch=start)
        for step, (x, y) in enumerate(loader, start=start):
            ...  # train; save {"epoch": epoch, "batch": step + 1} (batch == len(epoch) is fine)

``state_dict()`` / ``load_state_dict()`` hold the same two numbers; ``state_dict(batches_done=k)``
records an explicit position.  Without ``set_epoch``, the epoch advances by one after each
complete pass.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["MPerClassBatchSampler"]


class MPerClassBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size // m`` distinct classes x ``m`` samples, deterministic and resumable.

    Args:
        labels: class of each sample, shape (N,) (tensor, array or list of ints).
        m: samples per class in a batch.
        batch_size: must be a multiple of ``m``; ``batch_size // m`` classes per batch.
        seed: epoch ``e`` is a function of ``(seed, e)`` only.
        drop_last: drop the chunks left over at the end of an epoch when they cannot fill a
            batch of distinct classes (default).  With ``False`` they are yielded in final
            batches of up to ``batch_size`` (classes may repeat there).
    """

    def __init__(self, labels: Sequence[int] | np.ndarray | torch.Tensor, m: int, batch_size: int, *,
                 seed: int = 0, drop_last: bool = True) -> None:
        y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if y.ndim != 1 or y.size == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {y.shape}")
        if m < 1 or batch_size < 1:
            raise ValueError(f"m and batch_size must be >= 1, got m={m}, batch_size={batch_size}")
        if batch_size % m:
            raise ValueError(f"batch_size={batch_size} is not divisible by m={m}; use a multiple of m")
        classes, inverse = np.unique(y, return_inverse=True)
        self.classes_per_batch = batch_size // m
        if len(classes) < self.classes_per_batch:
            raise ValueError(
                f"batch_size={batch_size}, m={m}: needs {self.classes_per_batch} distinct classes a batch, "
                f"but labels hold only {len(classes)} classes; lower batch_size or raise m"
            )
        self.m, self.batch_size, self.seed, self.drop_last = int(m), int(batch_size), int(seed), drop_last
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))[:-1]
        self.class_indices = np.split(order, bounds)  # per class: its sample indices
        self.n_small_classes = int(sum(len(ix) < m for ix in self.class_indices))  # padded with repeats
        self.epoch = 0
        self.start_batch = 0
        self._yielded = 0  # batches of the current epoch handed out, counting from batch 0
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None

    def plan(self, epoch: int) -> list[np.ndarray]:
        """All batches of ``epoch``, each an int64 array (batch_size,) (shorter only in a last batch)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        chunks: list[np.ndarray] = []
        chunk_class: list[int] = []
        keys: list[np.ndarray] = []
        for c, ix in enumerate(self.class_indices):
            ix = rng.permutation(ix)
            n_chunks = -(-len(ix) // self.m)
            short = n_chunks * self.m - len(ix)
            if short:  # fill the last chunk with other samples of the class (with repeats if it is small)
                ix = np.concatenate([ix, rng.choice(ix, size=short, replace=short > len(ix))])
            chunks.extend(ix.reshape(n_chunks, self.m))
            chunk_class.extend([c] * n_chunks)
            # spread the class's chunks evenly over the epoch: keys (j + u) / n_chunks, u ~ U(0, 1)
            keys.append((np.arange(n_chunks) + rng.uniform()) / n_chunks)
        order = np.argsort(np.concatenate(keys), kind="stable")
        queue = deque(order.tolist())
        k, batches = self.classes_per_batch, []
        while len(queue) >= k:
            picked: list[int] = []
            used: set[int] = set()
            deferred: list[int] = []
            while queue and len(picked) < k:
                j = queue.popleft()
                if chunk_class[j] in used:
                    deferred.append(j)
                else:
                    picked.append(j)
                    used.add(chunk_class[j])
            queue.extendleft(reversed(deferred))
            if len(picked) < k:  # too few distinct classes left
                queue.extendleft(reversed(picked))
                break
            batches.append(np.concatenate([chunks[j] for j in picked]).astype(np.int64))
        if not self.drop_last and queue:
            rest = list(queue)
            for i in range(0, len(rest), k):
                batches.append(np.concatenate([chunks[j] for j in rest[i: i + k]]).astype(np.int64))
        self._plan_cache = (epoch, batches)
        return batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields batches ``start_batch, start_batch + 1, ...`` of ``epoch``."""
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"epoch and start_batch must be >= 0, got {epoch}, {start_batch}")
        self.epoch, self.start_batch, self._yielded = int(epoch), int(start_batch), int(start_batch)

    def __len__(self) -> int:
        """Batches the next iteration yields (those of the current epoch from ``start_batch`` on)."""
        return max(0, len(self.plan(self.epoch)) - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batches = self.epoch, self.plan(self.epoch)
        self._yielded = self.start_batch
        for b in range(self.start_batch, len(batches)):
            self._yielded = b + 1
            yield batches[b].tolist()
        if self.epoch == epoch:  # a complete pass: move on unless set_epoch intervened
            self.epoch, self.start_batch, self._yielded = epoch + 1, 0, 0

    def state_dict(self, batches_done: Optional[int] = None) -> dict[str, Any]:
        """``{"epoch", "start_batch", "seed"}``: where to resume.

        ``batches_done``: batches of the current epoch the training loop has consumed; default
        the number this sampler has yielded (exact with ``num_workers=0``, ahead otherwise).
        """
        done = self._yielded if batches_done is None else int(batches_done)
        return {"epoch": self.epoch, "start_batch": done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["start_batch"]`` of ``state["epoch"]`` (the seed must match)."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.set_epoch(int(state["epoch"]), int(state["start_batch"]))
