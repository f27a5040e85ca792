"""The front of several replicas: the one port, forwarding each request to a replica over
its Unix socket (distml.serving.replicas picks which), with the gRPC proxy beside it
(distml.serving.grpc_proxy). Health and metrics are answered here: ready while any replica
is, and every replica's Prometheus metrics aggregated (prometheus-client's multiprocess
mode). A request in flight on a replica that dies gets 503 (retry); the others are
untouched.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any

from distml.config import ServeConfig
from distml.serving.replicas import Replica, ReplicaSet
from distml.serving.transport import Tls, grpc_address
from distml.serving.uds_client import (
    BROADCAST,
    FORWARDED,
    FORWARDED_BYTES,
    INFER,
    exchange,
    reply,
)


def front_app(replicas: ReplicaSet, settings: ServeConfig, tls: Tls | None = None) -> Any:
    """The one port: health, aggregated metrics, and every other route forwarded (a model
    repository load or unload to every replica); gRPC, when asked, proxied the same way."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from distml.serving.app import error_response, read_body
    from distml.serving.protocol import ProtocolError

    metrics_registry = CollectorRegistry()
    MultiProcessCollector(metrics_registry)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        up = sum(r.ready for r in replicas.replicas)
        return JSONResponse({"ready": up > 0, "replicas_ready": up},
                            status_code=200 if up else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    async def forward(request: Request) -> Response:
        try:
            body = await read_body(request, settings.max_body_bytes)
        except ProtocolError as e:
            return error_response(e.status, e.message)
        headers = {k: v for k, v in request.headers.items() if k in FORWARDED}
        if request.method == "POST" and BROADCAST.match(request.url.path):
            return await _broadcast(replicas, request, body, headers)
        while (replica := replicas.pick(request.headers.get("idempotency-key"))) is not None:
            response = await _send(replica, request, body, headers)
            if response is not None:
                return response
        return error_response(503, "no replica is ready; retry shortly", {"Retry-After": "1"})

    @asynccontextmanager
    async def lifespan(app: Any):
        await replicas.open()
        grpc_server = None
        if settings.grpc_port is not None:
            from distml.serving.grpc_proxy import start_grpc_proxy

            grpc_server, app.state.grpc_port = await start_grpc_proxy(
                replicas, grpc_address(settings.host, settings.grpc_port), settings, tls)
        yield
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
        await replicas.close()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    app = Starlette(routes=[
        Route("/v2/health/live", live), Route("/v2/health/ready", ready),
        Route("/metrics", metrics), Route("/{path:path}", forward, methods=methods),
    ], lifespan=lifespan)
    return _with_infer_first(app, replicas, settings.max_body_bytes)


async def _send(replica: Replica, request: Any, body: bytes, headers: dict[str, str]) -> Any:
    """The replica's response; None when it could not be reached (send to another)."""
    from starlette.responses import Response

    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    answer = await exchange(replica, request.method, target, headers, body)
    if answer is None:
        return None
    status, got, content = answer
    return Response(content, status_code=status, headers=dict(got))


class _InferFirst:
    """The infer route forwarded before Starlette's routing and request objects (pure ASGI:
    the front's cost per request is what limits replicas on few cores); the rest goes on to
    ``app``."""

    def __init__(self, app: Any, replicas: ReplicaSet, limit: int) -> None:
        self.app, self.replicas, self.limit = app, replicas, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or INFER.fullmatch(scope["path"]) is None):
            return await self.app(scope, receive, send)
        from distml.serving.endpoint import read_body
        from distml.serving.protocol import ProtocolError

        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]
                   if k in FORWARDED_BYTES}
        try:
            body = await read_body(receive, headers.pop("content-length", None), self.limit)
        except ProtocolError as e:
            return await reply(send, e.status, [("content-type", "application/json")],
                                json.dumps({"error": e.message}).encode())
        query = scope.get("query_string", b"").decode("latin-1")
        target = scope["path"] + (f"?{query}" if query else "")
        while (replica := self.replicas.pick(headers.get("idempotency-key"))) is not None:
            answer = await exchange(replica, "POST", target, headers, body)
            if answer is not None:
                return await reply(send, *answer)
        await reply(send, 503, [("content-type", "application/json"), ("retry-after", "1")],
                     b'{"error":"no replica is ready; retry shortly"}')


def _with_infer_first(app: Any, replicas: ReplicaSet, limit: int) -> Any:
    """``app`` with ``_InferFirst`` before its middleware stack."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: _InferFirst(build(), replicas, limit)
    return app


async def _broadcast(replicas: ReplicaSet, request: Any, body: bytes,
                     headers: dict[str, str]) -> Any:
    """A repository load or unload on every ready replica: the first failure, else the
    first answer."""
    from distml.serving.app import error_response

    live = [r for r in replicas.replicas if r.ready]
    answers = [a for a in await asyncio.gather(*[_send(r, request, body, headers)
                                                for r in live]) if a is not None]
    if not answers:
        return error_response(503, "no replica is ready; retry shortly", {"Retry-After": "1"})
    failed = next((a for a in answers if a.status_code >= 400), None)
    if failed is None and request.url.path.endswith("/feedback"):
        return _matched(answers)
    return failed or answers[0]


def _matched(answers: list[Any]) -> Any:
    """The feedback answers of the replicas as one: labels matched by any of them."""
    import json

    from starlette.responses import Response

    out = json.loads(answers[0].body)
    out["matched"] = sum(json.loads(a.body)["matched"] for a in answers)
    return Response(json.dumps(out), media_type="application/json")
