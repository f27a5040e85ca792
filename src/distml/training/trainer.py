"""The training loop, readable top to bottom: step -> eval -> checkpoint, on any strategy.

One optimizer step consumes ``grad_accum_steps`` micro-batches on every rank; the strategy
runs them (see ``distml.distributed.strategy``). Everything that decides the future (weights,
optimizer, schedule, RNG, loader position, best-so-far) is in the checkpoint, so ``resume``
reproduces an uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from distml.config import TrainSettings
from distml.data.loader import PartitionLoader
from distml.distributed.checkpoint import (
    agree,
    checkpoint_paths,
    load_sharded,
    read_rank_state,
    save_checkpoint,
)
from distml.distributed.runtime import gather_objects
from distml.distributed.strategy import Batch, LossFn, Strategy
from distml.tasks import loss_fn
from distml.training.best import BestSoFar
from distml.training.callbacks import Callback
from distml.training.elastic import ElasticBook
from distml.training.telemetry.system import SystemSampler

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
    seconds: float = 0.0  # time in optimizer steps
    elapsed: float = 0.0  # wall time of training at the last evaluation, pauses excluded
    world_size: int = 0  # of the ranks that saved it
    membership_changes: list[dict] = field(default_factory=list)  # elastic jobs' restarts
    epoch_samples: list[dict] = field(default_factory=list)  # elastic: each row's uses


class Trainer:
    def __init__(
        self,
        strategy: Strategy,
        settings: TrainSettings,
        *,
        task: str,
        train_loader: PartitionLoader,
        val_data: tuple[torch.Tensor, torch.Tensor],
        metric: str,
        checkpoint_dir: Path,
        callbacks: Sequence[Callback] = (),
        system: SystemSampler | None = None,
        loss: LossFn | None = None,
        prepare_batch: Callable[[Batch], Batch] | None = None,
    ) -> None:
        """``loss``: of (outputs, targets), default the task's; ``prepare_batch``: run on
        each micro-batch inside the step (an online teacher's forward, say)."""
        self.strategy = strategy
        self.loss = loss or (lambda out, y: loss_fn(task, out, y))
        self.prepare_batch = prepare_batch
        self.system = system
        self.env = strategy.env
        self.settings = settings
        self.task = task
        self.loader = train_loader
        self.val_data = val_data
        self.metric = metric
        self.checkpoint_dir = checkpoint_dir
        self.callbacks = list(callbacks)
        self.steps_per_epoch = math.ceil(len(train_loader) / settings.grad_accum_steps)
        self.total_steps = settings.epochs * self.steps_per_epoch
        if settings.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            strategy.optimizer, lr_lambda(settings, self.total_steps)
        )
        self.state = TrainState(world_size=self.env.world_size)
        # An elastic job's restarts and sample counts (distml.training.elastic)
        self.elastic = (ElasticBook(train_loader, self.env, checkpoint_dir)
                        if train_loader.elastic is not None else None)
        self.best = BestSoFar(metric, patience=settings.early_stopping_patience)
        # A callback sets it (in on_eval_end, on rank 0 of a one-process run: a search's
        # pruner) to end training after this evaluation, as early stopping would.
        self.stop_requested = False

    @property
    def model(self) -> torch.nn.Module:
        return self.strategy.model

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, *, resume: bool = False) -> TrainState:
        if resume:
            self._restore()
        for cb in self._listeners:
            cb.on_train_start(self)
        self._start, self._paused, self._elapsed0 = time.perf_counter(), 0.0, self.state.elapsed
        stop = self.state.step >= self.total_steps
        while not stop:
            epoch_start, wait_start, samples = time.perf_counter(), self.loader.wait_seconds, 0
            for group in self._step_groups():
                start = time.perf_counter()
                if self.prepare_batch is not None:
                    group = [self.prepare_batch(b) for b in group]
                loss = self.strategy.train_step(group, self.loss)
                self.scheduler.step()
                seconds = time.perf_counter() - start
                n = sum(len(b[0]) for b in group) * self.strategy.data_size
                samples += n
                self.state.step += 1
                self.state.position += len(group)
                self.state.seconds += seconds
                self.state.train_loss.append(loss)
                epoch_end = self.state.position >= len(self.loader)
                record = {
                    "step": self.state.step, "epoch": self.state.epoch, "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0], "samples_per_s": n / max(seconds, 1e-9),
                    "step_seconds": seconds,
                }
                if epoch_end:
                    self._end_epoch(samples, time.perf_counter() - epoch_start,
                                    self.loader.wait_seconds - wait_start)
                for cb in self._listeners:
                    cb.on_step_end(self, record)
                pause = time.perf_counter()
                stop = self._after_step(epoch_end)
                self._paused += time.perf_counter() - pause
                if stop:
                    break
        if self.settings.restore_best:
            self.best.restore(self.strategy)
        for cb in self._listeners:
            cb.on_train_end(self)
        return self.state

    def _end_epoch(self, samples: int, seconds: float, waited: float) -> None:
        """Throughput (all ranks), data-stall fraction (time waiting for batches / epoch
        time) and peak memory of this rank."""
        stats = {"epoch": self.state.epoch, "samples_per_s": samples / max(seconds, 1e-9),
                 "data_stall": waited / max(seconds, 1e-9), "peak_mem_bytes": peak_memory()}
        if self.system is not None:  # every rank's, gathered: a collective on all ranks
            stats["system"] = gather_objects(self.system.summary(), self.env)
        self.state.epochs.append(stats)
        if self.elastic is not None:
            self.elastic.end_epoch(self.state)
        self.state.epoch, self.state.position = self.state.epoch + 1, 0
        for cb in self._listeners:
            cb.on_epoch_end(self, stats)

    def _step_groups(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The rest of the current epoch, grouped into optimizer steps."""
        return step_groups(self.loader.batches(self.state.epoch, self.state.position),
                           self.settings.grad_accum_steps)

    def _after_step(self, epoch_end: bool) -> bool:
        """Evaluate and checkpoint when due; True when training should stop."""
        s, step = self.settings, self.state.step
        last = step >= self.total_steps
        stop = last
        if self.elastic is not None:
            self.elastic.step_done(self.state)
            if self.elastic.stop_requested():  # a node waits to join: save, then leave
                self.save()
                raise SystemExit(0)
        if last or (epoch_end if s.eval_every_steps is None else step % s.eval_every_steps == 0):
            stop = self._evaluate() or last
        due = epoch_end if s.checkpoint_every_steps is None else (
            step % s.checkpoint_every_steps == 0)
        if s.checkpoints and (due or stop):
            self.save()
            for cb in self._listeners:
                cb.on_checkpoint(self, step)
        return stop

    def _evaluate(self) -> bool:
        """Evaluate on val (every rank, the same rows), track the best; True to stop early."""
        x, y = self.val_data
        self.state.elapsed = (self._elapsed0 + time.perf_counter() - self._start
                              - self._paused)
        metrics, _ = self.strategy.evaluate(self.task, x, y)
        self.state.evals.append({"step": self.state.step, "elapsed_s": self.state.elapsed,
                                 **metrics})
        stop = self.best.observe(self.state, metrics[self.metric], step=self.state.step,
                                 weights=self._model_copy)
        for cb in self._listeners:
            cb.on_eval_end(self, metrics)
        return stop or self.stop_requested

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self) -> Path | str:
        sharded = self.strategy.state_dict()
        if self.best.weights is not None:
            sharded["best"] = self.best.weights
        rank_state = {
            "rng": torch.get_rng_state(),
            "scheduler": self.scheduler.state_dict(),
            "progress": asdict(self.state),
        }
        if self.elastic is not None:
            rank_state["samples"] = self.elastic.checkpoint_state()
        return save_checkpoint(
            self.checkpoint_dir, self.state.step, sharded=sharded, rank_state=rank_state,
            extra=self.strategy.extra_state(), env=self.env, keep=self.settings.keep_checkpoints,
        )

    def _restore(self) -> None:
        for path in reversed(checkpoint_paths(self.checkpoint_dir)):
            try:
                rank_state = read_rank_state(path, self.env)
                template = self.strategy.state_template()
                if rank_state["progress"]["best_step"] is not None:
                    template["best"] = self._model_copy()
                loaded = load_sharded(path, template)
                ok = True
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - fall back
                # (CheckpointException, DCP's report of a failed read, is a BaseException)
                logger.warning("checkpoint %s cannot be loaded (%s: %s); trying the previous one",
                               path, type(e).__name__, e)
                ok = False
            if agree(ok, self.env):
                break
        else:
            logger.info("no usable checkpoint in %s; starting from scratch", self.checkpoint_dir)
            return
        self.strategy.load_state_dict(loaded)
        if loaded["extra"] is not None:
            self.strategy.load_extra_state(loaded["extra"])
        self.best.weights = loaded.get("best")
        self.scheduler.load_state_dict(rank_state["scheduler"])
        torch.set_rng_state(rank_state["rng"])
        self.state = TrainState(**rank_state["progress"])
        if self.elastic is not None:
            self.elastic.restored(rank_state.get("samples"), self.state)
        logger.info("resumed from %s (step %d)", path, self.state.step)

    def _model_copy(self) -> dict[str, torch.Tensor]:
        """The weights under canonical names, so a checkpoint's best weights load under any
        strategy."""
        return {k: v.detach().clone() for k, v in self.strategy.model_state_dict().items()}

    def peak_memory_per_rank(self) -> list[int]:
        """Every rank's peak memory, in rank order (a collective: every rank calls it)."""
        return gather_objects(peak_memory(), self.env)

    def result_extras(self) -> dict[str, object]:
        """Strategy-specific entries of result.json (none here)."""
        return {}

    @property
    def _listeners(self) -> list[Callback]:
        return self.callbacks if self.env.is_main else []  # progress and tracking: rank 0's


def step_groups(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], size: int
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Micro-batches grouped ``size`` at a time into optimizer steps (the last may be short)."""
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def peak_memory() -> int:
    """This process's peak memory in bytes: the CUDA allocator's peak, else peak RSS.

    On Linux the peak RSS is read from /proc/self/status (VmHWM, this process's own
    address space): getrusage's ru_maxrss survives exec, so a worker started by a big
    parent (the launcher, verify's driver) would report the parent's peak as its own."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def lr_lambda(s: TrainSettings, total_steps: int):
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
