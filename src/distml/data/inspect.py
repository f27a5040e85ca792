"""Describe a Parquet data set: schema, partitions, rows and per-column statistics.

Works on a distml data folder (its manifest adds the task, splits and preprocessing), a run
folder (through its ``data`` link), or any Parquet file or folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distml.config import MinMaxSpec, StandardizeSpec
from distml.data import transforms
from distml.data.dataset import MANIFEST, Manifest
from distml.data.transforms.scaling import merge_moments
from distml.errors import DataError
from distml.rundir import RunDir

_STANDARDIZE, _MINMAX = StandardizeSpec(type="standardize"), MinMaxSpec(type="minmax")


def inspect(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if (RunDir(path).data / MANIFEST).is_file():  # a run folder: its data
        path = RunDir(path).data
    if not path.exists():
        raise DataError(f"{path} does not exist")
    manifest = Manifest.read(path) if (path / MANIFEST).is_file() else None
    if manifest is not None:  # its partitions (not, say, stored teacher outputs beside them)
        files = [path / p["path"] for split in manifest.splits
                 for p in manifest.partitions(split)]
    else:
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path} holds no .parquet file")
    schema = pq.read_schema(files[0])
    numeric = [f.name for f in schema if pa.types.is_integer(f.type) or
               pa.types.is_floating(f.type)]
    rows, nulls, parts = [], dict.fromkeys(numeric, 0), {"std": [], "mm": []}
    for f in files:
        try:
            table = pq.read_table(f, columns=numeric, memory_map=True)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f} is unreadable (truncated or corrupt?): {e}") from None
        rows.append({"path": str(f.relative_to(path) if path.is_dir() else f.name),
                     "rows": table.num_rows})
        cols = {}
        for name in numeric:
            nulls[name] += table[name].null_count
            cols[name] = pc.cast(table[name], pa.float64()).to_numpy(zero_copy_only=False)
        if table.num_rows:
            parts["std"].append(transforms.partial_stats(_STANDARDIZE, cols))
            parts["mm"].append(transforms.partial_stats(_MINMAX, cols))
    stats = {}
    if parts["std"]:
        _, mean, std = merge_moments(parts["std"])
        lo = np.min([p["min"] for p in parts["mm"]], axis=0)
        hi = np.max([p["max"] for p in parts["mm"]], axis=0)
        for j, name in enumerate(numeric):
            stats[name] = {"nulls": nulls[name], "mean": float(mean[j]), "std": float(std[j]),
                           "min": float(lo[j]), "max": float(hi[j])}
    return {
        "path": str(path),
        "schema": [(f.name, str(f.type)) for f in schema],
        "files": rows,
        "rows": sum(r["rows"] for r in rows),
        "stats": stats,
        "manifest": manifest,
    }
