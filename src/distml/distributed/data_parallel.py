"""Data parallelism: every rank trains on its own shard of each global batch.

- ``ddp``: a full replica per rank; gradients are averaged by all-reduce (DistributedDataParallel).
- ``zero1``: ddp, with the optimizer state sharded evenly across ranks (a flat buffer cut
  into equal shards: distml.distributed.zero).
- ``fsdp``: parameters, gradients and optimizer state sharded (torch's ``fully_shard``);
  ``reshard_after_forward: true`` frees gathered parameters after forward (ZeRO-3),
  ``false`` keeps them for backward (ZeRO-2 behaviour).

Gradient accumulation skips the gradient sync on every micro-batch but the last.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from distml.distributed.strategy import (
    Strategy,
    build_optimizer,
    optimizer_spec,
    shard_units,
)
from distml.distributed.zero import FlatZeRO, flatten_parameters

logger = logging.getLogger(__name__)


class DDP(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @contextlib.contextmanager
    def sync_gradients(self, sync: bool) -> Iterator[None]:
        with contextlib.nullcontext() if sync else self.model.no_sync():
            yield


class ZeRO1(DDP):
    """ddp, with the optimizer state split evenly across ranks by elements (see
    distml.distributed.zero: torch's ZeroRedundancyOptimizer splits by whole tensors)."""

    name = "zero1"

    def wrap(self, model: nn.Module) -> nn.Module:
        # The parameters become views of one flat buffer before DDP registers them.
        self.flat = flatten_parameters(self._params(model), self.env.world_size)
        return super().wrap(model)

    def build_optimizer(self) -> torch.optim.Optimizer:
        cls, kwargs = optimizer_spec(self.settings)
        return FlatZeRO(self._params(), self.flat, dist.group.WORLD, cls, **kwargs)

    # The optimizer state is saved under parameter names, in the form a plain optimizer's
    # takes, offered by every rank alike (DCP writes a replicated entry once), so a zero1
    # checkpoint resumes under any strategy and world size, and vice versa.
    def state_dict(self) -> dict[str, Any]:
        return {"model": get_model_state_dict(self.model),
                "optim": self.optimizer.full_state(self._param_names())}

    def state_template(self) -> dict[str, Any]:
        # The names and shapes a checkpoint holds, from a plain optimizer over the same
        # parameters (ours holds no state until its first step).
        plain = build_optimizer(self._params(), self.settings)
        return {"model": get_model_state_dict(self.model),
                "optim": get_optimizer_state_dict(self.model, plain)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_model_state_dict(state["model"])
        self.optimizer.load_full_state(state["optim"], self._param_names())

    def _params(self, model: nn.Module | None = None) -> list[nn.Parameter]:
        return [p for p in (model or self.model).parameters() if p.requires_grad]

    def _param_names(self) -> list[str]:
        """Canonical names of the optimizer's parameters, in its order."""
        return [n for n, p in self.model.module.named_parameters() if p.requires_grad]


class FSDP(Strategy):
    name = "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        fsdp = self.settings.parallel.fsdp
        offload = fsdp.offload
        if offload and self.env.device.type == "cpu":
            logger.warning("offload: training runs on the CPU, where every shard already "
                           "lives in CPU memory; there is nothing to offload")
            offload = False
        return apply_fsdp(model, self.mesh["data"],
                          reshard_after_forward=fsdp.reshard_after_forward, offload=offload)

    @contextlib.contextmanager
    def sync_gradients(self, sync: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(sync)
        yield


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, reshard_after_forward: bool = True,
               offload: bool = False) -> nn.Module:
    """Shard ``model`` over ``mesh`` (a 1-D data axis) with torch's fully_shard: each block
    is its own unit (gathered just in time), then the root takes the rest (embeddings,
    heads, tied weights). ``offload`` keeps the shards in CPU memory between uses."""
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for unit in shard_units(model):
        fully_shard(unit, **kw)
    return fully_shard(model, **kw)
