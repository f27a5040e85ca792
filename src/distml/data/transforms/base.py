"""What every feature transform does, the table of transforms by name, and the steps that
ingestion, serving and monitoring call (which look the kind up in the table).

Fitting is parallel: ``partial_stats`` runs per partition and ``merge`` combines the parts
exactly, so the result equals statistics of the whole table. Fitted parameters are plain
JSON; they travel in the manifest and the model artifact, so serving applies exactly the
preprocessing that training saw. ``TRANSFORMS`` names each kind's implementation by import
path, so this module imports none of them; a user's 'module:function' is the ``user`` kind.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from distml.imports import load_object

Columns = dict[str, np.ndarray]
Block = Callable[[np.ndarray], np.ndarray]

# The config's ``data.transforms[].type`` -> import path of its Transform class.
TRANSFORMS: dict[str, str] = {
    "standardize": "distml.data.transforms.scaling:Standardize",
    "minmax": "distml.data.transforms.scaling:MinMax",
    "impute": "distml.data.transforms.impute:Impute",
    "clip": "distml.data.transforms.clip:Clip",
    "onehot": "distml.data.transforms.onehot:OneHot",
    "hash": "distml.data.transforms.hashing:Hash",
    "user": "distml.data.transforms.user:UserFunction",
}


class Transform:
    """One kind of transform. Stateless: the config's spec says what to fit, the fitted
    parameters (JSON, with the ``type``) say what to apply."""

    def needs_fit(self, spec: Any) -> bool:
        """Whether it needs statistics of the training split."""
        return True

    def partial_stats(self, spec: Any, names: list[str], column: Any) -> dict[str, Any]:
        """Sufficient statistics of one partition; ``column(name)`` gives its values."""
        raise NotImplementedError

    def merge(self, columns: list[str], parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The fitted JSON parameters from every partition's statistics."""
        raise NotImplementedError

    def params(self, spec: Any) -> dict[str, Any]:
        """The JSON parameters of a transform that needs no statistics."""
        return {"type": spec.type}

    def fills_nan(self, spec: Any) -> list[str] | None:
        """Columns whose NaN it replaces, so validation lets them through (None: all)."""
        return []

    def encodes(self, spec: Any) -> list[str]:
        """Categorical columns it turns into numbers, so validation lets them through."""
        return []

    def apply(self, p: dict[str, Any], cols: Columns) -> Columns:
        """New columns with the transform applied (``cols`` is not modified)."""
        raise NotImplementedError


class ColumnTransform(Transform):
    """A transform of each numeric column by itself (``columns`` null: every numeric one)."""

    def apply(self, p: dict[str, Any], cols: Columns) -> Columns:
        out = dict(cols)
        names = p["columns"] or [n for n, v in out.items() if is_numeric(v)]
        for j, name in enumerate(names):
            out[name] = self.apply_column(p, j, out[name].astype(np.float32, copy=False))
        return out

    def apply_column(self, p: dict[str, Any], j: int, x: np.ndarray) -> np.ndarray:
        """Column ``j`` of ``p["columns"]``, float32 in and out."""
        raise NotImplementedError

    def block(self, p: dict[str, Any]) -> Block:
        """The transform of the (N, k) float32 block of its k columns at once, elementwise as
        ``apply_column`` (a kind overrides it with one vectorised expression)."""
        return lambda x: np.column_stack([self.apply_column(p, j, x[:, j])
                                          for j in range(x.shape[1])])


@functools.cache
def implementation(kind: str) -> Transform:
    """The Transform of a spec's (or fitted parameters') ``type``."""
    tag = "user" if ":" in kind else kind
    return load_object(TRANSFORMS[tag], what="transform")()


def is_numeric(values: np.ndarray) -> bool:
    return values.dtype.kind in "fiu"


def needs_fit(spec: Any) -> bool:
    return implementation(spec.type).needs_fit(spec)


def fills_nan(spec: Any) -> list[str] | None:
    return implementation(spec.type).fills_nan(spec)


def encodes(spec: Any) -> list[str]:
    return implementation(spec.type).encodes(spec)


def _targets(spec: Any, cols: Columns) -> list[str]:
    names = spec.columns if getattr(spec, "columns", None) else [
        n for n, v in cols.items() if is_numeric(v)]
    missing = [n for n in names if n not in cols]
    if missing:
        raise ValueError(f"transform {spec.type}: columns {missing} do not exist; "
                         f"columns: {list(cols)}")
    return list(names)


def column_stats(names: list[str], column: Any) -> np.ndarray:
    """(len(names), 5) float64: count, sum, M2, min and max of each column, NaN ignored."""
    return np.array([_column_stats(column(n).astype(np.float32, copy=False)) for n in names],
                    dtype=np.float64).reshape(len(names), 5)


def _column_stats(values: np.ndarray) -> tuple[int, float, float, float, float]:
    """(count, sum, M2, min, max) of one column in float64, NaN ignored.

    Column by column keeps the temporaries in cache; sums accumulate in float64.
    """
    nan = np.isnan(values)
    if nan.any():
        values = values[~nan]
    if len(values) == 0:
        return 0, 0.0, 0.0, np.inf, -np.inf
    total = float(values.sum(dtype=np.float64))
    dev = values.astype(np.float64) - total / len(values)
    m2 = float(np.square(dev, out=dev).sum())  # not np.dot: BLAS threads would oversubscribe
    return len(values), total, m2, float(values.min()), float(values.max())


def partial_stats(spec: Any, cols: Columns, rows: np.ndarray | None = None) -> dict[str, Any]:
    """Sufficient statistics of one partition's ``rows`` (default: all; NaN ignored)."""
    names = _targets(spec, cols)

    def column(name: str) -> np.ndarray:  # gathered one column at a time: stays in cache
        return cols[name] if rows is None else cols[name][rows]

    return implementation(spec.type).partial_stats(spec, names, column)


def merge(spec: Any, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine partial statistics into the transform's JSON parameters."""
    return implementation(spec.type).merge(parts[0]["columns"], parts)


def unfitted_params(spec: Any) -> dict[str, Any]:
    """Parameters of a transform that needs no statistics (columns None: every numeric one)."""
    return implementation(spec.type).params(spec)


def apply(params: list[dict[str, Any]], cols: Columns) -> Columns:
    """Apply fitted transforms in order; returns new columns (the input is not modified)."""
    out = dict(cols)
    for p in params:
        out = implementation(p["type"]).apply(p, out)
    return out


def matrix_form(params: list[dict[str, Any]], names: list[str]) -> Block | None:
    """The fitted transforms as one function of the (N, C) float32 matrix of the columns
    ``names`` in order, equal to ``to_matrix(apply(params, columns))``, when every step is a
    column transform (the columns stay as they are); None when one is not (one-hot, hashing
    and user functions change the columns: use ``apply``). A request of a few rows then
    costs a few array operations, not a few per column."""
    steps: list[tuple[np.ndarray | None, Block]] = []
    for p in params:
        kind = implementation(p["type"])
        if not isinstance(kind, ColumnTransform):
            return None
        columns = p["columns"] or names  # none named: every (numeric) column
        if not set(columns) <= set(names):
            return None
        index = None if columns == names else np.array([names.index(c) for c in columns])
        steps.append((index, kind.block(p)))

    def run(x: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float32)  # a copy: the caller's array is not modified
        if x.ndim != 2 or x.shape[1] != len(names):
            raise ValueError(f"inputs of shape {x.shape}; expected (rows, {len(names)}): "
                             f"the columns {names}")
        for index, block in steps:
            if index is None:
                x = block(x)
            else:
                x[:, index] = block(x[:, index])
        return x

    return run


def to_matrix(cols: Columns) -> np.ndarray:
    """Columns -> (N, F) float32, in column order."""
    return np.column_stack([v.astype(np.float32, copy=False) for v in cols.values()])
