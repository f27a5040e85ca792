"""The model zoo and user models: a model is built from its resolved spec alone.

A resolved spec is JSON: ``{"type": "mlp" | "cnn" | "transformer" | "module:factory",
"kwargs": {...}}`` with every constructor argument, including those derived from the data
(input width, number of outputs). It is stored in the artifact, so loading needs no config.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from distml.config import VOCAB_SIZE, ZOO
from distml.errors import ConfigError
from distml.imports import load_object

__all__ = ["VOCAB_SIZE", "build_model", "check_fits", "count_parameters", "resolve_spec"]


def resolve_spec(spec: Any, *, task: str, num_features: int, num_outputs: int, where: str
                 ) -> dict[str, Any]:
    """Fill in what the data decides; refuse a model whose input shape does not fit.

    ``num_features`` is the input width, or the sequence length for language modeling.
    ``where`` is the config path of the spec, used in error messages.
    """
    return spec.resolve(task=task, num_features=num_features, num_outputs=num_outputs,
                        where=where)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build an nn.Module from a resolved spec (see module docstring)."""
    kind, kwargs = spec["type"], dict(spec["kwargs"])
    factory = load_object(ZOO.get(kind, kind), what="model type")
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in spec.get("inject", {}).items():
        if (takes_any or key in params) and key not in kwargs:
            kwargs[key] = value
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {kind!r} returned {type(model).__name__}, not nn.Module")
    return model


def check_fits(
    model: nn.Module, sample: torch.Tensor, expected: tuple[int, ...], where: str
) -> None:
    """Run one forward pass on real rows; a mismatch is the user's, so say it plainly."""
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as e:  # noqa: BLE001 - any failure here means the spec does not fit
        raise ConfigError(
            f"{where} does not fit the data: a forward pass on inputs of shape "
            f"{tuple(sample.shape)} failed with {type(e).__name__}: {e}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape[1:]) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{where} does not fit the data: it returned {got} for inputs of shape "
            f"{tuple(sample.shape)}; expected (batch, {', '.join(map(str, expected))})"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
