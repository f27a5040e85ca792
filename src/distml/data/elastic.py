"""How an elastic job deals an epoch's rows: by step, the same at every world size.

The epoch's order is one global sequence of the split's row ids, a pure function of
(seed, epoch): the partitions permuted and laid end to end, then cut into shuffle windows
that are each permuted. Optimizer step ``s`` takes rows ``[s*G, (s+1)*G)`` of it (``G``, the
global batch, is fixed); rank ``r`` of ``W`` takes the ``r``-th of ``W`` even slices of them,
cut into ``accum`` micro-batches. So every step trains on the same rows whatever the world
size (only the order of the sums differs), and after a resize at step ``s`` the new ranks go
on from row ``s*G``: every row of the epoch is used once, however often the size changed.
The price: each rank reads rows from every partition (the fixed deal reads 1/W of them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from distml.errors import DataError


@dataclass(frozen=True)
class ElasticDeal:
    global_batch: int  # rows per optimizer step, at every world size
    accum: int = 1  # micro-batches per step on each rank
    max_world: int = 1  # the most ranks the job may have

    def steps(self, total: int) -> int:
        """Optimizer steps per epoch (the last may be short)."""
        return math.ceil(total / self.global_batch)

    def check(self, total: int, world_size: int) -> None:
        """Every rank needs rows in every micro-batch, the short last step's included."""
        last = total % self.global_batch
        need = max(world_size, self.max_world) * self.accum
        if total < need or (last and last < need):
            raise DataError(
                f"the training split's {total} rows end in a step of {last} rows, fewer "
                f"than the {need} that {max(world_size, self.max_world)} ranks x "
                f"{self.accum} micro-batches need; change batch_size={self.global_batch} "
                "so that it divides the rows or leaves a larger last step")

    @staticmethod
    def epoch_ids(sizes: list[int], *, epoch: int, seed: int, shuffle: bool,
                  window_rows: int) -> np.ndarray:
        """The epoch's global order of row ids (indices into the partitions end to end)."""
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        order = (np.random.default_rng([seed, epoch]).permutation(len(sizes)) if shuffle
                 else np.arange(len(sizes)))
        ids = np.concatenate([np.arange(offsets[p], offsets[p + 1]) for p in order])
        if shuffle:
            for w, lo in enumerate(range(0, len(ids), window_rows)):
                window = ids[lo : lo + window_rows]
                window[:] = window[np.random.default_rng([seed, epoch, w]).permutation(
                    len(window))]
        return ids

    def rank_batches(self, ids: np.ndarray, *, start: int, rank: int, world_size: int
                     ) -> Iterator[np.ndarray]:
        """Rank ``rank``'s micro-batches (row ids) from micro-batch ``start`` on."""
        if start % self.accum:
            raise DataError(f"an elastic loader resumes at a step boundary; micro-batch "
                            f"{start} is inside a step of {self.accum}")
        g = self.global_batch
        for step in range(start // self.accum, self.steps(len(ids))):
            rows = ids[step * g : (step + 1) * g]
            n = len(rows)
            mine = rows[rank * n // world_size : (rank + 1) * n // world_size]
            yield from np.array_split(mine, self.accum)
