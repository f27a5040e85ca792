"""Shared fixtures: small real configs written to a temporary folder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from distml.config import Config, parse_config

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "sklearn:digits"},
    "train": {
        "epochs": 2,
        "batch_size": 64,
        "lr": 0.005,
        "candidates": [
            {"name": "small", "model": {"type": "mlp", "hidden_sizes": [16]}},
            {"name": "cnn", "model": {"type": "cnn", "channels": [4], "hidden_size": 16}},
        ],
    },
}


@pytest.fixture
def tiny_raw(tmp_path: Path) -> dict[str, Any]:
    """A small digits pipeline that writes only under tmp_path."""
    raw = copy.deepcopy(TINY)
    raw["output_dir"] = str(tmp_path / "runs")
    raw["registry"] = str(tmp_path / "registry")
    return raw


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_config(raw: dict[str, Any], **kw: Any) -> Config:
    return parse_config(copy.deepcopy(raw), **kw)
