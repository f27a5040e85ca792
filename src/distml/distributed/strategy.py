"""The strategy contract, and the strategies that need no model split.

A strategy wraps a model and its optimizer and owns the training step: ``train_step`` runs
forward and backward over an optimizer step's micro-batches (skipping gradient sync on all
but the last), clips, and steps the optimizer. It gives the state to checkpoint
(``state_dict`` / ``load_state_dict``, through torch.distributed.checkpoint) and the full
model for export (``full_state_dict``). Model-parallel strategies implement the same
contract.

Apply order, as the best codebases do it: tensor parallel (or the pipeline stage's split) ->
activation checkpointing -> FSDP / DDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh

from distml.config import TrainSettings
from distml.config.strategies import STRATEGIES
from distml.distributed.runtime import DistEnv, all_reduce_mean
from distml.imports import load_object

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

def optimizer_spec(s: TrainSettings) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer class and its keyword arguments: the one place they are chosen."""
    if s.optimizer == "sgd":
        return torch.optim.SGD, {"lr": s.lr, "momentum": s.momentum,
                                 "weight_decay": s.weight_decay}
    return torch.optim.AdamW, {"lr": s.lr, "weight_decay": s.weight_decay}


def build_optimizer(params: Any, s: TrainSettings) -> torch.optim.Optimizer:
    cls, kwargs = optimizer_spec(s)
    return cls(params, **kwargs)


class Strategy:
    """One process trains the whole model (``strategy: single``); the base of the others.

    ``mesh`` is the job's one device mesh, built from the settings' ParallelDims: a "data"
    axis, and the model's axis ("tensor" or "pipeline"; 3d: "pipeline", then "tensor")
    innermost; None in one process.
    """

    name = "single"
    needs_full_batches = False  # True: the loader drops a short last batch

    def __init__(self, model: nn.Module, settings: TrainSettings, env: DistEnv, *,
                 mesh: DeviceMesh | None = None, sample: torch.Tensor | None = None) -> None:
        self.settings = settings
        self.env = env
        self.mesh = mesh
        self.sample = sample  # a few input rows, for splits that time the model's layers
        # The apply order: split the model (tensor parallel, pipeline stage), then
        # activation checkpointing, then the data-parallel wrapper (DDP / FSDP).
        model = self.parallelize(model.to(env.device))
        if settings.activation_checkpointing:
            checkpoint_blocks(model)
        self.model = self.wrap(model)
        self.optimizer = self.build_optimizer()
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            settings.precision)
        # fp16 needs its loss scaled so small gradients do not flush to zero.
        self.scaler = torch.amp.GradScaler(env.device.type) if settings.precision == "fp16" \
            else None

    # -- what subclasses change ------------------------------------------------------------

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Split the model across ranks (model-parallel strategies)."""
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    @property
    def data_rank(self) -> int:
        """This rank's index among the data-parallel replicas (which batch shard it gets)."""
        return self.mesh["data"].get_local_rank() if self.mesh is not None else 0

    @property
    def data_size(self) -> int:
        return self.mesh["data"].size() if self.mesh is not None else 1

    def build_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer([p for p in self.model.parameters() if p.requires_grad],
                               self.settings)

    @contextlib.contextmanager
    def sync_gradients(self, sync: bool) -> Iterator[None]:
        """Around one micro-batch's backward; ``sync`` is False on all but the last."""
        yield

    # -- the step ------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> float:
        """One optimizer step; returns the mean loss over every rank's samples."""
        self.model.train()
        # Gradients are cleared here, not after the step, so that trackers can read them.
        self.optimizer.zero_grad(set_to_none=True)
        total = sum(len(x) for x, _ in micro_batches)
        loss_sum = 0.0
        for i, (x, y) in enumerate(micro_batches):
            x = x.to(self.env.device, non_blocking=True)
            y = y.to(self.env.device, non_blocking=True)
            with self.sync_gradients(i == len(micro_batches) - 1), self.autocast():
                loss = loss_fn(self.model(x), y)
            # Weighted by the micro-batch's share of this rank's samples, so an accumulated
            # step equals one big batch; ranks hold equal shares, so averaging over ranks
            # gives the global batch's mean.
            scaled = loss * (len(x) / total)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.item() * len(x)
        self.step_optimizer()
        return all_reduce_mean(loss_sum / total, self.env)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.env.device.type, self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def step_optimizer(self) -> None:
        """Clip (after unscaling fp16 gradients) and step."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.settings.grad_clip is not None:
            self.clip_gradients(self.settings.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf or NaN
            self.scaler.update()
        else:
            self.optimizer.step()

    def clip_gradients(self, max_norm: float) -> None:
        nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def evaluate(self, task: str, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[dict[str, float], Any]:
        """Metrics on (x, y), the same on every rank."""
        from distml.tasks import evaluate

        return evaluate(task, self.model, x, y)

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state in the canonical form torch.distributed.checkpoint
        saves and reshards (names without wrapper prefixes)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def state_template(self) -> dict[str, Any]:
        """What to fill from a checkpoint: the names and shapes of ``state_dict()``."""
        return self.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def extra_state(self) -> dict[str, Any] | None:
        """State saved whole by rank 0 next to the sharded checkpoint (None: nothing)."""
        return None

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state under canonical names (no wrapper prefixes), as this rank
        holds it: the same keys under every strategy."""
        return get_model_state_dict(self.model)

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(self.model, state)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every parameter, whole, on CPU, on rank 0 (None on the other ranks)."""
        sd = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.env.is_main else None

    def local_bytes(self) -> dict[str, int]:
        """Bytes this rank holds of parameters, gradients (as they stand after backward,
        shaped like the local parameters) and optimizer state."""
        def size(t: torch.Tensor) -> int:
            t = getattr(t, "_local_tensor", t)  # a DTensor's shard
            return t.numel() * t.element_size()

        params = list(self.model.parameters())
        state = [v for s in _optimizer_states(self.optimizer) for v in s.values()
                 if isinstance(v, torch.Tensor)]
        return {"params": sum(size(p) for p in params),
                "grads": sum(size(p) for p in params if p.requires_grad),
                "optimizer": sum(size(v) for v in state)}


    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds right now, by what the tensors are, each storage counted
        once: parameters (the model's as they stand, gathered or not, and the optimizer's:
        under FSDP they differ while a unit is gathered), their gradients, and the
        optimizer's state. Unlike ``local_bytes``, measured, not derived from the shapes:
        read between forward and backward it shows gathered parameters, after backward the
        gradients as they are (whole, or shards)."""
        seen: set[int] = set()

        def held(t: torch.Tensor | None) -> int:
            if not isinstance(t, torch.Tensor):
                return 0
            storage = getattr(t, "_local_tensor", t).untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:  # freed, or counted
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()

        inner = getattr(self.optimizer, "optim", self.optimizer)
        params = [*self.model.parameters(),
                  *(p for o in {id(self.optimizer): self.optimizer, id(inner): inner}.values()
                    for g in o.param_groups for p in g["params"])]
        return {"params": sum(held(p) for p in params),
                "grads": sum(held(p.grad) for p in params),
                "optimizer": sum(held(v) for st in _optimizer_states(self.optimizer)
                                 for v in st.values())}


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing per block: each block's activations are recomputed in
    backward instead of kept. Parameter names stay canonical (torch's state-dict helpers
    drop the wrapper's prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for unit in shard_units(model):
        parent, name = _parent(model, unit)
        setattr(parent, name, checkpoint_wrapper(unit))


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The model's blocks if it exposes them, else its top-level children with parameters:
    the units that FSDP shards and activation checkpointing wraps."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList | nn.Sequential):
        return list(blocks)
    return [m for m in model.children() if any(p.requires_grad for p in m.parameters())]


def _parent(model: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for path, module in model.named_modules():
        if module is child:
            parent, _, name = path.rpartition(".")
            return model.get_submodule(parent), name
    raise ValueError("not a submodule")


def _optimizer_states(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer's local one
    return list(inner.state.values())


def make_strategy(name: str, model: nn.Module, settings: TrainSettings, env: DistEnv, *,
                  sample: torch.Tensor | None = None) -> Strategy:
    """A strategy by name (its record's implementation, resolved as a user's is, so this
    module imports none of its subclasses), or a user's Strategy subclass by
    'module:Class', on the device mesh that the settings' degrees describe."""
    record = STRATEGIES.get(name)
    cls = load_object(record.implementation if record else name, what="strategy")
    # An elastic job down to one rank keeps its process group (and fsdp its 1-rank mesh)
    grouped = env.distributed or (settings.parallel.elastic and dist.is_initialized())
    mesh = settings.dims.build_mesh(env.device.type) if grouped else None
    return cls(model, settings, env, mesh=mesh, sample=sample)
