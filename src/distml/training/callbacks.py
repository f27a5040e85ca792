"""The training loop's extension point: progress displays and trackers subclass ``Callback``
and override the hooks they need (rank 0 calls them; the others never do)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distml.training.trainer import Trainer


class Callback:
    """Hooks called by the trainer; each does nothing unless overridden."""

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        pass

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, stats: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, trainer: Trainer, step: int) -> None:
        """A checkpoint of ``step`` is complete: a restart replays only later steps, so
        anything buffered up to here must be made durable now."""

    def on_train_end(self, trainer: Trainer) -> None:
        pass


class MetricLines(Callback):
    """Prints ``val-<metric>=<value>`` for every validation metric at each evaluation, one
    line each, on stdout: what Katib's StdOut metrics collector reads from a trial."""

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            print(f"val-{name}={value:.6g}", flush=True)
