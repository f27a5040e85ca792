"""A user function 'module:function' (or 'file.py:function') as a transform: it takes and
returns a dict of column name -> numpy array, and runs on every partition."""

from __future__ import annotations

from typing import Any

from distml.data.transforms.base import Columns, Transform
from distml.imports import load_object


class UserFunction(Transform):
    """Nothing to fit; the parameters are only the function's import path (its ``type``)."""

    def needs_fit(self, spec: Any) -> bool:
        return False

    def apply(self, p: dict[str, Any], cols: Columns) -> Columns:
        return load_object(p["type"], what="transform")(cols)
