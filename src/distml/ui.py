"""Terminal output for the CLI: rich progress on a terminal, plain log lines otherwise."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from distml.execution.base import ProgressHandle
from distml.processes import LOG_FORMAT
from distml.training.callbacks import Callback

logger = logging.getLogger("distml")


def setup_logging(console: Console, *, quiet: bool) -> None:
    root = logging.getLogger("distml")
    root.handlers.clear()
    root.propagate = False
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler(console.file)
        handler.setFormatter(logging.Formatter(LOG_FORMAT.format(who="%(name)s")))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)


class ConsoleReporter:
    """Stage lines plus, per candidate, a progress bar (terminal) or periodic log lines."""

    def __init__(self, console: Console, *, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if not self.quiet:
            self.console.print(f"[bold cyan]▶ {name}[/]")
        yield
        if not self.quiet:
            self.console.print(f"[green]✓ {name}[/] [dim]{time.perf_counter() - start:.1f}s[/]")

    def progress(self, desc: str, total: int) -> ProgressHandle:
        """A progress handle for an executor's map (see distml.execution)."""
        if self.quiet:
            return _SilentTask()
        if self.console.is_terminal:
            return _RichTask(self.console, desc, total)
        return _LogTask(desc, total)

    def training_callbacks(self, candidate: str) -> Sequence[Any]:
        if self.quiet:
            return ()
        if self.console.is_terminal:
            return (_RichTrainingProgress(self.console, candidate),)
        return (_PlainTrainingLog(candidate),)


class _RichTrainingProgress(Callback):
    def __init__(self, console: Console, candidate: str) -> None:
        self.candidate = candidate
        self.progress = Progress(
            TextColumn("  [bold]{task.fields[name]}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ep {task.fields[epoch]} loss {task.fields[loss]:.4f} "
                       "{task.fields[rate]:,.0f} samples/s {task.fields[val]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = None

    def on_train_start(self, trainer: Any) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=trainer.total_steps, completed=trainer.state.step,
            name=self.candidate, epoch=trainer.state.epoch, loss=float("nan"), rate=0.0, val="",
        )

    def on_step_end(self, trainer: Any, record: dict[str, float]) -> None:
        self.progress.update(self.task, completed=record["step"], epoch=record["epoch"],
                             loss=record["loss"], rate=record["samples_per_s"])

    def on_eval_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.progress.update(self.task, val=f"val {trainer.metric} {metrics[trainer.metric]:.4f}")

    def on_train_end(self, trainer: Any) -> None:
        self.progress.stop()


class _PlainTrainingLog(Callback):
    """About ten lines per candidate, for logs that are not a terminal."""

    def __init__(self, candidate: str) -> None:
        self.candidate = candidate
        self.every = 1

    def on_train_start(self, trainer: Any) -> None:
        self.every = max(1, trainer.total_steps // 10)
        logger.info("training %s: %d steps", self.candidate, trainer.total_steps)

    def on_step_end(self, trainer: Any, record: dict[str, float]) -> None:
        if record["step"] % self.every == 0 or record["step"] == trainer.total_steps:
            logger.info("%s step %d/%d epoch %d loss %.4f lr %.2e %.0f samples/s",
                        self.candidate, record["step"], trainer.total_steps, record["epoch"],
                        record["loss"], record["lr"], record["samples_per_s"])

    def on_epoch_end(self, trainer: Any, stats: dict[str, float]) -> None:
        logger.info("%s epoch %d: %.0f samples/s, data stall %.1f%%, peak memory %.0f MiB",
                    self.candidate, stats["epoch"], stats["samples_per_s"],
                    100 * stats["data_stall"], stats["peak_mem_bytes"] / 2**20)

    def on_eval_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        logger.info("%s eval at step %d: %s", self.candidate, trainer.state.step, shown)


class _SilentTask:
    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _RichTask:
    """A transient bar; ``advance`` may be called from executor callback threads."""

    def __init__(self, console: Console, desc: str, total: int) -> None:
        self.progress = Progress(
            TextColumn(f"  {desc}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(desc, total=total)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def close(self) -> None:
        self.progress.stop()


class _LogTask:
    def __init__(self, desc: str, total: int) -> None:
        self.desc, self.total, self.done = desc, total, 0
        self.start = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        logger.info("%s: %d/%d items in %.1fs", self.desc, self.done, self.total,
                    time.perf_counter() - self.start)
