"""The ``data`` section: sources, splits, feature transforms and the input pipeline.

Validated data only: a source's spec says what it is (its options and its task); how it is
cut into chunks and loaded is its implementation in the data layer, found there by the spec's
``type``. Adding a source is adding its spec class to ``SOURCES`` here and its implementation
to the data layer's table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from distml.config.base import (
    IMPORT_PATH_PATTERN,
    Strict,
    TaggedUnion,
    Task,
    check_path_text,
    relative_import_path,
    resolve_path,
)
from distml.storage import as_url

# ---------------------------------------------------------------------------------------------
# sources


class SourceSpec(Strict):
    """What every source's spec holds: its ``type`` and options, and a ``task`` (a class
    constant, or a field where the user says)."""

    def grown(self, factor: int) -> SourceSpec | None:
        """The same source with ``factor`` times the rows (weak scaling); None: cannot."""
        return None


class DigitsSource(SourceSpec):
    """scikit-learn's bundled handwritten digits: 1,797 images of 8x8 pixels, 10 classes."""

    type: Literal["sklearn:digits"]
    task: ClassVar[Task] = "classification"


class _SyntheticSource(SourceSpec):
    """Generated in chunks of rows from (seed, chunk index): the data does not depend on how
    many workers made it."""

    n_samples: int = Field(10_000, ge=1, description="Number of rows.")
    n_features: int = Field(20, ge=1, description="Number of features.")
    seed: int = Field(0, description="Seed of the generator.")

    def grown(self, factor: int) -> SourceSpec | None:
        return self.model_copy(update={"n_samples": self.n_samples * factor})


class SyntheticClassificationSource(_SyntheticSource):
    """Gaussian clusters, one or more per class; generated in chunks, fine for millions of rows."""

    type: Literal["synthetic:classification"]
    task: ClassVar[Task] = "classification"
    n_classes: int = Field(2, ge=2, description="Number of classes.")
    class_sep: float = Field(1.0, gt=0, description="Distance scale between class centres.")
    noise: float = Field(1.0, gt=0, description="Standard deviation of the within-class noise.")


class SyntheticRegressionSource(_SyntheticSource):
    """A random linear function of the features plus Gaussian noise."""

    type: Literal["synthetic:regression"]
    noise: float = Field(0.1, ge=0, description="Standard deviation of the target noise.")
    task: ClassVar[Task] = "regression"


class ClicksSource(SourceSpec):
    """A synthetic click log: categorical columns c0.. (ids as text, power-law frequent),
    dense columns d0.., a 0/1 label from a hidden model (AUC has a known ceiling)."""

    type: Literal["synthetic:clicks"]
    task: ClassVar[Task] = "classification"
    n_samples: int = Field(10_000, ge=1, description="Number of rows.")
    cardinalities: list[int] = Field(
        [100_000, 10_000, 1_000], min_length=1, description="Distinct values of each "
        "categorical column (its ids are in [0, cardinality)).")
    num_dense: int = Field(4, ge=0, description="Number of dense (numeric) columns.")
    alpha: float = Field(1.1, gt=0, description="Power-law exponent of the categorical "
                         "values' frequencies (P(rank r) ~ (r+1)^-alpha).")
    seed: int = Field(0, description="Seed of the generator.")

    def grown(self, factor: int) -> SourceSpec | None:
        return self.model_copy(update={"n_samples": self.n_samples * factor})


class TextSource(SourceSpec):
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
    task: ClassVar[Task] = "language_modeling"

    @field_validator("paths", mode="before")
    @classmethod
    def _relative_to_config(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, list):
            return value
        for v in value:
            if isinstance(v, str):
                check_path_text(v)
        return [
            v if not isinstance(v, str) or v.startswith("stdlib:") else str(resolve_path(v, info))
            for v in value
        ]


class FileSource(SourceSpec):
    """A CSV or Parquet file, or a folder of them, with one label column."""

    type: Literal["file"] = "file"
    path: str | Path = Field(
        union_mode="left_to_right", description="CSV/Parquet file or folder (relative to the "
        "config file), or a storage URL: s3://bucket/prefix/ or s3://bucket/prefix/*.parquet.")
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
        if isinstance(value, str) and as_url(value):
            return as_url(value)
        return resolve_path(value, info) if isinstance(value, str | Path) else value


SOURCES = TaggedUnion(
    [DigitsSource, SyntheticClassificationSource, SyntheticRegressionSource, ClicksSource,
     TextSource, FileSource],
    default="file", what="source", hint=" (or give a path to a CSV/Parquet file or folder)")
Source = SOURCES.annotation


class SplitConfig(Strict):
    """Fractions of the rows in each split; they must add up to 1."""

    train: float = Field(0.7, gt=0, lt=1, description="Fraction for training.")
    val: float = Field(0.15, gt=0, lt=1, description="Fraction for validation (selection).")
    test: float = Field(0.15, gt=0, lt=1, description="Fraction for the final test.")
    unlabelled: float = Field(
        0.0, ge=0, lt=1, description="Fraction whose labels are dropped at ingestion (written "
        "as -1): a transfer set for distilled students (distill.transfer), unseen by every "
        "other candidate.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test + self.unlabelled
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(
                f"train + val + test{' + unlabelled' if self.unlabelled else ''} = "
                f"{total:g}; the fractions must add up to 1 (e.g. 0.7, 0.15, 0.15)"
            )
        return self


# ---------------------------------------------------------------------------------------------
# feature transforms: fitted and applied by the data layer's transform table, keyed by `type`


class _ColumnsTransform(Strict):
    columns: list[str] | None = Field(None, description="Columns; default: every numeric one.")


class StandardizeSpec(_ColumnsTransform):
    """(x - mean) / std per column, statistics fitted on the training split."""

    type: Literal["standardize"]


class MinMaxSpec(_ColumnsTransform):
    """(x - min) / (max - min) per column, fitted on the training split."""

    type: Literal["minmax"]


class ImputeSpec(_ColumnsTransform):
    """Replace missing values (NaN) by the training mean or a constant."""

    type: Literal["impute"]
    strategy: Literal["mean", "constant"] = Field("mean", description="mean or constant.")
    value: float = Field(0.0, description="The constant, for strategy: constant.")


class ClipSpec(_ColumnsTransform):
    """Clip values into [min, max]."""

    type: Literal["clip"]
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


class HashSpec(Strict):
    """Categorical columns -> their hashed ids in [0, buckets), in place (the text of a
    value is hashed: a number is hashed as its integer text, so 42 and "42" agree)."""

    type: Literal["hash"]
    columns: list[str] = Field(min_length=1, description="Categorical columns to hash.")
    buckets: list[int] = Field(
        min_length=1, description="Ids per column (one number for all, or one per column): "
        "a click model's table sizes (cardinalities).")

    @field_validator("buckets", mode="before")
    @classmethod
    def _one_for_all(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @model_validator(mode="after")
    def _one_per_column(self) -> HashSpec:
        if len(self.buckets) == 1:
            self.buckets = self.buckets * len(self.columns)
        if len(self.buckets) != len(self.columns) or not 0 < min(self.buckets) \
                <= max(self.buckets) <= 1 << 24:
            raise ValueError(f"hash buckets={self.buckets} for columns={self.columns}: give "
                             "one number in [1, 2^24] (ids travel as float32), or one per column")
        return self


class UserTransformSpec(Strict):
    """A user function 'module:function' (or 'file.py:function') taking and returning a dict
    of column name -> numpy array; it runs on every partition."""

    type: str = Field(pattern=IMPORT_PATH_PATTERN, description="Import path of the function.")

    @field_validator("type", mode="before")
    @classmethod
    def _file_relative_to_config(cls, value: Any, info: ValidationInfo) -> Any:
        return relative_import_path(value, info)


TRANSFORMS = TaggedUnion(
    [StandardizeSpec, MinMaxSpec, ImputeSpec, ClipSpec, OneHotSpec, HashSpec],
    user=UserTransformSpec, what="transform", hint=", or 'module:function' for a user function")
TransformSpec = TRANSFORMS.annotation


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
        None, pattern=IMPORT_PATH_PATTERN, description="Optional 'module:function' applied "
        "to each batch (x, y) of numpy arrays, returning (x, y); runs in the threads."
    )


class DataConfig(Strict):
    """Where the data comes from and how it is prepared."""

    source: Source = Field(
        description="'sklearn:digits', 'synthetic:classification', 'synthetic:regression', "
        "'synthetic:clicks', "
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
        "the artifact: standardize, minmax, impute, clip, onehot, hash, or 'module:function'. "
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
            return {"type": value} if value in SOURCES.names else {"type": "file", "path": value}
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
        return self.source.task
