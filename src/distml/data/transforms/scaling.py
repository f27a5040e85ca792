"""Scaling each numeric column by statistics of the training split: standardize (mean and
standard deviation, merged exactly with Chan's pairwise update in float64) and minmax."""

from __future__ import annotations

from typing import Any

import numpy as np

from distml.data.transforms.base import Block, ColumnTransform, column_stats

_EPS = 1e-12


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


class Standardize(ColumnTransform):
    """(x - mean) / std; a constant column passes through centred."""

    def partial_stats(self, spec: Any, names: list[str], column: Any) -> dict[str, Any]:
        count, total, m2, _, _ = column_stats(names, column).T
        return {"columns": names, "n": count, "mean": total / np.maximum(count, 1), "m2": m2}

    def merge(self, columns: list[str], parts: list[dict[str, Any]]) -> dict[str, Any]:
        _, mean, std = merge_moments(parts)
        std = np.where(std < _EPS, 1.0, std)
        return {"type": "standardize", "columns": columns, "mean": mean.tolist(),
                "std": std.tolist()}

    def apply_column(self, p: dict[str, Any], j: int, x: np.ndarray) -> np.ndarray:
        return (x - np.float32(p["mean"][j])) / np.float32(p["std"][j])

    def block(self, p: dict[str, Any]) -> Block:
        return _affine(p["mean"], p["std"])


class MinMax(ColumnTransform):
    """(x - min) / (max - min); a constant column is only shifted."""

    def partial_stats(self, spec: Any, names: list[str], column: Any) -> dict[str, Any]:
        _, _, _, lo, hi = column_stats(names, column).T
        return {"columns": names, "min": lo, "max": hi}

    def merge(self, columns: list[str], parts: list[dict[str, Any]]) -> dict[str, Any]:
        lo = np.min([p["min"] for p in parts], axis=0)
        hi = np.max([p["max"] for p in parts], axis=0)
        scale = np.where(hi - lo < _EPS, 1.0, hi - lo)
        return {"type": "minmax", "columns": columns, "min": lo.tolist(), "scale": scale.tolist()}

    def apply_column(self, p: dict[str, Any], j: int, x: np.ndarray) -> np.ndarray:
        return (x - np.float32(p["min"][j])) / np.float32(p["scale"][j])

    def block(self, p: dict[str, Any]) -> Block:
        return _affine(p["min"], p["scale"])


def _affine(shift: list[float], scale: list[float]) -> Block:
    """(x - shift) / scale per column, in float32 as ``apply_column`` computes it."""
    shift_, scale_ = np.float32(shift), np.float32(scale)
    return lambda x: (x - shift_) / scale_
