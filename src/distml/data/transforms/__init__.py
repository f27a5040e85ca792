"""Feature transforms over columns, fitted on the training split. See ``base``; each kind is
a module here, named in ``base.TRANSFORMS``."""

from __future__ import annotations

from distml.data.transforms.base import (
    TRANSFORMS,
    Columns,
    Transform,
    apply,
    encodes,
    fills_nan,
    is_numeric,
    matrix_form,
    merge,
    needs_fit,
    partial_stats,
    to_matrix,
    unfitted_params,
)

__all__ = ["TRANSFORMS", "Columns", "Transform", "apply", "encodes", "fills_nan", "is_numeric",
           "matrix_form", "merge", "needs_fit", "partial_stats", "to_matrix", "unfitted_params"]
