"""Ray: ``ray://local`` starts Ray on this machine; ``ray://HOST:PORT`` connects a Ray
client to a running cluster (workers there need distml installed)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray

from distml.execution.base import Executor, ProgressFactory, ProgressHandle

logger = logging.getLogger(__name__)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, *, owns_runtime: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self.owns_runtime = owns_runtime

    def _map(
        self, fn: Callable, items: list, *, handle: ProgressHandle, desc: str,
        describe: Callable[[Any], str],
    ) -> Iterator:
        # SPREAD: an item is a whole partition; spread over the nodes rather than packed
        # onto the driver's node first (Ray's default), which a cluster would wait on.
        # max_retries covers a dead worker or node as well as an exception.
        task = ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=True,
                          scheduling_strategy="SPREAD")(_call)
        fn_ref = ray.put(fn)  # shipped once, not with every task
        refs = [task.remote(fn_ref, item) for item in items]
        done = 0
        try:
            for item, ref in zip(items, refs, strict=True):
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise self._failed(desc, item, describe, e.cause or e) from e
                done += 1
                handle.advance()
                yield result
        finally:
            # Only the tasks whose results were not taken: cancelling a finished task
            # while its reply is handled can abort Ray's core worker ("Tried to complete
            # task that was not pending", seen with searches' concurrent maps).
            for ref in refs[done:]:
                ray.cancel(ref)

    def close(self) -> None:
        if self.owns_runtime:
            ray.shutdown()


def _call(fn: Callable, item: Any) -> Any:
    return fn(item)


def _connect(address: str, attempts: int = 3) -> None:
    """Connect to a cluster's Ray Client server. The server starts one process per client;
    when that process dies as it starts (seen with Ray 2.60 on a loaded machine:
    "Initialization failure from server ... ZombieProcess"), a new connection gets a new
    one, so the connection is tried again a few times before the error is raised."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=f"ray://{address}", log_to_driver=False)
            return
        except ConnectionAbortedError as e:
            if attempt == attempts or "Initialization failure from server" not in str(e):
                raise
            logger.warning("Ray client connection to %s failed as it started (%s); trying "
                           "again (%d/%d)", address, str(e).strip().splitlines()[-1],
                           attempt + 1, attempts)
            time.sleep(1.0)


def make(
    address: str, *, num_workers: int, retries: int, progress: ProgressFactory | None
) -> RayExecutor:
    owns = not ray.is_initialized()
    if owns and address == "local":
        ray.init(num_cpus=num_workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    elif owns:
        _connect(address)
    return RayExecutor(owns_runtime=owns, num_workers=num_workers, retries=retries,
                       progress=progress)
