"""``distml serve``: one replica in this process, or N replica processes behind a front.

With ``replicas > 1`` this process binds the port and runs a small front that forwards each
request to a replica over a Unix socket: to the one with the fewest requests in flight, or,
for a request with an Idempotency-Key, always to the same live replica, so duplicates meet
and are computed once. A supervisor replaces a replica that dies; the requests that were in
flight on it get 503 (retry), the others are untouched. Replicas are separate processes
(spawned: nothing of the front's state is inherited), each with its share of the CPU threads;
their Prometheus metrics are aggregated through prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from distml.config import ServeConfig
from distml.serving.transport import Tls, guarded_protocol, load_tls
from distml.trust import TrustPolicy

logger = logging.getLogger(__name__)

_FORWARDED = ("content-type", "authorization", "idempotency-key", "x-request-timeout-ms",
              "inference-header-content-length")
_RETURNED = ("content-type", "retry-after", "www-authenticate",
             "inference-header-content-length")
# To every replica: a repository load or unload; feedback labels (each replica monitors the
# requests it served, so each matches the labels of its own predictions).
_BROADCAST = re.compile(r"^/v2/(repository/models/[^/]+/(load|unload)|models/[^/]+/feedback)$")


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


def _uvicorn(app: Any, settings: ServeConfig, tls: Tls | None = None,
             **where: Any) -> uvicorn.Server:
    """uvicorn with distml's connection limits (see serving.transport) and, given, TLS."""
    if tls is not None:
        where.update(ssl_certfile=str(tls.certfile), ssl_keyfile=str(tls.keyfile))
    http = guarded_protocol(settings.read_timeout_s, settings.max_header_bytes)
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                         timeout_graceful_shutdown=5, http=http, **where))


def serve(ref: str | None, settings: ServeConfig, *, registry: Path, token: str | None,
          on_ready: Callable[[str, dict[str, Any]], None] = lambda url, info: None) -> None:
    """Serve until interrupted. ``on_ready(url, info)`` is called once requests are taken."""
    from distml.serving.model import load_served_model

    tls = load_tls(settings)  # before anything loads: a wrong file fails at once
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    url = f"{'https' if tls else 'http'}://{host}:{port}"
    if settings.replicas == 1:
        from distml.serving.app import create_app

        model = load_served_model(ref, registry=registry, quantize=settings.quantize,
                                  trust=TrustPolicy.for_serve(settings))
        grpc_address = (None if settings.grpc_port is None
                        else _grpc_host(settings.host, settings.grpc_port))
        app = create_app(model, settings, token=token, ref=ref, registry=registry,
                         grpc_address=grpc_address, grpc_tls=tls)
        server = _uvicorn(app, settings, tls)
        _announce(server, on_ready, url, {"model": model.name, "version": model.version,
                                          "replicas": 1}, app)
        server.run(sockets=[sock])
        return
    with tempfile.TemporaryDirectory(prefix="distml-serve-") as tmp:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(Path(tmp) / "metrics")
        (Path(tmp) / "metrics").mkdir()
        replicas = ReplicaSet(ref, settings, registry=registry, token=token, folder=Path(tmp))
        # uvicorn ends a SIGTERM'd server by raising the signal again under the handler it
        # found: the default one would end this process before the replicas are stopped
        # below (they were left running); this one unwinds through the finally instead.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        replicas.start()
        try:
            info = {**replicas.model, "replicas": settings.replicas}
            app = front_app(replicas, settings, tls)
            server = _uvicorn(app, settings, tls)
            _announce(server, on_ready, url, info, app)
            server.run(sockets=[sock])
        finally:
            replicas.stop()


def _grpc_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _announce(server: uvicorn.Server, on_ready: Callable, url: str, info: dict,
              app: Any) -> None:
    original = server.startup

    async def startup(sockets: Any = None) -> None:
        await original(sockets=sockets)
        port = getattr(app.state, "grpc_port", None)  # bound by the app's startup
        if port is not None:
            info["grpc"] = _grpc_host(url.split("//")[1].rsplit(":", 1)[0], port)
        on_ready(url, info)

    server.startup = startup


# -- replicas ------------------------------------------------------------------------------

def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _die_with(front: int) -> None:
    """End this replica when the front process ends, even killed (SIGKILL runs no cleanup):
    Linux's parent-death signal (elsewhere only the front's shutdown stops replicas)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != front:  # the front was gone before the line above took effect
        os._exit(0)


def _replica_main(ref: str | None, settings: dict, registry: str, token: str | None,
                  uds: str, threads: int, ready: Any, front: int) -> None:
    """One replica process: its own model and batcher, on a Unix socket."""
    _die_with(front)
    import torch

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s replica "
                        f"{Path(uds).stem.removeprefix('replica-')}: %(message)s")

    from distml.serving.app import create_app
    from distml.serving.model import load_served_model

    torch.set_num_threads(threads)
    cfg = ServeConfig(**settings)
    model = load_served_model(ref, registry=Path(registry), quantize=cfg.quantize,
                              trust=TrustPolicy.for_serve(cfg))
    ready.put({"model": model.name, "version": model.version})
    grpc_address = None if cfg.grpc_port is None else f"unix:{uds}.grpc"
    app = create_app(model, cfg, token=token, ref=ref, registry=Path(registry),
                     grpc_address=grpc_address)
    _uvicorn(app, cfg, uds=uds).run()  # the front terminates TLS; replicas are local


@dataclass
class Replica:
    index: int
    uds: Path
    process: Any = None
    client: Any = None
    loaded: Any = None  # the queue on which it reports its model once loaded
    started: float = 0.0
    inflight: int = 0
    ready: bool = False
    channel: Any = None  # gRPC, to the replica's unix:<uds>.grpc


class ReplicaSet:
    def __init__(self, ref: str | None, settings: ServeConfig, *, registry: Path,
                 token: str | None, folder: Path) -> None:
        import multiprocessing

        self.ctx = multiprocessing.get_context("spawn")
        self.ref, self.settings, self.registry, self.token = ref, settings, registry, token
        self.replicas = [Replica(i, folder / f"replica-{i}.sock")
                         for i in range(settings.replicas)]
        self.threads = max(1, (os.cpu_count() or 1) // settings.replicas)
        self.model: dict[str, str] = {}
        self._supervisor: asyncio.Task | None = None

    def _spawn(self, r: Replica) -> None:
        r.uds.unlink(missing_ok=True)
        r.loaded = self.ctx.Queue()
        r.process = self.ctx.Process(
            target=_replica_main, name=f"distml-replica-{r.index}", daemon=True,
            args=(self.ref, self.settings.model_dump(), str(self.registry), self.token,
                  str(r.uds), self.threads, r.loaded, os.getpid()))
        r.process.start()
        r.started = time.monotonic()

    def start(self) -> None:
        """Start every replica and wait until each has loaded its model."""
        for r in self.replicas:
            self._spawn(r)
        for r in self.replicas:
            while True:
                try:
                    self.model = r.loaded.get(timeout=1)
                    break
                except Exception:  # noqa: BLE001 - queue.Empty: check the process is alive
                    if not r.process.is_alive():
                        self.stop()
                        raise RuntimeError(f"replica {r.index} exited with code "
                                           f"{r.process.exitcode} while loading the model; "
                                           "its error is above") from None

    def stop(self) -> None:
        for r in self.replicas:
            if r.process is not None and r.process.is_alive():
                r.process.terminate()
        for r in self.replicas:
            if r.process is not None:
                r.process.join(10)

    async def open(self) -> None:
        import httpx

        for r in self.replicas:
            r.client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(r.uds)),
                                         base_url="http://replica", timeout=None)
            if self.settings.grpc_port is not None:
                import grpc

                r.channel = grpc.aio.insecure_channel(f"unix:{r.uds}.grpc")
            await self._wait_ready(r)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        for r in self.replicas:
            if r.client is not None:
                await r.client.aclose()
            if r.channel is not None:
                await r.channel.close()

    async def _wait_ready(self, r: Replica) -> None:
        import httpx

        while r.process.is_alive():
            try:
                if (await r.client.get("/v2/health/ready")).status_code == 200:
                    r.ready = True
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)

    async def _supervise(self) -> None:
        from prometheus_client import multiprocess

        while True:
            await asyncio.sleep(0.2)
            for r in self.replicas:
                if r.process.is_alive():
                    if not r.ready:  # the front lost a connection to it: check it again
                        await self._wait_ready(r)
                    continue
                r.ready = False
                logger.warning("replica %d (pid %s) died with exit code %s; starting a new one",
                               r.index, r.process.pid, r.process.exitcode)
                multiprocess.mark_process_dead(r.process.pid)
                if time.monotonic() - r.started < 5:  # dying at start: do not spin
                    await asyncio.sleep(2)
                self._spawn(r)
                await self._wait_ready(r)

    def pick(self, key: str | None) -> Replica | None:
        live = [r for r in self.replicas if r.ready]
        if not live:
            return None
        if key:  # the same key always meets the same replica while it lives
            return live[zlib.crc32(key.encode()) % len(live)]
        return min(live, key=lambda r: r.inflight)


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
        headers = {k: v for k, v in request.headers.items() if k in _FORWARDED}
        if request.method == "POST" and _BROADCAST.match(request.url.path):
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
            from distml.serving.grpc_service import start_grpc_proxy

            grpc_server, app.state.grpc_port = await start_grpc_proxy(
                replicas, _grpc_host(settings.host, settings.grpc_port), settings, tls)
        yield
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
        await replicas.close()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[
        Route("/v2/health/live", live), Route("/v2/health/ready", ready),
        Route("/metrics", metrics), Route("/{path:path}", forward, methods=methods),
    ], lifespan=lifespan)


async def _send(replica: Replica, request: Any, body: bytes, headers: dict[str, str]) -> Any:
    """The replica's response; None when it could not be reached (send to another)."""
    import httpx
    from starlette.responses import Response

    from distml.serving.app import error_response

    replica.inflight += 1
    try:
        r = await replica.client.request(request.method, request.url.path,
                                         params=request.query_params, content=body,
                                         headers=headers)
    except httpx.ConnectError:  # never reached it: safe to send to another
        replica.ready = False
        return None
    except httpx.TransportError as e:  # it died with the request: that one fails
        replica.ready = False
        return error_response(503, f"replica {replica.index} stopped while handling this "
                                   f"request ({type(e).__name__}); retry", {"Retry-After": "1"})
    finally:
        replica.inflight -= 1
    return Response(r.content, status_code=r.status_code,
                    headers={k: v for k, v in r.headers.items() if k in _RETURNED})


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
