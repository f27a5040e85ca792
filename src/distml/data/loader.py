"""The training loader: seeded, shuffled whole batches over tensors, resumable to the batch.

Its state is just (epoch, batch position): the order of an epoch is a pure function of
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class BatchLoader:
    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        assert len(x) == len(y), "inputs and targets differ in length"
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle

    def __len__(self) -> int:
        """Batches per epoch (the last one may be short)."""
        return math.ceil(len(self.x) / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.x))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.x), generator=gen)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``epoch`` from batch index ``start`` on; (B, ...) inputs and targets."""
        order = self.order(epoch)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]
