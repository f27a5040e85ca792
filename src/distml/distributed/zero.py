"""ZeRO-1 on a flat buffer: the optimizer state split evenly by elements, not by tensors.

torch's ZeroRedundancyOptimizer gives each rank whole parameters (largest first, to the
least loaded rank), so a model whose one matrix outweighs the rest cannot be balanced: the
rank holding that matrix holds its whole optimizer state. Here, as in DeepSpeed's ZeRO
stage 1, the trainable parameters become views into one flat buffer, padded to a multiple
of the world size and cut into equal contiguous shards (a tensor is split where a cut falls).
Each rank's optimizer (the configured class, unchanged) sees one parameter, its shard, a
view of the same buffer, so its step updates the model's weights in place; an all-gather
then brings every rank the others' shards.

The wrapper is a ``torch.optim.Optimizer`` whose ``param_groups`` hold the model's own
parameters: LR schedulers, gradient clipping and the fp16 GradScaler see the ordinary
optimizer they expect. ``full_state`` / ``load_full_state`` speak the per-parameter form a
plain optimizer's state takes, so checkpoints move between zero1 and every other strategy.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distml.errors import DistmlError

logger = logging.getLogger(__name__)


def flatten_parameters(params: list[nn.Parameter], world_size: int) -> torch.Tensor:
    """Move ``params`` into one flat buffer (padded to a multiple of ``world_size``) and make
    each a view of its slice; returns the buffer. Call before a wrapper (DDP) is built."""
    kinds = {(p.dtype, p.device) for p in params}
    if len(kinds) != 1:
        raise DistmlError(f"strategy zero1: the trainable parameters have several dtypes or "
                          f"devices {sorted(map(str, kinds))}; cast the model to one dtype "
                          "(the precision setting handles mixed precision) or use ddp or fsdp")
    total = sum(p.numel() for p in params)
    dtype, device = kinds.pop()
    flat = torch.zeros(-(-total // world_size) * world_size, dtype=dtype, device=device)
    at = 0
    with torch.no_grad():
        for p in params:
            view = flat[at : at + p.numel()].view_as(p)
            view.copy_(p)
            p.data = view  # the same Parameter object (what DDP and the optimizer hold)
            at += p.numel()
    return flat


class FlatZeRO(torch.optim.Optimizer):
    """Optimizer state for this rank's contiguous shard of the flat parameter buffer."""

    def __init__(self, params: list[nn.Parameter], flat: torch.Tensor, group: Any,
                 optimizer_class: type[torch.optim.Optimizer], **kwargs: Any) -> None:
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.group, self.flat = group, flat
        self.numel = sum(p.numel() for p in params)
        size = len(flat) // self.world
        self.lo, self.hi = self.rank * size, min((self.rank + 1) * size, self.numel)
        self.hi = max(self.hi, self.lo)
        self.shard = nn.Parameter(flat[self.lo : self.hi])  # shares the buffer's storage
        self.optim = optimizer_class([self.shard], **kwargs)  # the local optimizer
        super().__init__(params, dict(self.optim.defaults))
        self.pieces = []  # (param, its [a, b) in my shard, at offset in the shard)
        at = 0
        for p in params:
            a, b = max(self.lo - at, 0), min(self.hi - at, p.numel())
            if a < b:
                self.pieces.append((p, a, b, at + a - self.lo))
            at += p.numel()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if closure is not None:
            raise DistmlError("strategy zero1: optimizer closures are not supported")
        mine, theirs = self.param_groups[0], self.optim.param_groups[0]
        theirs.update({k: v for k, v in mine.items() if k != "params"})  # the LR schedule's
        grad = torch.zeros_like(self.shard)
        for p, a, b, at in self.pieces:
            if p.grad is not None:  # (an unused parameter's gradient counts as zero)
                grad[at : at + b - a] = p.grad.reshape(-1)[a:b]
        self.shard.grad = grad
        self.optim.step()
        self.shard.grad = None
        size = len(self.flat) // self.world
        own = self.flat[self.rank * size : (self.rank + 1) * size].clone()
        dist.all_gather_into_tensor(self.flat, own, group=self.group)
        return None

    # -- state in the per-parameter form of a plain optimizer ----------------------------------

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        size = len(self.flat) // self.world
        own = torch.zeros(size, dtype=t.dtype, device=t.device)
        own[: len(t)] = t
        full = torch.empty(size * self.world, dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(full, own, group=self.group)
        return full[: self.numel]

    def full_state(self, names: list[str]) -> dict[str, Any]:
        """The optimizer state as a plain optimizer over the named parameters would hold it
        (every rank gets it whole: a collective)."""
        params = self.param_groups[0]["params"]
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        local = self.optim.state.get(self.shard, {})
        state: dict[str, dict[str, Any]] = {n: {} for n in names}
        for key in sorted(local):
            value = local[key]
            if isinstance(value, torch.Tensor) and value.shape == self.shard.shape:
                full, at = self._gather(value), 0  # per element: cut back into tensors
                for name, p in zip(names, params, strict=True):
                    state[name][key] = full[at : at + p.numel()].view_as(p).clone()
                    at += p.numel()
            else:  # a scalar every rank holds alike (Adam's step count)
                for name in names:
                    state[name][key] = value.clone() if isinstance(value, torch.Tensor) \
                        else value
        return {"state": {n: s for n, s in state.items() if s},
                "param_groups": [{**group, "params": list(names)}]}

    def load_full_state(self, optim: dict[str, Any], names: list[str]) -> None:
        """Keep this rank's shard of a per-parameter optimizer state (see full_state)."""
        (saved,) = optim["param_groups"]
        for g in (self.param_groups[0], self.optim.param_groups[0]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        states = optim["state"]
        if not states:
            self.optim.state.clear()
            return
        params = self.param_groups[0]["params"]
        first = states[names[0]]
        local: dict[str, Any] = {}
        for key, value in first.items():
            if isinstance(value, torch.Tensor) and value.shape == params[0].shape:
                full = torch.cat([states[n][key].reshape(-1).to(self.flat.device)
                                  for n in names])
                local[key] = full[self.lo : self.hi].clone()
            else:
                local[key] = value.clone() if isinstance(value, torch.Tensor) else value
        self.optim.state.clear()
        self.optim.state[self.shard] = local
