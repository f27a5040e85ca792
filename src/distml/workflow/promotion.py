"""The promotion rule: when a newly registered version takes ``production``.

``distml run`` compares the new version's test metric with the one production recorded;
``distml watch`` scores both on the newest rows. How each scores differs; the rule, and
the registry's alias move with its reason, are this one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distml.registry import PRODUCTION, Registry
from distml.selection import is_better


@dataclass(frozen=True)
class Promotion:
    """A new version against production: its score, production's version and score."""

    model: str
    version: int
    metric: str
    new: float
    current: int | None  # production's version (None: no production yet)
    old: float | None  # production's score (None: it has none, or there is no production)

    @property
    def promoted(self) -> bool:
        """The new version is (or already was) production: it beats the current one on the
        metric; anything beats no score."""
        return self.current == self.version or is_better(self.metric, self.new, self.old)


def weigh(registry: Registry, model: str, version: int, *, metric: str, new: float,
          score: Callable[[Path], float | None]) -> Promotion:
    """Version ``version`` of ``model`` (scored ``new``) against production, scored by
    ``score`` from its artifact folder."""
    current = registry.aliases(model).get(PRODUCTION)
    old = None if current is None else score(registry.get(model, current).path)
    return Promotion(model, version, metric, new, current, old)


def promote(registry: Registry, promotion: Promotion, *, reason: str) -> bool:
    """Move ``production`` to the new version if the rule says so (with ``reason`` in the
    audit log); whether it is production now."""
    if promotion.promoted and promotion.current != promotion.version:
        registry.set_alias(promotion.model, PRODUCTION, promotion.version, reason=reason)
    return promotion.promoted
