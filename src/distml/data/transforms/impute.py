"""Missing values (NaN) replaced by the training mean of their column, or a constant."""

from __future__ import annotations

from typing import Any

import numpy as np

from distml.data.transforms.base import Block, ColumnTransform, column_stats


class Impute(ColumnTransform):
    """``strategy: mean`` is fitted (sums and counts merge exactly); ``constant`` is not."""

    def needs_fit(self, spec: Any) -> bool:
        return spec.strategy == "mean"

    def partial_stats(self, spec: Any, names: list[str], column: Any) -> dict[str, Any]:
        count, total, _, _, _ = column_stats(names, column).T
        return {"columns": names, "n": count, "sum": total}

    def merge(self, columns: list[str], parts: list[dict[str, Any]]) -> dict[str, Any]:
        n = sum(p["n"] for p in parts)
        fill = sum(p["sum"] for p in parts) / np.maximum(n, 1)
        return {"type": "impute", "columns": columns, "fill": fill.tolist()}

    def fills_nan(self, spec: Any) -> list[str] | None:
        return spec.columns

    def params(self, spec: Any) -> dict[str, Any]:
        return {"type": "impute", "columns": spec.columns, "value": spec.value}

    def apply_column(self, p: dict[str, Any], j: int, x: np.ndarray) -> np.ndarray:
        fill = p["fill"][j] if "fill" in p else p["value"]
        return np.where(np.isnan(x), np.float32(fill), x)

    def block(self, p: dict[str, Any]) -> Block:
        fill = np.float32(p["fill"] if "fill" in p else p["value"])
        return lambda x: np.where(np.isnan(x), fill, x)
