"""``DriftMonitor``: one model's traffic against its training reference, fed as it comes.

It is what ``distml monitor`` runs over a file, and what a server can run off the request
path: hand it each batch's model inputs and outputs (``update``), hand it labels when they
arrive, keyed by the ids given to ``update`` (``add_labels``), and read ``report()`` whenever
scores are wanted. It keeps the last ``window_rows`` inputs and predictions for the column
and prediction tests, and runs the streaming detectors over everything it was given.
Not thread-safe: one thread owns it (a server feeds it from a queue).

False alarms over time: every alarm has a rate, ``false_alarm_rate`` expected false alarms
per ``horizon`` (10^6) stationary rows at most, however long the traffic runs:

- concept (margin density) and supervised (error-rate window): each window test runs at
  level ``false_alarm_rate * step / horizon`` (union bound over the tests; see detectors);
  an alarm is *active* while it is among the last ``window_rows`` rows (or labels), then
  resets;
- data (the column tests, ``refresh``): a server re-tests its sliding window every few
  seconds; each refresh spends ``false_alarm_rate * new rows / horizon`` of the level (alpha
  spending: the levels of all refreshes over 10^6 rows sum to ``false_alarm_rate``), and
  the effect gate applies on top;
- rates are per row, so replicas that each monitor their share of the traffic keep the
  rate per row of the whole (their budgets add up to the same total), whichever combines.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from distml.drift.columns import (
    FALSE_ALARMS_PER_MILLION_ROWS,
    MIN_JENSEN_SHANNON,
    MIN_WASSERSTEIN,
    Gate,
    feature_drift,
    prediction_drift,
)
from distml.drift.detectors import (
    HORIZON,
    ErrorDetector,
    MarginDensityDetector,
    MarginReference,
    WindowTest,
)
from distml.drift.performance import calibrate, expected_accuracy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftSettings:
    """Defaults: the false-alarm rates are by design; windows and margin density were tuned
    on bench/drift.py's tuning seeds (never the reported ones)."""

    alpha: float = 0.05  # false discovery rate across the columns' tests
    min_wasserstein: float = MIN_WASSERSTEIN  # continuous column: effect to be drifted
    min_jensen_shannon: float = MIN_JENSEN_SHANNON  # discrete/categorical column: the same
    false_alarms_per_million_rows: float = FALSE_ALARMS_PER_MILLION_ROWS  # columns' level cap
    detector: str = "window"  # the error-rate window test alone, or it and a river detector
    margin_density: float = 0.3  # share of the reference inside the margin: sets the threshold
    margin_window: int = 200  # samples per margin-density window
    error_window: int = 100  # labelled samples per error-rate window
    step: int = 10  # samples between window tests
    false_alarm_rate: float = 0.1  # expected false alarms per `horizon` stationary rows, each
    horizon: int = HORIZON  # rows the false alarm rate is per
    window_rows: int = 5000  # recent inputs and predictions kept for the column tests
    pending_labels: int = 100_000  # predictions kept waiting for their label

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def gate(self) -> Gate:
        return Gate(self.alpha, self.min_wasserstein, self.min_jensen_shannon,
                    self.false_alarms_per_million_rows)


class _Ring:
    """The last ``size`` rows of an array stream."""

    def __init__(self, size: int) -> None:
        self.size, self.data, self.count = size, None, 0

    def extend(self, rows: np.ndarray) -> None:
        rows = rows[-self.size:]
        if self.data is None:
            self.data = np.empty((self.size, *rows.shape[1:]), dtype=rows.dtype)
        start = self.count % self.size
        first = min(len(rows), self.size - start)
        self.data[start:start + first] = rows[:first]
        self.data[: len(rows) - first] = rows[first:]
        self.count += len(rows)

    def values(self) -> np.ndarray | None:
        if self.data is None:
            return None
        if self.count < self.size:
            return self.data[: self.count]
        start = self.count % self.size
        return np.concatenate([self.data[start:], self.data[:start]])


class DriftMonitor:
    """Data drift, label-free concept drift and (with labels) supervised drift of one model.

    ``reference``: the artifact's reference.json; ``feature_names``: the model's input
    features (spec.json), the columns of the ``x`` given to ``update``; ``labels``: the class
    names (None for regression).
    """

    def __init__(self, reference: dict[str, Any], *, feature_names: list[str],
                 labels: list[str] | None, settings: DriftSettings | None = None) -> None:
        self.reference, self.feature_names, self.labels = reference, feature_names, labels
        self.settings = s = settings or DriftSettings()
        self.rows = 0
        self._inputs, self._outputs = _Ring(s.window_rows), _Ring(s.window_rows)
        self.margin = self.errors = None
        self.label_free_alarms: list[int] = []
        self.supervised_alarms: list[int] = []
        self._pending: OrderedDict[Hashable, int] = OrderedDict()  # id -> predicted class
        self.labelled = self.unknown_labels = self.num_errors = self._next_label = 0
        self._refreshed = 0  # rows at the last refresh (alpha spending)
        self._last_tests: dict[str, Any] | None = None  # the last refresh's column tests
        calibration = reference.get("calibration")
        self.temperature = calibration["temperature"] if calibration else None
        self._confidence = _Ring(s.window_rows)  # calibrated top probability per row
        self._correct = _Ring(s.window_rows)  # 1 - error per labelled row, the last ones
        if reference.get("margin_histogram") is not None:
            self.margin = MarginDensityDetector(
                MarginReference(tuple(reference["margin_histogram"])),
                density=s.margin_density, window=s.margin_window, step=s.step,
                alpha=s.false_alarm_rate, horizon=s.horizon)
            self.errors = ErrorDetector(
                s.detector, ref_errors=reference["held_out_errors"],
                ref_rows=reference["held_out_rows"],
                window=s.error_window, step=s.step, alpha=s.false_alarm_rate,
                horizon=s.horizon)

    @property
    def classification(self) -> bool:
        return self.labels is not None

    def update(self, x: np.ndarray, outputs: np.ndarray,
               ids: Sequence[Hashable] | None = None) -> None:
        """One batch: model inputs (N, F) and outputs, class probabilities (N, C) or
        predicted values (N,). ``ids`` (default: the rows' positions) key later labels;
        a row whose id is None is not kept for one."""
        x = np.asarray(x, dtype=np.float32)
        outputs = np.asarray(outputs, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names) or len(outputs) != len(x):
            raise ValueError(f"update needs inputs (N, {len(self.feature_names)}) and N "
                             f"outputs; got {x.shape} and {outputs.shape}")
        n = len(x)
        self._inputs.extend(x)
        if self.classification:
            predicted = outputs.argmax(axis=1)
            self._outputs.extend(predicted)
            if self.margin is not None:
                self.label_free_alarms += self.margin.update(outputs)
            if self.temperature is not None:
                self._confidence.extend(calibrate(outputs, self.temperature).max(axis=1))
            keys = range(self.rows, self.rows + n) if ids is None else ids
            # An id of None: a prediction no label will come for (an anonymous request),
            # not kept waiting, so it cannot push out those that will get one.
            self._pending.update((k, p) for k, p in zip(keys, predicted.tolist(), strict=True)
                                 if k is not None)
            while len(self._pending) > self.settings.pending_labels:
                self._pending.popitem(last=False)
        else:
            self._outputs.extend(outputs)
        self.rows += n

    def add_labels(self, labels: Sequence[Any], ids: Sequence[Hashable] | None = None) -> int:
        """True labels (class names; other values are str()-ed) of earlier predictions, by
        the ids given to ``update`` (default: positions, in order from the first label).
        Returns how many matched a waiting prediction."""
        if not self.classification or self.errors is None:
            raise ValueError("labels need a classifier with a reference (supervised drift "
                             "is measured on the error stream)")
        if ids is None:
            ids = range(self._next_label, self._next_label + len(labels))
            self._next_label += len(labels)
        index = {c: i for i, c in enumerate(self.labels)}
        errors = []
        for key, label in zip(ids, labels, strict=True):
            predicted = self._pending.pop(key, None)
            if predicted is None:
                continue
            truth = index.get(str(label))
            self.unknown_labels += truth is None
            errors.append(int(truth != predicted))
        self.labelled += len(errors)
        self.num_errors += sum(errors)
        if errors:
            self._correct.extend(1 - np.asarray(errors, np.int8))
        self.supervised_alarms += self.errors.update(errors)
        return len(errors)

    def report(self, *, alpha: float | None = None) -> dict[str, Any]:
        """Scores and alarms so far: column tests on the window (at ``alpha``, default the
        settings'), the detectors' history, the estimated accuracy."""
        return self._report(self._column_tests(alpha))

    def _column_tests(self, alpha: float | None) -> dict[str, Any]:
        s = self.settings
        gate = s.gate if alpha is None else replace(s.gate, alpha=alpha)
        x = self._inputs.values()
        columns = [] if x is None else feature_drift(self.reference, x, self.feature_names,
                                                     gate=gate)
        outputs = self._outputs.values()
        prediction = None if outputs is None else prediction_drift(
            self.reference, outputs, self.labels or [], gate=gate).to_dict()
        return {"window_rows": 0 if x is None else len(x), "columns_alpha": gate.alpha,
                "columns": [c.to_dict() for c in columns],
                "drifted_features": [c.column for c in columns if c.drifted],
                "max_psi": max((c.psi for c in columns), default=0.0),
                "prediction": prediction}

    def _report(self, tests: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        label_free = self._label_free()
        supervised = self._supervised()
        enough = supervised is not None and self.labelled >= s.error_window
        source = "labels" if enough else "margin density" if label_free is not None else None
        concept = (supervised["drift"] if enough
                   else bool(label_free is not None and label_free["drift"]))
        return {
            "rows": self.rows, "settings": s.to_dict(), **tests,
            "label_free": label_free, "supervised": supervised,
            "performance": self._performance(),
            "concept_drift": concept,
            "concept_drift_from": source,  # None: not measured (regression, no labels)
        }

    def refresh(self) -> dict[str, Any]:
        """The report a periodic refresh publishes: the column tests at the level the rows
        since the last refresh earned (``false_alarm_rate * new rows / horizon``, at most
        ``alpha``), so the data alarm keeps its rate per row over any number of refreshes.
        With no new rows (labels alone arrived) the last column tests stand: a test at level
        0 would switch the data alarm off, to be counted again when rows come."""
        s = self.settings
        new, self._refreshed = self.rows - self._refreshed, self.rows
        if new or self._last_tests is None:
            self._last_tests = self._column_tests(
                min(s.alpha, s.false_alarm_rate * new / s.horizon))
        return self._report(self._last_tests)

    def _active(self, alarms: list[int], seen: int) -> bool:
        """An alarm among the last ``window_rows`` positions: on until the stream calms."""
        return bool(alarms) and alarms[-1] >= seen - self.settings.window_rows

    def _performance(self) -> dict[str, Any] | None:
        """CBPE: expected accuracy of the window's rows, with its interval; the realised
        accuracy of the last labelled rows to compare."""
        conf = self._confidence.values()
        if self.temperature is None or conf is None:
            return None
        cal = self.reference["calibration"]
        est, low, high = expected_accuracy(conf, cal)
        correct = self._correct.values()
        return {"method": "CBPE (temperature-scaled probabilities)",
                "temperature": self.temperature, "rows": len(conf),
                "estimated_accuracy": est, "interval": [low, high],
                "reference_accuracy": cal["held_out_accuracy"],
                "realised_accuracy": None if correct is None else float(correct.mean()),
                "realised_rows": 0 if correct is None else len(correct)}

    def _label_free(self) -> dict[str, Any] | None:
        if self.margin is None:
            return None
        test: WindowTest = self.margin.test
        return {
            "method": "margin density (MD3)", "threshold": self.margin.threshold,
            "reference_density": self.margin.reference_density, "density": test.rate,
            "window": test.window, "bounds": [test.bounds.low / test.window,
                                              test.bounds.high / test.window],
            "history": [list(p) for p in test.history],
            "alarms": list(self.label_free_alarms), "drift": bool(self.label_free_alarms),
            "active": self._active(self.label_free_alarms, self.rows),
        }

    def _supervised(self) -> dict[str, Any] | None:
        if self.errors is None or self.labelled == 0:
            return None
        test = self.errors.test
        return {
            "method": f"{self.errors.method} + error-rate window", "labels": self.labelled,
            "unknown_labels": self.unknown_labels,
            "error_rate": self.num_errors / self.labelled,
            "reference_error_rate": test.ref_rate if test is not None else None,
            "reference_split": self.reference.get("held_out_split"),
            "window": test.window if test is not None else None,
            "bound": test.bounds.high / test.window if test is not None else None,
            "history": [list(p) for p in test.history] if test is not None else [],
            "alarms": list(self.supervised_alarms), "drift": bool(self.supervised_alarms),
            "active": self._active(self.supervised_alarms, self.labelled),
        }
