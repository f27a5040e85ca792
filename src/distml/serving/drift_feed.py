"""Drift monitoring of served traffic, off the request path.

Each served version whose artifact has a ``reference.json`` (the select stage writes it) gets
a ``DriftFeed``. The request path only appends the request's raw rows, the model's outputs
and the request's ``id`` to a queue: it never waits and never fails for monitoring; when the
queue already holds ``serve.monitor_queue_rows`` rows the request's rows are left
unmonitored and counted (``distml_drift_dropped_rows``). One thread owns the
``DriftMonitor`` (it is not thread-safe): every ``_POLL_S`` it drains the queue, preprocesses
the rows as the model did (the reference is of model inputs), updates the monitor, and every
``serve.monitor_interval_s`` while rows arrive it refreshes the ``distml_drift_*`` gauges
from the monitor's ``refresh()`` (whose alarms keep a false-alarm rate per row however
often it runs; see drift.monitor) and counts each alarm that turns on
(``distml_drift_alarms_total``). The clock is a seam: a simulation drives ``turn()`` with
its own. Reports and feedback labels are asked of that thread as commands
(futures); a command sees every row offered before it.

Feedback: a prediction is keyed by the protocol's request ``id`` and the row's position in
the request. ``POST /v2/models/{name}/feedback`` takes ``{"ids": [...], "labels": [...]}``:
each id names a request, its label is the true class of a one-row request, or a list of one
label per row. Requests without an ``id`` are monitored (data drift, margin density) but
cannot be labelled later; ids should be unique (a reused id replaces the earlier
prediction). Labels reach only the monitor of the version serving now: a prediction of a
version since replaced is not matched.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from distml.config import ServeConfig
from distml.drift.monitor import DriftMonitor
from distml.drift.reference import REFERENCE, read_reference
from distml.serving.metrics import Metrics
from distml.serving.model import ServedModel
from distml.serving.protocol import ProtocolError, bad

logger = logging.getLogger(__name__)

_POLL_S = 0.05  # the thread drains the queue this often (the request path never wakes it)
MAX_FEEDBACK = 100_000  # labels in one feedback request


@dataclass
class _Batch:
    x: np.ndarray  # (N, columns) raw rows, as the request carried them
    outputs: np.ndarray  # (N, C) class probabilities or (N,) predictions
    request_id: str | None


class DriftFeed:
    """The drift monitor of one served version and the thread that owns it."""

    def __init__(self, model: ServedModel, settings: ServeConfig, metrics: Metrics, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model, self.metrics, self.clock = model, metrics, clock
        self.name = model.name
        self.max_rows, self.interval_s = settings.monitor_queue_rows, settings.monitor_interval_s
        self.output = "probabilities" if model.artifact.task == "classification" else "prediction"
        self._cond = threading.Condition()
        self._batches: deque[_Batch] = deque()
        self._commands: deque[tuple[Callable[[DriftMonitor], Any], Future]] = deque()
        self.queued_rows = self.dropped_rows = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why the monitor could not be built
        self.monitor: DriftMonitor | None = None  # built on the thread (or by ``build``)
        self._published, self._fresh = 0.0, False
        self._alarms_on = {"data": False, "concept": False, "supervised": False}

    @staticmethod
    def wanted(model: ServedModel, settings: ServeConfig) -> bool:
        """Monitoring is on (the default) and the artifact has a reference to compare with."""
        if not settings.monitor or model.artifact.task == "language_modeling":
            return False
        if not (model.artifact.path / REFERENCE).is_file():
            logger.info("%s:%s is not drift-monitored: its artifact has no %s (trained before "
                        "distml recorded one)", model.name, model.version, REFERENCE)
            return False
        return True

    # -- the request path (event loop thread) ----------------------------------------------

    def offer(self, x: np.ndarray, outputs: dict[str, np.ndarray], request_id: str | None
              ) -> None:
        """Queue one request's rows for the monitor; drops them (counted) when full."""
        n = len(x)
        with self._cond:  # held by the thread only to swap the queue out: microseconds
            if self._closed:
                return
            if self.queued_rows + n > self.max_rows:
                self.dropped_rows += n
                dropped = True
            else:
                self._batches.append(_Batch(x, outputs[self.output], request_id))
                self.queued_rows += n
                dropped = False
        if dropped:
            self.metrics.drift_dropped.labels(self.name).inc(n)

    def ask(self, fn: Callable[[DriftMonitor], Any]) -> Future:
        """Run ``fn(monitor)`` on the monitor's thread, after the rows offered so far."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                future.set_exception(ProtocolError(
                    404, f"{self.name}:{self.model.version} is no longer served"))
                return future
            self._commands.append((fn, future))
            self._cond.notify()
        return future

    # -- lifetime --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"distml-drift-{self.name}-{self.model.version}")
        self._thread.start()

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the thread (queued rows are dropped); ``timeout_s``: wait that long for it."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if timeout_s is not None and self._thread is not None:
            self._thread.join(timeout_s)

    # -- the monitor's thread --------------------------------------------------------------

    def build(self) -> bool:
        """The monitor from the artifact's reference, and its first gauges; False (and
        ``error`` says why) when it cannot be built."""
        artifact = self.model.artifact
        try:
            self.monitor = DriftMonitor(read_reference(artifact.path),
                                        feature_names=list(artifact.spec["feature_names"]),
                                        labels=artifact.labels)
        except Exception as e:  # noqa: BLE001 - serving goes on unmonitored, says why
            self.error = f"the drift monitor could not be built: {e}"
            logger.error("%s:%s: %s", self.name, self.model.version, self.error)
            return False
        self._publish(self.monitor)
        self._published = self.clock()
        return True

    def _run(self) -> None:
        if not self.build():
            self.close()
            self._fail_commands()
            return
        while self.turn(wait_s=_POLL_S):
            pass

    def turn(self, *, wait_s: float = 0.0) -> bool:
        """One turn of the monitor's thread: take the queued rows and commands, update, answer,
        and refresh the gauges when ``monitor_interval_s`` of ``clock`` has passed since the
        last refresh and something changed. False once closed. (The thread calls it in a
        loop; a simulation can call it with its own clock.)"""
        monitor = self.monitor
        assert monitor is not None, "build() first"
        with self._cond:
            if wait_s and not (self._commands or self._closed):
                self._cond.wait(wait_s)
            batches, self._batches = self._batches, deque()
            commands, self._commands = self._commands, deque()
            self.queued_rows, closed = 0, self._closed
        if closed:
            self._fail_commands(commands)
            return False
        if batches:
            self._update(monitor, batches)
        self._fresh = self._fresh or bool(batches) or bool(commands)  # labels change it too
        for fn, future in commands:
            self._answer(monitor, fn, future)
        if self._fresh and self.clock() - self._published >= self.interval_s:
            self._publish(monitor)
            self._published, self._fresh = self.clock(), False
        return True

    def _update(self, monitor: DriftMonitor, batches: deque[_Batch]) -> None:
        """Everything queued since the last turn in one update: the per-call work (the
        preprocessing, the detectors' bookkeeping) is paid once per turn, not per request,
        which keeps this thread's share of the interpreter small at high request rates."""
        try:
            raw = np.concatenate([b.x for b in batches])
            x = self.model.artifact.preprocess(raw).numpy()  # (N, F) as the model saw them
            outputs = np.concatenate([b.outputs for b in batches])
            ids: list[Hashable] = [None if b.request_id is None else (b.request_id, i)
                                   for b in batches for i in range(len(b.x))]
            monitor.update(x, outputs, ids)
        except Exception:  # a bug here must not stop monitoring for good
            logger.exception("%s: a batch could not be monitored", self.name)

    @staticmethod
    def _answer(monitor: DriftMonitor, fn: Callable, future: Future) -> None:
        try:
            future.set_result(fn(monitor))
        except Exception as e:  # noqa: BLE001 - the asker gets it
            future.set_exception(e)

    def _fail_commands(self, commands: deque | None = None) -> None:
        with self._cond:
            commands = (commands or deque()) + self._commands
            self._commands = deque()
        for _, future in commands:
            future.set_exception(ProtocolError(404, self.error or f"{self.name}:"
                                               f"{self.model.version} is no longer served"))

    def _publish(self, monitor: DriftMonitor) -> None:
        """The gauges from a fresh refresh (a new version starts them from its empty state);
        an alarm that turns on is counted."""
        with self._cond:
            if self._closed:  # replaced: the new version's feed owns the gauges now
                return
        try:
            report = monitor.refresh()
        except Exception:  # noqa: BLE001 - keep serving; the next refresh may do
            logger.exception("%s: the drift report failed", self.name)
            return
        m, name = self.metrics, self.name
        cols = report["columns"]
        m.drift_pvalue.labels(name).set(min((c["p_adjusted"] for c in cols), default=1.0))
        m.drift_features.labels(name).set(len(report["drifted_features"]))
        m.drift_psi.labels(name).set(report["max_psi"])
        m.drift_window.labels(name).set(report["window_rows"])
        m.drift_rows.labels(name).set(report["rows"])
        m.drift_queue.labels(name).set(self.queued_rows)
        label_free, supervised = report["label_free"], report["supervised"]
        for kind, on in (("data", bool(report["drifted_features"])),
                         ("concept", bool(label_free and label_free["active"])),
                         ("supervised", bool(supervised and supervised["active"]))):
            m.drift_alarm.labels(name, kind).set(int(on))
            if on and not self._alarms_on[kind]:
                m.drift_alarms.labels(name, kind).inc()
            self._alarms_on[kind] = on
        density = label_free["density"] if label_free else None
        m.drift_margin.labels(name).set(float("nan") if density is None else density)
        m.drift_error.labels(name).set(supervised["error_rate"] if supervised
                                       else float("nan"))
        perf = report["performance"]
        m.drift_accuracy.labels(name).set(perf["estimated_accuracy"] if perf
                                          else float("nan"))


# -- the feedback route's body ---------------------------------------------------------------

def parse_feedback(body: bytes) -> tuple[list[Any], list[tuple[str, int]]]:
    """``{"ids": [...], "labels": [...]}`` -> (labels, (request id, row) keys), one per row."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise bad(f"the feedback body is not valid JSON: {str(e)[:200]}") from None
    example = '{"ids": ["request-1", "request-2"], "labels": ["3", ["1", "7"]]}'
    if not isinstance(req, dict) or set(req) - {"ids", "labels"}:
        raise bad(f"the feedback body must be an object with 'ids' and 'labels', e.g. {example}")
    ids, labels = req.get("ids"), req.get("labels")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise bad(f"ids: must be a list of the requests' 'id' strings, e.g. {example}")
    if not isinstance(labels, list) or len(labels) != len(ids):
        raise bad(f"labels: must be a list with one entry per id ({len(ids)}): a label, or "
                  f"a list of one label per row of that request; e.g. {example}")
    keys, flat = [], []
    for j, (rid, label) in enumerate(zip(ids, labels, strict=True)):
        rows = label if isinstance(label, list) else [label]
        for i, value in enumerate(rows):
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise bad(f"labels[{j}]: {str(value)[:40]!r} is not a class label (a string, "
                          "or an integer for classes named by numbers)")
            keys.append((rid, i))
            flat.append(value)
    if len(flat) > MAX_FEEDBACK:
        raise bad(f"labels: {len(flat)} labels in one request; send at most {MAX_FEEDBACK}")
    return flat, keys


def label_rows(monitor: DriftMonitor, labels: list[Any], keys: list[tuple[str, int]]
               ) -> dict[str, int]:
    """The feedback command, on the monitor's thread."""
    matched = monitor.add_labels(labels, keys)
    return {"labels": len(labels), "matched": matched}
