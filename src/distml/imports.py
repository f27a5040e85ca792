"""Load user code named by an import path: 'package.module:name' or 'path/to/file.py:name'."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distml.errors import ConfigError


def load_object(path: str, *, what: str) -> Callable[..., Any]:
    """The callable at ``path``; ``what`` names it in errors (e.g. 'model type')."""
    module_name, _, attr = path.rpartition(":")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise FileNotFoundError(f"no file {file}")
            name = "distml_user_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, file)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        obj = getattr(module, attr)
    except (ImportError, AttributeError, FileNotFoundError) as e:
        raise ConfigError(f"{what} {path!r} cannot be loaded: {e}") from None
    if not callable(obj):
        raise ConfigError(f"{what} {path!r} is not callable")
    return obj
