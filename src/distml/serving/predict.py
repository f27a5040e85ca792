"""``distml predict``: batch inference over the input's partitions on the data layer's
executors (a local process pool by default; Dask or Ray when given).

The input is a CSV or Parquet file, or a folder of them, with the raw columns the model was
trained on (other columns are ignored). Each Parquet row group and each CSV file is one work
item; workers write their part, and the driver joins the parts in input order into one
Parquet file under a temporary name, renamed when complete. Input and output may be storage
URLs (``s3://bucket/in/``, ``s3://bucket/out.parquet``): the output is one object, uploaded
whole when complete (a PUT is atomic: readers see no object or all of it). Row ids are kept: the
``id_column`` if given, else ``row_id``, the row's position in the input.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distml import storage
from distml.data.tables import list_remote, raw_columns, read_table
from distml.errors import DataError
from distml.execution import make_executor
from distml.execution.base import ProgressFactory
from distml.serving.model import ServedModel, load_served_model, resolve
from distml.trust import TrustPolicy

_SUFFIXES = (".csv", ".parquet", ".pq")


@dataclass(frozen=True)
class Part:
    index: int
    path: str
    row_group: int | None  # None: the whole (CSV) file

    def __str__(self) -> str:
        return self.path + ("" if self.row_group is None else f" row group {self.row_group}")


@dataclass(frozen=True)
class PredictJob:
    artifact: str
    id_column: str | None
    out_dir: str
    trust: TrustPolicy = TrustPolicy()  # travels to each worker: it decides as the driver did


def plan_parts(path: Path | str) -> list[Part]:
    if isinstance(path, str):
        return _plan_remote(path)
    if not path.exists():
        raise DataError(f"--input: {str(path)!r} does not exist")
    files = sorted(f for f in (path.rglob("*") if path.is_dir() else [path])
                   if f.is_file() and f.suffix.lower() in _SUFFIXES)
    if not files:
        raise DataError(f"--input: {str(path)!r} holds no .csv or .parquet file")
    parts: list[Part] = []
    for f in files:
        if f.suffix.lower() == ".csv":
            parts.append(Part(len(parts), str(f), None))
            continue
        try:
            groups = pq.ParquetFile(f).num_row_groups
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read {f} (truncated or corrupt?): {e}") from None
        parts += [Part(len(parts) + g, str(f), g) for g in range(groups)]
    return parts


def _plan_remote(url: str) -> list[Part]:
    parts: list[Part] = []
    for f in list_remote(url):
        if f["path"].lower().endswith(".csv"):
            parts.append(Part(len(parts), f["path"], None))
            continue
        with storage.translated(f["path"], action="read"), \
                storage.filesystem(url).open(f["path"].split("://", 1)[1], "rb") as fh:
            groups = pq.ParquetFile(fh).num_row_groups
        parts += [Part(len(parts) + g, f["path"], g) for g in range(groups)]
    return parts


# Per worker process: each artifact is loaded (and its digests checked) once per policy.
_MODELS: dict[tuple[str, TrustPolicy], ServedModel] = {}


def _model(path: str, trust: TrustPolicy) -> ServedModel:
    if (path, trust) not in _MODELS:
        from distml.artifact import load_artifact

        _MODELS[path, trust] = ServedModel(load_artifact(path, trust=trust), "", "")
    return _MODELS[path, trust]


def predict_part(job: PredictJob, part: Part) -> dict[str, Any]:
    """One work item: read, preprocess, predict, write ``part-NNNNN.parquet``."""
    model = _model(job.artifact, job.trust)
    table = read_table(part.path if storage.as_url(part.path) else Path(part.path),
                       part.row_group)
    names = model.spec["input_columns"]
    missing = [c for c in names if c not in table.column_names]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(f"{part.path} lacks {len(missing)} of the model's {len(names)} input "
                        f"columns ({shown}); it has {', '.join(table.column_names[:10])}")
    if job.id_column is not None and job.id_column not in table.column_names:
        raise DataError(f"--id-column {job.id_column!r} is not a column of {part.path}; it has "
                        f"{table.column_names}")
    out = model.infer(raw_columns(table, names))
    result: dict[str, Any] = {}
    if job.id_column is not None:
        result[job.id_column] = table[job.id_column]
    for name, values in out.items():
        if values.ndim == 2:  # one list per row: the class probabilities
            result[name] = pa.FixedSizeListArray.from_arrays(values.reshape(-1), values.shape[1])
        else:
            result[name] = pa.array(values.tolist() if values.dtype == object else values)
    path = Path(job.out_dir) / f"part-{part.index:05d}.parquet"
    pq.write_table(pa.table(result), path)
    return {"path": str(path), "rows": table.num_rows}


def predict(
    ref: str, input_path: Path, output: Path, *, registry: Path, executor: str = "local",
    num_workers: int | None = None, id_column: str | None = None,
    progress: ProgressFactory | None = None, trust: TrustPolicy | None = None,
) -> dict[str, Any]:
    """Predict every row of the input; returns {rows, parts, output, model, version}.
    ``trust``: the code the artifact may name (default: none)."""
    trust = trust or TrustPolicy()
    # Paths travel to workers, whose working folder (on another machine) is not ours.
    source: Path | str = storage.as_url(input_path) or Path(input_path).absolute()
    target = storage.as_url(output)
    output = storage.local_path(target) if target else Path(output).absolute()
    artifact, name, version = resolve(ref, registry)
    artifact = artifact.absolute()
    # A broken or untrusted artifact fails here, once, before any worker starts.
    load_served_model(str(artifact), registry=registry, trust=trust)
    parts = plan_parts(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output.with_name(f".{output.name}.parts-{os.getpid()}")
    tmp_file = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    job = PredictJob(str(artifact), id_column, str(tmp_dir), trust)
    try:
        with make_executor(executor, num_workers=min(num_workers or os.cpu_count() or 1,
                                                      len(parts)),
                           progress=progress) as ex:
            written = list(ex.map(_predict, [(job, p) for p in parts], desc="predict",
                                  describe=lambda item: str(item[1])))
        rows = _join(written, tmp_file, add_row_id=id_column is None)
        if target is not None:  # one object, uploaded whole
            with storage.translated(target, action="write"):
                storage.filesystem(target).put_file(str(tmp_file), target.split("://", 1)[1])
        os.replace(tmp_file, output)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_file.unlink(missing_ok=True)
    return {"rows": rows, "parts": len(parts), "output": target or str(output), "model": name,
            "version": version}


def _predict(item: tuple[PredictJob, Part]) -> dict[str, Any]:
    return predict_part(*item)


def _join(written: list[dict[str, Any]], path: Path, *, add_row_id: bool) -> int:
    """The parts, in input order, streamed into one file; row_id = position in the input."""
    writer, offset = None, 0
    try:
        for w in written:
            table = pq.read_table(w["path"])
            if add_row_id:
                ids = pa.array(np.arange(offset, offset + table.num_rows, dtype=np.int64))
                table = table.add_column(0, "row_id", ids)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            offset += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return offset
