"""A partitioned data set on disk: ``<root>/<split>/part-NNNNN.parquet`` plus ``manifest.json``.

Partitions are the unit of parallel work. The manifest is written last, so a folder without
one is incomplete by definition; ingestion builds the folder under a temporary name and
renames it into place when complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    feature_names: list[str]
    classes: list[str] | None
    preprocessing: list[dict[str, Any]]
    splits: dict[str, dict[str, Any]]  # split -> {"rows": n, "partitions": [{path, rows, sha256}]}
    source: dict[str, Any]
    dropped_invalid_rows: int = 0
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
        return self.splits[split]["rows"]

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _to_table(
    x: np.ndarray, y: np.ndarray | None, row_ids: np.ndarray, names: list[str], task: str
) -> pa.Table:
    columns: dict[str, pa.Array] = {"row_id": pa.array(row_ids, pa.int64())}
    if task == "language_modeling":
        flat = pa.array(np.ascontiguousarray(x, dtype=np.uint8).ravel())
        columns["tokens"] = pa.FixedSizeListArray.from_arrays(flat, x.shape[1])
    else:
        for j, name in enumerate(names):
            columns[name] = pa.array(x[:, j])
        columns["label"] = pa.array(y)
    return pa.table(columns)


def write_split(
    root: Path,
    split: str,
    *,
    x: np.ndarray,
    y: np.ndarray | None,
    row_ids: np.ndarray,
    feature_names: list[str],
    task: str,
    rows_per_partition: int,
) -> dict[str, Any]:
    """Write one split as Parquet partitions; returns its manifest entry."""
    (root / split).mkdir(parents=True, exist_ok=True)
    parts = []
    for i, start in enumerate(range(0, len(x), rows_per_partition)):
        stop = start + rows_per_partition
        rel = f"{split}/part-{i:05d}.parquet"
        table = _to_table(
            x[start:stop], None if y is None else y[start:stop], row_ids[start:stop],
            feature_names, task,
        )
        pq.write_table(table, root / rel)
        parts.append({"path": rel, "rows": table.num_rows, "sha256": _sha256(root / rel)})
    return {"rows": int(len(x)), "partitions": parts}


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
