"""Data parallelism: every rank trains on its own shard of each global batch.

- ``ddp``: a full replica per rank; gradients are averaged by all-reduce (DistributedDataParallel).
- ``zero1``: ddp, with the optimizer state sharded across ranks (ZeroRedundancyOptimizer).
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
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from distml.distributed.strategy import Strategy, optimizer_spec, shard_units

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
    name = "zero1"

    def build_optimizer(self) -> torch.optim.Optimizer:
        cls, kwargs = optimizer_spec(self.settings)
        params = [p for p in self.model.parameters() if p.requires_grad]
        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)

    # torch.distributed.checkpoint does not know ZeroRedundancyOptimizer: the optimizer
    # state is consolidated on rank 0 and saved whole; every rank loads it and keeps its
    # own partition, whatever the world size was.
    def state_dict(self) -> dict[str, Any]:
        return {"model": get_model_state_dict(self.model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_model_state_dict(state["model"])

    def extra_state(self) -> dict[str, Any] | None:
        self.optimizer.consolidate_state_dict(to=0)
        return {"optim": self.optimizer.state_dict()} if self.env.is_main else None

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(extra["optim"])


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
