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
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from distml.distributed.strategy import (
    Strategy,
    build_optimizer,
    optimizer_spec,
    shard_units,
)

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
        return ZeroRedundancyOptimizer(self._params(), optimizer_class=cls, **kwargs)

    # torch.distributed.checkpoint does not know ZeroRedundancyOptimizer, whose state is
    # partitioned by parameter index. It is consolidated, offered by every rank alike (DCP
    # writes a replicated entry once) and saved under parameter names like every other
    # strategy's, so a zero1 checkpoint resumes under any strategy and vice versa.
    def state_dict(self) -> dict[str, Any]:
        self.optimizer.consolidate_state_dict(to=0)
        box = [self.optimizer.state_dict() if self.env.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return {"model": get_model_state_dict(self.model),
                "optim": _by_name(box[0], self._param_names())}

    def state_template(self) -> dict[str, Any]:
        # The names and shapes a checkpoint holds, from a plain optimizer over the same
        # parameters (ZeRO's own state is empty until its first step).
        plain = build_optimizer(self._params(), self.settings)
        return {"model": get_model_state_dict(self.model),
                "optim": get_optimizer_state_dict(self.model, plain)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_model_state_dict(state["model"])
        names = self._param_names()
        index = {name: i for i, name in enumerate(names)}
        optim = state["optim"]
        self.optimizer.load_state_dict({  # every rank keeps its own partition
            "state": {index[k]: v for k, v in optim["state"].items()},
            "param_groups": [{**g, "params": [index[p] for p in g["params"]]}
                             for g in optim["param_groups"]]})

    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _param_names(self) -> list[str]:
        """Canonical names of the optimizer's parameters, in its order."""
        return [n for n, p in self.model.module.named_parameters() if p.requires_grad]


def _by_name(indexed: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter index, keyed by parameter name instead."""
    return {"state": {names[i]: v for i, v in indexed["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                             for g in indexed["param_groups"]]}


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
