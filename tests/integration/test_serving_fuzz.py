"""Property-based fuzzing of a real ``distml serve``: requests generated from the protocol's
schema in the package's OpenAPI document (valid by the schema, most of them wrong for the
model), valid requests with one field replaced by an arbitrary JSON value, binary-extension
bodies with wrong lengths, arbitrary bodies, and malformed gRPC messages. Nothing may answer
5xx but 503/504 (REST), nor INTERNAL or UNKNOWN (gRPC)."""

from __future__ import annotations

import copy
import json
import struct
from importlib import resources

import grpc
import httpx
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.schema import from_schema
from tests.helpers.serving import infer_body, running_server

OK_5XX = {503, 504}
_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)  # what a header may hold
GRPC_ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _openapi() -> dict:
    return yaml.safe_load((resources.files("distml.serving") / "openapi.yaml").read_text())


def _requests() -> st.SearchStrategy:
    """Infer requests as the document's InferenceRequest schema allows them."""
    doc = _openapi()
    return from_schema(doc["components"]["schemas"]["InferenceRequest"], doc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)


def _valid(rows: np.ndarray) -> dict:
    return infer_body(rows, id="r", outputs=[{"name": "probabilities"}, {"name": "label"}])


# Where in a valid request a field is replaced (None: the key is removed).
PATHS = [("id",), ("parameters",), ("inputs",), ("outputs",), ("inputs", 0),
         ("inputs", 0, "name"), ("inputs", 0, "shape"), ("inputs", 0, "datatype"),
         ("inputs", 0, "data"), ("inputs", 0, "parameters"), ("inputs", 0, "data", 0),
         ("inputs", 0, "shape", 0), ("outputs", 0), ("outputs", 0, "name"),
         ("outputs", 0, "parameters"), ("parameters", "binary_data_output"),
         ("inputs", 0, "parameters", "binary_data_size"),
         ("outputs", 0, "parameters", "binary_data")]


def _replace(req: dict, path: tuple, value: object, remove: bool) -> dict:
    req = copy.deepcopy(req)
    node = req
    for step in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(step, {})
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            node = node[step]
        else:
            return req
    last = path[-1]
    if isinstance(node, dict):
        if remove:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    return req


@pytest.fixture(scope="module")
def fuzz_server(trained):
    root, x = trained
    with running_server("--registry", str(root / "registry"), "--grpc-port", "0", cwd=root,
                        env={"DISTML_SERVE_TOKEN": "t"}) as (url, _, lines):
        grpc_at = next(line.split("gRPC at ")[1].split()[0].rstrip(",")
                       for line in lines if "gRPC at " in line)
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer t"}) as client:
            yield client, grpc_at, x


def _check(resp: httpx.Response) -> None:
    assert resp.status_code < 500 or resp.status_code in OK_5XX, resp.text
    if resp.status_code >= 400:
        assert isinstance(resp.json()["error"], str)


def test_no_generated_rest_request_gets_a_5xx(fuzz_server):
    client, _, x = fuzz_server
    sent = []

    def post(body: bytes, path: str = "/v2/models/tiny/infer", **headers: str) -> None:
        resp = client.post(path, content=body, headers=headers)
        sent.append(resp.status_code)
        _check(resp)

    @FUZZ
    @given(req=_requests())
    def schema_valid(req):
        post(json.dumps(req).encode())

    @FUZZ
    @given(path=st.sampled_from(PATHS), value=json_values, remove=st.booleans(),
           rows=st.integers(1, 3))
    def one_field_wrong(path, value, remove, rows):
        post(json.dumps(_replace(_valid(x[:rows]), path, value, remove)).encode())

    @FUZZ
    @given(rows=st.integers(1, 3), size=st.integers(-3, 2000), extra=st.binary(max_size=16),
           header_length=st.one_of(st.none(), st.integers(-5, 5000).map(str),
                                   st.text(_PRINTABLE, max_size=6)),
           datatype=st.sampled_from(["FP32", "FP16", "UINT8", "BOOL", "BYTES", "INT64"]))
    def binary_lengths(rows, size, extra, header_length, datatype):
        raw = x[:rows].astype(np.float32).tobytes() + extra
        head = {"inputs": [{"name": "input", "datatype": datatype, "shape": [rows, 64],
                            "parameters": {"binary_data_size": size}}],
                "parameters": {"binary_data_output": True}}
        header = json.dumps(head).encode()
        length = str(len(header)) if header_length is None else header_length
        post(header + raw, **{"Inference-Header-Content-Length": length})

    @FUZZ
    @given(body=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()),
           path=st.sampled_from(["/v2/models/tiny/infer", "/v2/models/tiny/versions/1/infer",
                                 "/v2/models/t%C3%BF/infer", "/v2/repository/index",
                                 "/v2/models/tiny/versions/x/infer"]))
    def arbitrary_bodies(body, path):
        post(body, path)

    for fuzz in (schema_valid, one_field_wrong, binary_lengths, arbitrary_bodies):
        fuzz()
    assert len(sent) >= 1000
    assert sent.count(200) > 10  # the generator also reached the model, not only errors


def test_no_malformed_grpc_message_gets_internal(fuzz_server):
    tc = pytest.importorskip("tritonclient.grpc.service_pb2")
    _, grpc_at, x = fuzz_server
    codes = []
    channel = grpc.insecure_channel(grpc_at)
    auth = (("authorization", "Bearer t"),)

    def call(method: str, body: bytes) -> None:
        try:
            channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(
                body, metadata=auth, timeout=10)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        assert code in GRPC_ALLOWED, (method, body[:40], code, details)
        codes.append(code)

    def valid(rows: int) -> object:
        req = tc.ModelInferRequest(model_name="tiny")
        t = req.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
        t.contents.fp32_contents.extend(x[:rows].reshape(-1).tolist())
        return req

    @FUZZ
    @given(method=st.sampled_from(["ModelInfer", "ModelMetadata", "ModelReady",
                                   "ServerMetadata", "ServerLive"]), body=st.binary(max_size=80))
    def random_bytes(method, body):
        call(method, body)

    @FUZZ
    @given(rows=st.integers(1, 3), cut=st.integers(0, 400), flip=st.integers(0, 255),
           shape=st.lists(st.integers(-2**40, 2**40), max_size=3) | st.none(),
           datatype=st.sampled_from(["FP32", "FP16", "BYTES", "INT8", "x", ""]),
           raw=st.lists(st.binary(max_size=300), max_size=2) | st.none(),
           name=st.sampled_from(["tiny", "", "other"]), version=st.sampled_from(["", "1", "9"]))
    def wrong_messages(rows, cut, flip, shape, datatype, raw, name, version):
        req = valid(rows)
        req.model_name, req.model_version = name, version
        if shape is not None:
            req.inputs[0].ClearField("shape")
            req.inputs[0].shape.extend(shape)
        req.inputs[0].datatype = datatype
        if raw is not None:
            req.inputs[0].ClearField("contents")
            req.raw_input_contents.extend(raw)
        data = bytearray(req.SerializeToString())
        if cut < len(data):  # truncate, or corrupt one byte
            data = data[:cut] if flip % 2 else data[:cut] + bytes([flip]) + data[cut + 1:]
        call("ModelInfer", bytes(data))

    try:
        random_bytes()
        wrong_messages()
        call("ModelInfer", struct.pack("<B", 0x0A) + b"\xff" * 5)  # a length past the end
    finally:
        channel.close()
    assert len(codes) >= 600
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    assert grpc.StatusCode.OK in codes
