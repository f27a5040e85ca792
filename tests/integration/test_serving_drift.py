"""Drift monitoring in a real ``distml serve``: in-distribution digits, then inverted ones;
feedback labels; a full monitor queue; a hot reload starting a fresh monitor."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from distml.config import ServeConfig
from distml.registry import Registry
from distml.serving.drift_feed import DriftFeed
from distml.serving.metrics import Metrics
from distml.serving.model import load_served_model
from tests.helpers.configs import TINY, write_config
from tests.helpers.serving import infer_body, running_server


def _config(tmp_path, **serve) -> str:
    raw = {**TINY, "serve": {"monitor_interval_s": 0.1, **serve}}
    return str(write_config(tmp_path / "serve.yaml", raw))


def _send(c: httpx.Client, x: np.ndarray, prefix: str, rows: int = 50) -> list[list[str]]:
    """Every row, ``rows`` a request with ids prefix-0, prefix-1, ...; the predicted labels."""
    labels = []
    for k, i in enumerate(range(0, len(x), rows)):
        r = c.post("/v2/models/tiny/infer", json=infer_body(x[i:i + rows], id=f"{prefix}-{k}"))
        assert r.status_code == 200, r.text
        labels.append(next(o["data"] for o in r.json()["outputs"] if o["name"] == "label"))
    return labels


def _gauges(c: httpx.Client) -> dict[tuple, float]:
    """The distml_drift_* samples: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for s in family.samples:
            if s.name.startswith("distml_drift"):
                out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def _alarm(kind: str) -> tuple:
    return "distml_drift_alarm", (("kind", kind), ("model", "tiny"))


def _wait(c: httpx.Client, key: tuple, value: float, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (g := _gauges(c)).get(key) != value and time.monotonic() < deadline:
        time.sleep(0.1)
    assert g.get(key) == value, (key, g)
    return g


@pytest.fixture
def registry(trained, tmp_path):
    root, _ = trained
    shutil.copytree(root / "registry", tmp_path / "registry")
    return Registry(tmp_path / "registry")


def test_drift_shows_after_a_shift_and_feedback_raises_the_supervised_alarm(
        trained, registry, tmp_path):
    _, x = trained
    with running_server("tiny@production", "--registry", str(registry.root), "--config",
                        _config(tmp_path), cwd=tmp_path) as (url, _, _), \
            httpx.Client(base_url=url, timeout=30) as c:
        _send(c, x, "same")
        before = c.get("/v2/models/tiny/drift").json()
        assert before["rows"] == len(x)
        assert before["model_version"] == "1"
        assert before["drifted_features"] == []
        assert before["concept_drift"] is False
        g = _wait(c, ("distml_drift_rows", (("model", "tiny"),)), len(x))
        assert g[_alarm("data")] == 0
        assert g[_alarm("concept")] == 0

        predicted = _send(c, 16 - x, "inverted")  # pixel intensities turned around
        after = c.get("/v2/models/tiny/drift").json()
        assert after["rows"] == 2 * len(x)
        assert len(after["drifted_features"]) > 10
        assert after["label_free"]["drift"] is True  # the margin density moved too
        # the gauges of a report taken after every inverted row (an earlier refresh may
        # have seen only some of them)
        g = _wait(c, ("distml_drift_rows", (("model", "tiny"),)), 2 * len(x))
        assert g[_alarm("data")] == 1
        assert g[_alarm("concept")] == 1
        assert g[_alarm("supervised")] == 0
        assert g["distml_drift_feature_pvalue_min", (("model", "tiny"),)] < 1e-6

        # Labels the model got wrong: the true class is the next one after each prediction.
        wrong = [[str((int(p) + 1) % 10) for p in rows] for rows in predicted]
        ids = [f"inverted-{k}" for k in range(len(predicted))]
        r = c.post("/v2/models/tiny/feedback", json={"ids": ids, "labels": wrong})
        assert r.status_code == 200, r.text
        assert r.json()["matched"] == r.json()["labels"] == len(x)
        supervised = c.get("/v2/models/tiny/drift").json()["supervised"]
        assert supervised["error_rate"] == 1.0
        assert supervised["drift"] is True
        _wait(c, _alarm("supervised"), 1)
        # An unknown id matches nothing; a malformed body names what is wrong.
        assert c.post("/v2/models/tiny/feedback",
                      json={"ids": ["nope"], "labels": ["1"]}).json()["matched"] == 0
        r = c.post("/v2/models/tiny/feedback", json={"ids": ["a"], "labels": []})
        assert r.status_code == 400
        assert "one entry per id" in r.json()["error"]
        assert c.get("/v2/models/other/drift").status_code == 404

        # A promoted version is monitored afresh against its own reference.
        registry.set_alias("tiny", "production",
                           registry.register(registry.get("tiny", 1).path, "tiny").version)
        deadline = time.monotonic() + 15
        while (d := c.get("/v2/models/tiny/drift").json())["model_version"] != "2":
            assert time.monotonic() < deadline, d
            time.sleep(0.1)
        assert d["rows"] == 0
        assert d["drifted_features"] == []
        assert d["supervised"] is None
        g = _wait(c, _alarm("data"), 0)
        assert g[_alarm("supervised")] == 0


def test_a_full_monitor_queue_drops_rows_not_requests(trained, registry, tmp_path):
    _, x = trained
    with running_server("tiny@production", "--registry", str(registry.root), "--config",
                        _config(tmp_path, monitor_queue_rows=4), cwd=tmp_path) as (url, _, _):
        statuses: list[int] = []

        def client(i: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                for k in range(20):
                    rows = x[(i * 20 + k) % 100:][:3]
                    statuses.append(c.post("/v2/models/tiny/infer", json=infer_body(rows)
                                           ).status_code)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with httpx.Client(base_url=url, timeout=30) as c:
            report = c.get("/v2/models/tiny/drift").json()
            dropped = _gauges(c)["distml_drift_dropped_rows_total", (("model", "tiny"),)]
    assert statuses == [200] * 80
    assert report["queue"]["dropped_rows"] == dropped > 0  # 4 clients outpace a 4-row queue
    assert report["rows"] + dropped == 80 * 3  # every row monitored or counted as dropped


def test_monitoring_off_by_config(trained, registry, tmp_path):
    _, x = trained
    with running_server("tiny@production", "--registry", str(registry.root), "--config",
                        _config(tmp_path, monitor=False), cwd=tmp_path) as (url, _, _), \
            httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v2/models/tiny/infer", json=infer_body(x[:2])).status_code == 200
        r = c.get("/v2/models/tiny/drift")
        assert r.status_code == 404
        assert "serve.monitor is false" in r.json()["error"]
        assert "distml_drift_rows{" not in c.get("/metrics").text


def test_the_feed_never_blocks_and_answers_after_the_rows_offered_before(trained):
    root, x = trained
    model = load_served_model("tiny", registry=root / "registry")
    outputs = model.infer(x[:30])
    feed = DriftFeed(model, ServeConfig(monitor_queue_rows=25), Metrics(CollectorRegistry()))
    for k in range(3):  # the thread is not started: nothing drains the queue
        feed.offer(x[10 * k:10 * k + 10], {n: v[10 * k:10 * k + 10] for n, v in
                                           outputs.items()}, f"r{k}")
    assert (feed.queued_rows, feed.dropped_rows) == (20, 10)
    answer = feed.ask(lambda m: (m.rows, m.add_labels(["0", "1"], [("r0", 0), ("r2", 0)])))
    feed.start()
    try:
        assert answer.result(10) == (20, 1)  # r2 was dropped: no prediction to label
    finally:
        feed.close(timeout_s=5)
    assert feed.ask(lambda m: m.rows).exception(1).status == 404  # closed: refused at once
