"""distml: end-to-end distributed machine learning for PyTorch, driven by one YAML file."""

from __future__ import annotations

__version__ = "0.1.0"
