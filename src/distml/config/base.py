"""What every config section shares: the strict base model, path resolution, tasks and their
metrics, and the tagged unions that users extend with 'module:name' paths.

Nothing here imports torch: the config loads (and errors are reported) before any heavy import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationInfo

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

# Names that become one path component (pipeline, candidate, registry model and alias names):
# no '/', no leading '.', no NUL, and short enough for any file system (255 bytes a component).
MAX_NAME_LENGTH = 100
NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME_LENGTH - 1}}}$"  # ASCII: bytes = chars
NAME_RULE = (f"1-{MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or "
             "digit (it becomes a folder name)")
MAX_PATH_LENGTH = 4096  # PATH_MAX on Linux
IMPORT_PATH_PATTERN = r"^.+:[A-Za-z_]\w*$"  # 'package.module:name' or 'file.py:name'


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_path_text(value: str | Path) -> str:
    """A path's text, refused (ValueError naming it) when no file system could hold it: a NUL
    byte, or longer than PATH_MAX or NAME_MAX; otherwise an OS error surfaces deep inside."""
    text = str(value)
    shown = repr(text) if len(text) <= 80 else f"{text[:60]!r}... ({len(text)} characters)"
    if "\0" in text:
        raise ValueError(f"path {shown} contains a NUL byte; give a plain file path")
    if len(os.fsencode(text)) > MAX_PATH_LENGTH or any(
            len(os.fsencode(part)) > 255 for part in text.split("/")):
        raise ValueError(f"path {shown} is too long (at most {MAX_PATH_LENGTH} bytes, and 255 "
                         "bytes per folder or file name)")
    return text


def safe_path(value: Any) -> Any:
    """A ``mode='before'`` validator for Path fields: see ``check_path_text``."""
    return Path(check_path_text(value)) if isinstance(value, str | Path) else value


def resolve_path(value: str | Path, info: ValidationInfo) -> Path:
    """Relative paths in the config are relative to the config file's folder."""
    path = Path(check_path_text(value)).expanduser()
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else Path(base) / path


def relative_import_path(value: Any, info: ValidationInfo) -> Any:
    """'path/to/file.py:name' is relative to the config file; 'module:name' stays."""
    if isinstance(value, str):
        check_path_text(value)
    if isinstance(value, str) and ".py:" in value:
        file, name = value.rsplit(":", 1)
        return f"{resolve_path(file, info)}:{name}"
    return value


def type_name(cls: type[BaseModel]) -> str:
    """The ``type`` a spec class answers to (its ``type: Literal[...]`` field)."""
    return get_args(cls.model_fields["type"].annotation)[0]


class TaggedUnion:
    """A discriminated union of spec classes keyed by their ``type``, where an unknown type
    containing ':' selects the ``user`` class ('module:name'). The known names are derived from
    the classes, so adding a kind is adding its class to the list."""

    def __init__(self, members: list[type[BaseModel]], *, user: type[BaseModel] | None = None,
                 default: str | None = None, what: str, hint: str) -> None:
        self.members = members
        self.user = user
        self.names = tuple(type_name(m) for m in members)
        self.default = default  # the type of a mapping without one
        known = ", ".join(self.names)
        tags = [Annotated[m, Tag(n)] for m, n in zip(members, self.names, strict=True)]
        if user is not None:
            tags.append(Annotated[user, Tag("user")])
        self.annotation = Annotated[
            Union[tuple(tags)],  # noqa: UP007 - a runtime-built union needs the old spelling
            Discriminator(self._tag, custom_error_type=f"unknown_{what}",
                          custom_error_message=f"{what} type must be one of {known}{hint}"),
        ]

    def _tag(self, value: Any) -> str | None:
        if isinstance(value, dict):
            kind = value.get("type", self.default)
        else:
            kind = getattr(value, "type", None)
        if not isinstance(kind, str):
            return None
        if kind in self.names:
            return kind
        return "user" if self.user is not None and ":" in kind else None

    @property
    def tags(self) -> set[str]:
        """Every tag pydantic may put into an error's location."""
        return {*self.names, *(("user",) if self.user is not None else ())}
