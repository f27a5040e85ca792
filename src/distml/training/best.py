"""The best evaluation so far and its weights: early stopping and restore-best for every
training loop. "Better" is ``selection.is_better``, the rule candidates are ranked by, so a
candidate's kept weights are the ones selection would have picked among its evaluations."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from distml.selection import is_better

if TYPE_CHECKING:
    from distml.distributed.strategy import Strategy
    from distml.training.trainer import TrainState

logger = logging.getLogger(__name__)


class BestSoFar:
    """Tracks ``state.best_value``, ``best_step`` and ``evals_since_best`` (saved with the
    training state) and holds the best weights (saved beside the model in checkpoints)."""

    def __init__(self, metric: str, *, patience: int | None) -> None:
        self.metric, self.patience = metric, patience
        self.weights: dict[str, torch.Tensor] | None = None

    def observe(self, state: TrainState, value: float, *, step: int,
                weights: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Record an evaluation; ``weights`` is called only for a new best. True when
        ``patience`` evaluations in a row brought no improvement: time to stop."""
        if is_better(self.metric, value, state.best_value):
            state.best_value, state.best_step, state.evals_since_best = value, step, 0
            self.weights = weights()
        else:
            state.evals_since_best += 1
        if self.patience is not None and state.evals_since_best >= self.patience:
            logger.info("early stopping at step %d: no improvement in %d evaluations",
                        step, self.patience)
            return True
        return False

    def restore(self, strategy: Strategy) -> None:
        """Load the best weights into the model, if there are any."""
        if self.weights is not None:
            strategy.load_model_state_dict(self.weights)
