"""``distml monitor`` at 10^5 and 10^6 rows: fresh rows of the training distribution name no
column (continuous, discrete and categorical alike), and a quarter-standard-deviation shift
of one column names that column alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.cli import distml
from tests.helpers.configs import write_config

COLORS = np.array(["red", "green", "blue"], dtype=object)


def rows(n: int, seed: int) -> dict[str, np.ndarray]:
    """Two continuous columns, a discrete one (5 values) and a categorical one; the label
    depends on all of them."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0, 1, n), rng.normal(5, 3, n)
    k = rng.integers(0, 5, n).astype(np.float64)
    color = rng.choice(COLORS, n, p=[0.5, 0.3, 0.2])
    score = a + (b - 5) / 3 + (k - 2) / 2 + (color == "red") - 0.5 + rng.normal(0, 0.5, n)
    return {"a": a.astype(np.float32), "b": b.astype(np.float32), "k": k.astype(np.float32),
            "color": color, "label": (score > 0).astype(np.int64)}


def write(path: Path, table: dict[str, np.ndarray]) -> Path:
    pq.write_table(pa.table(table), path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("drift-scale")
    source = write(root / "train.parquet", rows(6000, seed=0))
    raw = {"name": "scale", "seed": 0, "output_dir": str(root / "runs"),
           "registry": str(root / "registry"),
           "data": {"source": str(source), "transforms": [
               {"type": "onehot", "columns": ["color"]}, "standardize"]},
           "train": {"epochs": 3, "batch_size": 128, "lr": 0.01, "candidates": [
               {"name": "mlp", "model": {"type": "mlp", "hidden_sizes": [16]}}]},
           "monitor": {"tensorboard": False, "system_metrics_interval_s": None}}
    distml("run", str(write_config(root / "scale.yaml", raw)), "-q", cwd=root)
    return root


def monitor(root: Path, file: Path) -> dict:
    out = root / f"{file.stem}.json"
    distml("monitor", "scale", "--input", str(file), "--json", str(out), "--out",
           str(root / f"{file.stem}-report"), "--registry", "registry", cwd=root)
    return json.loads(out.read_text())


@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_fresh_rows_of_the_training_distribution_name_no_column(trained, n):
    report = monitor(trained, write(trained / f"fresh-{n}.parquet", rows(n, seed=n)))
    assert report["rows"] == n
    assert report["drifted_features"] == []
    kinds = {c["column"]: c["test"] for c in report["columns"]}
    assert kinds == {"a": "ks", "b": "ks", "k": "chi2", "color": "chi2"}
    assert max(c["effect"] for c in report["columns"]) < 0.05
    assert report["prediction"]["drifted"] is False
    assert report["concept_drift"] is False


def test_a_quarter_standard_deviation_shift_of_one_column_names_it_alone(trained):
    table = rows(100_000, seed=7)
    table["b"] = table["b"] + 0.25 * 3  # b's standard deviation is 3
    report = monitor(trained, write(trained / "shifted.parquet", table))
    assert report["drifted_features"] == ["b"]
    [b] = [c for c in report["columns"] if c["column"] == "b"]
    assert b["effect"] == pytest.approx(0.25, abs=0.03)
