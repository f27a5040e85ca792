"""The model zoo and user models: a model is built from its resolved spec alone.

A resolved spec is JSON: ``{"type": "mlp" | "cnn" | "transformer" | "module:factory",
"kwargs": {...}}`` with every constructor argument, including those derived from the data
(input width, number of outputs). It is stored in the artifact, so loading needs no config.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distml.config import CNNSpec, CustomModelSpec, MLPSpec, TransformerSpec
from distml.errors import ConfigError
from distml.imports import load_object
from distml.models.cnn import CNN
from distml.models.mlp import MLP
from distml.models.transformer import Transformer

VOCAB_SIZE = 256  # byte-level tokens

_ZOO: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN, "transformer": Transformer}


def resolve_spec(
    spec: MLPSpec | CNNSpec | TransformerSpec | CustomModelSpec,
    *,
    task: str,
    num_features: int,
    num_outputs: int,
    where: str,
) -> dict[str, Any]:
    """Fill in what the data decides; refuse a model whose input shape does not fit.

    ``num_features`` is the input width, or the sequence length for language modeling.
    ``where`` is the config path of the spec, used in error messages.
    """
    options = spec.model_dump(exclude={"type"})
    text = task == "language_modeling"
    if isinstance(spec, CustomModelSpec):
        return {"type": spec.type, "kwargs": spec.kwargs,
                "inject": {"in_features": num_features, "num_outputs": num_outputs,
                           "input_shape": [num_features]}}
    if isinstance(spec, TransformerSpec):
        if not text:
            raise ConfigError(
                f"{where}: the transformer is a language model over text tokens, but the data "
                f"is a {task} table; use mlp or cnn, or a text source"
            )
        context = spec.context_length or num_features
        if context < num_features:
            raise ConfigError(
                f"{where}.context_length={context} is shorter than the data's "
                f"sequence_length={num_features}; use at least {num_features} or shorten "
                "data.source.sequence_length"
            )
        options.update(context_length=context, vocab_size=VOCAB_SIZE)
        return {"type": "transformer", "kwargs": options}
    if text:
        raise ConfigError(
            f"{where}: a {spec.type} takes numeric features, but the data is text tokens; "
            "use type: transformer"
        )
    options["num_outputs"] = num_outputs
    if isinstance(spec, MLPSpec):
        options["in_features"] = num_features
    else:  # CNN
        options["image_shape"] = list(_image_shape(spec, num_features, where))
    return {"type": spec.type, "kwargs": options}


def _image_shape(spec: CNNSpec, num_features: int, where: str) -> tuple[int, int, int]:
    if spec.image_shape is not None:
        if math.prod(spec.image_shape) != num_features:
            c, h, w = spec.image_shape
            raise ConfigError(
                f"{where}.image_shape={list(spec.image_shape)} holds {c}*{h}*{w}="
                f"{c * h * w} values but the data has {num_features} features; "
                f"give a shape whose product is {num_features}"
            )
        return spec.image_shape
    side = math.isqrt(num_features)
    if side * side != num_features:
        raise ConfigError(
            f"{where}: the cnn needs image-shaped inputs; {num_features} features are not a "
            f"square image, so set image_shape: [C, H, W] with C*H*W = {num_features}"
        )
    return (1, side, side)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build an nn.Module from a resolved spec (see module docstring)."""
    kind, kwargs = spec["type"], dict(spec["kwargs"])
    if kind in _ZOO:
        return _ZOO[kind](**kwargs)
    factory = load_object(kind, what="model type")
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
