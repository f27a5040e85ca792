"""Drift monitoring of a served model, off the request path.

A request that got its outputs hands the rows, the class probabilities and the request's
``id`` to ``ServingMonitor.observe``, which only puts them on a bounded queue (when it is
full the batch is dropped and counted; a request never waits for monitoring). One thread owns
the version's ``DriftMonitor``: it takes batches off the queue, preprocesses the raw rows as
the model does (the reference is in the model's input space) and feeds the detectors, and
every ``serve.monitor_interval_s`` it computes the report and publishes it as Prometheus
gauges. ``GET /v2/models/{name}/drift`` reads a fresh report; ``POST .../feedback`` queues
true labels, matched to earlier predictions by request id (the protocol's ``id``; row i of a
request of several rows is ``<id>/<i>``).

Each loaded version has its own monitor, built from its own ``reference.json``: after a hot
reload the new version starts with an empty window. Under several replicas each replica
monitors the requests it served.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from distml.errors import ArtifactError
from distml.monitoring.monitor import DriftMonitor
from distml.monitoring.reference import read_reference
from distml.serving.metrics import Metrics
from distml.serving.model import ServedModel
from distml.serving.protocol import ProtocolError

logger = logging.getLogger(__name__)

QUEUE_BATCHES = 1024  # batches waiting for the monitor's thread; past it, dropped


def row_ids(request_id: str | None, rows: int) -> list[str] | None:
    """The keys labels are matched by: the request's id, with ``/<row>`` for several rows."""
    if request_id is None:
        return None
    return [request_id] if rows == 1 else [f"{request_id}/{i}" for i in range(rows)]


def parse_feedback(body: bytes) -> tuple[list[str], list[str]]:
    """The feedback route's body: ``{"ids": [...], "labels": [...]}``, one true label per
    prediction id (see ``row_ids``); a 400 naming what is wrong otherwise."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ProtocolError(400, 'the body is not JSON; send {"ids": [...], "labels": [...]}'
                            ) from None
    if not isinstance(doc, dict) or set(doc) != {"ids", "labels"}:
        raise ProtocolError(400, 'the body must be {"ids": [...], "labels": [...]}: the '
                                 "request ids (row i of a request of several rows: "
                                 "'<id>/<i>') and their true labels")
    ids, labels = doc["ids"], doc["labels"]
    if not (isinstance(ids, list) and isinstance(labels, list)) or len(ids) != len(labels):
        raise ProtocolError(400, "ids and labels must be lists of the same length; got "
                                 f"{type(ids).__name__} and {type(labels).__name__}")
    for i, (key, label) in enumerate(zip(ids, labels, strict=True)):
        if not isinstance(key, str) or not isinstance(label, str | int) or \
                isinstance(label, bool):
            raise ProtocolError(400, f"ids[{i}] must be a string and labels[{i}] a class "
                                     f"name or number; got {str(key)[:40]!r}, "
                                     f"{str(label)[:40]!r}")
    return [str(label) for label in labels], ids


class ServingMonitor:
    """One served version's drift monitor and the thread that feeds it."""

    def __init__(self, model: ServedModel, metrics: Metrics, *, interval_s: float) -> None:
        artifact = model.artifact
        self.model, self.metrics, self.interval_s = model, metrics, interval_s
        self.monitor = DriftMonitor(read_reference(artifact.path),
                                    feature_names=list(artifact.spec["feature_names"]),
                                    labels=artifact.labels)
        self._queue: queue.Queue = queue.Queue(QUEUE_BATCHES)
        self._lock = threading.Lock()  # the monitor: this thread feeds it, routes read it
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"drift-{model.name}:{model.version}")

    @classmethod
    def for_model(cls, model: ServedModel, metrics: Metrics, *, interval_s: float
                  ) -> ServingMonitor | None:
        """A monitor when the artifact has what it needs (a reference; not a language
        model), else None with the reason logged."""
        if model.artifact.task == "language_modeling":
            return None
        try:
            return cls(model, metrics, interval_s=interval_s)
        except ArtifactError as e:
            logger.warning("drift monitoring is off for %s:%s: %s", model.name,
                           model.version, e)
            return None

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._queue.put(None)  # after what is queued; blocks only if the queue is full
        self._thread.join(timeout=10)

    # -- request path: never blocks --------------------------------------------------------------

    def observe(self, x: np.ndarray, outputs: dict[str, np.ndarray],
                request_id: str | None) -> None:
        probs = outputs.get("probabilities", outputs.get("prediction"))
        if probs is None:
            return
        self._offer(("rows", x, probs, row_ids(request_id, len(x))))

    def feedback(self, labels: Sequence[Any], ids: Sequence[str]) -> bool:
        """Queue true labels for the predictions with these ids; False when the queue is
        full (the caller says 503: try again)."""
        return self._offer(("labels", list(labels), list(ids)))

    def _offer(self, item: tuple) -> bool:
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.metrics.drift_dropped.labels(self.model.name).inc()
            return False

    # -- the monitor's thread -------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        with self._lock:
            report = self.monitor.report()
        return {"model_name": self.model.name, "model_version": self.model.version,
                "queued": self._queue.qsize(), **report}

    def _run(self) -> None:
        next_publish = time.monotonic() + self.interval_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_publish - time.monotonic()))
            except queue.Empty:
                item = ()
            if item is None:
                return
            try:
                if item:
                    self._apply(item)
                if time.monotonic() >= next_publish:
                    self.publish()
                    next_publish = time.monotonic() + self.interval_s
            except Exception:  # noqa: BLE001 - monitoring must not take serving down
                logger.exception("drift monitor of %s:%s", self.model.name,
                                 self.model.version)

    def _apply(self, item: tuple) -> None:
        if item[0] == "rows":
            _, x, probs, ids = item
            features = self.model.artifact.preprocess(x).numpy()
            with self._lock:
                self.monitor.update(features, probs, ids)
                self.metrics.drift_rows.labels(self.model.name).inc(len(x))
        else:
            _, labels, ids = item
            with self._lock:
                self.monitor.add_labels(labels, ids)

    def publish(self) -> dict[str, Any]:
        """The report, also as the Prometheus gauges."""
        report = self.report()
        m, name = self.metrics, self.model.name
        m.drift_drifted_features.labels(name).set(len(report["drifted_features"]))
        m.drift_max_psi.labels(name).set(report["max_psi"])
        m.drift_alarm.labels(name, "data").set(int(bool(report["drifted_features"])))
        m.drift_alarm.labels(name, "concept").set(int(report["concept_drift"]))
        supervised = report["supervised"]
        m.drift_alarm.labels(name, "supervised").set(int(bool(supervised and
                                                              supervised["drift"])))
        if report["label_free"] is not None:
            density = report["label_free"]["density"]
            m.drift_margin_density.labels(name).set(math.nan if density is None else density)
        return report
