"""Streaming drift detectors over per-sample bits: errors (supervised) and margin hits
(label-free).

- ``WindowTest``: the rate of a 0/1 stream over a sliding window against a reference rate
  measured on held-out rows. The alarm bounds come from the beta-binomial predictive
  distribution of the window's count given the reference (Jeffreys prior on the reference
  rate), so the reference's own sampling error is accounted for. The window is tested every
  ``step`` samples, each test at level ``alpha * step / horizon``: by the union bound the
  expected number of false alarms in any ``horizon`` stationary samples is at most
  ``alpha``, however long the stream runs (a *rate* per sample, not a once-per-horizon
  budget), and after an alarm the window starts empty, so the alarm resets.
- ``MarginDensityDetector``: MD3 (Sethi & Kantardzic, 2017) for any model with class
  probabilities: a sample is in the margin when its top-2 probability difference is below a
  threshold; a significant change of the margin density, either way, is drift, no label needed.
- ``ErrorDetector``: supervised drift: a one-sided ``WindowTest`` of the error rate against
  the held-out error (``window``, the default: calibrated as above), optionally with one of
  river's detectors (ADWIN, DDM, HDDM_A, HDDM_W, Page-Hinkley) alarming too; river's
  detectors have no false-alarm rate per sample over a long stream, so adding one gives up
  the bound.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from distml.errors import ConfigError

logger = logging.getLogger(__name__)

HORIZON = 1_000_000  # ``alpha`` bounds the expected false alarms per this many samples


def _river(name: str) -> Callable[[], Any]:
    from river import drift

    return {
        "adwin": drift.ADWIN,
        "ddm": drift.binary.DDM,
        "hddm_a": drift.binary.HDDMA,
        "hddm_w": drift.binary.HDDMW,
        # on an error stream only an increase is drift
        "page_hinkley": lambda: drift.PageHinkley(mode="up"),
    }[name]


RIVER_DETECTORS = ("adwin", "ddm", "hddm_a", "hddm_w", "page_hinkley")
DETECTORS = ("window", *RIVER_DETECTORS)


def make_river_detector(name: str) -> Any:
    """A river detector for a 0/1 error stream, by name (river's default parameters); None
    for ``window`` (the window test alone)."""
    if name not in DETECTORS:
        raise ConfigError(f"drift detector {name!r} is not known; choose from "
                          f"{', '.join(DETECTORS)}")
    return None if name == "window" else _river(name)()


def margins(probs: np.ndarray) -> np.ndarray:
    """(N, C) class probabilities -> (N,) difference between the two highest."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"margins need (N, C >= 2) class probabilities, got {probs.shape}")
    top2 = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


@dataclass(frozen=True)
class Bounds:
    """Counts in a window of ``window`` samples that are still consistent with the reference."""

    window: int
    low: int  # alarm below this count
    high: int  # alarm above this count
    per_test_alpha: float


def window_bounds(ref_count: int, ref_rows: int, *, window: int, step: int, alpha: float,
                  horizon: int = HORIZON, two_sided: bool = True) -> Bounds:
    """Alarm bounds for a window's count from the reference's ``ref_count`` of ``ref_rows``.

    The window count K of a stationary stream follows BetaBinomial(window, a, b) with
    a = ref_count + 1/2, b = ref_rows - ref_count + 1/2: the binomial averaged over the
    reference's Jeffreys posterior of the rate. With ``horizon / step`` tests per horizon, each
    is run at level alpha * step / horizon (Bonferroni, valid for overlapping windows too).
    """
    if not 0 <= ref_count <= ref_rows or ref_rows < 1:
        raise ValueError(f"reference count {ref_count} of {ref_rows} rows is not a valid rate")
    level = alpha / max(1, math.ceil(horizon / step))
    tail = level / 2 if two_sided else level
    dist = stats.betabinom(window, ref_count + 0.5, ref_rows - ref_count + 0.5)
    low = int(dist.ppf(tail)) if two_sided else 0
    high = int(dist.isf(tail))  # P(K > high) <= tail
    return Bounds(window, low, high, level)


class WindowTest:
    """Sliding-window rate test of a 0/1 stream against a reference rate (see module doc).

    ``update(bits)`` returns the stream positions (0-based, over every bit seen) where an
    alarm fired. After an alarm the window starts empty, so one change alarms once per
    ``window`` samples while it lasts.
    """

    def __init__(self, ref_count: int, ref_rows: int, *, window: int = 200, step: int = 10,
                 alpha: float = 0.01, horizon: int = HORIZON, two_sided: bool = True,
                 history: int = 2000) -> None:
        if window < 1 or step < 1 or not 0 < alpha < 1:
            raise ValueError(f"window={window}, step={step} must be >= 1 and alpha={alpha} in "
                             "(0, 1)")
        self.bounds = window_bounds(ref_count, ref_rows, window=window, step=step, alpha=alpha,
                                    horizon=horizon, two_sided=two_sided)
        self.ref_rate = ref_count / ref_rows
        self.window, self.step = window, step
        self._bits: deque[int] = deque(maxlen=window)
        self._sum = 0
        self._since = 0  # bits since the last test
        self.seen = 0
        self.history: deque[tuple[int, float]] = deque(maxlen=history)  # (position, rate)

    @property
    def rate(self) -> float | None:
        """The current window's rate (None before any bit)."""
        return self._sum / len(self._bits) if self._bits else None

    def update(self, bits: Iterable[int]) -> list[int]:
        alarms = []
        lo, hi, window, step = self.bounds.low, self.bounds.high, self.window, self.step
        for b in bits:
            b = int(b)
            if len(self._bits) == window:
                self._sum -= self._bits[0]
            self._bits.append(b)
            self._sum += b
            self.seen += 1
            self._since += 1
            if len(self._bits) == window and self._since >= step:
                self._since = 0
                self.history.append((self.seen - 1, self._sum / window))
                if self._sum < lo or self._sum > hi:
                    alarms.append(self.seen - 1)
                    self._bits.clear()
                    self._sum = 0
        return alarms


@dataclass(frozen=True)
class MarginReference:
    """The model's margins on its held-out rows: a histogram over [0, 1]."""

    counts: tuple[int, ...]  # equal-width bins over [0, 1]

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def below(self, threshold: float) -> int:
        """Reference samples whose margin is below ``threshold`` (a bin edge, rounded down)."""
        bins = len(self.counts)
        return sum(self.counts[: int(math.floor(threshold * bins + 1e-9))])

    def threshold_for(self, density: float) -> float:
        """The smallest bin edge with at least ``density`` of the reference below it."""
        bins, total, acc = len(self.counts), self.rows, 0
        for i, c in enumerate(self.counts):
            acc += c
            if acc >= density * total:
                return (i + 1) / bins
        return 1.0

    @classmethod
    def from_margins(cls, m: np.ndarray, *, bins: int = 100) -> MarginReference:
        counts, _ = np.histogram(np.clip(m, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
        return cls(tuple(int(c) for c in counts))


class MarginDensityDetector:
    """Label-free drift: the density of samples in the classifier's margin (MD3)."""

    def __init__(self, reference: MarginReference, *, density: float = 0.25,
                 window: int = 200, step: int = 10, alpha: float = 0.01,
                 horizon: int = HORIZON) -> None:
        # The threshold is set where `density` of the reference lies in the margin: what
        # counts as "near the boundary" then means the same for a calibrated forest and an
        # overconfident network.
        self.threshold = reference.threshold_for(density)
        self.ref_count, self.ref_rows = reference.below(self.threshold), reference.rows
        self.test = WindowTest(self.ref_count, self.ref_rows, window=window, step=step,
                               alpha=alpha, horizon=horizon, two_sided=True)

    @property
    def reference_density(self) -> float:
        return self.ref_count / self.ref_rows

    def in_margin(self, probs: np.ndarray) -> np.ndarray:
        return margins(probs) < self.threshold

    def update(self, probs: np.ndarray) -> list[int]:
        return self.test.update(self.in_margin(probs))


class ErrorDetector:
    """Supervised drift on the error stream: when the held-out error is known, a window test
    of the error rate against it (one-sided); with a river ``method``, that detector too."""

    def __init__(self, method: str = "window", *, ref_errors: int | None = None,
                 ref_rows: int | None = None, window: int = 200, step: int = 10,
                 alpha: float = 0.01, horizon: int = HORIZON) -> None:
        self.method = method
        self.river = make_river_detector(method)
        self.test = None
        if ref_errors is not None and ref_rows:
            self.test = WindowTest(ref_errors, ref_rows, window=window, step=step,
                                   alpha=alpha, horizon=horizon, two_sided=False)
        self.seen = 0

    def update(self, errors: Iterable[int]) -> list[int]:
        """Feed 0/1 errors; returns the positions where either part alarmed."""
        errors = [int(e) for e in errors]
        alarms = set(self.test.update(errors)) if self.test is not None else set()
        river = self.river
        for i, e in enumerate(errors if river is not None else ()):
            river.update(e)
            if river.drift_detected:
                alarms.add(self.seen + i)
        self.seen += len(errors)
        return sorted(alarms)
