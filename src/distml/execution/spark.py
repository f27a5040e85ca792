"""Spark: ``spark://local[N]`` runs a local Spark (N cores); ``spark://HOST:7077`` connects
to a standalone cluster's master (its workers need distml, its Python and Java 17).

Every work item is one Spark task over Arrow batches: a DataFrame of item indices, one per
partition, goes through ``mapInArrow``; the task runs the item's function and returns its
result serialized by cloudpickle (the same function and the same result as on the local
executor, so ingestion writes byte-identical partitions). Spark's task retries
(``spark.task.maxFailures``, and ``local[N,F]``) carry ``execution.retries``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import pyarrow as pa
from pyspark.sql import SparkSession

from distml.execution.base import Executor, ProgressFactory, ProgressHandle

logger = logging.getLogger(__name__)


class SparkExecutor(Executor):
    name = "spark"

    def __init__(self, *, session: SparkSession, owns_session: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self.session, self.owns_session = session, owns_session

    def _map(
        self, fn: Callable, items: list, *, handle: ProgressHandle, desc: str,
        describe: Callable[[Any], str],
    ) -> Iterator:
        if not items:
            return
        payload = cloudpickle.dumps((fn, items))  # shipped once, in the closure
        attempts = self.retries + 1

        def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            work, inputs = cloudpickle.loads(payload)
            for batch in batches:
                ids = batch.column(0).to_pylist()
                results = []
                results.extend(cloudpickle.dumps(_attempt(work, inputs[i], attempts))
                               for i in ids)
                yield pa.RecordBatch.from_arrays([pa.array(ids, pa.int64()),
                                                  pa.array(results, pa.binary())],
                                                 names=["id", "result"])

        frame = self.session.range(0, len(items), numPartitions=len(items))
        rows = frame.mapInArrow(run, "id long, result binary").toArrow()
        by_id = dict(zip(rows["id"].to_pylist(), rows["result"].to_pylist(), strict=True))
        for i, item in enumerate(items):
            status, value = cloudpickle.loads(by_id[i])
            if status == "error":
                raise self._failed(desc, item, describe, value)
            handle.advance()
            yield value

    def close(self) -> None:
        if self.owns_session:
            self.session.stop()


def _attempt(fn: Callable, item: Any, attempts: int) -> tuple[str, Any]:
    """("ok", result), or ("error", the last exception) after ``attempts`` tries: a failure
    for good is raised in the driver, naming its item."""
    for attempt in range(attempts):
        try:
            return "ok", fn(item)
        except Exception as e:
            if attempt == attempts - 1:
                return "error", e
    raise AssertionError("unreachable")


def session(master: str, *, retries: int) -> tuple[SparkSession, bool]:
    """The active SparkSession, or a new one on ``master``; and whether it is new (then
    its maker stops it)."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    builder = SparkSession.builder.master(master).appName("distml")
    if master.startswith("local"):  # local workers run this interpreter (this venv)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (builder
            .config("spark.task.maxFailures", str(retries + 1))
            .config("spark.ui.enabled", "false")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .getOrCreate()), True


def make(
    address: str, *, num_workers: int, retries: int, progress: ProgressFactory | None
) -> SparkExecutor:
    master = address if address.startswith("local") else f"spark://{address}"
    spark, owns = session(master, retries=retries)
    return SparkExecutor(session=spark, owns_session=owns,
                         num_workers=num_workers, retries=retries, progress=progress)
