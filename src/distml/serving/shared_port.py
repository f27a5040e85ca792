"""Replicas sharing the one port (``replica_routing: shared_port``): every replica listens on
the port itself (SO_REUSEPORT), so the kernel spreads the connections over them and no
process sits between a client and the replica that answers it (a front forwarding every
request costs as much CPU as a replica on few cores). What needs one chosen replica, or all
of them, goes between the replicas over their Unix sockets, off the path of a plain request:

- a request with an Idempotency-Key is answered by the key's owner (crc32 of the key modulo
  the replicas), so duplicates meet there and run once whichever replica received them (a
  replica that cannot reach the owner answers itself);
- a model repository load or unload, and feedback labels, go to every replica (the first
  failure is the answer, else the first answer; feedback's matched labels summed);
- ``/metrics``: every replica's, aggregated (prometheus-client's multiprocess mode);
- ``/v2/health/ready``: this replica's readiness, with how many replicas answer ready.

Each replica serves its app twice: on the port (TLS when configured, wrapped in
``SharedPort``) and on its Unix socket (plain; what the other replicas and the parent's
supervisor and gRPC proxy reach).
"""

from __future__ import annotations

import asyncio
import json
import socket
import zlib
from dataclasses import dataclass
from typing import Any

from distml.serving.transport import Tls, uvicorn_server
from distml.serving.uds_client import (
    BROADCAST,
    FORWARDED_BYTES,
    INFER,
    ReplicaClient,
    exchange,
    reply,
)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT (not listening yet), TCP_NODELAY
    possible (IPPROTO_TCP named: see distml.serving.server.bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


@dataclass
class _Peer:
    """A replica as seen from another (what ``exchange`` needs)."""

    index: int
    pool: ReplicaClient
    inflight: int = 0
    ready: bool = True


class SharedPort:
    """The port's ASGI app in front of one replica's ``app`` (see the module's docstring)."""

    def __init__(self, app: Any, *, index: int, sockets: list[str], limit: int) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.app, self.index, self.limit = app, index, limit
        self.replicas = [_Peer(i, ReplicaClient(s)) for i, s in enumerate(sockets)]
        self.metrics = CollectorRegistry()
        MultiProcessCollector(self.metrics)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path, method = scope["path"], scope["method"]
            if method == "POST" and INFER.fullmatch(path):
                key = _header(scope, b"idempotency-key")
                owner = None if key is None else zlib.crc32(key.encode()) % len(self.replicas)
                if owner is not None and owner != self.index:
                    return await self._to_owner(self.replicas[owner], scope, receive, send)
            elif method == "POST" and BROADCAST.match(path):
                return await self._broadcast(scope, receive, send)
            elif method == "GET" and path == "/metrics":
                return await self._metrics(send)
            elif method == "GET" and path == "/v2/health/ready":
                return await self._ready(send)
        await self.app(scope, receive, send)

    async def _request(self, scope: dict, receive: Any) -> tuple[str, dict, bytes]:
        """(target, forwarded headers, body); ProtocolError for a body over the limit."""
        from distml.serving.endpoint import read_body

        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]
                   if k in FORWARDED_BYTES}
        body = await read_body(receive, headers.pop("content-length", None), self.limit)
        query = scope.get("query_string", b"").decode("latin-1")
        return scope["path"] + (f"?{query}" if query else ""), headers, body

    async def _to_owner(self, owner: _Peer, scope: dict, receive: Any, send: Any) -> None:
        from distml.serving.protocol import ProtocolError

        try:
            target, headers, body = await self._request(scope, receive)
        except ProtocolError as e:
            return await reply(send, e.status, [("content-type", "application/json")],
                                json.dumps({"error": e.message}).encode())
        answer = await exchange(owner, "POST", target, headers, body)
        if answer is not None:
            return await reply(send, *answer)

        async def replay() -> dict:  # the owner is unreachable: this replica answers
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _broadcast(self, scope: dict, receive: Any, send: Any) -> None:
        """To every replica, this one included (over its own socket)."""
        from distml.serving.protocol import ProtocolError

        try:
            target, headers, body = await self._request(scope, receive)
        except ProtocolError as e:
            return await reply(send, e.status, [("content-type", "application/json")],
                                json.dumps({"error": e.message}).encode())
        answers = [a for a in await asyncio.gather(*[
            exchange(r, "POST", target, headers, body) for r in self.replicas]) if a is not None]
        if not answers:
            return await reply(send, 503, [("content-type", "application/json"),
                                            ("retry-after", "1")],
                                b'{"error":"no replica is ready; retry shortly"}')
        failed = next((a for a in answers if a[0] >= 400), None)
        if failed is None and target.endswith("/feedback"):
            out = json.loads(answers[0][2])
            out["matched"] = sum(json.loads(a[2])["matched"] for a in answers)
            failed = (200, [("content-type", "application/json")], json.dumps(out).encode())
        await reply(send, *(failed or answers[0]))

    async def _metrics(self, send: Any) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        await reply(send, 200, [("content-type", CONTENT_TYPE_LATEST)],
                     generate_latest(self.metrics))

    async def _ready(self, send: Any) -> None:
        answers = await asyncio.gather(*[exchange(r, "GET", "/v2/health/ready", {}, b"")
                                         for r in self.replicas])
        up = [a is not None and a[0] == 200 for a in answers]
        await reply(send, 200 if up[self.index] else 503,
                     [("content-type", "application/json")],
                     json.dumps({"ready": up[self.index], "replicas_ready": sum(up)}).encode())


def _header(scope: dict, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


async def serve_replica(app: Any, settings: Any, tls: Tls | None, *, index: int,
                        sockets: list[str], port: int) -> None:
    """One replica: ``app`` on the shared port (wrapped in ``SharedPort``) and, once that has
    started (the app's lifespan has run), on its own Unix socket."""
    sock = reuse_port_socket(settings.host, port)
    sock.listen(2048)
    shared = uvicorn_server(SharedPort(app, index=index, sockets=sockets,
                                       limit=settings.max_body_bytes), settings, tls)
    local = uvicorn_server(app, settings, uds=sockets[index], lifespan="off")
    serving = asyncio.ensure_future(shared.serve(sockets=[sock]))
    while not shared.started and not serving.done():
        await asyncio.sleep(0.01)
    await asyncio.gather(serving, local.serve())
