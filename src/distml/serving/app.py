"""The HTTP server of one replica: the Open Inference Protocol's REST routes (KServe v2,
Triton) with the binary tensor data and model repository extensions, Prometheus metrics,
bearer-token auth, a body-size limit, and (when asked) the protocol's gRPC service on its own
port, both over one ``Inference`` (batcher, deadlines, idempotency, hot reload).

Errors follow the protocol: a JSON object ``{"error": "..."}`` with a 4xx status for anything
the client can fix, 503 (with Retry-After) when overloaded, 504 past the deadline.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import math
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import distml
from distml.config import ServeConfig
from distml.serving.drift_feed import DriftFeed, label_rows, parse_feedback
from distml.serving.endpoint import InferEndpoint
from distml.serving.endpoint import read_body as endpoint_read_body
from distml.serving.inference import Inference, Slot
from distml.serving.metrics import Metrics
from distml.serving.model import ServedModel
from distml.serving.protocol import ProtocolError, server_metadata
from distml.serving.transport import Tls

_OPEN = ("/v2/health/live", "/v2/health/ready", "/metrics")  # no token needed


def error_response(status: int, message: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    """The protocol's error body, ``{"error": message}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class MetricsMiddleware:
    """Counts, times and tracks in-flight requests by route template (pure ASGI: cheap)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._labelled: dict[tuple[str, int], tuple[Any, Any]] = {}

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
            counter, latency = self._children(route, status[0])
            counter.inc()
            latency.observe(time.perf_counter() - start)

    def _children(self, route: str, status: int) -> tuple[Any, Any]:
        """The labelled metrics of a route and status (looked up once: labels() is costly)."""
        key = (route, status)
        found = self._labelled.get(key)
        if found is None:
            found = self._labelled[key] = (self.metrics.requests.labels(route, str(status)),
                                           self.metrics.latency.labels(route))
        return found


async def read_body(request: Request, limit: int) -> bytes:
    """The body of a routed request, under ``limit`` (endpoint.read_body)."""
    return await endpoint_read_body(request.receive, request.headers.get("content-length"),
                                    limit)


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


def create_app(model: ServedModel, settings: ServeConfig, *, token: str | None = None,
               ref: str | None = None, registry: Path | None = None,
               grpc_address: str | None = None, grpc_tls: Tls | None = None) -> FastAPI:
    """The app of one replica (metrics in a registry of its own). ``grpc_address``: also
    serve gRPC there (``host:port`` or ``unix:path``; with ``grpc_tls``, over TLS); the bound
    port is then in ``app.state.grpc_port``."""
    metrics_registry = CollectorRegistry()
    metrics = Metrics(metrics_registry)
    inference = Inference(model, settings, metrics, ref=ref, registry=registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gc.collect()
        gc.freeze()  # the model and libraries are long-lived: keep them out of GC pauses
        inference.start()
        grpc_server = None
        if grpc_address is not None:
            from distml.serving.grpc_service import start_grpc

            grpc_server, app.state.grpc_port = await start_grpc(inference, grpc_address,
                                                                token=token, tls=grpc_tls)
        yield
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
        await inference.stop()

    # FastAPI's native OpenTelemetry off: distml's metrics are Prometheus's (/metrics), and
    # it would look its providers up on every request (a tenth of a small request's time)
    app = FastAPI(title="distml serve", version=distml.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.inference = inference

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, e: ProtocolError) -> JSONResponse:
        return error_response(e.status, e.message)

    _routes(app, inference)
    _repository_routes(app, inference)
    _drift_routes(app, inference)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    _infer_first(app, inference, metrics, token)
    return app


def _infer_first(app: FastAPI, inference: Inference, metrics: Metrics, token: str | None
                 ) -> None:
    """Metrics, then auth, then the infer route (endpoint.py), all before the app's own
    middleware stack (FastAPI's error, telemetry and body-limit layers: a tenth of a small
    request's time), which the other routes go on to. The infer route's errors are the
    protocol's own; an unexpected one is uvicorn's 500."""
    build = app.build_middleware_stack

    def build_with_infer() -> Any:
        inner = InferEndpoint(build(), inference)
        return MetricsMiddleware(BearerAuth(inner, token) if token else inner, metrics)

    app.build_middleware_stack = build_with_infer  # type: ignore[method-assign]


def _routes(app: FastAPI, inference: Inference) -> None:
    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2")
    async def metadata() -> dict[str, Any]:
        return server_metadata()

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return inference.slot_for(name, version).model.metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        slot = inference.slot_for(name, version)
        return {"name": name, "version": slot.model.version, "ready": True}


def _repository_routes(app: FastAPI, inference: Inference) -> None:
    """Triton's model repository extension, over the registry: the index, load (the version
    the served reference names now) and unload."""

    @app.post("/v2/repository/index")
    async def index(request: Request) -> list[dict[str, str]]:
        body = await read_body(request, 4096)
        ready_only = _ready_only(body)
        slot = inference.current
        entry = {"name": inference.name, "version": slot.model.version if slot else "",
                 "state": "READY" if slot else "UNAVAILABLE"}
        if slot is None:
            entry["reason"] = "unloaded"
        return [entry] if slot is not None or not ready_only else []

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str) -> dict[str, str]:
        _known(inference, name)
        version = await inference.load()
        return {"name": name, "version": version, "state": "READY"}

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str) -> dict[str, str]:
        _known(inference, name)
        await inference.unload()
        return {"name": name, "state": "UNAVAILABLE"}


def _known(inference: Inference, name: str) -> None:
    if name != inference.name:
        raise ProtocolError(404, f"unknown model {name[:80]!r}; this server serves "
                                 f"{inference.name!r}")


def _ready_only(body: bytes) -> bool:
    """The index request's optional body: {"ready": bool}."""
    if not body.strip():
        return False
    try:
        req = json.loads(body)
    except (ValueError, RecursionError):
        raise ProtocolError(400, "the index request body must be JSON like "
                                 "{\"ready\": true}") from None
    ready = req.get("ready", False) if isinstance(req, dict) else None
    if not isinstance(ready, bool):
        raise ProtocolError(400, "ready: must be true or false")
    return ready


def _drift_routes(app: FastAPI, inference: Inference) -> None:
    """The served model's drift report, and labels for its earlier predictions."""

    @app.get("/v2/models/{name}/drift")
    async def drift(name: str) -> Response:
        slot, feed = _monitored(inference, name)
        report = await _ask(inference, feed, lambda monitor: monitor.report())
        return _json({"model_name": name, "model_version": slot.model.version,
                      "queue": {"rows": feed.queued_rows, "max_rows": feed.max_rows,
                                "dropped_rows": feed.dropped_rows}, **report})

    @app.post("/v2/models/{name}/feedback")
    async def feedback(request: Request, name: str) -> Response:
        slot, feed = _monitored(inference, name)
        if slot.model.artifact.task != "classification":
            raise ProtocolError(400, f"{name}:{slot.model.version} is a "
                                     f"{slot.model.artifact.task} model; feedback labels are "
                                     "for classifiers (their error stream is monitored)")
        labels, keys = parse_feedback(await read_body(request,
                                                      inference.settings.max_body_bytes))
        out = await _ask(inference, feed, lambda monitor: label_rows(monitor, labels, keys))
        return _json({"model_name": name, "model_version": slot.model.version, **out})


def _monitored(inference: Inference, name: str) -> tuple[Slot, DriftFeed]:
    slot = inference.slot_for(name, None)
    if slot.drift is None:
        why = ("serve.monitor is false" if not inference.settings.monitor else
               "its artifact has no reference.json (distml run's select stage writes it)")
        raise ProtocolError(404, f"{name}:{slot.model.version} is not drift-monitored: {why}")
    return slot, slot.drift


async def _ask(inference: Inference, feed: DriftFeed, fn) -> dict[str, Any]:
    """``fn(monitor)`` on the monitor's thread, within the request deadline."""
    timeout_s = inference.settings.timeout_ms / 1000
    try:
        return await asyncio.wait_for(asyncio.wrap_future(feed.ask(fn)), timeout_s)
    except TimeoutError:
        raise ProtocolError(504, f"the drift monitor did not answer within {timeout_s:g} s"
                            ) from None


def _json(obj: Any) -> Response:
    """JSON with NaN and infinities as null (JSON has neither)."""
    def finite(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [finite(x) for x in v]
        return v

    return Response(json.dumps(finite(obj), separators=(",", ":")),
                    media_type="application/json")
