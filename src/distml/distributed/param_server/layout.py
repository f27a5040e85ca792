"""How the model's parameters are split across the servers: one flat vector cut into
contiguous ranges of equal size, so the servers hold equal bytes whatever the tensor sizes
(whole tensors dealt to servers would leave one holding the biggest matrix).

SGD and AdamW are elementwise, so an optimizer stepping a flat range computes what it would
on the tensors the range covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ShardLayout:
    """Parameter names and shapes in model order, and each server's [start, stop) range of
    the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    ranges: tuple[tuple[int, int], ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, model: nn.Module, num_servers: int) -> ShardLayout:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(f"strategy parameter_server needs parameters of one dtype; the "
                             f"model has {sorted(map(str, dtypes))}")
        total = sum(p.numel() for _, p in named)
        if total < num_servers:
            raise ValueError(f"the model has {total} parameters, fewer than num_servers="
                             f"{num_servers}; use fewer servers")
        cuts = [total * s // num_servers for s in range(num_servers + 1)]
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named),
                   tuple(zip(cuts[:-1], cuts[1:], strict=True)), dtypes.pop())

    @property
    def numel(self) -> int:
        return self.ranges[-1][1]

    def size(self, server: int) -> int:
        start, stop = self.ranges[server]
        return stop - start

    def flatten(self, tensors: list[torch.Tensor | None]) -> torch.Tensor:
        """One CPU vector of ``tensors`` (in model order; None counts as zeros)."""
        parts = [torch.zeros(shape, dtype=self.dtype) if t is None else t.detach()
                 for t, shape in zip(tensors, self.shapes, strict=True)]
        return torch.cat([p.reshape(-1).to("cpu", self.dtype) for p in parts])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each server's range of ``flat`` (views)."""
        return [flat[a:b] for a, b in self.ranges]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named tensors of ``flat`` (views, shaped as the model's)."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = _numel(shape)
            out[name] = flat[offset:offset + n].view(shape)
            offset += n
        return out

    def copy_into(self, flat: torch.Tensor, params: list[torch.Tensor]) -> None:
        """Write ``flat`` into the model's parameters (on their device)."""
        with torch.no_grad():
            for p, t in zip(params, self.unflatten(flat).values(), strict=True):
                p.copy_(t, non_blocking=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
