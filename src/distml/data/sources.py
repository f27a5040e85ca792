"""Data sources: each turns its config into a RawData in memory. Nothing is downloaded."""

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
    DigitsSource,
    FileSource,
    Source,
    SyntheticClassificationSource,
    SyntheticRegressionSource,
    TextSource,
)
from distml.errors import DataError

_CHUNK_ROWS = 1 << 20  # synthetic data is generated in chunks to bound temporary memory


@dataclass
class RawData:
    """A whole data set before splitting.

    ``x`` is (N, F) float32 features, or (N, T+1) uint8 byte tokens for language modeling;
    ``labels`` holds the raw label values (strings, ints or floats), None for language modeling.
    """

    x: np.ndarray
    labels: np.ndarray | None
    feature_names: list[str]
    fingerprint: dict

    def __len__(self) -> int:
        return len(self.x)


def load_source(source: Source) -> RawData:
    loaders = {
        DigitsSource: _digits,
        SyntheticClassificationSource: _synthetic_classification,
        SyntheticRegressionSource: _synthetic_regression,
        TextSource: _text,
        FileSource: _file,
    }
    return loaders[type(source)](source)


def _digits(source: DigitsSource) -> RawData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    return RawData(
        bunch.data.astype(np.float32), bunch.target, names, {"source": source.type}
    )


def _synthetic_classification(src: SyntheticClassificationSource) -> RawData:
    rng = np.random.default_rng(src.seed)
    centres = rng.normal(0.0, src.class_sep, (src.n_classes, src.n_features)).astype(np.float32)
    x = np.empty((src.n_samples, src.n_features), dtype=np.float32)
    y = np.empty(src.n_samples, dtype=np.int64)
    for start in range(0, src.n_samples, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, src.n_samples)
        y[start:stop] = rng.integers(0, src.n_classes, stop - start)
        noise = rng.standard_normal((stop - start, src.n_features), dtype=np.float32)
        x[start:stop] = centres[y[start:stop]] + src.noise * noise
    names = [f"x{i}" for i in range(src.n_features)]
    return RawData(x, y, names, src.model_dump(mode="json"))


def _synthetic_regression(src: SyntheticRegressionSource) -> RawData:
    rng = np.random.default_rng(src.seed)
    weights = rng.standard_normal(src.n_features).astype(np.float32)
    x = rng.standard_normal((src.n_samples, src.n_features), dtype=np.float32)
    y = x @ weights + src.noise * rng.standard_normal(src.n_samples, dtype=np.float32)
    names = [f"x{i}" for i in range(src.n_features)]
    return RawData(x, y.astype(np.float32), names, src.model_dump(mode="json"))


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


def _text(src: TextSource) -> RawData:
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
    fingerprint = {"source": "text", "files": len(files), "bytes": int(len(data)), "T": t}
    return RawData(windows, None, [f"t{i}" for i in range(t + 1)], fingerprint)


def _read_table(path: Path) -> pa.Table:
    if not path.exists():
        raise DataError(f"data.source.path: {str(path)!r} does not exist")
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    files = [f for f in files if f.suffix.lower() in (".csv", ".parquet", ".pq")]
    if not files:
        raise DataError(f"data.source.path: {str(path)!r} holds no .csv or .parquet file")
    tables = []
    for f in files:
        try:
            is_csv = f.suffix.lower() == ".csv"
            tables.append(pcsv.read_csv(f) if is_csv else pq.read_table(f, memory_map=True))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read {f}: {e}") from None
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as e:
        raise DataError(f"the files under {path} have incompatible schemas: {e}") from None


def _file(src: FileSource) -> RawData:
    table = _read_table(src.path)
    if table.num_rows == 0:
        raise DataError(f"the data set is empty: {src.path} has 0 rows")
    if src.label_column not in table.column_names:
        raise DataError(
            f"data.source.label_column={src.label_column!r} is not a column of {src.path}; "
            f"columns: {', '.join(table.column_names)}"
        )
    features = src.feature_columns or [c for c in table.column_names if c != src.label_column]
    missing = [c for c in features if c not in table.column_names]
    if missing:
        raise DataError(f"data.source.feature_columns: {missing} are not columns of {src.path}")
    not_numeric = [
        c for c in features
        if not (pa.types.is_integer(table[c].type) or pa.types.is_floating(table[c].type))
    ]
    if not_numeric:
        raise DataError(
            f"feature columns {not_numeric} of {src.path} are not numeric; "
            "list numeric columns in data.source.feature_columns"
        )
    if not features:
        raise DataError(f"{src.path} has no feature column besides the label")
    # Nulls become NaN so that validation counts them with the other invalid rows.
    x = np.column_stack(
        [pc.cast(table[c], pa.float32()).to_numpy(zero_copy_only=False) for c in features]
    ).astype(np.float32, copy=False)
    labels = table[src.label_column].to_numpy(zero_copy_only=False)
    fingerprint = {"source": str(src.path), "rows": table.num_rows, "columns": table.column_names}
    return RawData(x, labels, list(features), fingerprint)
