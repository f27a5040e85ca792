"""Values clipped into fixed bounds from the config (nothing to fit)."""

from __future__ import annotations

from typing import Any

import numpy as np

from distml.data.transforms.base import Block, ColumnTransform


class Clip(ColumnTransform):
    """Into [min, max]; a null bound does not clip."""

    def needs_fit(self, spec: Any) -> bool:
        return False

    def params(self, spec: Any) -> dict[str, Any]:
        return {"type": "clip", "columns": spec.columns, "min": spec.min, "max": spec.max}

    def apply_column(self, p: dict[str, Any], j: int, x: np.ndarray) -> np.ndarray:
        return np.clip(x, p["min"], p["max"]).astype(np.float32, copy=False)

    def block(self, p: dict[str, Any]) -> Block:
        return lambda x: self.apply_column(p, 0, x)  # the same bounds for every column
