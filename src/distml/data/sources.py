"""Data sources, cut into chunks: the independent work items of parallel ingestion.

A source spec's ``plan_chunks`` lists its chunks (cheap, in the driver) and ``load_chunk``
loads one (in a worker), with the functions here. Synthetic data is generated per chunk
from (seed, chunk index), so the data does not depend on how many workers made it. Nothing
is downloaded.
"""

from __future__ import annotations

import glob
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from distml.config import (
    FileSource,
    SyntheticClassificationSource,
    SyntheticRegressionSource,
    TextSource,
)
from distml.errors import DataError

_FILE_SUFFIXES = (".csv", ".parquet", ".pq")


@dataclass(frozen=True)
class Chunk:
    """One work item: rows [start, stop) of a generated source, or one file."""

    index: int
    label: str
    path: str | None = None
    start: int = 0
    stop: int = 0


@dataclass
class RawChunk:
    """A chunk before validation and transforms.

    ``columns``: raw feature columns, float32 (nulls as NaN) or str (categorical);
    ``labels``: raw label values, None for text; ``tokens``: (N, T+1) uint8 byte windows
    for text, else None.
    """

    columns: dict[str, np.ndarray]
    labels: np.ndarray | None
    tokens: np.ndarray | None = None

    def __len__(self) -> int:
        if self.tokens is not None:
            return len(self.tokens)
        return len(self.labels) if self.labels is not None else 0


def row_chunks(n: int, rows_per_partition: int) -> list[Chunk]:
    """Chunks of ``rows_per_partition`` consecutive rows of a generated source."""
    return [
        Chunk(i, f"rows {start}-{min(start + rows_per_partition, n) - 1}", None, start,
              min(start + rows_per_partition, n))
        for i, start in enumerate(range(0, n, rows_per_partition))
    ]


def load_digits() -> RawChunk:
    from sklearn import datasets

    bunch = datasets.load_digits()
    data = bunch.data.astype(np.float32)
    names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    return RawChunk({n: data[:, j] for j, n in enumerate(names)}, bunch.target)


def _chunk_rng(seed: int, chunk: Chunk) -> np.random.Generator:
    return np.random.default_rng([seed, chunk.index])


def synthetic_classification(src: SyntheticClassificationSource, chunk: Chunk) -> RawChunk:
    centres = np.random.default_rng(src.seed).normal(
        0.0, src.class_sep, (src.n_classes, src.n_features)
    ).astype(np.float32)
    rng = _chunk_rng(src.seed, chunk)
    n = chunk.stop - chunk.start
    y = rng.integers(0, src.n_classes, n)
    x = centres[y] + src.noise * rng.standard_normal((n, src.n_features), dtype=np.float32)
    return RawChunk({f"x{j}": x[:, j] for j in range(src.n_features)}, y)


def synthetic_regression(src: SyntheticRegressionSource, chunk: Chunk) -> RawChunk:
    weights = np.random.default_rng(src.seed).standard_normal(src.n_features).astype(np.float32)
    rng = _chunk_rng(src.seed, chunk)
    n = chunk.stop - chunk.start
    x = rng.standard_normal((n, src.n_features), dtype=np.float32)
    y = x @ weights + src.noise * rng.standard_normal(n, dtype=np.float32)
    return RawChunk({f"x{j}": x[:, j] for j in range(src.n_features)}, y.astype(np.float32))


def expand_text_paths(patterns: list[str]) -> list[Path]:
    """Expand globs; 'stdlib:' stands for the Python standard library's folder."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for pattern in patterns:
        if pattern.startswith("stdlib:"):
            full = str(stdlib / pattern.removeprefix("stdlib:"))
        else:
            full = str(Path(pattern).expanduser())
        matches = sorted(Path(m) for m in glob.glob(full, recursive=True))
        files.extend(m for m in matches if m.is_file())
    return files


def load_text(src: TextSource) -> RawChunk:
    files = expand_text_paths(src.paths)
    if not files:
        raise DataError(f"data.source.paths={src.paths} matches no file")
    chunks, total = [], 0
    for f in files:
        chunk = f.read_bytes() + b"\n"
        chunks.append(chunk)
        total += len(chunk)
        if src.max_bytes is not None and total >= src.max_bytes:
            break
    data = np.frombuffer(b"".join(chunks)[: src.max_bytes], dtype=np.uint8)
    t = src.sequence_length
    n = (len(data) - 1) // t
    if n < 1:
        raise DataError(
            f"data.source: {len(data)} bytes of text is shorter than one sequence of "
            f"sequence_length={t} tokens; add files or lower sequence_length"
        )
    # Windows of T+1 bytes with stride T: inputs are [:T], next-token targets are [1:].
    windows = np.lib.stride_tricks.sliding_window_view(data, t + 1)[::t][:n].copy()
    return RawChunk({}, None, windows)


def list_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"data.source.path: {str(path)!r} does not exist")
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    files = [f for f in files if f.is_file() and f.suffix.lower() in _FILE_SUFFIXES]
    if not files:
        raise DataError(f"data.source.path: {str(path)!r} holds no .csv or .parquet file")
    return files


def read_table(path: Path, row_group: int | None = None) -> pa.Table:
    """A CSV or Parquet file (or one row group of a Parquet file); a file that cannot be
    read is a DataError naming it."""
    try:
        if path.suffix.lower() == ".csv":
            return pcsv.read_csv(path)
        if row_group is not None:
            return pq.ParquetFile(path).read_row_group(row_group)
        return pq.read_table(path, memory_map=True)
    except (pa.ArrowInvalid, OSError) as e:
        where = path if row_group is None else f"{path} row group {row_group}"
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


def load_file(src: FileSource, path: Path) -> RawChunk:
    table = read_table(path)
    if src.label_column not in table.column_names:
        raise DataError(
            f"data.source.label_column={src.label_column!r} is not a column of {path}; "
            f"columns: {', '.join(table.column_names)}"
        )
    features = src.feature_columns or [c for c in table.column_names if c != src.label_column]
    missing = [c for c in features if c not in table.column_names]
    if missing:
        raise DataError(f"data.source.feature_columns: {missing} are not columns of {path}")
    labels = table[src.label_column].to_numpy(zero_copy_only=False)
    return RawChunk(raw_columns(table, features), labels)
