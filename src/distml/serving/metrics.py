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

    def served(self, name: str, version: str, quantized: bool, *, now: bool) -> None:
        self.info.labels(name, version, str(quantized).lower()).set(1 if now else 0)
