"""The model as a server holds it: loaded from a registry reference or artifact folder,
optionally int8-quantized, taking raw rows (the source data's columns) in and giving
probabilities and labels (or predictions) out."""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distml.artifact import Artifact, load_artifact
from distml.errors import ArtifactError
from distml.registry import Registry
from distml.serving.protocol import ProtocolError
from distml.trust import TrustPolicy

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    artifact: Artifact
    name: str
    version: str
    quantized: bool = False

    @property
    def spec(self) -> dict[str, Any]:
        return self.artifact.spec

    @property
    def input(self) -> dict[str, Any]:
        """The one input tensor: name, datatype and shape ([-1, columns])."""
        return self.spec["inputs"][0]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.spec["outputs"]

    def metadata(self) -> dict[str, Any]:
        """The protocol's model metadata."""
        return {"name": self.name, "versions": [self.version], "platform": "pytorch",
                "inputs": [self.input], "outputs": self.outputs}

    def check(self, x: np.ndarray, where: str) -> None:
        """Values the schema's datatype allows but the model cannot take: token ids outside
        the vocabulary would fail deep in the embedding."""
        if self.artifact.task == "language_modeling" and x.size:
            vocab = self.outputs[0]["shape"][-1]
            low, high = int(x.min()), int(x.max())
            if low < 0 or high >= vocab:
                raise ProtocolError(400, f"{where}: token ids must be in [0, {vocab}); got "
                                         f"{low if low < 0 else high}")

    @functools.cached_property
    def _labels(self) -> np.ndarray:
        return np.asarray(self.artifact.labels, dtype=object)

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Raw rows (n, columns) -> each output tensor by name."""
        out = self.artifact.predict(x)
        if self.artifact.task == "classification":
            labels = self._labels[out.argmax(-1)]
            return {"probabilities": out.astype(np.float32), "label": labels}
        if self.artifact.task == "regression":
            return {"prediction": out.astype(np.float32)}
        return {"logits": out.astype(np.float32)}


def resolve(ref: str | None, registry: Path) -> tuple[Path, str, str]:
    """A model reference -> (artifact folder, model name, version).

    ``ref``: an artifact folder, ``name``, ``name:version`` or ``name@alias``; None: the
    production version (else the newest) of the most recently registered model.
    """
    reg = Registry(registry)
    if ref is None:
        names = reg.names()
        if not names:
            raise ArtifactError(f"no model in the registry at {registry}; give MODEL_REF (a "
                                "registry name or an artifact folder), or run distml run first")
        ref = max(names, key=lambda n: reg.versions(n)[-1].path.stat().st_mtime)
    version = reg.resolve(ref)
    return version.path, version.name, str(version.version)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of the Linear layers: weights stored in int8, activations
    quantized per batch; a CPU serving technique."""
    with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated for torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _val_accuracy(artifact: Artifact, model: nn.Module) -> float | None:
    """Accuracy on the validation split the artifact was trained against, if it is there."""
    from distml.data.dataset import Manifest, load_split

    data_dir = artifact.spec.get("data_dir")
    if artifact.task != "classification" or not data_dir or not Path(data_dir).is_dir():
        return None
    x, y = load_split(Manifest.read(Path(data_dir)), "val")
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(-1).numpy()
    return float((pred == y).mean())


def load_served_model(ref: str | None, *, registry: Path, quantize: str = "none",
                      trust: TrustPolicy | None = None) -> ServedModel:
    """Load what ``ref`` names (see ``resolve``); an artifact naming code loads only if
    ``trust`` allows it (default: none; ``TrustPolicy.for_serve(settings)`` in a server)."""
    path, name, version = resolve(ref, registry)
    artifact = load_artifact(path, trust=trust)
    if artifact.spec["inputs"][0]["datatype"] == "FP32" and any(
            p["type"] == "onehot" for p in artifact.spec.get("preprocessing", [])):
        raise ArtifactError(f"{name}:{version} has categorical inputs, which one FP32 input "
                            "tensor cannot carry; use distml predict for it")
    served = ServedModel(artifact, name, version)
    if quantize == "int8":
        before = _val_accuracy(artifact, artifact.model)
        artifact.model = quantize_int8(artifact.model)
        after = _val_accuracy(artifact, artifact.model)
        served.quantized = True
        if before is None:
            logger.warning("int8 quantization of %s:%s: no validation split to measure its "
                           "accuracy change (the artifact's data folder is gone)", name, version)
        else:
            logger.info("int8 quantization of %s:%s: validation accuracy %.4f -> %.4f (%+.4f)",
                        name, version, before, after, after - before)
    return served
