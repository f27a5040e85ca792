"""The server's Prometheus metrics, one set for REST and gRPC. Under several replicas
prometheus-client's multiprocess mode aggregates them (gauges summed over live processes)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        reg = {"registry": registry}
        self.requests = Counter("distml_requests", "Requests by route (REST) or method (gRPC) "
                                "and status", ["route", "status"], **reg)
        self.latency = Histogram(
            "distml_request_seconds", "Request latency by route or method", ["route"], **reg,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("distml_batch_rows", "Rows per forward pass", **reg,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.queue_wait = Histogram(
            "distml_queue_wait_seconds", "Time a request waited in the batcher's queue before "
            "its forward pass began", **reg,
            buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                     2.5))
        self.dropped = Counter("distml_dropped_requests", "Requests dropped from the queue "
                               "unrun because their deadline passed", **reg)
        self.queue = Gauge("distml_queue_rows", "Rows waiting for the model", **reg,
                           multiprocess_mode="livesum")
        self.inflight = Gauge("distml_inflight_requests", "Requests being handled", **reg,
                              multiprocess_mode="livesum")
        self.info = Gauge("distml_model_info", "The served model (1: served now)",
                          ["model", "version", "quantized"], **reg, multiprocess_mode="max")
        self.loads = Counter("distml_model_loads", "Model versions loaded and switched to",
                             ["model", "version"], **reg)

        self._drift(reg)

    def _drift(self, reg: dict) -> None:
        """Drift monitoring of the served model (serving/drift_feed.py); under replicas each
        monitors its share of the traffic: scores are the worst replica's, rows summed."""
        def gauge(name: str, doc: str, mode: str, labels: tuple[str, ...] = ("model",)
                  ) -> Gauge:
            return Gauge(name, doc, list(labels), **reg, multiprocess_mode=mode)

        self.drift_pvalue = gauge("distml_drift_feature_pvalue_min", "Smallest adjusted "
                                  "p-value (Benjamini-Hochberg) of the input columns' drift "
                                  "tests over the window of recent rows", "livemin")
        self.drift_features = gauge("distml_drift_drifted_features", "Input columns drifted "
                                    "in the window of recent rows", "livemax")
        self.drift_psi = gauge("distml_drift_psi_max", "Largest population stability index "
                               "of an input column over the window", "livemax")
        self.drift_alarm = gauge(
            "distml_drift_alarm", "1: drift now. data: an input column drifted in the window "
            "at the refresh's spent level; concept: margin density left its band within the "
            "last window of rows (no labels needed); supervised: the error rate of the "
            "feedback labels left its band within the last window of labels", "livemax",
            ("model", "kind"))
        self.drift_alarms = Counter("distml_drift_alarms", "Drift alarms raised (each time "
                                    "an alarm turns on), by kind; at most 0.1 per 10^6 "
                                    "stationary rows each, by design", ["model", "kind"], **reg)
        self.drift_accuracy = gauge("distml_drift_estimated_accuracy", "Expected accuracy of "
                                    "the window's predictions from calibrated probabilities "
                                    "(CBPE, no labels needed)", "livemin")
        self.drift_window = gauge("distml_drift_window_rows", "Rows in the window the column "
                                  "tests run on", "livesum")
        self.drift_rows = gauge("distml_drift_rows", "Rows monitored since this version was "
                                "loaded", "livesum")
        self.drift_margin = gauge("distml_drift_margin_density", "Share of the last window's "
                                  "rows inside the decision margin (MD3)", "livemax")
        self.drift_error = gauge("distml_drift_error_rate", "Error rate of the predictions "
                                 "labelled through the feedback route", "livemax")
        self.drift_queue = gauge("distml_drift_queue_rows", "Rows waiting for the drift "
                                 "monitor", "livesum")
        self.drift_dropped = Counter("distml_drift_dropped_rows", "Rows left unmonitored "
                                     "because the drift monitor's queue was full", ["model"],
                                     **reg)

    def served(self, name: str, version: str, quantized: bool, *, now: bool) -> None:
        self.info.labels(name, version, str(quantized).lower()).set(1 if now else 0)
