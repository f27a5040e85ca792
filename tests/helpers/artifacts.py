"""A small saved model artifact (an MLP on three numeric columns, two labels) for the
artifact, registry and trust tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distml.artifact import io_schema, save_artifact
from distml.models import build_model

SPEC: dict[str, Any] = {
    "name": "m", "task": "classification",
    "model": {"type": "mlp", "kwargs": {"in_features": 3, "num_outputs": 2, "hidden_sizes": [4]}},
    "labels": ["no", "yes"], "input_columns": {"a": "numeric", "b": "numeric", "c": "numeric"},
    "preprocessing": [{"type": "standardize", "columns": ["a", "b", "c"], "mean": [1.0, 2.0, 3.0],
                       "std": [2.0, 2.0, 2.0]}],
    "metrics": {"val": {"accuracy": 0.5}},
}


def small_artifact(folder: Path, name: str = "a", *, seed: int = 0,
                   **spec: Any) -> tuple[nn.Module, Path]:
    """(the model, its artifact folder folder/name): SPEC with ``spec``'s fields over it,
    weights seeded by ``seed``."""
    torch.manual_seed(seed)
    model = build_model(SPEC["model"])
    inputs, outputs = io_schema("classification", num_features=3, num_outputs=2)
    return model, save_artifact(model, {**SPEC, "inputs": inputs, "outputs": outputs, **spec},
                                folder / name)
