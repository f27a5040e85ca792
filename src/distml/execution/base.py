"""The executor contract: ``map(fn, items)`` over independent work items, results in order.

Every embarrassingly parallel step (preprocessing partitions, batch inference) goes through
it. Implementations: ``local`` (a process pool on this machine; one worker runs in-process),
``dask://local`` or ``dask://HOST:PORT`` (a Dask LocalCluster or a running scheduler), and
``ray://local`` or ``ray://HOST:PORT``. Each item is retried ``retries`` times; then the map
fails with WorkItemError naming the item and its original error.

``fn`` and the items must be picklable (module-level functions, plain data), because they
travel to other processes or machines; there, distml must be installed too.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

from distml.config.executors import ENGINES, engine_of, executor_forms
from distml.errors import DistmlError

T = TypeVar("T")
R = TypeVar("R")


class WorkItemError(DistmlError):
    """A work item still failed after its retries."""


class ProgressHandle(Protocol):
    def advance(self, n: int = 1) -> None: ...
    def close(self) -> None: ...


ProgressFactory = Callable[[str, int], ProgressHandle]


class _NoProgress:
    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(desc: str, total: int) -> ProgressHandle:
    return _NoProgress()


class Executor:
    """Base class; subclasses implement ``_map``. Use as a context manager."""

    name = "executor"

    def __init__(
        self, *, num_workers: int, retries: int = 2, progress: ProgressFactory | None = None
    ) -> None:
        self.num_workers = num_workers
        self.retries = retries
        self.progress = progress or no_progress

    def map(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        *,
        desc: str,
        describe: Callable[[T], str] = str,
    ) -> Iterator[R]:
        """Apply ``fn`` to every item in parallel; yields results in the items' order."""
        items = list(items)
        handle = self.progress(desc, len(items))
        try:
            yield from self._map(fn, items, handle=handle, desc=desc, describe=describe)
        finally:
            handle.close()

    def _map(
        self, fn: Callable[[T], R], items: list[T], *, handle: ProgressHandle, desc: str,
        describe: Callable[[T], str],
    ) -> Iterator[R]:
        raise NotImplementedError

    def _failed(self, desc: str, item: Any, describe: Callable[[Any], str], err: BaseException):
        """The error to raise for an item that failed for good.

        A user error (DistmlError: bad data, say) keeps its class and gains the item's name;
        anything else becomes a WorkItemError that names the item and the original error.
        """
        if isinstance(err, DistmlError):
            return type(err)(f"{desc}: {describe(item)}: {err}")
        attempts = self.retries + 1
        return WorkItemError(
            f"{desc}: {describe(item)} failed after {attempts} attempt"
            f"{'s' if attempts > 1 else ''}: {type(err).__name__}: {err}"
        )

    def close(self) -> None:
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_executor(
    spec: str,
    *,
    num_workers: int | None = None,
    retries: int = 2,
    progress: ProgressFactory | None = None,
) -> Executor:
    """An executor by its ``execution.executor`` value (see ``config.executors``)."""
    workers = num_workers or os.cpu_count() or 1
    kind = engine_of(spec)
    if kind is None:
        raise DistmlError(
            f"execution.executor={spec!r} is not an executor; use {executor_forms()}")
    address = spec.partition("://")[2]
    try:
        module = importlib.import_module(ENGINES[kind].module)
    except ImportError as e:
        raise DistmlError(
            f"execution.executor={spec!r} needs {kind.capitalize()}, which is not installed "
            f"({e.name}); install it with: pip install 'distml[{kind}]'") from None
    return module.make(address, num_workers=workers, retries=retries, progress=progress)
