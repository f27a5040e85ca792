"""Feature transforms over columns (name -> numpy array), fitted on the training split.

Fitting is parallel: ``partial_stats`` runs per partition and ``merge`` combines the parts
exactly (means and variances with Chan's pairwise update, in float64), so the result equals
statistics of the whole table. Fitted parameters are plain JSON; they travel in the manifest
and the model artifact, so serving applies exactly the preprocessing that training saw.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distml.imports import load_object

Columns = dict[str, np.ndarray]
_EPS = 1e-12
FITTED = ("standardize", "minmax", "onehot")


def is_numeric(values: np.ndarray) -> bool:
    return values.dtype.kind in "fiu"


def needs_fit(spec: Any) -> bool:
    return spec.type in FITTED or (spec.type == "impute" and spec.strategy == "mean")


def _targets(spec: Any, cols: Columns) -> list[str]:
    names = spec.columns if getattr(spec, "columns", None) else [
        n for n, v in cols.items() if is_numeric(v)]
    missing = [n for n in names if n not in cols]
    if missing:
        raise ValueError(f"transform {spec.type}: columns {missing} do not exist; "
                         f"columns: {list(cols)}")
    return list(names)


def _column_stats(values: np.ndarray) -> tuple[int, float, float, float, float]:
    """(count, sum, M2, min, max) of one column in float64, NaN ignored.

    Column by column keeps the temporaries in cache; sums accumulate in float64.
    """
    nan = np.isnan(values)
    if nan.any():
        values = values[~nan]
    if len(values) == 0:
        return 0, 0.0, 0.0, np.inf, -np.inf
    total = float(values.sum(dtype=np.float64))
    dev = values.astype(np.float64) - total / len(values)
    m2 = float(np.square(dev, out=dev).sum())  # not np.dot: BLAS threads would oversubscribe
    return len(values), total, m2, float(values.min()), float(values.max())


def partial_stats(spec: Any, cols: Columns, rows: np.ndarray | None = None) -> dict[str, Any]:
    """Sufficient statistics of one partition's ``rows`` (default: all; NaN ignored)."""
    names = _targets(spec, cols)

    def column(name: str) -> np.ndarray:  # gathered one column at a time: stays in cache
        return cols[name] if rows is None else cols[name][rows]

    if spec.type == "onehot":
        return {"columns": names, "categories": [sorted(set(column(n).tolist())) for n in names]}
    stats = np.array([_column_stats(column(n).astype(np.float32, copy=False)) for n in names],
                     dtype=np.float64).reshape(len(names), 5)
    count, total, m2, lo, hi = stats.T
    if spec.type == "minmax":
        return {"columns": names, "min": lo, "max": hi}
    if spec.type == "impute":
        return {"columns": names, "n": count, "sum": total}
    return {"columns": names, "n": count, "mean": total / np.maximum(count, 1), "m2": m2}


def merge(spec: Any, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine partial statistics into the transform's JSON parameters."""
    columns = parts[0]["columns"]
    if spec.type == "onehot":
        cats = [sorted(set().union(*(p["categories"][j] for p in parts)))
                for j in range(len(columns))]
        return {"type": "onehot", "columns": columns, "categories": cats}
    if spec.type == "impute":
        n = sum(p["n"] for p in parts)
        fill = sum(p["sum"] for p in parts) / np.maximum(n, 1)
        return {"type": "impute", "columns": columns, "fill": fill.tolist()}
    if spec.type == "minmax":
        lo = np.min([p["min"] for p in parts], axis=0)
        hi = np.max([p["max"] for p in parts], axis=0)
        scale = np.where(hi - lo < _EPS, 1.0, hi - lo)
        return {"type": "minmax", "columns": columns, "min": lo.tolist(), "scale": scale.tolist()}
    _, mean, std = merge_moments(parts)
    std = np.where(std < _EPS, 1.0, std)  # constant columns pass through centred
    return {"type": "standardize", "columns": columns, "mean": mean.tolist(), "std": std.tolist()}


def merge_moments(parts: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, mean, population std) per column from standardize partial statistics."""
    n, mean, m2 = parts[0]["n"].astype(np.float64), parts[0]["mean"], parts[0]["m2"]
    for p in parts[1:]:  # Chan et al.: exact pairwise combination of (n, mean, M2)
        nb = p["n"].astype(np.float64)
        total = n + nb
        delta = p["mean"] - mean
        safe = np.maximum(total, 1)
        mean = mean + delta * nb / safe
        m2 = m2 + p["m2"] + delta**2 * n * nb / safe
        n = total
    return n, mean, np.sqrt(m2 / np.maximum(n, 1))


def unfitted_params(spec: Any) -> dict[str, Any]:
    """Parameters of a transform that needs no statistics (columns None: every numeric one)."""
    if spec.type == "clip":
        return {"type": "clip", "columns": spec.columns, "min": spec.min, "max": spec.max}
    if spec.type == "impute":
        return {"type": "impute", "columns": spec.columns, "value": spec.value}
    return {"type": spec.type}  # a user function


def apply(params: list[dict[str, Any]], cols: Columns) -> Columns:
    """Apply fitted transforms in order; returns new columns (the input is not modified)."""
    out = dict(cols)
    for p in params:
        kind = p["type"]
        if kind == "onehot":
            out = _onehot(p, out)
            continue
        if ":" in kind:
            out = load_object(kind, what="transform")(out)
            continue
        names = p["columns"] or [n for n, v in out.items() if is_numeric(v)]
        for j, name in enumerate(names):
            x = out[name].astype(np.float32, copy=False)
            if kind == "standardize":
                x = (x - np.float32(p["mean"][j])) / np.float32(p["std"][j])
            elif kind == "minmax":
                x = (x - np.float32(p["min"][j])) / np.float32(p["scale"][j])
            elif kind == "impute":
                fill = p["fill"][j] if "fill" in p else p["value"]
                x = np.where(np.isnan(x), np.float32(fill), x)
            elif kind == "clip":
                x = np.clip(x, p["min"], p["max"]).astype(np.float32, copy=False)
            out[name] = x
    return out


def _onehot(p: dict[str, Any], cols: Columns) -> Columns:
    """Each encoded column is replaced, in place, by one 0/1 column per training category."""
    cats = dict(zip(p["columns"], p["categories"], strict=True))
    out: Columns = {}
    for name, values in cols.items():
        if name not in cats:
            out[name] = values
            continue
        for cat in cats[name]:  # a category unseen in training encodes as all zeros
            out[f"{name}={cat}"] = (values == cat).astype(np.float32)
    return out


def to_matrix(cols: Columns) -> np.ndarray:
    """Columns -> (N, F) float32, in column order."""
    return np.column_stack([v.astype(np.float32, copy=False) for v in cols.values()])
