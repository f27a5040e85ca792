"""CSV and Parquet files read as raw columns: the file source, batch prediction, the watch
loop's landing files and the drift report all read tables this one way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from distml import storage
from distml.errors import DataError

_FILE_SUFFIXES = (".csv", ".parquet", ".pq")


def list_remote(url: str) -> list[dict[str, Any]]:
    """The CSV/Parquet objects a URL names (a prefix, a glob like ``s3://b/p/*.parquet``, or
    one object), each ``{"path": url, "bytes": n, "etag": ...}``, sorted by path."""
    fs = storage.filesystem(url)
    scheme, key = url.split("://", 1)
    with storage.translated(url, action="list"):
        storage.check_reachable(fs, url)
        if any(c in key for c in "*?["):
            infos = fs.glob(key, detail=True).values()
        elif fs.isdir(key):
            infos = fs.find(key, detail=True).values()
        else:
            infos = [fs.info(key)]
    found = [{"path": f"{scheme}://{i['name']}", "bytes": int(i["size"]),
              "etag": storage.etag(i)}
             for i in infos if i.get("type") == "file"
             and Path(i["name"]).suffix.lower() in _FILE_SUFFIXES]
    if not found:
        raise DataError(f"data.source.path: {url!r} holds no .csv or .parquet object")
    return sorted(found, key=lambda f: f["path"])


def list_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"data.source.path: {str(path)!r} does not exist")
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    files = [f for f in files if f.is_file() and f.suffix.lower() in _FILE_SUFFIXES]
    if not files:
        raise DataError(f"data.source.path: {str(path)!r} holds no .csv or .parquet file")
    return files


def read_table(path: Path | str, row_group: int | None = None) -> pa.Table:
    """A CSV or Parquet file or object (or one row group of a Parquet file); a file that
    cannot be read is a DataError naming it."""
    if isinstance(path, str) and storage.as_url(path):
        with storage.translated(path, action="read"), \
                storage.filesystem(path).open(path.split("://", 1)[1], "rb") as f:
            return _read(f, path.lower().endswith(".csv"), path, row_group)
    return _read(path, Path(path).suffix.lower() == ".csv", path, row_group)


def _read(path: Any, csv: bool, name: Path | str, row_group: int | None) -> pa.Table:
    try:
        if csv:
            return pcsv.read_csv(path)
        if row_group is not None:
            return pq.ParquetFile(path).read_row_group(row_group)
        return pq.read_table(path, memory_map=isinstance(path, Path))
    except (pa.ArrowInvalid, OSError) as e:
        where = name if row_group is None else f"{name} row group {row_group}"
        raise DataError(f"cannot read {where} (truncated or corrupt?): {e}") from None


def raw_columns(table: pa.Table, names: list[str]) -> dict[str, np.ndarray]:
    """Raw feature columns: numbers as float32 (nulls as NaN), anything else as str
    categories (nulls as the empty category)."""
    columns = {}
    for name in names:
        col = table[name]
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            columns[name] = pc.cast(col, pa.float32()).to_numpy(zero_copy_only=False)
        elif pa.types.is_null(col.type):  # an empty file has untyped columns
            columns[name] = np.full(table.num_rows, np.nan, np.float32)
        else:
            columns[name] = np.asarray(pc.fill_null(pc.cast(col, pa.string()), "").to_pylist(),
                                       dtype=object)
    return columns
