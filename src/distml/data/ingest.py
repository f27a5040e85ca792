"""Parallel ingestion: source chunks -> validate -> split -> fit transforms -> Parquet.

The driver plans the chunks and runs the passes of ``preprocess.py`` through an executor
(the work-queue pattern: any number of workers, local, Dask or Ray). The output folder is
built under a temporary name and renamed into place when complete, so a failed or
interrupted ingestion leaves nothing that looks like a finished data set.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from distml.config import DataConfig
from distml.data import transforms
from distml.data.dataset import MANIFEST, Manifest
from distml.data.preprocess import SPLITS, FitJob, WriteJob, fit_chunk, write_chunk
from distml.data.sources import Chunk, open_source
from distml.data.versions import data_version
from distml.errors import DataError
from distml.execution import Executor, make_executor

logger = logging.getLogger(__name__)


def _describe(chunk: Chunk) -> str:
    return f"partition {chunk.index} ({chunk.label})"


def ingest(
    data: DataConfig, root: Path, *, seed: int, executor: Executor | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> Manifest:
    """Ingest ``data`` into ``root``; an existing complete folder is reused as it is.
    ``fingerprint``: the source's, if the caller took it already (it names the version)."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        logger.info("data already ingested at %s", root)
        return Manifest.read(root)
    if executor is None:
        with make_executor("local", num_workers=1) as serial:
            return ingest(data, root, seed=seed, executor=serial, fingerprint=fingerprint)

    source = open_source(data.source)
    fingerprint = fingerprint or source.fingerprint()
    chunks = source.plan_chunks(data.rows_per_partition)
    run = functools.partial(executor.map, items=chunks, describe=_describe)
    specs = data.feature_transforms
    first_fit = next((i for i, s in enumerate(specs) if transforms.needs_fit(s)), None)

    # Pass 1: scan every chunk, with the statistics of the first fitted transform.
    prefix = [transforms.unfitted_params(s) for s in specs[:first_fit]]  # [:None] is all
    spec = None if first_fit is None else specs[first_fit]
    scans = list(run(functools.partial(fit_chunk, FitJob(data, seed, prefix, spec, scan=True)),
                     desc="scan" + (f" + fit {spec.type}" if spec else "")))
    dropped = _check_scans(data, chunks, scans)
    classes = _classes(data, scans)

    # Further passes: one per remaining fitted transform, with the fitted prefix applied.
    params: list[dict[str, Any]] = list(prefix)
    if spec is not None:
        params.append(transforms.merge(spec, [s["stats"] for s in scans]))
        for spec in specs[first_fit + 1 :]:
            if transforms.needs_fit(spec):
                job = FitJob(data, seed, list(params), spec)
                parts = [r["stats"] for r in run(functools.partial(fit_chunk, job),
                                                    desc=f"fit {spec.type}")]
                params.append(transforms.merge(spec, parts))
            else:
                params.append(transforms.unfitted_params(spec))

    # Last pass: transform and write, under a temporary name.
    offsets = np.concatenate([[0], np.cumsum([s["raw_rows"] for s in scans])[:-1]])
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        job = WriteJob(data, seed, params, classes, str(tmp),
                       {c.index: int(o) for c, o in zip(chunks, offsets, strict=True)})
        written = list(run(functools.partial(write_chunk, job), desc="transform + write"))
        names, splits = _collect(chunks, written)
        manifest = Manifest(
            task=data.task, feature_names=names, classes=classes, preprocessing=params,
            splits=splits, source=fingerprint, input_columns=scans[0]["columns"],
            dropped_invalid_rows=dropped, version=data_version(data, seed, fingerprint),
        )
        manifest.write(tmp)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest.root = root
    return manifest


def _collect(chunks: list[Chunk], written: list[dict[str, Any]]
             ) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The feature names (every chunk must yield the same) and the partitions per split."""
    names = written[0]["feature_names"]
    for chunk, w in zip(chunks, written, strict=True):
        if w["feature_names"] != names:
            raise DataError(f"{_describe(chunk)} yields features {w['feature_names']}, "
                            f"but {_describe(chunks[0])} yields {names}")
    splits: dict[str, dict[str, Any]] = {s: {"rows": 0, "partitions": []} for s in SPLITS}
    if not any(w["parts"] and any(p["split"] == "unlabelled" for p in w["parts"])
               for w in written):
        del splits["unlabelled"]  # a data set without one keeps its manifest as it was
    for w in written:
        for part in w["parts"]:
            entry = splits[part.pop("split")]
            entry["partitions"].append(part)
            entry["rows"] += part["rows"]
    return names, splits


def _check_scans(data: DataConfig, chunks: list[Chunk], scans: list[dict[str, Any]]) -> int:
    """Refuse empty, invalid or inconsistent data before anything is written."""
    total = sum(s["raw_rows"] for s in scans)
    if total == 0:
        raise DataError("the data set is empty: the source produced 0 rows")
    for chunk, scan in zip(chunks, scans, strict=True):
        if scan["columns"] != scans[0]["columns"]:
            raise DataError(f"{_describe(chunk)} has columns {scan['columns']}, but "
                            f"{_describe(chunks[0])} has {scans[0]['columns']}")
    encoded = {c for s in data.feature_transforms for c in transforms.encodes(s)}
    categorical = [c for c, kind in scans[0]["columns"].items() if kind == "categorical"]
    if set(categorical) - encoded:
        raise DataError(
            f"feature columns {sorted(set(categorical) - encoded)} are not numeric; one-hot "
            "encode them (data.transforms: [{type: onehot, columns: [...]}]) or list only "
            "numeric columns in data.source.feature_columns"
        )
    invalid = sum(s["invalid_count"] for s in scans)
    if invalid and not data.drop_invalid:
        offsets = np.cumsum([0] + [s["raw_rows"] for s in scans])
        first = [int(o) + r for o, s in zip(offsets, scans, strict=False)
                 for r in s["invalid_rows"]][:5]
        raise DataError(
            f"{invalid} of {total} rows have NaN or infinite values (first rows: {first}); "
            "fix the data, impute (data.transforms: [impute, ...]) or set "
            "data.drop_invalid: true to drop them"
        )
    if invalid:
        logger.warning("dropped %d rows with NaN or infinite values", invalid)
    if invalid == total:
        raise DataError("every row has NaN or infinite values; nothing is left")
    per_split = np.sum([s["split_rows"] for s in scans], axis=0)
    if per_split[:3].min() < 1 or (data.split.unlabelled and per_split[3] < 1):
        frac = data.split
        raise DataError(
            f"{total - invalid} rows are too few to split into train/val/test with fractions "
            f"{frac.train}/{frac.val}/{frac.test}; every split needs at least one row"
        )
    return invalid


def _classes(data: DataConfig, scans: list[dict[str, Any]]) -> list[str] | None:
    """Class names: declared, or the sorted labels seen (numerically sorted if numbers)."""
    if data.task != "classification":
        return None
    counts: dict[Any, int] = {}
    for s in scans:
        for value, n in zip(*s["labels"], strict=True):
            counts[value] = counts.get(value, 0) + n
    if data.classes is None:
        return [str(v) for v in sorted(counts)]
    outside = {str(v): n for v, n in counts.items() if str(v) not in data.classes}
    if outside:
        examples = sorted(outside)[:5]
        raise DataError(
            f"{sum(outside.values())} rows have labels outside data.classes={data.classes}: "
            f"e.g. {examples}; declare every class or fix the labels"
        )
    return list(data.classes)
