"""Feature transforms: fitted on the training split, stored as plain JSON, applied everywhere.

The same parameters travel in the manifest and in the model artifact, so serving applies
exactly the preprocessing that training saw.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_EPS = 1e-12


def fit(names: list[str], x: np.ndarray) -> list[dict[str, Any]]:
    """Fit each named transform in order on (N, F) features; returns JSON-able parameters."""
    params = []
    x = x.astype(np.float64)
    for name in names:
        if name == "standardize":
            mean, std = x.mean(axis=0), x.std(axis=0)
            std = np.where(std < _EPS, 1.0, std)  # constant columns pass through centred
            p = {"type": name, "mean": mean.tolist(), "std": std.tolist()}
        elif name == "minmax":
            lo, hi = x.min(axis=0), x.max(axis=0)
            scale = np.where(hi - lo < _EPS, 1.0, hi - lo)
            p = {"type": name, "min": lo.tolist(), "scale": scale.tolist()}
        else:
            raise ValueError(f"unknown transform {name!r}")
        params.append(p)
        x = apply([p], x)
    return params


def apply(params: list[dict[str, Any]], x: np.ndarray) -> np.ndarray:
    """Apply fitted transforms to (N, F) features; returns float32."""
    out = np.asarray(x, dtype=np.float32)
    for p in params:
        if p["type"] == "standardize":
            out = (out - np.asarray(p["mean"], np.float32)) / np.asarray(p["std"], np.float32)
        elif p["type"] == "minmax":
            out = (out - np.asarray(p["min"], np.float32)) / np.asarray(p["scale"], np.float32)
        else:
            raise ValueError(f"unknown transform {p['type']!r}")
    return out
