"""Serving: a real ``distml serve`` on a free loopback port, spoken to over HTTP as the Open
Inference Protocol defines it, and ``distml predict`` through the local executor."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time

import httpx
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.cli import distml
from tests.helpers.serving import batches_run, infer_body, running_server

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(trained):
    root, _ = trained
    with running_server("--registry", str(root / "registry"), "--max-delay-ms", "5", cwd=root,
                        env={"DISTML_SERVE_TOKEN": TOKEN}) as (url, proc, lines):
        yield url, lines


def test_metadata_matches_the_artifact_and_binds_loopback(server, trained):
    url, lines = server
    root, _ = trained
    spec = json.loads((root / "registry" / "tiny" / "v1" / "spec.json").read_text())
    assert url.startswith("http://127.0.0.1:")
    assert "token required" in "".join(lines)
    for path in ("/v2/models/tiny", "/v2/models/tiny/versions/1"):
        meta = httpx.get(url + path, headers=AUTH).json()
        assert meta == {"name": "tiny", "versions": ["1"], "platform": "pytorch",
                        "inputs": spec["inputs"], "outputs": spec["outputs"]}
    assert meta["inputs"][0]["shape"] == [-1, 64]
    assert httpx.get(f"{url}/v2/models/tiny/ready", headers=AUTH).json()["ready"] is True
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}  # open, no token


def test_infer_equals_distml_predict_on_the_same_rows(server, trained, predicted):
    url, _ = server
    _, x = trained
    pred = predicted[2]
    assert pred.column_names == ["key", "probabilities", "label"]
    assert pred["key"].to_pylist() == [10 * i for i in range(len(x))]  # ids kept, in order
    rows = [0, 1, 399, 400, 401, 1796]  # across row groups (the executor's work items)
    resp = httpx.post(f"{url}/v2/models/tiny/infer", headers=AUTH,
                      json=infer_body(x[rows], id="req-7"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == "req-7"
    assert body["model_name"] == "tiny"
    assert body["model_version"] == "1"
    probs, labels = body["outputs"]
    assert probs["name"] == "probabilities"
    assert probs["shape"] == [6, 10]
    expected = np.stack(pred["probabilities"].to_numpy(zero_copy_only=False))[rows]
    np.testing.assert_allclose(np.reshape(probs["data"], (6, 10)), expected, atol=1e-6)
    assert labels["data"] == [pred["label"][i].as_py() for i in rows]
    assert labels["datatype"] == "BYTES"
    flat = httpx.post(f"{url}/v2/models/tiny/infer", headers=AUTH, json={
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                    "data": x[5].tolist()}], "outputs": [{"name": "label"}]}).json()
    assert [o["name"] for o in flat["outputs"]] == ["label"]  # only what was asked for


def _bad(x):
    good = infer_body(x[:2])

    def with_input(**change):
        return json.dumps({"inputs": [{**good["inputs"][0], **change}]})

    nan_rows = x[:2].copy()
    nan_rows[1, 3] = np.nan
    return [
        ("malformed JSON", "{\"inputs\": [", 400, "not valid JSON"),
        ("wrong datatype", with_input(datatype="INT64"), 400, "'INT64' is not accepted"),
        ("wrong shape", with_input(shape=[2, 63]), 400, "does not match this model's"),
        ("wrong element count", with_input(shape=[3, 64]), 400, "128 elements in data"),
        ("not a number", with_input(data=["a"] * 128), 400, "'a' is not a FP32 value"),
        # among numbers (numpy alone would read true as 1.0: the JSON fast path's guard)
        ("boolean", with_input(data=[*x[:2].ravel().tolist()[:127], True]), 400,
         "True is not a FP32 value"),
        ("NaN", json.dumps(infer_body(nan_rows)), 400, "element [1, 3] is nan"),
        ("missing input", json.dumps({"inputs": []}), 400, "inputs: must be a non-empty"),
        ("unknown input", with_input(name="pixels"), 400, "unknown input 'pixels'"),
        ("unknown output", json.dumps({**good, "outputs": [{"name": "logits"}]}), 400,
         "unknown output 'logits'"),
    ]


@pytest.mark.parametrize("case", range(10), ids=lambda i: [
    "malformed", "datatype", "shape", "count", "string", "boolean", "nan", "missing",
    "unknown-in", "unknown-out"][i])
def test_bad_requests_get_a_4xx_that_names_the_problem(server, trained, case):
    url, _ = server
    name, body, status, message = _bad(trained[1])[case]
    resp = httpx.post(f"{url}/v2/models/tiny/infer", headers={**AUTH,
                      "content-type": "application/json"}, content=body)
    assert resp.status_code == status, (name, resp.text)
    assert message in resp.json()["error"], name


def test_unknown_model_version_size_and_token_are_refused(server, trained):
    url, _ = server
    body = infer_body(trained[1][:1])
    cases = [
        (f"{url}/v2/models/other/infer", AUTH, body, 404, "unknown model 'other'"),
        (f"{url}/v2/models/tiny/versions/9/infer", AUTH, body, 404, "no version '9'"),
        (f"{url}/v2/models/tiny/infer", {}, body, 401, "missing or wrong bearer token"),
        (f"{url}/v2/models/tiny/infer", {"Authorization": "Bearer nope"}, body, 401,
         "bearer token"),
        (f"{url}/v2/models/tiny/infer", AUTH, infer_body(np.zeros((20000, 64))), 413,
         "the limit is"),
    ]
    for where, headers, payload, status, message in cases:
        resp = httpx.post(where, headers=headers, json=payload)
        assert resp.status_code == status, (where, resp.text)
        assert message in resp.json()["error"]
    assert httpx.get(f"{url}/v2/models/tiny").status_code == 401  # metadata needs it too
    timed_out = httpx.post(f"{url}/v2/models/tiny/infer", json=body,
                           headers={**AUTH, "X-Request-Timeout-Ms": "0.001"})
    assert timed_out.status_code == 504
    assert "deadline" in timed_out.json()["error"]


def test_duplicate_requests_with_one_idempotency_key_run_the_model_once(server, trained):
    url, _ = server
    x = trained[1]
    before = batches_run(url)

    async def burst():
        async with httpx.AsyncClient(headers={**AUTH, "Idempotency-Key": "order-42"}) as c:
            return await asyncio.gather(*[
                c.post(f"{url}/v2/models/tiny/infer", json=infer_body(x[:3])) for _ in range(8)])

    responses = asyncio.run(burst())
    assert {r.status_code for r in responses} == {200}
    assert len({r.text for r in responses}) == 1  # everyone got the one result
    assert batches_run(url) == before + 1  # one forward pass for the eight
    reused = httpx.post(f"{url}/v2/models/tiny/infer", json=infer_body(x[3:4]),
                        headers={**AUTH, "Idempotency-Key": "order-42"})
    assert reused.status_code == 409


def _batch_histogram(url: str) -> tuple[float, float, dict[float, float]]:
    """distml_batch_rows: (forward passes, rows, passes with at most `le` rows per bucket)."""
    text = httpx.get(f"{url}/metrics").text
    family = next(f for f in text_string_to_metric_families(text)
                  if f.name == "distml_batch_rows")
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    buckets = {float(le): v for (name, le), v in samples.items()
               if name.endswith("_bucket") and le != "+Inf"}
    return samples[("distml_batch_rows_count", None)], \
        samples[("distml_batch_rows_sum", None)], buckets


def test_concurrent_requests_are_batched_and_metrics_say_so(server, trained):
    url, _ = server
    x = trained[1]
    passes0, rows0, buckets0 = _batch_histogram(url)

    async def load():
        async with httpx.AsyncClient(headers=AUTH) as c:
            return await asyncio.gather(*[
                c.post(f"{url}/v2/models/tiny/infer", json=infer_body(x[i:i + 1]))
                for i in range(48)])

    responses = asyncio.run(load())
    assert all(r.status_code == 200 for r in responses)
    passes, rows, buckets = _batch_histogram(url)
    # Every one of the 48 rows went through the model once, in fewer passes than requests,
    # and at least one pass held several requests' rows.
    assert rows - rows0 == 48
    assert passes - passes0 < 48
    assert (passes - passes0) - (buckets[1.0] - buckets0[1.0]) >= 1  # a pass of >= 2 rows
    # Batched, each request still got its own row's answer: the one it gets alone (up to
    # float rounding, which depends on the batch's size).
    for i in (0, 17, 47):
        batched = {o["name"]: o["data"] for o in responses[i].json()["outputs"]}
        alone = {o["name"]: o["data"] for o in httpx.post(
            f"{url}/v2/models/tiny/infer", json=infer_body(x[i:i + 1]),
            headers=AUTH).json()["outputs"]}
        assert batched["label"] == alone["label"]
        np.testing.assert_allclose(batched["probabilities"], alone["probabilities"],
                                   rtol=1e-5, atol=1e-6)
    text = httpx.get(f"{url}/metrics").text
    for family in ("distml_requests_total", "distml_request_seconds_bucket",
                   "distml_batch_rows_bucket", "distml_queue_rows", "distml_inflight_requests",
                   'distml_model_info{model="tiny",quantized="false",version="1"} 1.0'):
        assert family in text
    assert re.search(r'distml_requests_total\{route="/v2/models/\{name\}/infer",status="200"\}',
                     text)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return sample.value
    return 0.0


def test_overload_gets_503_at_once_and_late_requests_are_dropped_unrun(trained):
    root, x = trained
    with running_server("--registry", str(root / "registry"), "--max-queue-rows", "64",
                        cwd=root) as (url, _, _):
        async def flood():
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(limits=limits, timeout=30) as c:
                return await asyncio.gather(*[
                    c.post(f"{url}/v2/models/tiny/infer", json=infer_body(x[:32]),
                           headers={"X-Request-Timeout-Ms": "300"}) for _ in range(200)])

        results = asyncio.run(flood())
        statuses = [r.status_code for r in results]
        # The server's own account, once its queue has settled: every request that was
        # not refused either ran in a forward pass (32 rows each) or was dropped unrun.
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(f"{url}/metrics").text
            ran = _metric(text, "distml_batch_rows_sum") / 32
            dropped = _metric(text, "distml_dropped_requests_total")
            if ran + dropped == statuses.count(200) + statuses.count(504) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.1)
        after = httpx.post(f"{url}/v2/models/tiny/infer", json=infer_body(x[:32]))
    assert set(statuses) <= {200, 503, 504}
    assert statuses.count(503) > 0
    assert all(r.headers.get("retry-after") == "1" for r in results if r.status_code == 503)
    assert ran + dropped == statuses.count(200) + statuses.count(504)
    assert ran >= statuses.count(200)  # a 504 may have started; no 200 was left unrun
    assert after.status_code == 200  # nothing stuck once the flood is over
    # Every request was answered and counted by the server's histogram, none hanging: all
    # within 5 s of arriving (a deadline of 0.3 s; the rest is slack for a loaded machine).
    route = "/v2/models/{name}/infer"
    total = _metric(text, "distml_request_seconds_count", route=route)
    assert total == len(results)
    assert _metric(text, "distml_request_seconds_bucket", route=route, le="5.0") == total


def test_duplicates_with_one_key_run_once_across_replicas(replica_server, trained):
    # The front pins a key to one replica, so duplicates meet there, whichever replica the
    # least-loaded rule would have picked; the metrics are summed over both replicas.
    url, _ = replica_server
    x = trained[1]
    before = batches_run(url)

    async def burst():
        async with httpx.AsyncClient(headers={"Idempotency-Key": "order-7"}) as c:
            return await asyncio.gather(*[
                c.post(f"{url}/v2/models/tiny/infer", json=infer_body(x[:3]))
                for _ in range(8)])

    responses = asyncio.run(burst())
    assert {r.status_code for r in responses} == {200}
    assert len({r.text for r in responses}) == 1
    assert batches_run(url) == before + 1  # one forward pass for the eight, not one each


def _replicas(front: subprocess.Popen) -> list[psutil.Process]:
    """The front's two replica processes (not multiprocessing's resource tracker)."""
    replicas = [p for p in psutil.Process(front.pid).children()
                if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(replicas) == 2
    return replicas


@pytest.mark.parametrize("routing", ["front", "shared_port"])
def test_killing_a_replica_fails_only_its_requests(trained, routing):
    # front: the requests in flight on the dead replica get 503; shared_port: the
    # connections it held drop (nothing stands between them and the client), and a new
    # replica takes the port with the other.
    root, x = trained
    with running_server("--registry", str(root / "registry"), "--replicas", "2",
                        "--replica-routing", routing, cwd=root) as (url, proc, lines):
        replicas = _replicas(proc)
        # Outcomes are collected and checked here, on the test's thread: an assertion in a
        # client thread would only end that thread.
        results: list[tuple[float, int | str, str]] = []
        stop = threading.Event()

        def client():
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    try:
                        r = c.post(f"{url}/v2/models/tiny/infer", json=infer_body(x[:4]))
                        results.append((time.monotonic(), r.status_code, r.text))
                    except httpx.HTTPError as e:
                        results.append((time.monotonic(), type(e).__name__, str(e)))

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        killed_at = time.monotonic()
        replicas[0].kill()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.3)
            if httpx.get(f"{url}/v2/health/ready").json().get("replicas_ready") == 2 and \
                    sum(1 for t, _, _ in results if t > killed_at) > 20:
                break
        stop.set()
        for t in threads:
            t.join()
        assert "died with exit code -9; starting a new one" in "".join(lines)
        assert httpx.get(f"{url}/v2/health/ready").json()["replicas_ready"] == 2
    statuses = [s for _, s, _ in results]
    # front: no dropped connection; shared_port: only those of the dead replica; no 500
    failed = {503} if routing == "front" else {"ReadError", "RemoteProtocolError"}
    assert set(statuses) <= {200, *failed}, set(statuses)
    assert sum(statuses.count(f) for f in failed) <= 6  # at most one per client
    assert all("replica" in json.loads(text)["error"] for _, s, text in results if s == 503)
    assert sum(1 for t, s, _ in results if t > killed_at and s == 200) > 20  # the other served


def test_a_standard_triton_client_works_unchanged(server, trained):
    http = pytest.importorskip("tritonclient.http")
    url, _ = server
    x = trained[1][:3]
    client = http.InferenceServerClient(url=url.removeprefix("http://"))
    assert client.is_server_live()
    assert client.is_model_ready("tiny", headers=dict(AUTH))
    meta = client.get_model_metadata("tiny", headers=dict(AUTH))
    assert meta["inputs"][0]["name"] == "input"
    inp = http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    outputs = [http.InferRequestedOutput(n, binary_data=False)
               for n in ("probabilities", "label")]
    result = client.infer("tiny", [inp], outputs=outputs, headers=dict(AUTH))
    probs = result.as_numpy("probabilities")
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")] == \
        [str(i) for i in probs.argmax(1)]
    client.close()


def test_predict_refuses_input_without_the_model_columns_and_writes_nothing(trained, tmp_path):
    root, _ = trained
    pq.write_table(pa.table({"a": [1.0, 2.0]}), tmp_path / "bad.parquet")
    out = distml("predict", "tiny", "--input", str(tmp_path / "bad.parquet"), "--output",
                 str(tmp_path / "pred.parquet"), "--registry", str(root / "registry"),
                 cwd=root, check=False)
    assert out.returncode == 2
    assert "lacks 64 of the model's 64 input columns" in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.parquet"]  # no output, no leftovers


@pytest.mark.parametrize("stop", ["terminate", "kill"])
def test_stopping_the_front_stops_its_replicas(trained, stop):
    # SIGTERM (what Kubernetes and systemd send) shuts down through the front's cleanup;
    # SIGKILL runs none, and the replicas end by their parent-death signal instead.
    root, _ = trained
    with running_server("--registry", str(root / "registry"), "--replicas", "2",
                        cwd=root) as (_, proc, _):
        replicas = _replicas(proc)
        getattr(proc, stop)()
        proc.wait(30)
        _, alive = psutil.wait_procs(replicas, timeout=15)
        assert not alive, [p.pid for p in alive]


def test_a_lone_request_under_batching_does_not_wait_for_max_delay(trained):
    """Batching on with a 1 s max delay: requests sent one at a time (each finds the model
    idle, nothing queued, nothing on its way) start their forward pass at once, as the
    server's own queue-wait histogram records, rather than a second later."""
    root, x = trained
    with running_server("--registry", str(root / "registry"), "--max-delay-ms", "1000",
                        cwd=root) as (url, _, _):
        for i in range(5):
            resp = httpx.post(f"{url}/v2/models/tiny/infer", json=infer_body(x[i:i + 1]))
            assert resp.status_code == 200, resp.text
        text = httpx.get(f"{url}/metrics").text
    family = next(f for f in text_string_to_metric_families(text)
                  if f.name == "distml_queue_wait_seconds")
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("distml_queue_wait_seconds_count", None)] == 5
    # every one of them within 50 ms of arriving: a twentieth of the delay it could have paid
    assert samples[("distml_queue_wait_seconds_bucket", "0.05")] == 5
