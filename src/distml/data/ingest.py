"""Ingestion: source -> validate -> split -> fit transforms on train -> Parquet partitions.

The output folder is built under a temporary name and renamed into place when complete, so
an interrupted ingestion leaves nothing that looks like a finished data set.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from distml.config import DataConfig
from distml.data import transforms
from distml.data.dataset import MANIFEST, SPLITS, Manifest, write_split
from distml.data.sources import RawData, load_source
from distml.errors import DataError

logger = logging.getLogger(__name__)


def ingest(data: DataConfig, root: Path, *, seed: int) -> Manifest:
    """Ingest ``data`` into ``root``; an existing complete folder is reused as it is."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        logger.info("data already ingested at %s", root)
        return Manifest.read(root)
    raw = load_source(data.source)
    task = data.task
    raw, dropped = _drop_or_reject_invalid(raw, drop=data.drop_invalid)
    classes, y = _encode_labels(raw, task, data.classes)
    split_idx = _split(len(raw), y if task == "classification" and data.stratify else None,
                       data, seed=seed, ordered=task == "language_modeling")
    train_x = raw.x[split_idx["train"]]
    params = transforms.fit(data.feature_transforms, train_x) if data.feature_transforms else []

    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        splits = {}
        for split, idx in split_idx.items():
            x = raw.x[idx]
            splits[split] = write_split(
                tmp, split,
                x=transforms.apply(params, x) if params else x,
                y=None if y is None else y[idx],
                row_ids=idx, feature_names=raw.feature_names, task=task,
                rows_per_partition=data.rows_per_partition,
            )
        manifest = Manifest(
            task=task, feature_names=raw.feature_names, classes=classes, preprocessing=params,
            splits=splits, source=raw.fingerprint, dropped_invalid_rows=dropped,
        )
        manifest.write(tmp)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest.root = root
    return manifest


def _drop_or_reject_invalid(raw: RawData, *, drop: bool) -> tuple[RawData, int]:
    if len(raw) == 0:
        raise DataError("the data set is empty: the source produced 0 rows")
    if raw.x.dtype.kind != "f":
        return raw, 0
    bad = ~np.isfinite(raw.x).all(axis=1)
    n_bad = int(bad.sum())
    if n_bad and not drop:
        first = np.flatnonzero(bad)[:5].tolist()
        raise DataError(
            f"{n_bad} of {len(raw)} rows have NaN or infinite features (first rows: {first}); "
            "fix the data or set data.drop_invalid: true to drop them"
        )
    if n_bad:
        logger.warning("dropped %d rows with NaN or infinite features", n_bad)
        keep = ~bad
        raw = RawData(raw.x[keep], None if raw.labels is None else raw.labels[keep],
                      raw.feature_names, raw.fingerprint)
        if len(raw) == 0:
            raise DataError("every row has NaN or infinite features; nothing is left")
    return raw, n_bad


def _encode_labels(
    raw: RawData, task: str, declared: list[str] | None
) -> tuple[list[str] | None, np.ndarray | None]:
    """Class labels -> int64 ids (classes sorted, or in declared order); targets -> float32."""
    if task == "language_modeling":
        return None, None
    labels = raw.labels
    if task == "regression":
        y = labels.astype(np.float32)
        if not np.isfinite(y).all():
            raise DataError(f"{int((~np.isfinite(y)).sum())} rows have a NaN or infinite label")
        return None, y
    as_text = np.array([str(v) for v in labels]) if labels.dtype.kind not in "iub" else None
    if declared is None:
        uniq = np.unique(labels)
        classes = [str(v) for v in uniq]
        return classes, np.searchsorted(uniq, labels).astype(np.int64)
    keys = as_text if as_text is not None else labels.astype(str)
    index = {c: i for i, c in enumerate(declared)}
    y = np.array([index.get(k, -1) for k in keys], dtype=np.int64)
    outside = y < 0
    if outside.any():
        examples = sorted(set(keys[outside].tolist()))[:5]
        raise DataError(
            f"{int(outside.sum())} rows have labels outside data.classes={declared}: "
            f"e.g. {examples}; declare every class or fix the labels"
        )
    return list(declared), y


def _split(
    n: int, stratify: np.ndarray | None, data: DataConfig, *, seed: int, ordered: bool
) -> dict[str, np.ndarray]:
    """Row indices per split. Text keeps its order (no leakage between overlapping windows)."""
    frac = data.split
    n_val, n_test = round(n * frac.val), round(n * frac.test)
    if min(n - n_val - n_test, n_val, n_test) < 1:
        raise DataError(
            f"{n} rows are too few to split into train/val/test with fractions "
            f"{frac.train}/{frac.val}/{frac.test}; every split needs at least one row"
        )
    idx = np.arange(n)
    if ordered:
        a, b = n - n_val - n_test, n - n_test
        return {"train": idx[:a], "val": idx[a:b], "test": idx[b:]}
    try:
        rest, test = train_test_split(idx, test_size=n_test, random_state=seed, stratify=stratify)
        train, val = train_test_split(
            rest, test_size=n_val, random_state=seed,
            stratify=None if stratify is None else stratify[rest],
        )
    except ValueError as e:
        raise DataError(
            f"cannot split {n} rows stratified by class: {e}; add rows or set "
            "data.stratify: false"
        ) from None
    return dict(zip(SPLITS, (np.sort(train), np.sort(val), np.sort(test)), strict=True))
