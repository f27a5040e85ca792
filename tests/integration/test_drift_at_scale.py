"""``distml monitor`` at 10^5 and 10^6 rows: fresh rows of the training distribution name no
column (continuous, discrete and categorical alike), and a quarter-standard-deviation shift
of one column names that column alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import distml
from tests.helpers.drift import rows, train, write


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("drift-scale")
    train(root)
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
