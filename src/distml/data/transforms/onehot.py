"""Categorical (string) columns -> one 0/1 feature per category seen in training."""

from __future__ import annotations

from typing import Any

import numpy as np

from distml.data.transforms.base import Columns, Transform


class OneHot(Transform):
    """Fitted: the categories of each column, merged as a sorted union over partitions."""

    def encodes(self, spec: Any) -> list[str]:
        return spec.columns

    def partial_stats(self, spec: Any, names: list[str], column: Any) -> dict[str, Any]:
        return {"columns": names, "categories": [sorted(set(column(n).tolist())) for n in names]}

    def merge(self, columns: list[str], parts: list[dict[str, Any]]) -> dict[str, Any]:
        cats = [sorted(set().union(*(p["categories"][j] for p in parts)))
                for j in range(len(columns))]
        return {"type": "onehot", "columns": columns, "categories": cats}

    def apply(self, p: dict[str, Any], cols: Columns) -> Columns:
        """Each encoded column is replaced, in place, by one 0/1 column per training
        category."""
        cats = dict(zip(p["columns"], p["categories"], strict=True))
        out: Columns = {}
        for name, values in cols.items():
            if name not in cats:
                out[name] = values
                continue
            for cat in cats[name]:  # a category unseen in training encodes as all zeros
                out[f"{name}={cat}"] = (values == cat).astype(np.float32)
        return out
