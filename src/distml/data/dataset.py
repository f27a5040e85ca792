"""A partitioned data set on disk: ``<root>/<split>/part-NNNNN.parquet`` plus ``manifest.json``.

Partitions are the unit of parallel work. The manifest is written last, so a folder without
one is incomplete by definition; ingestion builds the folder under a temporary name and
renames it into place when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distml.errors import DataError
from distml.fsutil import write_json_atomic

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


@dataclass
class Manifest:
    """What a data folder holds; JSON on disk."""

    task: str
    feature_names: list[str]  # model inputs, after the transforms
    classes: list[str] | None
    preprocessing: list[dict[str, Any]]
    splits: dict[str, dict[str, Any]]  # split -> {"rows": n, "partitions": [{path, rows, sha256}]}
    source: dict[str, Any]
    input_columns: dict[str, str] = field(default_factory=dict)  # raw name -> numeric/categorical
    dropped_invalid_rows: int = 0
    version: str = ""  # content-addressed (distml.data.versions); "" in older manifests
    format_version: int = FORMAT_VERSION
    root: Path = field(default=Path("."), compare=False, repr=False)

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @property
    def sequence_length(self) -> int | None:
        """Input tokens per sequence for language modeling (stored windows are one longer)."""
        return self.num_features - 1 if self.task == "language_modeling" else None

    def rows(self, split: str) -> int:
        return self.splits[split]["rows"] if split in self.splits else 0

    def partitions(self, split: str) -> list[dict[str, Any]]:
        """A split's partitions; none for a split the data set lacks (unlabelled)."""
        return self.splits[split]["partitions"] if split in self.splits else []

    def write(self, root: Path) -> None:
        data = asdict(self)
        data.pop("root")
        write_json_atomic(root / MANIFEST, data)

    @classmethod
    def read(cls, root: Path) -> Manifest:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise DataError(f"{root} is not a distml data folder (no {MANIFEST})")
        try:
            data = json.loads(path.read_text())
            return cls(**data, root=Path(root))
        except (json.JSONDecodeError, TypeError) as e:
            raise DataError(f"{path} is not a valid manifest: {e}") from None


def partition_table(
    features: dict[str, np.ndarray] | np.ndarray, y: np.ndarray | None, row_ids: np.ndarray
) -> pa.Table:
    """One partition: row_id, then a column per feature and the label; or, for language
    modeling (``features`` an (n, T+1) uint8 array), a fixed-size list column of tokens."""
    columns: dict[str, pa.Array] = {"row_id": pa.array(row_ids, pa.int64())}
    if isinstance(features, np.ndarray):
        flat = pa.array(np.ascontiguousarray(features, dtype=np.uint8).ravel())
        columns["tokens"] = pa.FixedSizeListArray.from_arrays(flat, features.shape[1])
    else:
        columns.update((name, pa.array(values)) for name, values in features.items())
        columns["label"] = pa.array(y)
    return pa.table(columns)


def write_partition(root: Path, rel: str, table: pa.Table) -> dict[str, Any]:
    """Write one partition file; returns its manifest entry."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        sink = _HashingWriter(f)
        # Dictionary encoding only pays for the label: on float features it costs ~5x the time.
        dictionary = [c for c in ("label",) if c in table.column_names]
        pq.write_table(table, sink, use_dictionary=dictionary)
    return {"path": rel, "rows": table.num_rows, "sha256": sink.sha256.hexdigest()}


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through (no second read of the file)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha256 = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.sha256.update(b)
        return self.f.write(b)


def read_partition(manifest: Manifest, rel_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one partition as (inputs, targets) ready for the model.

    Features: (n, F) float32 and (n,) int64 class ids or float32 targets.
    Language modeling: (n, T) int64 tokens and their (n, T) next-token targets.
    """
    path = manifest.root / rel_path
    try:
        table = pq.read_table(path, memory_map=True)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"partition {path} is unreadable (truncated or corrupt?): {e}") from None
    if manifest.task == "language_modeling":
        tokens = table["tokens"].combine_chunks()
        width = manifest.num_features
        seq = tokens.values.to_numpy().reshape(-1, width).astype(np.int64)
        return seq[:, :-1], seq[:, 1:]
    x = np.column_stack([table[n].to_numpy() for n in manifest.feature_names])
    return x.astype(np.float32, copy=False), table["label"].to_numpy()


def load_split(manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All partitions of a split, concatenated in order."""
    parts = [read_partition(manifest, p["path"]) for p in manifest.splits[split]["partitions"]]
    if not parts:
        raise DataError(f"split {split!r} of {manifest.root} is empty")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
