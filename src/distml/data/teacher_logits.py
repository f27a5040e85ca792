"""Teacher outputs stored next to the data, keyed by row id.

A store is a folder beside the training (and unlabelled) partitions it describes::

    <data root>/teachers/<key>/manifest.json
    <data root>/teachers/<key>/train/part-CCCCC-KKK.parquet    row_id, logits (float32 list)
    <data root>/teachers/<key>/unlabelled/part-CCCCC-KKK.parquet   (a transfer set's rows)

with one file per data partition, of the same name. ``key`` hashes the teachers' weights
(and their calibration), so a store is computed once per set of teachers and data version
(the data root is the version's) and reused by every run on the data. Rows
are matched by ``row_id``, never by position: whatever order a store's file holds its rows
in, each data row meets its own teacher's logits.

The loader hands them to the training step inside the batch's targets: a float32 array of
``(..., 1 + C)`` whose channel 0 is the label (class ids are exact in float32 below 2^24)
and channels 1.. the teacher's logits. Shuffling, sharding, caching and micro-batching move
a row's label and its teacher's logits together, and every strategy passes targets through
unchanged; ``distml.training.distill`` unpacks them in the loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distml.data.dataset import Manifest
from distml.errors import DataError
from distml.fsutil import write_json_atomic

STORE_MANIFEST = "manifest.json"
MAX_EXACT_LABEL = 2**24  # float32 holds every integer below it exactly


def store_root(manifest: Manifest, key: str) -> Path:
    return manifest.root / "teachers" / key


def read_row_ids(manifest: Manifest, rel_path: str) -> np.ndarray:
    """The row ids of one data partition, in its row order."""
    path = manifest.root / rel_path
    try:
        return pq.read_table(path, columns=["row_id"])["row_id"].to_numpy()
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise DataError(f"partition {path} has no readable row_id column: {e}") from None


def write_logits(root: Path, rel_path: str, row_ids: np.ndarray, logits: np.ndarray) -> None:
    """One store file: ``row_id`` and ``logits`` ((n, C) float32, as a fixed-size list)."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    table = pa.table({
        "row_id": pa.array(row_ids, pa.int64()),
        "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), logits.shape[1]),
    })
    path = root / rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def write_store_manifest(root: Path, info: dict[str, Any]) -> None:
    """Written last: a store without one is incomplete."""
    write_json_atomic(root / STORE_MANIFEST, info)


def is_complete(root: Path) -> bool:
    return (root / STORE_MANIFEST).is_file()


def read_store_manifest(root: Path) -> dict[str, Any]:
    path = root / STORE_MANIFEST
    if not path.is_file():
        raise DataError(f"{root} holds no complete teacher outputs (no {STORE_MANIFEST}); "
                        "they are computed by the pipeline before the student trains")
    return json.loads(path.read_text())


def aligned_logits(root: Path, rel_path: str, row_ids: np.ndarray) -> np.ndarray:
    """The stored logits of the rows ``row_ids``, in that order: (n, C) float32."""
    path = root / rel_path
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"teacher outputs {path} are unreadable: {e}") from None
    ids = table["row_id"].to_numpy()
    column = table["logits"].combine_chunks()
    logits = column.values.to_numpy().reshape(len(ids), column.type.list_size)
    sorter = np.argsort(ids, kind="stable")
    pos = sorter[np.searchsorted(ids, row_ids, sorter=sorter).clip(max=max(len(ids) - 1, 0))] \
        if len(ids) else np.zeros(0, np.int64)
    missing = ids[pos] != row_ids if len(ids) else np.ones(len(row_ids), bool)
    if missing.any():
        raise DataError(
            f"teacher outputs {path} lack {int(missing.sum())} of the partition's "
            f"{len(row_ids)} rows (row_id {int(row_ids[missing][0])}, ...); they were "
            f"computed for other data: delete {root} and run again")
    return logits[pos]


def pack_targets(y: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Labels (n,) and teacher logits (n, C) -> (n, 1 + C) float32, the label first."""
    if len(y) and int(y.max()) >= MAX_EXACT_LABEL:
        raise DataError(f"class id {int(y.max())} is too large to travel with the teacher's "
                        f"logits (at most {MAX_EXACT_LABEL - 1})")
    out = np.empty((len(y), 1 + logits.shape[1]), np.float32)
    out[:, 0] = y
    out[:, 1:] = logits
    return out
