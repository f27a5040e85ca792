"""The YAML spec: pydantic models at the user boundary, loading, and ``--set`` overrides.

One module per section: ``base`` (shared helpers, tasks and metrics), ``data``, ``models``,
``parallel`` and ``train``, ``strategies`` (the strategy table they validate against),
``sections`` (select, execution, serve, monitor) and ``loading``
(the whole config, files and errors). Every field carries a description (``distml`` prints
them in errors and the README documents them). Relative data and model-file paths are
resolved against the config file's folder; ``output_dir`` and ``registry`` against the
working directory. Importing this package does not import torch.
"""

from __future__ import annotations

from distml.config.base import METRIC_HIGHER_IS_BETTER, TASK_METRICS, Strict, Task
from distml.config.data import (
    SOURCES,
    TRANSFORMS,
    ClicksSource,
    ClipSpec,
    DataConfig,
    DigitsSource,
    FileSource,
    HashSpec,
    ImputeSpec,
    LoaderConfig,
    MinMaxSpec,
    OneHotSpec,
    Source,
    SplitConfig,
    StandardizeSpec,
    SyntheticClassificationSource,
    SyntheticRegressionSource,
    TextSource,
    TransformSpec,
    UserTransformSpec,
)
from distml.config.distill import DistillConfig, TransferConfig
from distml.config.loading import (
    Config,
    apply_override,
    format_validation_error,
    load_config,
    parse_config,
)
from distml.config.models import (
    MODELS,
    VOCAB_SIZE,
    ZOO,
    ClickSpec,
    CNNSpec,
    CustomModelSpec,
    MLPSpec,
    ModelSpec,
    TransformerSpec,
)
from distml.config.parallel import (
    FsdpConfig,
    ParallelConfig,
    ParallelDims,
    ParameterServerConfig,
    PipelineConfig,
)
from distml.config.sections import (
    DriftConfig,
    ExecutionConfig,
    MlflowConfig,
    MonitorConfig,
    SelectConfig,
    ServeConfig,
    WatchConfig,
)
from distml.config.train import Candidate, TrainConfig, TrainSettings, deep_merge

__all__ = [
    "METRIC_HIGHER_IS_BETTER", "MODELS", "SOURCES", "TASK_METRICS", "TRANSFORMS", "VOCAB_SIZE",
    "ZOO", "CNNSpec", "Candidate", "ClickSpec", "ClipSpec", "Config", "CustomModelSpec",
    "ClicksSource", "DataConfig", "HashSpec",
    "DigitsSource", "DistillConfig", "DriftConfig", "ExecutionConfig", "FileSource", "FsdpConfig",
    "ImputeSpec", "LoaderConfig",
    "MLPSpec", "MinMaxSpec", "MlflowConfig", "ModelSpec", "MonitorConfig", "OneHotSpec",
    "ParallelConfig", "ParallelDims", "ParameterServerConfig", "PipelineConfig", "SelectConfig",
    "ServeConfig", "Source",
    "SplitConfig", "StandardizeSpec", "Strict", "SyntheticClassificationSource",
    "SyntheticRegressionSource", "Task", "TextSource", "TrainConfig", "TrainSettings",
    "TransferConfig", "TransformSpec", "TransformerSpec", "UserTransformSpec", "WatchConfig",
    "apply_override",
    "deep_merge",
    "format_validation_error", "load_config", "parse_config",
]
