"""The strategy contract, and the strategies that need no model split.

A strategy wraps a model and its optimizer and owns the training step: ``train_step`` runs
forward and backward over an optimizer step's micro-batches (skipping gradient sync on all
but the last), clips, and steps the optimizer. It gives the state to checkpoint
(``state_dict`` / ``load_state_dict``, through torch.distributed.checkpoint) and the full
model for export (``full_state_dict``). Model-parallel strategies implement the same
contract.

Apply order, as the best codebases do it: tensor parallel -> activation checkpointing ->
compile -> FSDP / DDP; pipeline parallelism is its own schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from distml.config import TrainSettings
from distml.distributed.runtime import DistEnv, all_reduce_mean
from distml.imports import load_object

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


def build_optimizer(params: Any, s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


class Strategy:
    """One process trains the whole model (``strategy: single``); the base of the others."""

    name = "single"

    def __init__(self, model: nn.Module, settings: TrainSettings, env: DistEnv) -> None:
        self.settings = settings
        self.env = env
        self.model = self.wrap(model.to(env.device))
        self.optimizer = self.build_optimizer()

    # -- what subclasses change ------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

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
            with self.sync_gradients(i == len(micro_batches) - 1), torch.autocast(
                self.env.device.type, torch.bfloat16, enabled=self.settings.precision == "bf16"
            ):
                loss = loss_fn(self.model(x), y)
            # Weighted by the micro-batch's share of this rank's samples, so an accumulated
            # step equals one big batch; ranks hold equal shares, so averaging over ranks
            # gives the global batch's mean.
            (loss * (len(x) / total)).backward()
            loss_sum += loss.item() * len(x)
        if self.settings.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        return all_reduce_mean(loss_sum / total, self.env)

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state in the canonical form torch.distributed.checkpoint
        saves and reshards (names without wrapper prefixes)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

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


def _optimizer_states(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer's local one
    return list(inner.state.values())


def make_strategy(name: str, model: nn.Module, settings: TrainSettings, env: DistEnv
                  ) -> Strategy:
    """A strategy by name, or a user's Strategy subclass by 'module:Class'."""
    from distml.distributed.data_parallel import DDP, FSDP, ZeRO1

    known: dict[str, type[Strategy]] = {
        "single": Strategy, "ddp": DDP, "zero1": ZeRO1, "fsdp": FSDP}
    cls = known.get(name) or load_object(name, what="strategy")
    return cls(model, settings, env)
