"""The same work on every executor engine: local processes, a Dask cluster and Ray give
byte-identical ingestion and batch predictions (on this machine; tests/multihost runs them
across hosts). Dask and Ray are dev dependencies: a broken install fails here, loudly."""

from __future__ import annotations

from pathlib import Path

import distributed  # noqa: F401 - required: make test installs it
import pyarrow.parquet as pq
import pytest
import ray  # noqa: F401 - required: make test installs it

from tests.helpers.cli import distml, distml_on_ray


@pytest.mark.parametrize("engine", ["dask://local", "ray://local"])
def test_predict_on_an_engine_equals_local(trained_digits: Path, tmp_path, engine):
    outputs = {}
    for executor in ("local", engine):
        out = tmp_path / f"{executor.split(':')[0]}.parquet"
        run = distml_on_ray if executor.startswith("ray") else distml
        run("predict", "tiny", "--input", str(trained_digits / "digits.parquet"),
               "--output", str(out), "--registry", str(trained_digits / "registry"),
               "--id-column", "key", "--executor", executor, "--workers", "2",
               cwd=tmp_path)
        outputs[executor] = pq.read_table(out)
    local, other = outputs.values()
    assert local.num_rows == 1797
    assert local.equals(other)
    assert local.column_names == ["key", "probabilities", "label"]
