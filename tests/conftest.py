"""Shared fixtures: small real configs written to a temporary folder."""

from __future__ import annotations

import copy
import json
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


def small_lm_config(tmp_path: Path, raw: dict[str, Any]) -> Path:
    """A tiny transformer language model on a local text file (dropout on: verify turns it
    off), written to tmp_path/lm.yaml."""
    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    raw["data"] = {"source": {"type": "text", "paths": ["corpus.txt"], "sequence_length": 32}}
    raw["train"].update(batch_size=16, lr=0.003)
    raw["train"]["candidates"] = [{"name": "gpt", "model": {
        "type": "transformer", "num_layers": 2, "num_heads": 2, "dim": 32, "dropout": 0.1}}]
    return write_config(tmp_path / "lm.yaml", raw)


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory) -> Path:
    """A folder with a small digits model registered as 'tiny' (registry/) and the raw
    digits rows as digits.parquet (row groups of 400 rows, a 'key' and a 'label' column):
    trained once per test session and shared by every test that needs a model."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    from tests.e2e.test_cli import distml

    root = tmp_path_factory.mktemp("trained-digits")
    raw = {**TINY, "output_dir": str(root / "runs"), "registry": str(root / "registry")}
    raw["train"] = {**TINY["train"], "candidates": TINY["train"]["candidates"][:1]}
    distml("run", str(write_config(root / "c.yaml", raw)), "-q", cwd=root)
    columns = json.loads((root / "registry" / "tiny" / "v1" / "spec.json").read_text())[
        "input_columns"]
    digits = load_digits()
    table = pa.table({**{c: digits.data[:, j].astype(np.float32)
                         for j, c in enumerate(columns)},
                      "key": np.arange(len(digits.data)) * 10, "label": digits.target})
    pq.write_table(table, root / "digits.parquet", row_group_size=400)
    return root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test`` runs two workers), tests that share something
    machine-wide run on one worker, one after another: the multi-host tests (one pair of
    network namespaces) and the tests that start a Ray cluster (one at a time)."""
    for item in items:
        if item.get_closest_marker("multihost"):
            item.add_marker(pytest.mark.xdist_group("multihost"))
        elif "ray" in item.nodeid.lower():
            item.add_marker(pytest.mark.xdist_group("ray"))
