"""The model specs of the zoo and of user models, each with what the rest of distml asks of
a model before it is built: how it resolves against the data, how many layers a pipeline can
cut it into, whether tensor parallelism can split it, and where its class lives.

Adding a zoo model is adding its spec class here (with ``factory``, the import path of the
nn.Module) and listing it in ``MODELS``. Nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from distml.config.base import (
    IMPORT_PATH_PATTERN,
    Strict,
    TaggedUnion,
    relative_import_path,
    type_name,
)
from distml.errors import ConfigError

VOCAB_SIZE = 256  # byte-level tokens


class ModelSpecBase(Strict):
    """Defaults shared by the specs: a model on numeric features with no parallel plan."""

    factory: ClassVar[str]  # 'module:Class' of the nn.Module

    def pipeline_layer_count(self) -> int | None:
        """Layers a pipeline can cut the model into (0: none; None: unknown until built)."""
        return 0

    def check_tensor_degree(self, degree: int, *, strategy: str = "tensor") -> None:
        """Refuse a tensor-parallel split the model cannot take."""
        raise ValueError(f"strategy {strategy} needs a tensor-parallel plan, and the {self.type} "
                         "has none; plans exist for mlp and transformer (a user model may "
                         "define tensor_plan()), or use ddp or fsdp")

    def resolve(self, *, task: str, num_features: int, num_outputs: int, where: str
                ) -> dict[str, Any]:
        """The resolved spec: every constructor argument, including those the data decides
        (``num_features`` is the input width, or the sequence length for text)."""
        if task == "language_modeling":
            raise ConfigError(f"{where}: a {self.type} takes numeric features, but the data is "
                              "text tokens; use type: transformer")
        kwargs = {**self.model_dump(exclude={"type"}), "num_outputs": num_outputs,
                  **self._data_kwargs(num_features, where)}
        return {"type": self.type, "kwargs": kwargs}

    def _data_kwargs(self, num_features: int, where: str) -> dict[str, Any]:
        return {"in_features": num_features}


def _check_divisible(key: str, values: list[int], degree: int) -> None:
    if any(v % degree for v in values):
        raise ValueError(f"model.{key}={values} cannot be split over tensor_degree={degree}; "
                         f"use sizes that are multiples of {degree}")


class MLPSpec(ModelSpecBase):
    """A multi-layer perceptron on flat features."""

    type: Literal["mlp"]
    factory: ClassVar[str] = "distml.models.mlp:MLP"
    hidden_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [128], description="Width of each hidden layer."
    )
    activation: Literal["relu", "gelu", "tanh", "silu"] = Field(
        "relu", description="relu, gelu, tanh or silu."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer.")

    def pipeline_layer_count(self) -> int | None:
        return len(self.hidden_sizes) + 1  # each Linear with its activation

    def check_tensor_degree(self, degree: int, *, strategy: str = "tensor") -> None:
        _check_divisible("hidden_sizes", self.hidden_sizes, degree)


class ClickSpec(ModelSpecBase):
    """A click model (DLRM-like): the last len(cardinalities) input columns are hashed ids
    (data.transforms' hash), each into its embedding table; the dense columns before them
    alongside, into an MLP. Under parameter_server the tables live on the servers."""

    type: Literal["click"]
    factory: ClassVar[str] = "distml.models.click:ClickModel"
    cardinalities: list[Annotated[int, Field(ge=1, le=1 << 24)]] = Field(
        min_length=1, description="Rows of each categorical column's embedding table (the "
        "hash transform's buckets).")
    dim: int = Field(16, ge=1, description="Embedding width.")
    hidden_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [64, 32], description="Width of each hidden layer of the MLP.")
    mode: Literal["mean", "sum"] = Field("mean", description="How a bag combines its rows.")

    def _data_kwargs(self, num_features: int, where: str) -> dict[str, Any]:
        dense = num_features - len(self.cardinalities)
        if dense < 0:
            raise ConfigError(f"{where}: a click model with {len(self.cardinalities)} "
                              f"cardinalities needs as many categorical columns, but the data "
                              f"has {num_features} features")
        # Dense gradients outside parameter servers: train.optimizer and grad_clip take them.
        return {"num_dense": dense, "sparse": False}


class CNNSpec(ModelSpecBase):
    """A small convolutional net for image-shaped inputs (e.g. digits' 8x8)."""

    type: Literal["cnn"]
    factory: ClassVar[str] = "distml.models.cnn:CNN"
    image_shape: tuple[int, int, int] | None = Field(
        None, description="(channels, height, width); default: one square channel."
    )
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [16, 32], min_length=1, description="Channels of each conv block."
    )
    kernel_size: int = Field(3, ge=1, description="Convolution kernel size (odd keeps the size).")
    hidden_size: int = Field(64, ge=1, description="Width of the dense layer after the convs.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the output layer.")

    def _data_kwargs(self, num_features: int, where: str) -> dict[str, Any]:
        if self.image_shape is not None:
            if math.prod(self.image_shape) != num_features:
                c, h, w = self.image_shape
                raise ConfigError(
                    f"{where}.image_shape={list(self.image_shape)} holds {c}*{h}*{w}="
                    f"{c * h * w} values but the data has {num_features} features; "
                    f"give a shape whose product is {num_features}")
            return {"image_shape": list(self.image_shape)}
        side = math.isqrt(num_features)
        if side * side != num_features:
            raise ConfigError(
                f"{where}: the cnn needs image-shaped inputs; {num_features} features are not "
                f"a square image, so set image_shape: [C, H, W] with C*H*W = {num_features}")
        return {"image_shape": [1, side, side]}


class TransformerSpec(ModelSpecBase):
    """A small decoder-only language model (nanoGPT-style) over byte tokens."""

    type: Literal["transformer"]
    factory: ClassVar[str] = "distml.models.transformer:Transformer"
    num_layers: int = Field(2, ge=1, description="Number of transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads per block.")
    dim: int = Field(128, ge=1, description="Model width (embedding size).")
    context_length: int | None = Field(
        None, ge=1, description="Longest sequence; default: the data's sequence_length."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability.")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> TransformerSpec:
        if self.dim % self.num_heads:
            raise ValueError(
                f"dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                "choose a dim that is a multiple of num_heads"
            )
        return self

    def pipeline_layer_count(self) -> int | None:
        return self.num_layers + 2  # the embeddings, each block, the norm and head

    def check_tensor_degree(self, degree: int, *, strategy: str = "tensor") -> None:
        _check_divisible("num_heads", [self.num_heads], degree)

    def resolve(self, *, task: str, num_features: int, num_outputs: int, where: str
                ) -> dict[str, Any]:
        if task != "language_modeling":
            raise ConfigError(
                f"{where}: the transformer is a language model over text tokens, but the data "
                f"is a {task} table; use mlp or cnn, or a text source")
        context = self.context_length or num_features
        if context < num_features:
            raise ConfigError(
                f"{where}.context_length={context} is shorter than the data's "
                f"sequence_length={num_features}; use at least {num_features} or shorten "
                "data.source.sequence_length")
        kwargs = {**self.model_dump(exclude={"type"}), "context_length": context,
                  "vocab_size": VOCAB_SIZE}
        return {"type": "transformer", "kwargs": kwargs}


class CustomModelSpec(Strict):
    """A user model: `type` is 'package.module:factory' or 'path/to/file.py:factory'."""

    type: str = Field(pattern=IMPORT_PATH_PATTERN, description="Import path of the factory.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments.")

    @field_validator("type", mode="before")
    @classmethod
    def _file_relative_to_config(cls, value: Any, info: ValidationInfo) -> Any:
        return relative_import_path(value, info)

    @property
    def factory(self) -> str:
        return self.type

    def pipeline_layer_count(self) -> int | None:
        return None  # known once built: the strategy checks its pipeline_layers()

    def check_tensor_degree(self, degree: int, *, strategy: str = "tensor") -> None:
        pass  # its tensor_plan(), if any, is checked when the strategy applies it

    def resolve(self, *, task: str, num_features: int, num_outputs: int, where: str
                ) -> dict[str, Any]:
        # Offered, not forced: a factory gets the keys its signature takes.
        return {"type": self.type, "kwargs": self.kwargs,
                "inject": {"in_features": num_features, "num_outputs": num_outputs,
                           "input_shape": [num_features]}}


MODELS = TaggedUnion([MLPSpec, CNNSpec, TransformerSpec, ClickSpec], user=CustomModelSpec,
                     what="model", hint=", or 'module:factory' for a user model")
ModelSpec = MODELS.annotation
ZOO: dict[str, str] = {type_name(cls): cls.factory for cls in MODELS.members}
