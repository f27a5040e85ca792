"""A whole pipeline's config: the ``Config`` model, reading a YAML file, ``--set`` overrides,
and validation errors worded for users (the key path as they wrote it, the value, a fix)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from distml.config.base import NAME_PATTERN, NAME_RULE, TASK_METRICS, Strict, safe_path
from distml.config.data import SOURCES, TRANSFORMS, DataConfig
from distml.config.distill import check_teachers
from distml.config.models import MODELS
from distml.config.sections import ExecutionConfig, MonitorConfig, SelectConfig, ServeConfig
from distml.config.train import TrainConfig
from distml.errors import ConfigError
from distml.storage import as_url, local_path, remote_of


class Config(Strict):
    """A whole distml pipeline."""

    name: str = Field(pattern=NAME_PATTERN, description="Pipeline name.")
    seed: int = Field(0, description="Seed of splits, initial weights, shuffling and dropout.")
    output_dir: Path = Field(Path("runs"), description="Runs go to <output_dir>/<name>/<time>/; "
                             "a folder or a storage URL (s3://bucket/prefix), whose runs are "
                             "worked on in a local mirror and published to it.")
    registry: Path = Field(Path("registry"), description="Model registry: a folder or a storage "
                           "URL (s3://bucket/prefix).")
    data: DataConfig
    train: TrainConfig
    select: SelectConfig = Field(default_factory=SelectConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @field_validator("output_dir", "registry", mode="before")
    @classmethod
    def _location(cls, value: Any) -> Any:
        """A folder, or a storage URL as its local mirror (``to_dict`` gives the URL back)."""
        return local_path(value) if as_url(str(value)) else safe_path(value)

    @model_validator(mode="after")
    def _metric_fits_task(self) -> Config:
        allowed = TASK_METRICS[self.data.task]
        if self.select.metric is not None and self.select.metric not in allowed:
            raise ValueError(
                f"select.metric={self.select.metric!r} cannot be computed for a "
                f"{self.data.task} task; use one of: {', '.join(allowed)}"
            )
        check_teachers(self.train.candidates, task=self.data.task)
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
        for key in ("output_dir", "registry"):
            data[key] = remote_of(data[key]) or data[key]
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


_TAGS = SOURCES.tags | MODELS.tags | TRANSFORMS.tags


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


def _short(value: Any) -> str:
    """A value as the user wrote it, cut short: a hostile 1 MB name is not echoed whole."""
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:80]}... ({len(text)} characters)"


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = _format_loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `distml --help` and README list the keys)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e.get("ctx", {}).get("pattern") == NAME_PATTERN:
            msg = f"not a valid name: use {NAME_RULE}"
        value = e.get("input")
        if e["type"].startswith("unknown_") and isinstance(value, dict):
            where, value = f"{where}.type", value.get("type")
        shown = "" if e["type"] == "missing" or isinstance(value, dict) else f" = {_short(value)}"
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
