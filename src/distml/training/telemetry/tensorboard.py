"""Experiment tracking as trainer callbacks (rank 0 only): TensorBoard event files.

Scalars every step (loss, learning rate, samples/s), evaluation metrics, per-epoch
throughput, data stall, peak memory and every rank's system metrics (parameter servers:
each worker's items, batches, compute, waiting and step time, and the staleness);
histograms of weights and gradients every N steps (this rank's shard under fsdp); the model
graph once. Tracking never breaks training: a failure to write (unwritable folder, full
disk) is reported once and tracking stops.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from distml.training.callbacks import Callback

logger = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t).detach().float().cpu()


class TensorBoardCallback(Callback):
    def __init__(self, log_dir: Path, *, histogram_every: int = 50) -> None:
        self.log_dir = Path(log_dir)
        self.histogram_every = histogram_every
        self.writer = None

    def _safely(self, what: str, fn: Any, *args: Any) -> None:
        if self.writer is None:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            logger.warning("TensorBoard: cannot write %s to %s (%s: %s); tracking is off for "
                           "the rest of this run", what, self.log_dir, type(e).__name__, e)
            self.writer = None

    def on_train_start(self, trainer: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.log_dir))
        except OSError as e:
            logger.warning("TensorBoard: cannot write to %s (%s); training goes on without it",
                           self.log_dir, e)
            return
        model = getattr(trainer.model, "module", trainer.model)  # DDP's inner model
        if not any(hasattr(p, "_local_tensor") for p in model.parameters()):  # not sharded
            self._graph(model, trainer.val_data[0][:2])

    def _graph(self, model: torch.nn.Module, sample: torch.Tensor) -> None:
        try:
            was_training = model.training
            model.eval()
            self.writer.add_graph(model, sample.to(next(model.parameters()).device))
            model.train(was_training)
        except Exception as e:  # noqa: BLE001 - some models cannot be traced; not fatal
            logger.info("TensorBoard: no model graph (%s: %s)", type(e).__name__, e)

    def on_step_end(self, trainer: Any, record: dict[str, float]) -> None:
        step = int(record["step"])
        for key in ("loss", "lr", "samples_per_s", "step_seconds"):
            self._safely("scalars", self.writer.add_scalar if self.writer else None,
                         f"train/{key}", record[key], step)
        if step % self.histogram_every == 0 or step == 1:
            self._safely("histograms", self._histograms, trainer.model, step)

    def _histograms(self, model: torch.nn.Module, step: int) -> None:
        for name, p in model.named_parameters():
            name = name.removeprefix("module.")
            self.writer.add_histogram(f"weights/{name}", _local(p), step)
            if p.grad is not None:
                self.writer.add_histogram(f"grads/{name}", _local(p.grad), step)

    def on_eval_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._safely("scalars", self.writer.add_scalar if self.writer else None,
                         f"val/{key}", value, trainer.state.step)

    def on_epoch_end(self, trainer: Any, stats: dict[str, Any]) -> None:
        epoch = int(stats["epoch"])
        for key in ("samples_per_s", "data_stall", "peak_mem_bytes"):
            self._safely("scalars", self.writer.add_scalar if self.writer else None,
                         f"epoch/{key}", stats[key], epoch)
        for rank, system in enumerate(stats.get("system", [])):
            for key, value in system.items():
                if key != "samples":
                    self._safely("scalars", self.writer.add_scalar if self.writer else None,
                                 f"system/rank{rank}/{key}", value, epoch)
        # Parameter servers: each worker's own numbers (the straggler view) and staleness.
        for rank, worker in stats.get("workers", {}).items():
            for key, value in worker.items():
                self._safely("scalars", self.writer.add_scalar if self.writer else None,
                             f"workers/rank{rank}/{key}", value, epoch)
        for key, value in stats.get("staleness", {}).items():
            self._safely("scalars", self.writer.add_scalar if self.writer else None,
                         f"staleness/{key}", value, epoch)

    def on_train_end(self, trainer: Any) -> None:
        self._safely("the last events", self.writer.close if self.writer else None)
        self.writer = None
