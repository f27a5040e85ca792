"""Standard clients against a real ``distml serve``: Triton's HTTP client with its default
settings (the binary tensor data extension, in and out) and its gRPC client, each giving the
answers ``distml predict`` gives on the same rows; the token on gRPC; replicas behind gRPC."""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest

from tests.helpers.serving import batches_run, infer_body, running_server

TOKEN = "grpc-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # tritonclient adds to the dict it is given: copy
ROWS = [0, 1, 399, 400, 401, 1796]  # across the Parquet row groups predict works on


@pytest.fixture(scope="module")
def server(trained):
    root, _ = trained
    with running_server("--registry", str(root / "registry"), "--grpc-port", "0", cwd=root,
                        env={"DISTML_SERVE_TOKEN": TOKEN}) as (url, _, lines):
        grpc_at = re.search(r"gRPC at (\S+?),? ", "".join(lines)).group(1)
        yield url, grpc_at


def _labels(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def test_triton_http_client_defaults_binary_in_and_out_equal_predict(server, trained,
                                                                     predicted):
    http = pytest.importorskip("tritonclient.http")
    url, _ = server
    x = trained[1][ROWS]
    probs, labels, _ = predicted
    client = http.InferenceServerClient(url=url.removeprefix("http://"))
    try:
        assert "binary_tensor_data" in client.get_server_metadata(headers=dict(AUTH))["extensions"]
        inp = http.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)  # default: binary_data=True
        result = client.infer("tiny", [inp], headers=dict(AUTH))  # no outputs named: all, binary
        response = result.get_response()
        assert all(o["parameters"]["binary_data_size"] > 0 and "data" not in o
                   for o in response["outputs"])  # the outputs did come as raw bytes
        np.testing.assert_allclose(result.as_numpy("probabilities"), probs[ROWS], atol=1e-6)
        assert _labels(result.as_numpy("label")) == list(labels[ROWS])
        # Asked per output: one binary, one JSON.
        outputs = [http.InferRequestedOutput("label", binary_data=True),
                   http.InferRequestedOutput("probabilities", binary_data=False)]
        mixed = client.infer("tiny", [inp], outputs=outputs, headers=dict(AUTH))
        kinds = {o["name"]: "data" in o for o in mixed.get_response()["outputs"]}
        assert kinds == {"label": False, "probabilities": True}
        np.testing.assert_allclose(mixed.as_numpy("probabilities"), probs[ROWS], atol=1e-6)
        assert _labels(mixed.as_numpy("label")) == list(labels[ROWS])
    finally:
        client.close()


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "UINT8", "UINT16", "INT8", "INT16",
                                      "BOOL"])
def test_every_datatype_the_model_accepts_round_trips_binary(server, trained, datatype):
    """The model's input is FP32; it takes every datatype FP32 holds exactly. Digits pixels
    (0-16) are exact in each; BOOL sends the rows thresholded to 0/1."""
    http = pytest.importorskip("tritonclient.http")
    url, _ = server
    x = trained[1][ROWS]
    if datatype == "BOOL":
        x = (x > 8).astype(np.float32)
    client = http.InferenceServerClient(url=url.removeprefix("http://"))
    try:
        results = []
        for dt, values in (("FP32", x), (datatype, x.astype(_numpy(datatype)))):
            inp = http.InferInput("input", list(x.shape), dt)
            inp.set_data_from_numpy(values)
            results.append(client.infer("tiny", [inp], headers=dict(AUTH)))
        np.testing.assert_array_equal(results[1].as_numpy("probabilities"),
                                      results[0].as_numpy("probabilities"))
        assert results[1].get_response()["outputs"][0]["datatype"] == "FP32"
        refused = http.InferInput("input", list(x.shape), "INT64")  # not exact in FP32
        refused.set_data_from_numpy(x.astype(np.int64))
        with pytest.raises(Exception, match="'INT64' is not accepted"):
            client.infer("tiny", [refused], headers=dict(AUTH))
    finally:
        client.close()


def _numpy(datatype: str) -> type:
    return {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8, "UINT16": np.uint16,
            "INT8": np.int8, "INT16": np.int16, "BOOL": np.bool_}[datatype]


def test_binary_request_by_hand_and_its_errors(server, trained):
    """The extension's layout without a client library: header length, sizes, BYTES out."""
    url, _ = server
    x = trained[1][:2]
    head = json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [2, 64],
                                   "parameters": {"binary_data_size": 128}}],
                       "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}
                      ).encode()
    body = head + x.astype(np.uint8).tobytes()
    r = httpx.post(f"{url}/v2/models/tiny/infer", content=body,
                   headers={**AUTH, "Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta, raw = json.loads(r.content[:n]), r.content[n:]
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == len(raw)
    sizes = np.frombuffer(raw[:4], "<u4")[0], np.frombuffer(raw[4 + 1:9], "<u4")[0]
    assert sizes == (1, 1)  # two labels, each a 4-byte length and one character
    cases = [
        (body, {}, "not valid JSON"),  # without the header, the body is all JSON
        (body, {"Inference-Header-Content-Length": "x"}, "Inference-Header-Content-Length"),
        (head + b"\0" * 127, {"Inference-Header-Content-Length": str(len(head))},
         "binary_data_size: 128 bytes from offset 0"),
    ]
    for content, headers, message in cases:
        bad = httpx.post(f"{url}/v2/models/tiny/infer", content=content, headers={**AUTH,
                                                                                   **headers})
        assert bad.status_code == 400
        assert message in bad.json()["error"]


def test_triton_grpc_client_equals_predict_and_needs_the_token(server, trained, predicted):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    _, grpc_at = server
    x = trained[1][ROWS]
    probs, labels, _ = predicted
    client = grpcclient.InferenceServerClient(url=grpc_at)
    try:
        assert client.is_server_live()  # health is open, as on REST
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.get_model_metadata("tiny")
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.get_model_metadata("tiny", headers={"authorization": "Bearer nope"})
        auth = {"authorization": f"Bearer {TOKEN}"}
        meta = client.get_model_metadata("tiny", headers=auth)
        assert (meta.name, list(meta.versions), meta.inputs[0].name) == ("tiny", ["1"], "input")
        assert client.is_model_ready("tiny", headers=auth)
        assert "binary_tensor_data" in client.get_server_metadata(headers=auth).extensions
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)  # raw_input_contents
        result = client.infer("tiny", [inp], headers=auth, request_id="g-1")
        np.testing.assert_allclose(result.as_numpy("probabilities"), probs[ROWS], atol=1e-6)
        assert _labels(result.as_numpy("label")) == list(labels[ROWS])
        assert result.get_response().id == "g-1"
        bad = grpcclient.InferInput("input", [2, 63], "FP32")
        bad.set_data_from_numpy(x[:2, :63].copy())
        with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT.*shape"):
            client.infer("tiny", [bad], headers=auth)
    finally:
        client.close()


def test_grpc_and_rest_share_metrics_and_idempotency(server, trained):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    url, grpc_at = server
    x = trained[1][:3]
    client = grpcclient.InferenceServerClient(url=grpc_at)
    auth = {"authorization": f"Bearer {TOKEN}", "idempotency-key": "shared-7"}
    batches = batches_run(url)
    try:
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        first = client.infer("tiny", [inp], headers=auth)
    finally:
        client.close()
    again = httpx.post(f"{url}/v2/models/tiny/infer", headers={**AUTH,
                       "Idempotency-Key": "shared-7"}, json=infer_body(x))
    assert again.status_code == 200
    # FP32 in JSON: each value's shortest decimal that reads back as the same float32
    rest = np.asarray(again.json()["outputs"][0]["data"], dtype=np.float32).reshape(3, 10)
    np.testing.assert_array_equal(rest, first.as_numpy("probabilities"))
    assert batches_run(url) == batches + 1  # one forward pass for the gRPC call and the REST one
    text = httpx.get(f"{url}/metrics").text
    assert re.search(r'distml_requests_total\{route="grpc:ModelInfer",status="OK"\} [1-9]', text)


def test_grpc_through_replicas(replica_server, trained, predicted):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    _, lines = replica_server
    x = trained[1]
    grpc_at = re.search(r"gRPC at (\S+?),? ", "".join(lines)).group(1)
    client = grpcclient.InferenceServerClient(url=grpc_at)
    try:
        for _ in range(4):  # spread over both replicas
            inp = grpcclient.InferInput("input", [len(ROWS), 64], "FP32")
            inp.set_data_from_numpy(x[ROWS])
            result = client.infer("tiny", [inp])
            np.testing.assert_allclose(result.as_numpy("probabilities"),
                                       predicted[0][ROWS], atol=1e-6)
        assert client.is_model_ready("tiny")
    finally:
        client.close()
