"""Dask: ``dask://local`` starts a LocalCluster of worker processes; ``dask://HOST:PORT``
connects to a running scheduler (workers there need distml installed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from distributed import Client, LocalCluster

from distml.execution.base import Executor, ProgressFactory, ProgressHandle


class DaskExecutor(Executor):
    name = "dask"

    def __init__(self, client: Client, *, cluster: LocalCluster | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.client = client
        self.cluster = cluster

    def _map(
        self, fn: Callable, items: list, *, handle: ProgressHandle, desc: str,
        describe: Callable[[Any], str],
    ) -> Iterator:
        futures = self.client.map(fn, items, retries=self.retries, pure=False)
        for fut in futures:
            fut.add_done_callback(lambda f: f.status == "finished" and handle.advance())
        try:
            for item, fut in zip(items, futures, strict=True):
                try:
                    yield fut.result()
                except Exception as e:
                    raise self._failed(desc, item, describe, e) from e
        finally:
            self.client.cancel(futures)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make(
    address: str, *, num_workers: int, retries: int, progress: ProgressFactory | None
) -> DaskExecutor:
    if address == "local":
        cluster = LocalCluster(
            n_workers=num_workers, threads_per_worker=1, processes=True,
            dashboard_address=None, host="127.0.0.1",
        )
        return DaskExecutor(Client(cluster), cluster=cluster, num_workers=num_workers,
                            retries=retries, progress=progress)
    client = Client(f"tcp://{address}" if "://" not in address else address)
    workers = len(client.scheduler_info()["workers"]) or num_workers
    return DaskExecutor(client, num_workers=workers, retries=retries, progress=progress)
