"""Choose the best candidate on the validation metric; ties go to the smaller model."""

from __future__ import annotations

from typing import Any

from distml.config import METRIC_HIGHER_IS_BETTER


def rank(results: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Candidates best first by ``result["val"][metric]``, then by fewer parameters."""
    sign = -1.0 if METRIC_HIGHER_IS_BETTER[metric] else 1.0
    return sorted(results, key=lambda r: (sign * r["val"][metric], r["params"]))


def is_better(metric: str, new: float, old: float | None) -> bool:
    """Whether ``new`` beats ``old`` on ``metric`` (anything beats no value)."""
    if old is None:
        return True
    return new > old if METRIC_HIGHER_IS_BETTER[metric] else new < old
