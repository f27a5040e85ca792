"""Per-chunk work of parallel ingestion; every function here runs in an executor's worker.

Each pass re-derives a chunk from the source: load -> find invalid rows -> assign splits.
That derivation is deterministic (seeded by (seed, chunk index)), so passes agree on every
row without sharing state, and the result does not depend on the number of workers.

Passes (driven by ``ingest.py``):
  1. ``fit_chunk`` with ``scan=True``: row counts, invalid rows, labels, column kinds, and
     the partial statistics of the first fitted transform.
  2. ``fit_chunk`` again for each further fitted transform (the fitted prefix applied).
  3. ``write_chunk``: apply every transform, encode labels, write Parquet partitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distml.config import DataConfig
from distml.data import transforms
from distml.data.dataset import partition_table, write_partition
from distml.data.sources import Chunk, RawChunk, open_source
from distml.errors import DataError

SPLITS = ("train", "val", "test", "unlabelled")


@dataclass
class Prepared:
    """A chunk after validation and split assignment."""

    columns: dict[str, np.ndarray]
    labels: np.ndarray | None
    tokens: np.ndarray | None
    split: np.ndarray  # (n,) int8: 0 train, 1 val, 2 test, 3 unlabelled
    row_index: np.ndarray  # (n,) int64: index of each kept row within the raw chunk
    raw_rows: int
    invalid_rows: np.ndarray  # raw indices of rows with invalid values


def _nan_allowed(data: DataConfig) -> set[str] | None:
    """Columns where NaN is imputed later (None: every column)."""
    allowed: set[str] = set()
    for spec in data.feature_transforms:
        filled = transforms.fills_nan(spec)
        if filled is None:
            return None
        allowed.update(filled)
    return allowed


def _invalid_mask(raw: RawChunk, data: DataConfig) -> np.ndarray:
    bad = np.zeros(len(raw), dtype=bool)
    nan_ok = _nan_allowed(data)
    for name, values in raw.columns.items():
        if values.dtype.kind == "f":
            ok = np.isfinite(values)
            if nan_ok is None or name in nan_ok:
                ok |= np.isnan(values)
            bad |= ~ok
    if raw.labels is not None and raw.labels.dtype.kind == "f":
        bad |= ~np.isfinite(raw.labels)
    return bad


def assign_splits(
    n: int, groups: np.ndarray | None, data: DataConfig, rng: np.random.Generator, *,
    ordered: bool,
) -> np.ndarray:
    """Split ids per row; within each group (class) the fractions are met up to rounding.

    Rows are ranked by a random key within their group and cut at the fractions, so even a
    class of one row gets a split, and no global view of the data is needed.
    """
    frac = data.split
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    if ordered:  # text: contiguous, so overlapping neighbours never straddle two splits
        position = (np.arange(n) + 0.5) / n
    else:
        group_ids = _group_ids(groups, n)
        perm = rng.permutation(n)
        order = perm[np.argsort(group_ids[perm], kind="stable")]  # by group, random within
        counts = np.bincount(group_ids)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - np.repeat(starts, counts)
        position = (rank + 0.5) / counts[group_ids]
    split = np.where(position < frac.train, 0, np.where(position < frac.train + frac.val, 1, 2))
    if frac.unlabelled:  # the last cut, so with none the other splits are as they were
        split[position >= 1 - frac.unlabelled] = 3
    return split.astype(np.int8)


def _group_ids(groups: np.ndarray | None, n: int) -> np.ndarray:
    """Dense small-integer ids per row (a radix-sortable dtype)."""
    if groups is None:
        return np.zeros(n, dtype=np.int16)
    if groups.dtype.kind in "iu" and n and groups.max() - groups.min() < 2**15:
        return (groups - groups.min()).astype(np.int16)
    return np.unique(groups, return_inverse=True)[1].astype(np.int32)


def prepare(data: DataConfig, seed: int, chunk: Chunk) -> Prepared:
    raw = open_source(data.source).load_chunk(chunk)
    invalid = _invalid_mask(raw, data) if raw.tokens is None else np.zeros(len(raw), bool)
    invalid_rows = np.flatnonzero(invalid)
    columns, labels, tokens = raw.columns, raw.labels, raw.tokens
    row_index = np.arange(len(raw))
    if data.drop_invalid and len(invalid_rows):
        keep = ~invalid
        row_index = row_index[keep]
        columns = {k: v[keep] for k, v in columns.items()}
        labels = None if labels is None else labels[keep]
        tokens = None if tokens is None else tokens[keep]
    stratify = data.task == "classification" and data.stratify
    rng = np.random.default_rng([seed, chunk.index])
    split = assign_splits(len(row_index), labels if stratify else None, data, rng,
                          ordered=data.task == "language_modeling")
    return Prepared(columns, labels, tokens, split, row_index, len(raw), invalid_rows)


@dataclass(frozen=True)
class FitJob:
    data: DataConfig
    seed: int
    params: list[dict[str, Any]] = field(default_factory=list)  # fitted prefix, applied first
    spec: Any = None  # the transform to compute statistics for (None: scan only)
    scan: bool = False


def fit_chunk(job: FitJob, chunk: Chunk) -> dict[str, Any]:
    p = prepare(job.data, job.seed, chunk)
    out: dict[str, Any] = {}
    if job.scan:
        out["raw_rows"] = p.raw_rows
        out["invalid_rows"] = p.invalid_rows[:5].tolist()
        out["invalid_count"] = int(len(p.invalid_rows))
        out["split_rows"] = np.bincount(p.split, minlength=4).tolist()
        out["columns"] = {k: ("numeric" if transforms.is_numeric(v) else "categorical")
                          for k, v in p.columns.items()}
        if p.labels is not None and job.data.task == "classification":
            uniq, counts = np.unique(p.labels, return_counts=True)
            out["labels"] = (uniq.tolist(), counts.tolist())
    if job.spec is not None and not (len(p.invalid_rows) and not job.data.drop_invalid):
        # (with invalid rows kept, the driver refuses the data: no statistics needed)
        train = np.flatnonzero(p.split == 0)
        if job.params:
            cols = transforms.apply(job.params, {k: v[train] for k, v in p.columns.items()})
            out["stats"] = transforms.partial_stats(job.spec, cols)
        else:
            out["stats"] = transforms.partial_stats(job.spec, p.columns, rows=train)
    return out


@dataclass(frozen=True)
class WriteJob:
    data: DataConfig
    seed: int
    params: list[dict[str, Any]]
    classes: list[str] | None
    out_dir: str
    row_offsets: dict[int, int]  # chunk index -> global id of its first raw row


def _encode(labels: np.ndarray, job: WriteJob) -> np.ndarray:
    if job.data.task == "regression":
        return labels.astype(np.float32)
    index = {c: i for i, c in enumerate(job.classes)}
    uniq, inverse = np.unique(labels, return_inverse=True)
    return np.array([index[str(u)] for u in uniq], dtype=np.int64)[inverse]


def write_chunk(job: WriteJob, chunk: Chunk) -> dict[str, Any]:
    """Transform and write one chunk; returns its partitions and feature names."""
    p = prepare(job.data, job.seed, chunk)
    features: dict[str, np.ndarray] | np.ndarray
    if p.tokens is not None:
        features, names = p.tokens, [f"t{i}" for i in range(p.tokens.shape[1])]
    else:
        features = {k: v.astype(np.float32, copy=False)
                    for k, v in transforms.apply(job.params, p.columns).items()}
        names = list(features)
        bad = [k for k, v in features.items() if not np.isfinite(v).all()]
        if bad:
            raise DataError(f"columns {bad[:5]} hold NaN or infinite values after the transforms")
    y = None if p.labels is None else _encode(p.labels, job)
    row_ids = job.row_offsets[chunk.index] + p.row_index
    rows_per_part = job.data.rows_per_partition
    parts = []
    for s, split in enumerate(SPLITS):
        idx = np.flatnonzero(p.split == s)
        for k, start in enumerate(range(0, len(idx), rows_per_part)):
            sel = idx[start : start + rows_per_part]
            rel = f"{split}/part-{chunk.index:05d}-{k:03d}.parquet"
            part = (features[sel] if isinstance(features, np.ndarray)
                    else {n: v[sel] for n, v in features.items()})
            labels = None if y is None else (y[sel] if split != "unlabelled"
                                             else np.full(len(sel), -1, y.dtype))
            table = partition_table(part, labels, row_ids[sel])
            parts.append({"split": split, **write_partition(Path(job.out_dir), rel, table)})
    return {"parts": parts, "feature_names": names}
