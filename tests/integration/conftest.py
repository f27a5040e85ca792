"""Fixtures the serving tests share: one trained digits model in a registry per session,
its predictions, and one server with two replicas."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from tests.helpers.cli import distml
from tests.helpers.serving import running_server


@pytest.fixture(scope="session")
def trained(trained_digits):
    """The session's digits model (tests/conftest.py's trained_digits: tiny:1, alias
    production, and digits.parquet with a key column), and the raw digits rows."""
    return trained_digits, load_digits().data.astype(np.float32)


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


@pytest.fixture(scope="session")
def replica_server(trained):
    """(url, output lines) of ``distml serve`` with two replicas and gRPC on, for the tests
    that only send it requests (tests that stop or kill a part start their own)."""
    root, _ = trained
    with running_server("--registry", str(root / "registry"), "--replicas", "2",
                        "--grpc-port", "0", cwd=root) as (url, _, lines):
        yield url, lines
