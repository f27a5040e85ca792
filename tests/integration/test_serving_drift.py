"""Drift monitoring inside ``distml serve``: the session's digits model served, its test
split's rows sent as they are, with three pixel columns shifted, and with wrong labels fed
back; the drift route and the Prometheus gauges must tell them apart."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_digits

from distml.serving.drift import QUEUE_BATCHES, ServingMonitor, row_ids
from distml.serving.metrics import Metrics
from distml.serving.model import load_served_model
from tests.helpers.serving import running_server

SHIFTED = ["pixel_2_3", "pixel_4_4", "pixel_5_5"]
ROWS_PER_REQUEST = 10


@pytest.fixture(scope="module")
def test_split(trained):
    """The served model's test rows (raw), their labels, and its input column names."""
    root, _ = trained
    spec = json.loads((root / "registry" / "tiny" / "v1" / "spec.json").read_text())
    data = Path(spec["data_dir"])
    manifest = json.loads((data / "manifest.json").read_text())
    ids = np.concatenate([pq.read_table(data / p["path"], columns=["row_id"])["row_id"]
                          .to_numpy() for p in manifest["splits"]["test"]["partitions"]])
    bunch = load_digits()
    return bunch.data[ids].astype(np.float32), bunch.target[ids], list(spec["input_columns"])


@pytest.fixture(scope="module")
def server(trained):
    root, _ = trained
    with running_server("tiny", "--registry", str(root / "registry"),
                        "--monitor-interval-s", "0.2", cwd=root) as (url, _, _):
        yield url


def _send(client: httpx.Client, url: str, x: np.ndarray, tag: str) -> list[str]:
    """Every row, ROWS_PER_REQUEST at a time, each request with an id; the rows' ids."""
    ids = []
    for k in range(0, len(x), ROWS_PER_REQUEST):
        rows = x[k:k + ROWS_PER_REQUEST]
        r = client.post(f"{url}/v2/models/tiny/infer", json={"id": f"{tag}-{k}", "inputs": [
            {"name": "input", "datatype": "FP32", "shape": list(rows.shape),
             "data": rows.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        assert r.json()["id"] == f"{tag}-{k}"
        ids += row_ids(f"{tag}-{k}", len(rows))
    return ids


def _report(client: httpx.Client, url: str, rows: int, labelled: int = 0) -> dict:
    """The drift report once the monitor has taken in ``rows`` rows and ``labelled`` labels
    (it works off the request path, so it may lag the responses a little)."""
    deadline = time.monotonic() + 20
    while True:
        report = client.get(f"{url}/v2/models/tiny/drift").json()
        got = (report["supervised"] or {}).get("labels", 0)
        if report["rows"] >= rows and got >= labelled and report["queued"] == 0:
            return report
        assert time.monotonic() < deadline, report
        time.sleep(0.1)


def _gauges(client: httpx.Client, url: str) -> dict[str, float]:
    """distml_drift_alarm by kind, after the monitor published the last report."""
    time.sleep(0.5)  # > the publishing interval (0.2 s)
    text = client.get(f"{url}/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'distml_drift_alarm\{kind="(\w+)",model="tiny"\} (\S+)', text)}


def _fresh_monitor(client: httpx.Client, url: str) -> None:
    """Unload and load: a new monitor with an empty window (as after a hot reload)."""
    assert client.post(f"{url}/v2/repository/models/tiny/unload").status_code == 200
    assert client.post(f"{url}/v2/repository/models/tiny/load").status_code == 200


def test_served_traffic_as_trained_shows_no_drift_and_true_labels_raise_nothing(
        server, test_split):
    x, y, _ = test_split
    with httpx.Client(timeout=30) as c:
        _fresh_monitor(c, server)
        ids = _send(c, server, x, "same")
        r = c.post(f"{server}/v2/models/tiny/feedback", json={"ids": ids,
                                                            "labels": y.tolist()})
        assert r.status_code == 202
        assert r.json() == {"accepted": len(ids)}
        report = _report(c, server, len(x), labelled=len(x))
        assert report["drifted_features"] == []
        assert report["concept_drift"] is False
        assert report["supervised"]["alarms"] == []
        assert report["supervised"]["labels"] == len(x)  # every id matched its prediction
        assert _gauges(c, server) == {"data": 0, "concept": 0, "supervised": 0}


def test_shifted_columns_are_named_by_the_drift_route_and_raise_the_data_alarm(
        server, test_split):
    x, _, columns = test_split
    shifted = x.copy()
    for name in SHIFTED:
        j = columns.index(name)
        shifted[:, j] = np.minimum(shifted[:, j] + 6, 16)
    with httpx.Client(timeout=30) as c:
        _fresh_monitor(c, server)
        _send(c, server, shifted, "shifted")
        report = _report(c, server, len(x))
        assert sorted(report["drifted_features"]) == SHIFTED
        assert report["rows"] == len(x)  # the new monitor saw only these rows
        assert _gauges(c, server)["data"] == 1


def test_wrong_labels_fed_back_raise_the_supervised_alarm(server, test_split):
    x, y, _ = test_split
    with httpx.Client(timeout=30) as c:
        _fresh_monitor(c, server)
        ids = _send(c, server, x, "relabelled")
        assert c.post(f"{server}/v2/models/tiny/feedback", json={
            "ids": ids, "labels": ((y + 1) % 10).tolist()}).status_code == 202
        report = _report(c, server, len(x), labelled=len(x))
        assert report["supervised"]["alarms"]
        assert report["concept_drift"] is True
        assert report["drifted_features"] == []
        assert _gauges(c, server) == {"data": 0, "concept": 1, "supervised": 1}


@pytest.mark.parametrize("body", [{"ids": ["a"]}, {"ids": ["a"], "labels": [1, 2]},
                                  {"ids": [1], "labels": [1]}, [1, 2]])
def test_malformed_feedback_is_a_400(server, body):
    r = httpx.post(f"{server}/v2/models/tiny/feedback", json=body)
    assert r.status_code == 400
    assert "ids" in r.json()["error"]


def test_a_full_queue_drops_and_counts_without_blocking_the_request(trained, test_split):
    """The monitor's thread not started: nothing drains the queue."""
    root, _ = trained
    x, _, _ = test_split
    model = load_served_model("tiny", registry=root / "registry")
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    monitor = ServingMonitor(model, metrics, interval_s=60)
    outputs = model.infer(x[:1])
    start = time.monotonic()
    for _ in range(QUEUE_BATCHES + 5):
        monitor.observe(x[:1], outputs, None)
    assert time.monotonic() - start < 5  # (a blocking put would never return)
    assert registry.get_sample_value("distml_drift_dropped_total", {"model": "tiny"}) == 5
    assert monitor.feedback(["1"], ["a"]) is False
