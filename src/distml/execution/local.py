"""The embedded default: a process pool over this machine's cores (one worker: in-process).

Workers are forked from this process while it runs no other thread: they start in
milliseconds with its imports already done. When other threads exist (a Dask client, a
progress display), forking could copy a lock held by one of them, so workers come from a
forkserver that preloads numpy and pyarrow instead. Workers are started when the executor
is created, before any progress display starts its thread.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from distml import processes
from distml.errors import DistmlError
from distml.execution.base import Executor, ProgressFactory, ProgressHandle

_PRELOAD = ["numpy", "pyarrow", "pyarrow.parquet", "distml.data.preprocess"]


def _threads() -> int:
    """This process's threads, native ones included: torch's, Ray's or gRPC's threads are
    invisible to ``threading`` but can hold a lock at the fork all the same (a forked
    worker then waits on it for ever)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux
        return threading.active_count()


def _context() -> mp.context.BaseContext:
    if _threads() == 1:
        return mp.get_context("fork")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _init_worker(parent: int | None) -> None:
    """Workers die with ``parent``, the process that forked them (None: a forkserver did,
    whose pid is not known here before it forks). Workers already fill the cores: BLAS,
    OpenMP or Arrow threads inside them would oversubscribe the machine (and spin-wait).
    And a fresh worker would serve each large temporary array with a new mmap and its page
    faults; keeping freed memory in the heap lets it be reused (about 15% of ingestion time
    on 2 cores)."""
    if parent is not None:
        processes.die_with_parent(parent)
    import pyarrow
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    pyarrow.set_cpu_count(1)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31)
    except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
        pass


def _noop(i: int) -> int:
    return i


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._pool: ProcessPoolExecutor | None = None
        if self.num_workers > 1:
            ctx = _context()
            parent = os.getpid() if ctx.get_start_method() == "fork" else None
            self._pool = ProcessPoolExecutor(max_workers=self.num_workers, mp_context=ctx,
                                             initializer=_init_worker, initargs=(parent,))
            list(self._pool.map(_noop, range(self.num_workers)))  # start every worker now

    def _map(
        self, fn: Callable, items: list, *, handle: ProgressHandle, desc: str,
        describe: Callable[[Any], str],
    ) -> Iterator:
        if self.num_workers == 1:
            yield from self._serial(fn, items, handle=handle, desc=desc, describe=describe)
            return
        pool = self._pool
        futures = [self._submit(pool, fn, item, handle) for item in items]
        try:
            for item, fut in zip(items, futures, strict=True):
                for attempt in range(self.retries + 1):
                    try:
                        yield fut.result()
                        break
                    except BrokenProcessPool as e:  # a worker died: no retry on a dead pool
                        raise self._failed(desc, item, describe, e) from e
                    except Exception as e:
                        if attempt == self.retries or isinstance(e, DistmlError):
                            raise self._failed(desc, item, describe, e) from e
                        fut = self._submit(pool, fn, item, handle)
        finally:
            for fut in futures:
                fut.cancel()

    @staticmethod
    def _submit(pool: ProcessPoolExecutor, fn: Callable, item: Any, handle: ProgressHandle):
        fut: Future = pool.submit(fn, item)
        fut.add_done_callback(lambda f: f.exception() is None and handle.advance())
        return fut

    def _serial(
        self, fn: Callable, items: list, *, handle: ProgressHandle, desc: str,
        describe: Callable[[Any], str],
    ) -> Iterator:
        for item in items:
            for attempt in range(self.retries + 1):
                try:
                    result = fn(item)
                    break
                except Exception as e:
                    if attempt == self.retries or isinstance(e, DistmlError):
                        raise self._failed(desc, item, describe, e) from e
            handle.advance()
            yield result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def make(address: str, *, num_workers: int, retries: int,
         progress: ProgressFactory | None) -> LocalExecutor:
    """The executor for ``local`` (it has no address)."""
    return LocalExecutor(num_workers=num_workers, retries=retries, progress=progress)
