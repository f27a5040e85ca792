"""The HTTP server of one replica: the Open Inference Protocol's REST routes (KServe v2,
Triton), Prometheus metrics, bearer-token auth, a body-size limit, dynamic batching with
backpressure and deadlines, and idempotency keys.

Errors follow the protocol: a JSON object ``{"error": "..."}`` with a 4xx status for anything
the client can fix, 503 (with Retry-After) when overloaded, 504 past the deadline.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import json
import math
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

import distml
from distml.config import ServeConfig
from distml.serving.batching import Batcher, DeadlineExceededError, OverloadedError
from distml.serving.model import ServedModel
from distml.serving.protocol import InferRequest, ProtocolError, infer_response, parse_infer

IDEMPOTENCY_HEADER = "idempotency-key"
TIMEOUT_HEADER = "x-request-timeout-ms"
_OPEN = ("/v2/health/live", "/v2/health/ready", "/metrics")  # no token needed


def error_response(status: int, message: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    """The protocol's error body, ``{"error": message}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Metrics:
    """The server's Prometheus metrics. Under several replicas prometheus-client's
    multiprocess mode aggregates them (gauges summed over live processes)."""

    def __init__(self, model: ServedModel, registry: CollectorRegistry | None) -> None:
        reg = {"registry": registry}
        self.requests = Counter("distml_requests", "HTTP requests by route and status",
                                ["route", "status"], **reg)
        self.latency = Histogram(
            "distml_request_seconds", "Request latency by route", ["route"], **reg,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("distml_batch_rows", "Rows per forward pass", **reg,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.queue = Gauge("distml_queue_rows", "Rows waiting for the model", **reg,
                           multiprocess_mode="livesum")
        self.inflight = Gauge("distml_inflight_requests", "Requests being handled", **reg,
                              multiprocess_mode="livesum")
        info = Gauge("distml_model_info", "The served model", ["model", "version", "quantized"],
                     **reg, multiprocess_mode="max")
        info.labels(model.name, model.version, str(model.quantized).lower()).set(1)


class MetricsMiddleware:
    """Counts, times and tracks in-flight requests by route template (pure ASGI: cheap)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.inflight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


@dataclass
class _Once:
    digest: str
    expires: float
    response: asyncio.Future


class Idempotency:
    """Requests with one key within the window share one computation and its response. A
    key reused with another body is a 409; a 5xx outcome is not kept, so a retry runs."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.entries: OrderedDict[str, _Once] = OrderedDict()

    async def run(self, key: str, body: bytes, compute: Any) -> Response:
        now = time.monotonic()
        while self.entries and next(iter(self.entries.values())).expires < now:
            self.entries.popitem(last=False)
        digest = hashlib.sha256(body).hexdigest()
        once = self.entries.get(key)
        if once is not None:
            if once.digest != digest:
                return error_response(409, f"Idempotency-Key {key!r} was used with another request "
                                   "body; use a new key for a new request")
            return await asyncio.shield(once.response)
        once = _Once(digest, now + self.window_s, asyncio.get_running_loop().create_future())
        self.entries[key] = once
        try:
            response = await compute()
        except BaseException:
            self.entries.pop(key, None)
            once.response.cancel()
            raise
        if response.status_code >= 500:
            self.entries.pop(key, None)
        once.response.set_result(response)
        return response


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(413, f"the request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(413, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class Inference:
    """The infer route's work: deadline, parsing, batching, the response."""

    def __init__(self, model: ServedModel, settings: ServeConfig, metrics: Metrics) -> None:
        self.model = model
        self.settings = settings
        self.batcher = Batcher(
            model.infer, batching=settings.dynamic_batching,
            max_batch_size=settings.max_batch_size, max_delay_s=settings.max_delay_ms / 1000,
            max_queue_rows=settings.max_queue_rows, on_batch=metrics.batch.observe,
            on_queue=metrics.queue.set, arriving=lambda: self.arriving)
        self.idempotency = Idempotency(settings.idempotency_window_s)
        self.arriving = 0  # requests in the route, not yet queued: the batcher waits for them

    def check_model(self, name: str, version: str | None) -> None:
        m = self.model
        if name != m.name:
            raise ProtocolError(404, f"unknown model {name!r}; this server serves {m.name!r}")
        if version is not None and version != m.version:
            raise ProtocolError(404, f"model {name!r} has no version {version!r}; this server "
                                     f"serves version {m.version!r}")

    def timeout_s(self, asked: str | None) -> float:
        """The configured deadline, or less when the request asks for less."""
        timeout_s = self.settings.timeout_ms / 1000
        if asked is None:
            return timeout_s
        try:
            value = float(asked) / 1000
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ProtocolError(400, f"{TIMEOUT_HEADER}: {asked!r} must be a positive number "
                                     "of milliseconds")
        return min(timeout_s, value)

    async def __call__(self, request: Request, name: str, version: str | None) -> Response:
        self.check_model(name, version)
        self.arriving += 1
        try:
            body = await read_body(request, self.settings.max_body_bytes)
            timeout_s = self.timeout_s(request.headers.get(TIMEOUT_HEADER))
            req = parse_infer(body, self.model.input, self.model.outputs)
        finally:
            self.arriving -= 1
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key:
            return await self.idempotency.run(key, body, lambda: self.respond(req, timeout_s))
        return await self.respond(req, timeout_s)

    async def respond(self, req: InferRequest, timeout_s: float) -> Response:
        try:
            outputs = await self.batcher.submit(req.x, timeout_s)
        except OverloadedError:
            return error_response(503, "the server is at capacity; retry after the Retry-After "
                               "seconds", {"Retry-After": "1"})
        except DeadlineExceededError:
            return error_response(504, f"no result within the deadline of {1000 * timeout_s:g} ms; "
                               "the request was dropped")
        out = infer_response(self.model.name, self.model.version, req.id, outputs, req.outputs)
        return Response(json.dumps(out), media_type="application/json")


class BearerAuth:
    """'Authorization: Bearer <token>' on every route but health and metrics (pure ASGI)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in _OPEN:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "missing or wrong bearer token: send the header "
                                       "'Authorization: Bearer <token>'",
                                  {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(model: ServedModel, settings: ServeConfig, *,
               token: str | None = None) -> FastAPI:
    """The app of one replica (metrics in a registry of its own)."""
    registry = CollectorRegistry()
    metrics = Metrics(model, registry)
    inference = Inference(model, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gc.collect()
        gc.freeze()  # the model and libraries are long-lived: keep them out of GC pauses
        inference.batcher.start()
        yield
        await inference.batcher.stop()

    app = FastAPI(title="distml serve", version=distml.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    if token:
        app.add_middleware(BearerAuth, token=token)

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, e: ProtocolError) -> JSONResponse:
        return error_response(e.status, e.message)

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "distml", "version": distml.__version__, "extensions": []}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict[str, Any]:
        inference.check_model(name, version)
        return model.metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        inference.check_model(name, version)
        return {"name": model.name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        return await inference(request, name, version)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
