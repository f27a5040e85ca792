"""The model artifact: ``model.safetensors`` + ``spec.json``. Loading never unpickles.

spec.json holds everything needed to rebuild and use the model with no config: the resolved
model spec, input/output schema (Open Inference Protocol names, datatypes and shapes), label
names, the fitted preprocessing, metrics, the config hash and the git revision.

Integrity: spec.json's ``sha256`` field records the SHA-256 of model.safetensors and of
spec.json's own content without that field (canonical JSON: sorted keys, no spaces). Loading
checks both before anything is built, so a corrupt or edited file is refused by name. They
catch corruption and casual edits; someone able to rewrite both files can rewrite the digests
too, so compare ``distml models show``'s digest with the one the registry's audit log recorded
at registration when that matters.

Trust: an artifact naming code (a user transform or model factory) loads only under a
``TrustPolicy`` that allows it (see distml.trust).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from distml.config import ZOO
from distml.data import transforms
from distml.errors import ArtifactError
from distml.fsutil import file_sha256, write_text_atomic
from distml.models import build_model
from distml.trust import TrustPolicy

WEIGHTS, SPEC = "model.safetensors", "spec.json"
FORMAT_VERSION = 1
DIGESTS = "sha256"  # the spec.json field: {"model.safetensors": hex, "spec.json": hex}


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
    write_spec(tmp, full)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def spec_sha256(spec: dict[str, Any]) -> str:
    """The digest of a spec's content without its digests field, independent of layout."""
    body = {k: v for k, v in spec.items() if k != DIGESTS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def write_spec(directory: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Write spec.json with the digests of the weights beside it and of itself; returns it."""
    directory = Path(directory)
    spec = {k: v for k, v in spec.items() if k != DIGESTS}
    spec[DIGESTS] = {WEIGHTS: file_sha256(directory / WEIGHTS), SPEC: spec_sha256(spec)}
    write_text_atomic(directory / SPEC, json.dumps(spec, indent=2) + "\n")
    return spec


def verify_integrity(directory: Path, spec: dict[str, Any], *, shown: Path | None = None
                     ) -> dict[str, str]:
    """Check both recorded digests; returns them. ``shown``: the folder named in errors."""
    directory, shown = Path(directory), Path(shown or directory)
    recorded = spec.get(DIGESTS)
    if not (isinstance(recorded, dict) and isinstance(recorded.get(WEIGHTS), str)
            and isinstance(recorded.get(SPEC), str)):
        raise ArtifactError(
            f"{shown / SPEC} records no SHA-256 digests (its {DIGESTS!r} field), so its files "
            "cannot be checked: it was written before distml recorded them, or edited; "
            "re-create the artifact (distml run), or register it again (that records them)")
    if spec_sha256(spec) != recorded[SPEC]:
        raise ArtifactError(f"{shown / SPEC} does not match the SHA-256 recorded in it: the "
                            "file was corrupted or edited after it was written; refusing it")
    if not (directory / WEIGHTS).is_file():
        raise ArtifactError(f"{shown} has no {WEIGHTS}")
    if file_sha256(directory / WEIGHTS) != recorded[WEIGHTS]:
        raise ArtifactError(
            f"{shown / WEIGHTS} does not match the SHA-256 recorded in {SPEC} "
            f"({recorded[WEIGHTS][:16]}...): the file was corrupted or replaced; refusing it")
    return recorded


def code_references(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (what, 'module:function') the spec would import when loaded and used; built-in
    transforms and zoo models are not listed (an exact zoo import path is built in too, but
    no other distml function: 'distml.x:y' could still do harm with the spec's kwargs)."""
    code = []
    kind = (spec.get("model") or {}).get("type")
    if not isinstance(kind, str):
        raise ArtifactError(f"the spec's model.type must be a string, not {kind!r}")
    if kind not in ZOO and kind not in ZOO.values():
        code.append(("model factory", kind))
    for step in spec.get("preprocessing") or []:
        name = step.get("type") if isinstance(step, dict) else None
        if isinstance(name, str) and ":" in name:
            code.append(("transform", name))
    return code


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
            if self._matrix_form is not None:  # numeric columns, column transforms only
                return torch.from_numpy(self._matrix_form(x))
            x = np.asarray(x, dtype=np.float32)
            x = {n: x[:, j] for j, n in enumerate(names)}
        cols = transforms.apply(self.spec["preprocessing"], {n: np.asarray(x[n]) for n in names})
        return torch.from_numpy(transforms.to_matrix(cols))

    @functools.cached_property
    def _matrix_form(self) -> Callable[[np.ndarray], np.ndarray] | None:
        return transforms.matrix_form(self.spec["preprocessing"], list(self.spec["input_columns"]))

    @torch.inference_mode()
    def predict(self, x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """Raw inputs -> class probabilities, regression values, or next-token logits."""
        out = self.model(self.preprocess(x)).float()
        if self.task == "classification":
            return out.softmax(-1).numpy()
        if self.task == "regression":
            return out.squeeze(-1).numpy()
        return out.numpy()


def load_artifact(directory: str | Path, *, trust: TrustPolicy | None = None) -> Artifact:
    """Load after checking the recorded digests, and the code the spec names against
    ``trust`` (default: no code trusted); nothing is imported before both pass."""
    directory = Path(directory)
    spec = read_spec(directory)
    verify_integrity(directory, spec)
    (trust or TrustPolicy()).check(code_references(spec), where=str(directory / SPEC))
    weights = directory / WEIGHTS
    model = build_model(spec["model"])
    try:
        load_model(model, str(weights))
    except (RuntimeError, OSError, SafetensorError) as e:
        raise ArtifactError(f"{weights} is not valid safetensors matching its spec: {e}") from None
    model.eval()
    return Artifact(model=model, spec=spec, path=directory)
