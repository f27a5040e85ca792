"""``distml serve``: one replica in this process, or N replica processes on the one port.

This is the entry point: it checks TLS, binds the port before anything loads, and runs
either the app itself (distml.serving.app) or, with ``replicas > 1``, the replica set
(distml.serving.replicas): by default each replica listening on the port itself
(distml.serving.shared_port), this process watching them and proxying gRPC; or behind the
front that forwards each request to one of them (distml.serving.front, with the gRPC proxy
beside it). The replicas are stopped on every way out.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from distml.config import ServeConfig
from distml.serving.front import front_app
from distml.serving.replicas import ReplicaSet
from distml.serving.shared_port import reuse_port_socket
from distml.serving.transport import grpc_address, load_tls, uvicorn_server
from distml.trust import TrustPolicy


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: a free one), bound before the app loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on such sockets, and
    # without it a response written in two parts waits ~40 ms on delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(ref: str | None, settings: ServeConfig, *, registry: Path, token: str | None,
          on_ready: Callable[[str, dict[str, Any]], None] = lambda url, info: None) -> None:
    """Serve until interrupted. ``on_ready(url, info)`` is called once requests are taken."""
    from distml.serving.model import load_served_model

    tls = load_tls(settings)  # before anything loads: a wrong file fails at once
    shared = settings.replicas > 1 and settings.replica_routing == "shared_port"
    # Shared: held (never listening) so that the port stays this server's while replicas
    # come and go, each listening on it with a socket of its own.
    sock = (reuse_port_socket(settings.host, settings.port) if shared
            else bind(settings.host, settings.port))
    host, port = sock.getsockname()[:2]
    url = f"{'https' if tls else 'http'}://{host}:{port}"
    if settings.replicas == 1:
        from distml.serving.app import create_app

        model = load_served_model(ref, registry=registry, quantize=settings.quantize,
                                  trust=TrustPolicy.for_serve(settings))
        grpc_at = (None if settings.grpc_port is None
                   else grpc_address(settings.host, settings.grpc_port))
        app = create_app(model, settings, token=token, ref=ref, registry=registry,
                         grpc_address=grpc_at, grpc_tls=tls)
        server = uvicorn_server(app, settings, tls)
        _announce(server, on_ready, url, {"model": model.name, "version": model.version,
                                          "replicas": 1}, app)
        server.run(sockets=[sock])
        return
    with tempfile.TemporaryDirectory(prefix="distml-serve-") as tmp:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(Path(tmp) / "metrics")
        (Path(tmp) / "metrics").mkdir()
        replicas = ReplicaSet(ref, settings, registry=registry, token=token, folder=Path(tmp),
                              port=port if shared else None)
        # uvicorn ends a SIGTERM'd server by raising the signal again under the handler it
        # found: the default one would end this process before the replicas are stopped
        # below (they were left running); this one unwinds through the finally instead.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        replicas.start()
        try:
            info = {**replicas.model, "replicas": settings.replicas}
            if shared:
                asyncio.run(_watch(replicas, settings, tls, lambda i: on_ready(url, i), info))
                return
            app = front_app(replicas, settings, tls)
            server = uvicorn_server(app, settings, tls)
            _announce(server, on_ready, url, info, app)
            server.run(sockets=[sock])
        finally:
            replicas.stop()


async def _watch(replicas: ReplicaSet, settings: ServeConfig, tls: Any,
                 on_ready: Callable[[dict[str, Any]], None], info: dict[str, Any]) -> None:
    """The parent of replicas sharing the port, off every request's path: it replaces a
    replica that dies and, when asked, proxies gRPC to them, until SIGINT or SIGTERM."""
    await replicas.open()
    grpc_server = None
    try:
        if settings.grpc_port is not None:
            from distml.serving.grpc_proxy import start_grpc_proxy

            grpc_server, grpc_port = await start_grpc_proxy(
                replicas, grpc_address(settings.host, settings.grpc_port), settings, tls)
            info["grpc"] = grpc_address(settings.host, grpc_port)
        on_ready(info)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
        await replicas.close()


def _announce(server: uvicorn.Server, on_ready: Callable, url: str, info: dict,
              app: Any) -> None:
    original = server.startup

    async def startup(sockets: Any = None) -> None:
        await original(sockets=sockets)
        port = getattr(app.state, "grpc_port", None)  # bound by the app's startup
        if port is not None:
            info["grpc"] = grpc_address(url.split("//")[1].rsplit(":", 1)[0], port)
        on_ready(url, info)

    server.startup = startup


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
