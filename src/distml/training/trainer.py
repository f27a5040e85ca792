"""The training loop, readable top to bottom: micro-batches -> optimizer step -> eval -> checkpoint.

One optimizer step consumes ``grad_accum_steps`` micro-batches of ``batch_size /
grad_accum_steps`` samples. Each micro-batch's mean loss is weighted by its share of the
step's samples, so an accumulated step equals one big batch even when the last group of an
epoch is short. Everything that decides the future (weights, optimizer, schedule, RNG,
loader position, best-so-far) is in the checkpoint, so ``resume`` reproduces an
uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from distml.config import METRIC_HIGHER_IS_BETTER, TrainSettings
from distml.data.loader import PartitionLoader
from distml.tasks import evaluate, loss_fn
from distml.training.checkpoint import load_latest_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Progress, saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches of the current epoch already consumed
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    train_loss: list[float] = field(default_factory=list)  # one per optimizer step
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", metrics...}
    epochs: list[dict[str, float]] = field(default_factory=list)  # throughput, data stall
    seconds: float = 0.0


class Callback(Protocol):
    """Hooks for progress displays and trackers; every method is optional."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, record: dict[str, float]) -> None: ...
    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: Trainer, stats: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        settings: TrainSettings,
        *,
        task: str,
        train_loader: PartitionLoader,
        val_data: tuple[torch.Tensor, torch.Tensor],
        metric: str,
        checkpoint_dir: Path,
        device: torch.device,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.model = model.to(device)
        self.settings = settings
        self.task = task
        self.loader = train_loader
        self.val_data = val_data
        self.metric = metric
        self.checkpoint_dir = checkpoint_dir
        self.device = device
        self.callbacks = list(callbacks)
        self.optimizer = _build_optimizer(model, settings)
        self.steps_per_epoch = math.ceil(len(train_loader) / settings.grad_accum_steps)
        self.total_steps = settings.epochs * self.steps_per_epoch
        if settings.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(settings, self.total_steps)
        )
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, *, resume: bool = False) -> TrainState:
        if resume:
            self._restore()
        self._emit("on_train_start")
        stop = self.state.step >= self.total_steps
        while not stop:
            epoch_start, wait_start, samples = time.perf_counter(), self.loader.wait_seconds, 0
            for group in self._step_groups():
                loss, seconds = self._optimizer_step(group)
                n = sum(len(b[0]) for b in group)
                samples += n
                self.state.step += 1
                self.state.position += len(group)
                self.state.seconds += seconds
                self.state.train_loss.append(loss)
                epoch_end = self.state.position >= len(self.loader)
                record = {
                    "step": self.state.step, "epoch": self.state.epoch, "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0], "samples_per_s": n / max(seconds, 1e-9),
                }
                if epoch_end:
                    self._end_epoch(samples, time.perf_counter() - epoch_start,
                                    self.loader.wait_seconds - wait_start)
                self._emit("on_step_end", record)
                stop = self._after_step(epoch_end)
                if stop:
                    break
        if self.settings.restore_best and self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        self._emit("on_train_end")
        return self.state

    def _end_epoch(self, samples: int, seconds: float, waited: float) -> None:
        """Throughput and data-stall fraction (time waiting for batches / epoch time)."""
        stats = {"epoch": self.state.epoch, "samples_per_s": samples / max(seconds, 1e-9),
                 "data_stall": waited / max(seconds, 1e-9)}
        self.state.epochs.append(stats)
        self.state.epoch, self.state.position = self.state.epoch + 1, 0
        self._emit("on_epoch_end", stats)

    def _step_groups(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The rest of the current epoch, grouped into optimizer steps."""
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in self.loader.batches(self.state.epoch, self.state.position):
            group.append(batch)
            if len(group) == self.settings.grad_accum_steps:
                yield group
                group = []
        if group:
            yield group

    def _optimizer_step(
        self, group: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[float, float]:
        start = time.perf_counter()
        self.model.train()
        total = sum(len(x) for x, _ in group)
        loss_sum = 0.0
        for x, y in group:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, torch.bfloat16,
                                enabled=self.settings.precision == "bf16"):
                loss = loss_fn(self.task, self.model(x), y)
            (loss * (len(x) / total)).backward()  # weight by share of the step's samples
            loss_sum += loss.item() * len(x)
        if self.settings.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_sum / total, time.perf_counter() - start

    def _after_step(self, epoch_end: bool) -> bool:
        """Evaluate and checkpoint when due; True when training should stop."""
        s, step = self.settings, self.state.step
        last = step >= self.total_steps
        stop = last
        if last or (epoch_end if s.eval_every_steps is None else step % s.eval_every_steps == 0):
            stop = self._evaluate() or last
        if last or (
            epoch_end if s.checkpoint_every_steps is None else step % s.checkpoint_every_steps == 0
        ) or stop:
            self.save()
        return stop

    def _evaluate(self) -> bool:
        """Evaluate on val, track the best; True when early stopping says stop."""
        x, y = self.val_data
        metrics, _ = evaluate(self.task, self.model, x, y)
        self.state.evals.append({"step": self.state.step, **metrics})
        value = metrics[self.metric]
        sign = 1.0 if METRIC_HIGHER_IS_BETTER[self.metric] else -1.0
        if self.state.best_value is None or sign * (value - self.state.best_value) > 0:
            self.state.best_value, self.state.best_step = value, self.state.step
            self.state.evals_since_best = 0
            self.best_weights = copy.deepcopy(self.model.state_dict())
        else:
            self.state.evals_since_best += 1
        self._emit("on_eval_end", metrics)
        patience = self.settings.early_stopping_patience
        if patience is not None and self.state.evals_since_best >= patience:
            logger.info("early stopping at step %d: no improvement in %d evaluations",
                        self.state.step, patience)
            return True
        return False

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self) -> Path:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "progress": self.state.__dict__.copy(),
            "best_weights": self.best_weights,
        }
        return save_checkpoint(
            self.checkpoint_dir, self.state.step, state, keep=self.settings.keep_checkpoints
        )

    def _restore(self) -> None:
        found = load_latest_checkpoint(self.checkpoint_dir)
        if found is None:
            logger.info("no checkpoint in %s; starting from scratch", self.checkpoint_dir)
            return
        path, state = found
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.state = TrainState(**state["progress"])
        self.best_weights = state["best_weights"]
        logger.info("resumed from %s (step %d)", path, self.state.step)

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)


def _build_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def _lr_lambda(s: TrainSettings, total_steps: int):
    """Multiplier of the peak lr at each step: linear warmup, then the chosen decay."""
    decay_steps = max(total_steps - s.warmup_steps, 1)

    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        progress = min((step - s.warmup_steps) / decay_steps, 1.0)
        if s.lr_schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif s.lr_schedule == "linear":
            shape = 1.0 - progress
        else:
            return 1.0
        return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * shape

    return factor
