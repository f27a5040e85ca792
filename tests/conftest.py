"""Shared fixtures: a tiny config in a temporary folder, and one trained digits model per
session; the helpers they use live in tests/helpers/."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.cli import distml
from tests.helpers.configs import TINY, write_config

# One thread per process (this one and every process the tests start): three xdist workers
# share two cores, and OpenMP threads over more threads than cores spin against each other
# (measured: the digits main job's CPU 16.8 s -> 12.0 s). Set it to run the suite otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def tiny_raw(tmp_path: Path) -> dict[str, Any]:
    """A small digits pipeline that writes only under tmp_path."""
    raw = copy.deepcopy(TINY)
    raw["output_dir"] = str(tmp_path / "runs")
    raw["registry"] = str(tmp_path / "registry")
    return raw


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory) -> Path:
    """A folder with a small digits model registered as 'tiny' (registry/) and the raw
    digits rows as digits.parquet (row groups of 400 rows, a 'key' and a 'label' column):
    trained once per test session and shared by every test that needs a model."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

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


def _uses_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(
        d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test`` runs three workers), tests that share something
    machine-wide run on one worker, one after another: the multi-host tests (one pair of
    network namespaces) and the tests that start a Ray cluster (one at a time). So do the
    tests of a module with a module-scoped fixture (a server, a trained run): split over
    both workers, each worker would set it up again."""
    for item in items:
        if item.get_closest_marker("multihost"):
            item.add_marker(pytest.mark.xdist_group("multihost"))
        elif "ray" in item.nodeid.lower():
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif _uses_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
