"""The YAML spec: pydantic models at the user boundary, loading, and ``--set`` overrides.

Every field carries a description (``distml`` prints them in errors and the README documents
them). Relative data and model-file paths are resolved against the config file's folder;
``output_dir`` and ``registry`` against the working directory.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from distml.errors import ConfigError

Task = Literal["classification", "regression", "language_modeling"]

# Metrics each task can compute; the first is the default for `select.metric`.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1_macro", "loss"),
    "regression": ("loss", "mae", "r2"),
    "language_modeling": ("perplexity", "loss"),
}
# Whether a larger value of the metric is better.
METRIC_HIGHER_IS_BETTER = {
    "accuracy": True, "f1_macro": True, "r2": True,
    "loss": False, "mae": False, "perplexity": False,
}


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve_path(value: str | Path, info: ValidationInfo) -> Path:
    """Relative paths in the config are relative to the config file's folder."""
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else Path(base) / path


def _relative_factory(value: Any, info: ValidationInfo) -> Any:
    """'path/to/file.py:name' is relative to the config file; 'module:name' stays."""
    if isinstance(value, str) and ".py:" in value:
        file, name = value.rsplit(":", 1)
        return f"{_resolve_path(file, info)}:{name}"
    return value


def _tagger(known: tuple[str, ...], *, user: str) -> Callable[[Any], str | None]:
    """A union's discriminator: a known ``type``, or ``user`` for a 'module:name' path."""

    def tag(value: Any) -> str | None:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        if not isinstance(kind, str):
            return None
        return kind if kind in known else (user if ":" in kind else None)

    return tag


# ---------------------------------------------------------------------------------------------
# data sources


class DigitsSource(Strict):
    """scikit-learn's bundled handwritten digits: 1,797 images of 8x8 pixels, 10 classes."""

    type: Literal["sklearn:digits"]


class SyntheticClassificationSource(Strict):
    """Gaussian clusters, one or more per class; generated in chunks, fine for millions of rows."""

    type: Literal["synthetic:classification"]
    n_samples: int = Field(10_000, ge=1, description="Number of rows.")
    n_features: int = Field(20, ge=1, description="Number of features.")
    n_classes: int = Field(2, ge=2, description="Number of classes.")
    class_sep: float = Field(1.0, gt=0, description="Distance scale between class centres.")
    noise: float = Field(1.0, gt=0, description="Standard deviation of the within-class noise.")
    seed: int = Field(0, description="Seed of the generator.")


class SyntheticRegressionSource(Strict):
    """A random linear function of the features plus Gaussian noise."""

    type: Literal["synthetic:regression"]
    n_samples: int = Field(10_000, ge=1, description="Number of rows.")
    n_features: int = Field(20, ge=1, description="Number of features.")
    noise: float = Field(0.1, ge=0, description="Standard deviation of the target noise.")
    seed: int = Field(0, description="Seed of the generator.")


class TextSource(Strict):
    """Byte-level token sequences cut from local text files (for the transformer)."""

    type: Literal["text"]
    paths: list[str] = Field(
        min_length=1,
        description="Files or glob patterns. A leading 'stdlib:' means the Python standard "
        "library's folder, e.g. 'stdlib:json/*.py'; other relative paths are relative to the "
        "config file.",
    )
    sequence_length: int = Field(64, ge=2, description="Tokens per training sequence.")
    max_bytes: int | None = Field(None, ge=1, description="Read at most this many bytes.")

    @field_validator("paths", mode="before")
    @classmethod
    def _relative_to_config(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, list):
            return value
        return [
            v if not isinstance(v, str) or v.startswith("stdlib:") else str(_resolve_path(v, info))
            for v in value
        ]


class FileSource(Strict):
    """A CSV or Parquet file, or a folder of them, with one label column."""

    type: Literal["file"] = "file"
    path: Path = Field(description="CSV/Parquet file or folder (relative to the config file).")
    label_column: str = Field("label", description="Name of the label (target) column.")
    feature_columns: list[str] | None = Field(
        None, description="Feature columns; default: every other column."
    )
    task: Literal["classification", "regression"] = Field(
        "classification", description="What the label is."
    )

    @field_validator("path", mode="before")
    @classmethod
    def _relative_to_config(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve_path(value, info) if isinstance(value, str | Path) else value


_SOURCE_TYPES = ("sklearn:digits", "synthetic:classification", "synthetic:regression", "text")


def _source_tag(value: Any) -> str | None:
    kind = value.get("type", "file") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in (*_SOURCE_TYPES, "file") else None


Source = Annotated[
    Annotated[DigitsSource, Tag("sklearn:digits")]
    | Annotated[SyntheticClassificationSource, Tag("synthetic:classification")]
    | Annotated[SyntheticRegressionSource, Tag("synthetic:regression")]
    | Annotated[TextSource, Tag("text")]
    | Annotated[FileSource, Tag("file")],
    Discriminator(
        _source_tag,
        custom_error_type="unknown_source",
        custom_error_message="source type must be one of " + ", ".join(_SOURCE_TYPES)
        + ", file (or give a path to a CSV/Parquet file or folder)",
    ),
]


class SplitConfig(Strict):
    """Fractions of the rows in each split; they must add up to 1."""

    train: float = Field(0.7, gt=0, lt=1, description="Fraction for training.")
    val: float = Field(0.15, gt=0, lt=1, description="Fraction for validation (selection).")
    test: float = Field(0.15, gt=0, lt=1, description="Fraction for the final test.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(
                f"train + val + test = {total:g}; the fractions must add up to 1 "
                "(e.g. 0.7, 0.15, 0.15)"
            )
        return self


# ---------------------------------------------------------------------------------------------
# feature transforms


class StandardizeSpec(Strict):
    """(x - mean) / std per column, statistics fitted on the training split."""

    type: Literal["standardize"]
    columns: list[str] | None = Field(None, description="Columns; default: every numeric one.")


class MinMaxSpec(Strict):
    """(x - min) / (max - min) per column, fitted on the training split."""

    type: Literal["minmax"]
    columns: list[str] | None = Field(None, description="Columns; default: every numeric one.")


class ImputeSpec(Strict):
    """Replace missing values (NaN) by the training mean or a constant."""

    type: Literal["impute"]
    columns: list[str] | None = Field(None, description="Columns; default: every numeric one.")
    strategy: Literal["mean", "constant"] = Field("mean", description="mean or constant.")
    value: float = Field(0.0, description="The constant, for strategy: constant.")


class ClipSpec(Strict):
    """Clip values into [min, max]."""

    type: Literal["clip"]
    columns: list[str] | None = Field(None, description="Columns; default: every numeric one.")
    min: float | None = Field(None, description="Lower bound; null: none.")
    max: float | None = Field(None, description="Upper bound; null: none.")

    @model_validator(mode="after")
    def _bounds(self) -> ClipSpec:
        if self.min is None and self.max is None:
            raise ValueError("clip needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"clip min={self.min} is greater than max={self.max}")
        return self


class OneHotSpec(Strict):
    """Categorical (string) columns -> one 0/1 feature per category seen in training."""

    type: Literal["onehot"]
    columns: list[str] = Field(min_length=1, description="Categorical columns to encode.")


class UserTransformSpec(Strict):
    """A user function 'module:function' (or 'file.py:function') taking and returning a dict
    of column name -> numpy array; it runs on every partition."""

    type: str = Field(pattern=r"^.+:[A-Za-z_]\w*$", description="Import path of the function.")

    @field_validator("type", mode="before")
    @classmethod
    def _file_relative_to_config(cls, value: Any, info: ValidationInfo) -> Any:
        return _relative_factory(value, info)


_TRANSFORM_TYPES = ("standardize", "minmax", "impute", "clip", "onehot")


TransformSpec = Annotated[
    Annotated[StandardizeSpec, Tag("standardize")]
    | Annotated[MinMaxSpec, Tag("minmax")]
    | Annotated[ImputeSpec, Tag("impute")]
    | Annotated[ClipSpec, Tag("clip")]
    | Annotated[OneHotSpec, Tag("onehot")]
    | Annotated[UserTransformSpec, Tag("user")],
    Discriminator(
        _tagger(_TRANSFORM_TYPES, user="user"),
        custom_error_type="unknown_transform",
        custom_error_message="transform type must be one of " + ", ".join(_TRANSFORM_TYPES)
        + ", or 'module:function' for a user function",
    ),
]


class LoaderConfig(Strict):
    """The training input pipeline."""

    shuffle: bool = Field(True, description="Shuffle samples every epoch (seeded).")
    shuffle_window: int = Field(
        65_536, ge=1, description="Rows shuffled together (across partitions); rounded up to "
        "whole batches. Larger: more random, more memory.",
    )
    num_threads: int = Field(
        2, ge=1, description="Threads decoding partitions in parallel (interleave) and running "
        "the map function."
    )
    prefetch_batches: int = Field(8, ge=0, description="Batches prepared ahead in the background.")
    cache: Literal["memory", "disk", "none"] = Field(
        "memory", description="Keep decoded partitions in memory, as .npy files on local disk, "
        "or re-read them every epoch."
    )
    remainder: Literal["drop", "pad"] = Field(
        "drop", description="When rows do not divide among ranks: drop the extra rows of the "
        "epoch, or pad by repeating rows from its start."
    )
    map_fn: str | None = Field(
        None, pattern=r"^.+:[A-Za-z_]\w*$", description="Optional 'module:function' applied "
        "to each batch (x, y) of numpy arrays, returning (x, y); runs in the threads."
    )


class DataConfig(Strict):
    """Where the data comes from and how it is prepared."""

    source: Source = Field(
        description="'sklearn:digits', 'synthetic:classification', 'synthetic:regression', "
        "a path to a CSV/Parquet file or folder, or a mapping with 'type' and its options."
    )
    split: SplitConfig = Field(default_factory=SplitConfig, description="Split fractions.")
    stratify: bool = Field(True, description="Keep class proportions in every split.")
    classes: list[str] | None = Field(
        None, description="Declared class labels; rows with another label are an error."
    )
    transforms: list[TransformSpec] | None = Field(
        None,
        description="Feature transforms in order, fitted on the training split and stored in "
        "the artifact: standardize, minmax, impute, clip, onehot, or 'module:function'. "
        "Default: [standardize] for numeric features, none for text.",
    )
    drop_invalid: bool = Field(
        False, description="Drop rows with NaN or infinite features instead of failing."
    )
    rows_per_partition: int = Field(
        100_000, ge=1, description="Rows per Parquet partition (the unit of parallel work)."
    )
    loader: LoaderConfig = Field(default_factory=LoaderConfig, description="Input pipeline.")

    @field_validator("source", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"type": value} if value in _SOURCE_TYPES else {"type": "file", "path": value}
        return value

    @field_validator("transforms", mode="before")
    @classmethod
    def _transform_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"type": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("classes", mode="before")
    @classmethod
    def _classes_as_str(cls, value: Any) -> Any:
        return [str(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _transforms_fit_source(self) -> DataConfig:
        if self.task == "language_modeling" and self.transforms:
            names = [t.type for t in self.transforms]
            raise ValueError(
                f"data.transforms={names} apply to feature columns; a text source "
                "takes none (use transforms: [])"
            )
        return self

    @property
    def feature_transforms(self) -> list[Any]:
        if self.transforms is not None:
            return list(self.transforms)
        return [] if self.task == "language_modeling" else [StandardizeSpec(type="standardize")]

    @property
    def task(self) -> Task:
        src = self.source
        if isinstance(src, FileSource):
            return src.task
        return {"text": "language_modeling", "synthetic:regression": "regression"}.get(
            src.type, "classification"
        )


# ---------------------------------------------------------------------------------------------
# models


class MLPSpec(Strict):
    """A multi-layer perceptron on flat features."""

    type: Literal["mlp"]
    hidden_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [128], description="Width of each hidden layer."
    )
    activation: Literal["relu", "gelu", "tanh", "silu"] = Field(
        "relu", description="relu, gelu, tanh or silu."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer.")


class CNNSpec(Strict):
    """A small convolutional net for image-shaped inputs (e.g. digits' 8x8)."""

    type: Literal["cnn"]
    image_shape: tuple[int, int, int] | None = Field(
        None, description="(channels, height, width); default: one square channel."
    )
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [16, 32], min_length=1, description="Channels of each conv block."
    )
    kernel_size: int = Field(3, ge=1, description="Convolution kernel size (odd keeps the size).")
    hidden_size: int = Field(64, ge=1, description="Width of the dense layer after the convs.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the output layer.")


class TransformerSpec(Strict):
    """A small decoder-only language model (nanoGPT-style) over byte tokens."""

    type: Literal["transformer"]
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


class CustomModelSpec(Strict):
    """A user model: `type` is 'package.module:factory' or 'path/to/file.py:factory'."""

    type: str = Field(pattern=r"^.+:[A-Za-z_]\w*$", description="Import path of the factory.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments.")

    @field_validator("type", mode="before")
    @classmethod
    def _file_relative_to_config(cls, value: Any, info: ValidationInfo) -> Any:
        return _relative_factory(value, info)


_MODEL_TYPES = ("mlp", "cnn", "transformer")


ModelSpec = Annotated[
    Annotated[MLPSpec, Tag("mlp")]
    | Annotated[CNNSpec, Tag("cnn")]
    | Annotated[TransformerSpec, Tag("transformer")]
    | Annotated[CustomModelSpec, Tag("custom")],
    Discriminator(
        _tagger(_MODEL_TYPES, user="custom"),
        custom_error_type="unknown_model",
        custom_error_message="model type must be one of mlp, cnn, transformer, "
        "or 'module:factory' for a user model",
    ),
]


# ---------------------------------------------------------------------------------------------
# training


def _shown(degree: int | None) -> str:
    return "the rest" if degree in (None, -1) else str(degree)


class TrainSettings(Strict):
    """Training settings shared by every candidate; a candidate may override any of them."""

    epochs: int = Field(10, ge=1, description="Passes over the training split.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Samples per optimizer step (global batch).")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw or sgd.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (sgd only).")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "cosine", description="Decay after warmup: constant, cosine or linear."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of lr.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm; null: off.")
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step; batch_size is split among them."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32; bf16 autocast; or fp16 autocast with dynamic loss scaling.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward instead of keeping "
        "them (less memory, about one more forward of compute).")
    offload: bool = Field(
        False, description="fsdp only: keep parameters, gradients and optimizer state in CPU "
        "memory between uses (torch's CPUOffloadPolicy).")
    eval_every_steps: int | None = Field(
        None, ge=1, description="Evaluate on val every N steps; null: at the end of each epoch."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement."
    )
    restore_best: bool = Field(True, description="End with the best weights seen on val.")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Checkpoint every N steps; null: at the end of each epoch."
    )
    checkpoints: bool = Field(True, description="Write checkpoints (for --resume and restarts).")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    strategy: Literal["single", "ddp", "zero1", "fsdp", "tensor", "pipeline"] = Field(
        "single",
        description="single (one process); ddp (replicas, gradients all-reduced); zero1 (ddp "
        "with the optimizer state sharded); fsdp (parameters, gradients and optimizer state "
        "sharded: torch's fully_shard); tensor (matrix multiplications split across ranks, "
        "fsdp over data_degree replicas); pipeline (layers split into stages fed with "
        "micro-batches, gradients averaged over data_degree replicas).",
    )
    world_size: int = Field(1, ge=1, description="Number of training processes.")
    data_degree: int | None = Field(
        None, description="tensor/pipeline: data-parallel replicas; -1: what the other "
        "degrees leave. Default: 1, or the rest when tensor_degree/pipeline_degree is set.")
    tensor_degree: int | None = Field(
        None, description="tensor: ranks that split each layer; -1: the rest. Default: the "
        "rest of world_size.")
    pipeline_degree: int | None = Field(
        None, description="pipeline: stages; -1: the rest. Default: the rest of world_size.")
    schedule: Literal["gpipe", "1f1b", "interleaved-1f1b"] = Field(
        "1f1b", description="pipeline: gpipe (all forwards, then all backwards), 1f1b (one "
        "forward, one backward: fewer activations alive), or interleaved-1f1b (virtual_stages "
        "stages per rank: a smaller bubble, more sends).")
    virtual_stages: int = Field(
        2, ge=1, description="pipeline interleaved-1f1b: stages per rank, dealt round-robin.")
    num_microbatches: int = Field(
        4, ge=1, description="pipeline: micro-batches each replica's batch is cut into.")
    stage_split: Literal["params", "time"] | list[int] = Field(
        "params", description="pipeline: balance stages by parameter count, by measured "
        "forward time (GPipe's heuristic), or give the number of layers per stage.")
    reshard_after_forward: bool | None = Field(
        None, description="fsdp only: true frees gathered parameters after forward (ZeRO-3); "
        "false keeps them for backward (ZeRO-2 behaviour). Default: true.",
    )
    max_restarts: int = Field(
        0, ge=0, description="Restart every process this many times after one dies; training "
        "continues from the last checkpoint (needs checkpoints)."
    )

    def _parallel_consistent(self) -> None:
        own = {"tensor": ("tensor_degree",), "pipeline": ("pipeline_degree",)}
        for key in ("tensor_degree", "pipeline_degree", "data_degree"):
            allowed = own.get(self.strategy, ()) + (
                ("data_degree",) if self.strategy in own else ())
            if getattr(self, key) is not None and key not in allowed:
                raise ValueError(f"{key} applies to strategy "
                                 f"{'tensor' if key == 'tensor_degree' else 'pipeline'}"
                                 f"{'' if key != 'data_degree' else ' or tensor'}, not "
                                 f"{self.strategy!r}; remove it or change the strategy")
        if self.strategy == "pipeline" and self.grad_accum_steps > 1:
            raise ValueError("pipeline accumulates over num_microbatches; set "
                             "grad_accum_steps: 1 and raise num_microbatches instead")

    def degrees(self) -> tuple[int, int, int]:
        """(data, pipeline, tensor) degrees; their product is world_size."""
        model_axis = {"tensor": "tensor_degree", "pipeline": "pipeline_degree"}.get(
            self.strategy)
        if model_axis is None:
            return self.world_size, 1, 1
        given = {"data_degree": self.data_degree, model_axis: getattr(self, model_axis)}
        if given["data_degree"] is None:
            given["data_degree"] = 1 if given[model_axis] is None else -1
        if given[model_axis] is None:
            given[model_axis] = -1
        if list(given.values()).count(-1) > 1:
            raise ValueError("only one of data_degree and "
                             f"{model_axis} may be -1 ('the rest')")
        known = math.prod(v for v in given.values() if v != -1)
        for k, v in given.items():
            if v == -1:
                given[k] = self.world_size // known if self.world_size % known == 0 else 0
        data, model = given["data_degree"], given[model_axis]
        if data < 1 or model < 1 or data * model != self.world_size:
            raise ValueError(
                f"data_degree x {model_axis} = {_shown(self.data_degree)} x "
                f"{_shown(getattr(self, model_axis))} does not multiply to world_size="
                f"{self.world_size}; choose degrees whose product is {self.world_size} "
                "(one may be -1)")
        return (data, model, 1) if self.strategy == "pipeline" else (data, 1, model)

    @model_validator(mode="after")
    def _consistent(self) -> TrainSettings:
        self._parallel_consistent()
        data = self.degrees()[0]
        per_step = data * self.grad_accum_steps
        if self.world_size > self.batch_size:
            raise ValueError(
                f"world_size={self.world_size} is larger than the global batch_size="
                f"{self.batch_size}: every rank needs samples in every step; use a batch size "
                f"of at least {self.world_size}"
            )
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by data-parallel ranks x "
                f"grad_accum_steps={data} x {self.grad_accum_steps}={per_step}; "
                "use a batch size that is a multiple of it"
            )
        rounds = max(1, self.num_microbatches // self.degrees()[1])
        if self.schedule == "interleaved-1f1b" and self.num_microbatches % rounds:
            raise ValueError(
                f"interleaved-1f1b runs num_microbatches={self.num_microbatches} in rounds of "
                f"pipeline_degree={self.degrees()[1]}; use a multiple of it")
        if self.strategy == "pipeline" and (self.batch_size // data) % self.num_microbatches:
            raise ValueError(
                f"batch_size={self.batch_size} over {data} replica(s) gives "
                f"{self.batch_size // data} samples per pipeline, which do not divide into "
                f"num_microbatches={self.num_microbatches}; use a batch size that is a "
                f"multiple of {data * self.num_microbatches}")
        if self.strategy == "single" and self.world_size > 1:
            raise ValueError(
                f"world_size={self.world_size} needs a distributed strategy; "
                "strategy 'single' runs one process (use ddp, zero1 or fsdp, or world_size: 1)"
            )
        if self.reshard_after_forward is not None and self.strategy != "fsdp":
            raise ValueError(
                f"reshard_after_forward applies to strategy fsdp, not {self.strategy!r}; "
                "remove it or use strategy: fsdp"
            )
        if self.precision == "fp16" and self.strategy not in ("single", "ddp", "zero1"):
            raise ValueError(
                f"precision fp16 with strategy {self.strategy!r}: its loss scaler would skip "
                "steps on some ranks and not others when gradients are sharded; use bf16 "
                "(no loss scaling needed) or strategy single, ddp or zero1")
        if self.offload and self.strategy != "fsdp":
            raise ValueError(
                f"offload applies to strategy fsdp (it offloads sharded state), not "
                f"{self.strategy!r}; use strategy: fsdp or remove offload")
        if self.max_restarts and not self.checkpoints:
            raise ValueError(
                f"max_restarts={self.max_restarts} needs checkpoints to restart from; set "
                "checkpoints: true (or max_restarts: 0)"
            )
        return self


def _optional(field: Any) -> tuple[Any, Any]:
    """The same field, but optional with default None (for per-candidate overrides)."""
    annotation = field.annotation
    if field.metadata:
        annotation = Annotated[annotation, *field.metadata]
    return (annotation | None, Field(None, description=field.description))


_CandidateBase = create_model(  # type: ignore[call-overload]
    "_CandidateBase",
    __base__=Strict,
    **{name: _optional(f) for name, f in TrainSettings.model_fields.items()},
)


class Candidate(_CandidateBase):  # type: ignore[misc,valid-type]
    """One model to train; any training setting given here overrides the shared one."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="Unique candidate name.")
    model: ModelSpec = Field(description="The model: a zoo type with options, or a user factory.")

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True, exclude={"name", "model"})


def pipeline_layer_count(model: Any) -> int | None:
    """Layers a pipeline can cut a zoo model into (None: not known before it is built)."""
    if isinstance(model, MLPSpec):
        return len(model.hidden_sizes) + 1  # each Linear with its activation
    if isinstance(model, TransformerSpec):
        return model.num_layers + 2  # the embeddings, each block, the norm and head
    if isinstance(model, CNNSpec):
        return 0
    return None


def check_model_parallel(s: TrainSettings, model: Any) -> None:
    """Refuse a model split that cannot work, before any process starts."""
    _, stages, tp = s.degrees()
    if s.strategy == "pipeline" and s.schedule == "interleaved-1f1b":
        stages *= s.virtual_stages  # the stages to cut the model into
    if s.strategy == "tensor":
        if isinstance(model, CNNSpec):
            raise ValueError("strategy tensor needs a tensor-parallel plan, and the cnn has "
                             "none; plans exist for mlp and transformer (a user model may "
                             "define tensor_plan()), or use ddp or fsdp")
        widths = {"hidden_sizes": model.hidden_sizes} if isinstance(model, MLPSpec) else \
            {"num_heads": [model.num_heads]} if isinstance(model, TransformerSpec) else {}
        for key, values in widths.items():
            if any(v % tp for v in values):
                raise ValueError(f"model.{key}={values} cannot be split over tensor_degree="
                                 f"{tp}; use sizes that are multiples of {tp}")
    if s.strategy == "pipeline":
        layers = pipeline_layer_count(model)
        if layers == 0:
            raise ValueError("strategy pipeline needs a model that is a sequence of blocks "
                             "(mlp, transformer, an nn.Sequential or a model with "
                             "pipeline_layers()); the cnn is not; use ddp or fsdp")
        if layers is not None and stages > layers:
            raise ValueError(f"{stages} pipeline stages (pipeline_degree x virtual_stages "
                             "under interleaved-1f1b) is more than the model's "
                             f"{layers} layers; use at most {layers} stages")
        split = s.stage_split
        if isinstance(split, list) and (len(split) != stages or min(split) < 1 or (
                layers is not None and sum(split) != layers)):
            raise ValueError(f"stage_split={s.stage_split} must give {stages} positive "
                                 "layer counts" + (f" that sum to the model's {layers} layers"
                                                   if layers is not None else ""))


class TrainConfig(TrainSettings):
    """Shared training settings plus the candidates to train."""

    candidates: list[Candidate] = Field(min_length=1, description="Models to train and compare.")

    @model_validator(mode="after")
    def _unique_and_consistent(self) -> TrainConfig:
        seen: set[str] = set()
        for c in self.candidates:
            if c.name in seen:
                raise ValueError(f"two candidates are named {c.name!r}; names must be unique")
            seen.add(c.name)
            settings = self.settings_for(c)  # cross-field checks on the merged settings
            try:
                check_model_parallel(settings, c.model)
            except ValueError as e:
                raise ValueError(f"candidate {c.name!r}: {e}") from None
        return self

    def settings_for(self, candidate: Candidate) -> TrainSettings:
        shared = self.model_dump(exclude={"candidates"})
        try:
            return TrainSettings(**{**shared, **candidate.overrides()})
        except ValidationError as e:
            msg = e.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"candidate {candidate.name!r}: {msg}") from None

    def candidate(self, name: str) -> Candidate:
        for c in self.candidates:
            if c.name == name:
                return c
        names = ", ".join(c.name for c in self.candidates)
        raise ConfigError(f"no candidate named {name!r}; the config has: {names}")


# ---------------------------------------------------------------------------------------------
# the rest


class SelectConfig(Strict):
    """How the best candidate is chosen and registered."""

    metric: str | None = Field(
        None,
        description="Validation metric: accuracy, f1_macro or loss (classification); loss, mae "
        "or r2 (regression); perplexity or loss (language modeling). Default: the first.",
    )
    register_as: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][\w.-]*$", description="Registry name; default: config name."
    )
    promote: bool = Field(
        True, description="Move the 'production' alias to the new version when it is better."
    )


class ExecutionConfig(Strict):
    """Where embarrassingly parallel work (preprocessing partitions) runs."""

    executor: str = Field(
        "local",
        pattern=r"^(local|(dask|ray)://.+)$",
        description="local (a process pool on this machine), dask://local (a Dask "
        "LocalCluster), dask://HOST:PORT (a running Dask scheduler), ray://local or "
        "ray://HOST:PORT.",
    )
    num_workers: int | None = Field(
        None, ge=1, description="Worker processes (local, dask://local, ray://local); "
        "default: the CPU count. 1 runs in-process."
    )
    retries: int = Field(
        2, ge=0, description="Retries of a failed work item before the stage fails."
    )


class ServeConfig(Strict):
    """Online serving (``distml serve``); command-line flags override these."""

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 exposes the server to "
                      "the network (then set a token).")
    port: int = Field(8000, ge=0, le=65535, description="Port; 0 picks a free one.")
    replicas: int = Field(1, ge=1, description="Worker processes behind the one port; a dead "
                          "one is replaced.")
    dynamic_batching: bool = Field(True, description="Gather concurrent requests into one "
                                   "forward pass.")
    max_batch_size: int = Field(64, ge=1, description="Most rows in one forward pass.")
    max_delay_ms: float = Field(2.0, ge=0, description="Longest wait for more requests once "
                                "one is queued.")
    max_queue_rows: int = Field(1024, ge=1, description="Rows waiting per replica; past it, "
                                "503 with Retry-After.")
    timeout_ms: float = Field(5000.0, gt=0, description="Per-request deadline (a request may "
                              "ask for less with the X-Request-Timeout-Ms header); past it, "
                              "504 and the work is dropped.")
    idempotency_window_s: float = Field(60.0, ge=0, description="Requests with the same "
                                        "Idempotency-Key header within this window are "
                                        "computed once.")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="Largest request body; "
                                "larger gets 413.")
    quantize: Literal["none", "int8"] = Field("none", description="int8: dynamic int8 "
                                              "quantization of Linear layers (CPU).")
    grpc_port: int | None = Field(None, ge=0, le=65535, description="Also serve the "
                                  "protocol's gRPC service on this port (0: a free one); "
                                  "null: REST only.")
    reload_interval_s: float | None = Field(1.0, gt=0, description="Serving name or "
                                            "name@alias: check the registry this often and "
                                            "switch to the version it names; null: never.")


class MlflowConfig(Strict):
    """MLflow tracking: one run per candidate inside one parent run per pipeline run."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (http://host:5000, sqlite:///path.db, ...); "
        "default: sqlite:///<output_dir>/mlflow.db with artifacts in <output_dir>/mlartifacts.")
    experiment: str | None = Field(None, description="Experiment name; default: the pipeline "
                                   "name.")
    register_model: bool = Field(True, description="Register the selected model in MLflow's model "
                           "registry (under select.register_as or the pipeline name).")


class MonitorConfig(Strict):
    """Tracking and monitoring."""

    tensorboard: bool = Field(
        True, description="Write TensorBoard event files under <run>/tensorboard/<candidate>.")
    histogram_every_steps: int = Field(
        50, ge=1, description="Histograms of weights and gradients every N steps.")
    system_metrics_interval_s: float | None = Field(
        2.0, gt=0, description="Sample CPU %, RSS (and GPU memory and utilisation) every N "
        "seconds on every rank, summarised per epoch; null: off.")
    mlflow: MlflowConfig | None = Field(
        None, description="MLflow tracking (needs distml[mlflow]): true for a local store, "
        "or {tracking_uri, experiment, register_model}; null or false: off.")

    @field_validator("mlflow", mode="before")
    @classmethod
    def _mlflow_switch(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value


class Config(Strict):
    """A whole distml pipeline."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="Pipeline name.")
    seed: int = Field(0, description="Seed of splits, initial weights, shuffling and dropout.")
    output_dir: Path = Field(Path("runs"), description="Runs go to <output_dir>/<name>/<time>/.")
    registry: Path = Field(Path("registry"), description="Model registry folder.")
    data: DataConfig
    train: TrainConfig
    select: SelectConfig = Field(default_factory=SelectConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @model_validator(mode="after")
    def _metric_fits_task(self) -> Config:
        allowed = TASK_METRICS[self.data.task]
        if self.select.metric is not None and self.select.metric not in allowed:
            raise ValueError(
                f"select.metric={self.select.metric!r} cannot be computed for a "
                f"{self.data.task} task; use one of: {', '.join(allowed)}"
            )
        return self

    @property
    def metric(self) -> str:
        return self.select.metric or TASK_METRICS[self.data.task][0]

    @property
    def model_name(self) -> str:
        return self.select.register_as or self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data; candidates keep only what they override, so it
        loads back to the same config."""
        data = self.model_dump(mode="json")
        data["train"]["candidates"] = [
            c.model_dump(mode="json", exclude_unset=True) for c in self.train.candidates
        ]
        return data

    def hash(self) -> str:
        """Hash of the resolved config, independent of key order."""
        return _digest(self.to_dict())


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# loading


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r} is not KEY=VALUE; e.g. --set train.epochs=3")
    node: Any = raw
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {key}: {where} is not a mapping or list index")
        node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = yaml.safe_load(text)
    elif isinstance(node, dict):
        node[last] = yaml.safe_load(text)
    else:
        raise ConfigError(f"--set {key}: cannot set {last!r} inside a {type(node).__name__}")


_TAGS = {*_SOURCE_TYPES, "file", *_MODEL_TYPES, "custom", *_TRANSFORM_TYPES, "user"}


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for prev, part in zip((None, *loc), loc, strict=False):
        if isinstance(part, int):
            out += f"[{part}]"
        elif (prev in ("source", "model") or isinstance(prev, int)) and part in _TAGS:
            continue  # a union's tag is not part of the user's path
        else:
            out += f".{part}" if out else str(part)
    return out


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = _format_loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `distml --help` and README list the keys)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        value = e.get("input")
        if e["type"].startswith("unknown_") and isinstance(value, dict):
            where, value = f"{where}.type", value.get("type")
        shown = "" if e["type"] == "missing" or isinstance(value, dict) else f" = {value!r}"
        lines.append(f"  {where}{shown}: {msg}" if e["loc"] else f"  {msg}")
    return "invalid config:\n" + "\n".join(lines)


def parse_config(
    raw: Any, *, base_dir: Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return Config.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a config file; every mistake raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return parse_config(raw, base_dir=path.resolve().parent, overrides=overrides)
