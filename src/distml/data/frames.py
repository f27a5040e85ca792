"""A Spark DataFrame a user already has, handed to ingestion from Python::

    from distml.data.frames import ingest_dataframe
    manifest = ingest_dataframe(df, "runs/frames-data", label_column="y",
                                data={"transforms": ["standardize"]})

Spark writes the DataFrame as Parquet (in parallel, on its executors) into a staging folder,
whose files are then renamed in partition order and the folder named by their content
(``frame-<sha256>``): the same rows give the same folder, so the same data version; then the
file source ingests it as any folder of Parquet files. ``stage_dataframe`` alone gives the
folder, for a config's ``data.source``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from distml.config import DataConfig
from distml.data.dataset import Manifest
from distml.data.ingest import ingest
from distml.execution import Executor
from distml.fsutil import file_sha256


def stage_dataframe(df: Any, staging: Path | str) -> Path:
    """Write ``df`` (a pyspark DataFrame) under ``staging`` as ``frame-<content>/part-NNNNN
    .parquet``; an existing folder of the same content is reused."""
    staging = Path(staging).absolute()
    tmp = staging / f".frame-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    df.write.mode("overwrite").parquet(str(tmp))
    digest = hashlib.sha256()
    written = sorted(p for p in tmp.glob("part-*") if p.suffix == ".parquet")
    for i, part in enumerate(written):
        digest.update(file_sha256(part).encode())
        part.rename(tmp / f"part-{i:05d}.parquet")
    for other in tmp.iterdir():  # Spark's _SUCCESS and .crc files
        if not other.name.startswith("part-") or other.suffix != ".parquet":
            other.unlink()
    final = staging / f"frame-{digest.hexdigest()[:16]}"
    if final.is_dir():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    return final


def ingest_dataframe(
    df: Any, root: Path | str, *, label_column: str = "label",
    feature_columns: list[str] | None = None, data: dict[str, Any] | None = None,
    seed: int = 0, staging: Path | str | None = None, executor: Executor | None = None,
) -> Manifest:
    """Ingest a Spark DataFrame into ``root`` (see the module docstring); ``data``: the rest
    of a config's ``data`` section (split, transforms, ...)."""
    root = Path(root)
    folder = stage_dataframe(df, staging or root.parent / ".frames")
    source = {"type": "file", "path": str(folder), "label_column": label_column,
              "feature_columns": feature_columns}
    config = DataConfig.model_validate({**(data or {}), "source": source})
    return ingest(config, root, seed=seed, executor=executor)
