"""The transport-neutral core of one replica, which REST and gRPC share: the model version
being served with its batcher, and an inference's deadline, idempotency and batching.

Hot reload: a server started on ``name`` or ``name@alias`` follows the registry. Every
``reload_interval_s`` it resolves the reference again; when it names another version, that
version is loaded beside the one being served (in a thread: requests go on meanwhile), then
the server switches to it in one step (new requests go to the new version), and the old one
drains: the requests that already hold it finish on it, then its batcher stops. No request
fails for it. The repository routes (load, unload) do the same on demand.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distml.config import ServeConfig
from distml.errors import DistmlError
from distml.serving.batching import Batcher
from distml.serving.drift_feed import DriftFeed
from distml.serving.metrics import Metrics
from distml.serving.model import ServedModel, load_served_model, resolve
from distml.serving.protocol import InferRequest, ProtocolError
from distml.trust import TrustPolicy

logger = logging.getLogger(__name__)


@dataclass
class Result:
    outputs: dict[str, np.ndarray]
    name: str
    version: str


@dataclass
class Slot:
    """One loaded model version and its batcher."""

    model: ServedModel
    batcher: Batcher
    drift: DriftFeed | None = None  # its drift monitor, when the artifact has a reference
    inflight: int = 0  # requests that hold this slot; the old slot drains to 0 on a switch

    def start(self) -> None:
        self.batcher.start()
        if self.drift is not None:
            self.drift.start()


@dataclass
class _Once:
    digest: str
    expires: float
    result: asyncio.Future


class Idempotency:
    """Requests with one key within the window share one computation and its result. A key
    reused for another computation is a 409; a failure (overload, deadline) is not kept, so a
    retry runs."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.entries: OrderedDict[str, _Once] = OrderedDict()

    async def run(self, key: str, digest: str, compute: Callable[[], Awaitable[Result]]
                  ) -> Result:
        now = time.monotonic()
        while self.entries and next(iter(self.entries.values())).expires < now:
            self.entries.popitem(last=False)
        once = self.entries.get(key)
        if once is not None:
            if once.digest != digest:
                raise ProtocolError(409, f"Idempotency-Key {key[:80]!r} was used with another "
                                         "request; use a new key for a new request")
            return await asyncio.shield(once.result)
        once = _Once(digest, now + self.window_s, asyncio.get_running_loop().create_future())
        self.entries[key] = once
        try:
            result = await compute()
        except BaseException as e:
            self.entries.pop(key, None)
            if isinstance(e, Exception):
                once.result.set_exception(e)
                once.result.exception()  # the waiters, if any, see it; none need to
            else:
                once.result.cancel()
            raise
        once.result.set_result(result)
        return result


class Inference:
    def __init__(self, model: ServedModel, settings: ServeConfig, metrics: Metrics, *,
                 ref: str | None = None, registry: Path | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        # The reference followed: a name or name@alias (None given: the served model's name).
        # A pinned version or an artifact folder is not followed.
        self.ref = ref if ref is not None else model.name
        self.follows = (registry is not None and settings.reload_interval_s is not None
                        and ":" not in self.ref and not (Path(self.ref) / "spec.json").exists())
        self.name = model.name
        self.current: Slot | None = self._slot(model)
        self.idempotency = Idempotency(settings.idempotency_window_s)
        self.arriving = 0  # requests in a route, not yet queued: the batcher waits for them
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def _slot(self, model: ServedModel) -> Slot:
        s = self.settings
        batcher = Batcher(
            model.infer, batching=s.dynamic_batching, max_batch_size=s.max_batch_size,
            max_delay_s=s.max_delay_ms / 1000, max_queue_rows=s.max_queue_rows,
            on_batch=self.metrics.batch.observe, on_queue=self.metrics.queue.set,
            on_drop=lambda n: self.metrics.dropped.inc(n), on_wait=self.metrics.queue_wait.observe,
            arriving=lambda: self.arriving)
        drift = DriftFeed(model, s, self.metrics) if DriftFeed.wanted(model, s) else None
        return Slot(model, batcher, drift)

    # -- lifetime ------------------------------------------------------------------------------

    def start(self) -> None:
        assert self.current is not None
        self.current.start()
        self.metrics.served(self.name, self.current.model.version,
                            self.current.model.quantized, now=True)
        if self.follows:
            self._spawn(self._follow())

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.current is not None:
            if self.current.drift is not None:
                self.current.drift.close()
            await self.current.batcher.stop()

    def _spawn(self, coro: Awaitable) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests ------------------------------------------------------------------------------

    def slot_for(self, name: str, version: str | None) -> Slot:
        """The slot serving ``name`` (and ``version``, when given), or a 404 naming what is."""
        if name != self.name:
            raise ProtocolError(404, f"unknown model {name[:80]!r}; this server serves "
                                     f"{self.name!r}")
        slot = self.current
        if slot is None:
            raise ProtocolError(404, f"model {name!r} is unloaded; POST "
                                     f"/v2/repository/models/{name}/load loads it")
        if version is not None and version != slot.model.version:
            raise ProtocolError(404, f"model {name!r} has no version {version[:40]!r} loaded; "
                                     f"this server serves version {slot.model.version!r}")
        return slot

    def timeout_s(self, asked_ms: str | float | None, what: str) -> float:
        """The configured deadline, or less when the request asks for less."""
        timeout_s = self.settings.timeout_ms / 1000
        if asked_ms is None:
            return timeout_s
        try:
            value = float(asked_ms) / 1000
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ProtocolError(400, f"{what}: {str(asked_ms)[:40]!r} must be a positive "
                                     "number of milliseconds")
        return min(timeout_s, value)

    async def infer(self, slot: Slot, req: InferRequest, timeout_s: float,
                    key: str | None = None) -> Result:
        """The model's outputs for ``req`` on ``slot``; OverloadedError (503) or
        DeadlineExceededError (504) otherwise, and a 409 for a reused Idempotency-Key."""
        slot.inflight += 1  # before any await: a switch drains this slot until it is done
        try:
            async def compute() -> Result:
                outputs = await slot.batcher.submit(req.x, timeout_s)
                if slot.drift is not None:  # queued for the monitor's thread, never waited on
                    slot.drift.offer(req.x, outputs, req.id)
                return Result(outputs, slot.model.name, slot.model.version)

            if key:
                return await self.idempotency.run(key, req.digest(), compute)
            return await compute()
        finally:
            slot.inflight -= 1

    # -- versions ------------------------------------------------------------------------------

    def _resolve(self) -> tuple[str, str]:
        assert self.registry is not None
        _, name, version = resolve(self.ref, self.registry)
        return name, version

    async def load(self) -> str:
        """Load the version the reference names now (a pinned reference: itself again) and
        switch to it; returns that version."""
        async with self._lock:
            if self.registry is None:
                raise ProtocolError(400, "this server was not started from a registry; "
                                         "nothing to load")
            try:
                name, version = await asyncio.to_thread(self._resolve)
            except DistmlError as e:
                raise ProtocolError(400, f"cannot load {self.ref!r}: {e}") from None
            if self.current is not None and self.current.model.version == version:
                return version
            await self._switch(f"{name}:{version}" if self.follows else self.ref)
            return version

    async def unload(self) -> None:
        async with self._lock:
            old, self.current = self.current, None
            if old is not None:
                if old.drift is not None:
                    old.drift.close()
                self.metrics.served(old.model.name, old.model.version, old.model.quantized,
                                    now=False)
                logger.info("unloaded %s:%s", old.model.name, old.model.version)
                self._spawn(self._drain(old))

    async def _switch(self, ref: str) -> None:
        """Load ``ref`` beside the served version, switch to it, drain the old one."""
        assert self.registry is not None
        model = await asyncio.to_thread(load_served_model, ref, registry=self.registry,
                                        quantize=self.settings.quantize,
                                        trust=TrustPolicy.for_serve(self.settings))
        if model.name != self.name:
            raise ProtocolError(400, f"{ref!r} is model {model.name!r}; this server serves "
                                     f"{self.name!r}")
        new = self._slot(model)
        if self.current is not None and self.current.drift is not None:
            self.current.drift.close()  # before the new one publishes: it owns the gauges now
        new.start()  # the new version's own reference: its monitor starts empty
        old, self.current = self.current, new  # one step: no request sees neither
        self.metrics.served(model.name, model.version, model.quantized, now=True)
        self.metrics.loads.labels(model.name, model.version).inc()
        if old is not None:
            self.metrics.served(old.model.name, old.model.version, old.model.quantized,
                                now=False)
            self._spawn(self._drain(old))
        logger.info("now serving %s:%s%s", model.name, model.version,
                    f" (was {old.model.version})" if old is not None else "")

    async def _drain(self, old: Slot) -> None:
        while old.inflight:
            await asyncio.sleep(0.01)
        await old.batcher.stop()

    async def _follow(self) -> None:
        """Poll the registry; switch when the reference names another version."""
        assert self.settings.reload_interval_s is not None
        failed: str | None = None
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            if self.current is None or self._lock.locked():
                continue  # unloaded on purpose, or a load is under way
            try:
                _, version = await asyncio.to_thread(self._resolve)
            except (DistmlError, OSError, ValueError) as e:  # mid-write or removed: next poll
                logger.debug("cannot resolve %s now: %s", self.ref, e)
                continue
            if version in (self.current.model.version, failed):
                continue
            try:
                await self.load()
                failed = None
            except Exception as e:  # noqa: BLE001 - keep serving the old version, say why
                failed = version
                logger.error("cannot switch to %s version %s; still serving %s: %s",
                             self.ref, version, self.current.model.version if self.current
                             else "nothing", e)

