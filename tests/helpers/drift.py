"""A stationary tabular stream for drift tests, and a small model trained on it by
``distml run``: two continuous columns, a discrete one (5 values) and, optionally, a
categorical one; the label depends on all of them (with noise, so probabilities matter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.helpers.cli import distml
from tests.helpers.configs import write_config

COLORS = np.array(["red", "green", "blue"], dtype=object)
NUMERIC = ["a", "b", "k"]


def rows(n: int, seed: int, *, categorical: bool = True, squeeze: float = 1.0
         ) -> dict[str, np.ndarray]:
    """``squeeze`` < 1 moves the continuous columns toward the decision boundary (a covariate
    shift that makes the model less sure and less right)."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0, 1, n) * squeeze, rng.normal(5, 3, n)
    k = rng.integers(0, 5, n).astype(np.float64)
    b = 5 + (b - 5) * squeeze
    color = rng.choice(COLORS, n, p=[0.5, 0.3, 0.2]) if categorical else None
    red = (color == "red") - 0.5 if categorical else 0.0
    score = a + (b - 5) / 3 + (k - 2) / 2 + red + rng.normal(0, 0.5, n)
    out = {"a": a.astype(np.float32), "b": b.astype(np.float32), "k": k.astype(np.float32)}
    if categorical:
        out["color"] = color
    return {**out, "label": (score > 0).astype(np.int64)}


def write(path: Path, table: dict[str, np.ndarray]) -> Path:
    pq.write_table(pa.table(table), path)
    return path


def train(root: Path, *, categorical: bool = True, name: str = "scale") -> Path:
    """``distml run`` on 6,000 rows; returns the registry (the model is ``name``)."""
    source = write(root / f"{name}-train.parquet", rows(6000, seed=0, categorical=categorical))
    steps: list = [{"type": "onehot", "columns": ["color"]}] if categorical else []
    raw = {"name": name, "seed": 0, "output_dir": str(root / "runs"),
           "registry": str(root / "registry"),
           "data": {"source": str(source), "transforms": [*steps, "standardize"]},
           "train": {"epochs": 3, "batch_size": 128, "lr": 0.01, "candidates": [
               {"name": "mlp", "model": {"type": "mlp", "hidden_sizes": [16]}}]},
           "monitor": {"tensorboard": False, "system_metrics_interval_s": None}}
    distml("run", str(write_config(root / f"{name}.yaml", raw)), "-q", cwd=root)
    return root / "registry"
