"""The model artifact: ``model.safetensors`` + ``spec.json``. Loading never unpickles.

spec.json holds everything needed to rebuild and use the model with no config: the resolved
model spec, input/output schema (Open Inference Protocol names, datatypes and shapes), label
names, the fitted preprocessing, metrics, the config hash and the git revision.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from distml.data import transforms
from distml.errors import ArtifactError
from distml.models import build_model

WEIGHTS, SPEC = "model.safetensors", "spec.json"
FORMAT_VERSION = 1


def io_schema(
    task: str, *, num_features: int, num_outputs: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input and output tensors of the model, as the Open Inference Protocol describes them."""
    if task == "language_modeling":
        inputs = [{"name": "tokens", "datatype": "INT64", "shape": [-1, num_features]}]
        outputs = [{"name": "logits", "datatype": "FP32", "shape": [-1, num_features, num_outputs]}]
    elif task == "regression":
        inputs = [{"name": "input", "datatype": "FP32", "shape": [-1, num_features]}]
        outputs = [{"name": "prediction", "datatype": "FP32", "shape": [-1]}]
    else:
        inputs = [{"name": "input", "datatype": "FP32", "shape": [-1, num_features]}]
        outputs = [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, num_outputs]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ]
    return inputs, outputs


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def save_artifact(model: nn.Module, spec: dict[str, Any], directory: Path) -> Path:
    """Write weights and spec under a temporary name, then rename into ``directory``."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    full = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **spec,
    }
    save_model(model, str(tmp / WEIGHTS))
    (tmp / SPEC).write_text(json.dumps(full, indent=2) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def read_spec(directory: Path) -> dict[str, Any]:
    path = Path(directory) / SPEC
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a model artifact (no {SPEC})")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if spec.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {spec.get('format_version')!r} is not supported "
            f"(this distml reads {FORMAT_VERSION})"
        )
    return spec


@dataclass
class Artifact:
    """A loaded model with its spec; ``predict`` takes raw (unpreprocessed) inputs."""

    model: nn.Module
    spec: dict[str, Any]
    path: Path

    @property
    def task(self) -> str:
        return self.spec["task"]

    @property
    def labels(self) -> list[str] | None:
        return self.spec.get("labels")

    def preprocess(self, x: np.ndarray | dict[str, np.ndarray]) -> torch.Tensor:
        """Raw inputs as the source data has them -> the model's input tensor.

        ``x`` is (N, C) with the raw input columns in order (when all are numeric), or a
        dict of raw columns by name (needed for categorical columns).
        """
        if self.task == "language_modeling":
            return torch.as_tensor(np.asarray(x), dtype=torch.int64)
        names = list(self.spec["input_columns"])
        if not isinstance(x, dict):
            x = np.asarray(x, dtype=np.float32)
            x = {n: x[:, j] for j, n in enumerate(names)}
        cols = transforms.apply(self.spec["preprocessing"], {n: np.asarray(x[n]) for n in names})
        return torch.from_numpy(transforms.to_matrix(cols))

    @torch.no_grad()
    def predict(self, x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """Raw inputs -> class probabilities, regression values, or next-token logits."""
        out = self.model(self.preprocess(x)).float()
        if self.task == "classification":
            return out.softmax(-1).numpy()
        if self.task == "regression":
            return out.squeeze(-1).numpy()
        return out.numpy()


def load_artifact(directory: str | Path) -> Artifact:
    directory = Path(directory)
    spec = read_spec(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{directory} has no {WEIGHTS}")
    model = build_model(spec["model"])
    try:
        load_model(model, str(weights))
    except (RuntimeError, OSError, SafetensorError) as e:
        raise ArtifactError(f"{weights} is not valid safetensors matching its spec: {e}") from None
    model.eval()
    return Artifact(model=model, spec=spec, path=directory)
