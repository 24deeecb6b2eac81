"""Which rows each worker trains on at each step: a deterministic, resumable data order.

Step s of a run reads global rows [k * G, (k + 1) * G) of epoch e's permutation (e, k = divmod(s, steps_per_epoch);
G = batch.global_size; the permutation is seeded by (seed, e)); worker r of W takes the r-th of W equal slices and
splits it into micro-batches. So the data position is just the step number: a resumed run, or one that comes back
with a different number of workers, reads exactly the rows it would have read. Ray Data is not used because its
iterators cannot be resumed at a given batch.
"""
from __future__ import annotations

import numpy as np
import torch

from raymoe.finetune.tokens import TokenRows


class BatchPlan:
    def __init__(self, num_rows: int, global_size: int, micro_size: int, world: int, rank: int, seed: int) -> None:
        if global_size % (world * micro_size):
            raise ValueError(f"batch.global_size ({global_size}) must be a multiple of workers x batch.micro_size "
                             f"({world} x {micro_size})")
        self.num_rows, self.global_size, self.micro_size = num_rows, global_size, micro_size
        self.world, self.rank, self.seed = world, rank, seed
        self.steps_per_epoch = num_rows // global_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_rows} training rows are fewer than batch.global_size ({global_size})")
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def accumulation(self) -> int:
        return self.global_size // (self.world * self.micro_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_rows))
        return self._perm[1]

    def step_rows(self, step: int) -> np.ndarray:
        """Row indices of the whole global batch of optimizer step `step` (0-based), all workers."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[k * self.global_size:(k + 1) * self.global_size]

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """Row indices of this worker's micro-batches for optimizer step `step` (0-based)."""
        rows = self.step_rows(step)
        per_worker = self.global_size // self.world
        mine = rows[self.rank * per_worker:(self.rank + 1) * per_worker]
        return [mine[i:i + self.micro_size] for i in range(0, per_worker, self.micro_size)]


def collate(rows: TokenRows, index: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows to the longest: ids [B, T] long, mask [B, T] float (padding is never a target)."""
    pieces = [rows.row(int(i)) for i in index]
    T = max(len(ids) for ids, _ in pieces)
    ids = torch.full((len(pieces), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pieces), T), dtype=torch.float32)
    for b, (r_ids, r_mask) in enumerate(pieces):
        ids[b, :len(r_ids)] = torch.from_numpy(r_ids.astype(np.int64))
        mask[b, :len(r_mask)] = torch.from_numpy(r_mask.astype(np.float32))
    return ids, mask


def eval_batches(num_rows: int, micro_size: int, world: int, rank: int) -> list[np.ndarray]:
    """Every validation row once across workers (rows i with i % world == rank), in micro-batches."""
    mine = np.arange(rank, num_rows, world)
    return [mine[i:i + micro_size] for i in range(0, len(mine), micro_size)]
