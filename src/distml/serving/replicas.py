"""The replica set behind ``distml serve --replicas N``: N processes, each with its own model
and batcher on a Unix socket, started, watched and replaced here.

Replicas are spawned (nothing of the front's state is inherited), each with its share of the
CPU threads, and die with the front (distml.processes). A supervisor replaces a replica that
dies; ``pick`` chooses the replica for a request: the one with the fewest requests in
flight, or, for a request with an Idempotency-Key, always the same live one, so duplicates
meet and are computed once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distml import processes
from distml.config import ServeConfig
from distml.serving.transport import uvicorn_server
from distml.serving.uds_client import ReplicaClient
from distml.trust import TrustPolicy

logger = logging.getLogger(__name__)


def _replica_main(ref: str | None, settings: dict, registry: str, token: str | None,
                  uds: str, threads: int, ready: Any, front: int,
                  shared: tuple[int, int, list[str]] | None = None) -> None:
    """One replica process: its own model and batcher, on a Unix socket; ``shared``: (port,
    this replica's index, every replica's socket) when the replicas share the port."""
    processes.die_with_parent(front)
    import torch

    processes.setup_logging(who=f"replica {Path(uds).stem.removeprefix('replica-')}",
                            stream=sys.stderr)

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
    if shared is None:
        uvicorn_server(app, cfg, uds=uds).run()  # the front terminates TLS; replicas are local
        return
    from distml.serving.shared_port import serve_replica
    from distml.serving.transport import load_tls

    port, index, sockets = shared
    asyncio.run(serve_replica(app, cfg, load_tls(cfg), index=index, sockets=sockets, port=port))


@dataclass
class Replica:
    index: int
    uds: Path
    process: Any = None
    client: Any = None  # httpx, for health checks
    pool: Any = None  # the request path's client (uds_client.ReplicaClient)
    loaded: Any = None  # the queue on which it reports its model once loaded
    started: float = 0.0
    inflight: int = 0
    ready: bool = False
    channel: Any = None  # gRPC, to the replica's unix:<uds>.grpc


class ReplicaSet:
    def __init__(self, ref: str | None, settings: ServeConfig, *, registry: Path,
                 token: str | None, folder: Path, port: int | None = None) -> None:
        """``port``: the replicas share it (each listens on it itself); None: behind a
        front, each on its Unix socket only."""
        import multiprocessing

        self.ctx = multiprocessing.get_context("spawn")
        self.ref, self.settings, self.registry, self.token = ref, settings, registry, token
        self.port = port
        self.replicas = [Replica(i, folder / f"replica-{i}.sock")
                         for i in range(settings.replicas)]
        self.threads = max(1, len(os.sched_getaffinity(0)) // settings.replicas)  # pinned too
        self.model: dict[str, str] = {}
        self._supervisor: asyncio.Task | None = None

    def _spawn(self, r: Replica) -> None:
        r.uds.unlink(missing_ok=True)
        r.loaded = self.ctx.Queue()
        r.process = self.ctx.Process(
            target=_replica_main, name=f"distml-replica-{r.index}", daemon=True,
            args=(self.ref, self.settings.model_dump(), str(self.registry), self.token,
                  str(r.uds), self.threads, r.loaded, os.getpid(),
                  None if self.port is None else (
                      self.port, r.index, [str(x.uds) for x in self.replicas])))
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
            r.pool = ReplicaClient(str(r.uds))
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
            if r.pool is not None:
                r.pool.close()
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
                r.pool.close()  # its connections led to the dead process
                self._spawn(r)
                await self._wait_ready(r)

    def pick(self, key: str | None) -> Replica | None:
        live = [r for r in self.replicas if r.ready]
        if not live:
            return None
        if key:  # the same key always meets the same replica while it lives
            return live[zlib.crc32(key.encode()) % len(live)]
        return min(live, key=lambda r: r.inflight)
