"""Fixtures the serving tests share: one trained digits model in a registry per session."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from tests.conftest import TINY, write_config
from tests.e2e.test_cli import distml


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A digits model in a registry (tiny:1, alias production), and the raw digits rows, also
    as Parquet (digits.parquet, with a key column)."""
    root = tmp_path_factory.mktemp("serving")
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
    return root, digits.data.astype(np.float32)


@pytest.fixture(scope="session")
def predicted(trained, tmp_path_factory):
    """``distml predict`` over every digits row: (probabilities (N, 10), labels)."""
    root, _ = trained
    out = tmp_path_factory.mktemp("predicted") / "pred.parquet"
    distml("predict", "tiny", "--input", str(root / "digits.parquet"), "--output", str(out),
           "--registry", str(root / "registry"), "--id-column", "key", cwd=root)
    pred = pq.read_table(out)
    return (np.stack(pred["probabilities"].to_numpy(zero_copy_only=False)),
            np.asarray(pred["label"].to_pylist()), pred)
