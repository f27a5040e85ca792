"""TLS on a real ``distml serve``: one certificate (signed by the test's own CA, for
127.0.0.1) for the REST port and the gRPC port. Clients that trust the CA get the model's
predictions; plain HTTP, an insecure gRPC channel and a client that does not trust the CA
get nothing."""

from __future__ import annotations

import re
import ssl

import grpc
import httpx
import numpy as np
import pytest

from tests.helpers.serving import infer_body, running_server
from tests.helpers.tls import make_certificates

ROWS = [0, 1, 400, 1796]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


def _infer(client: httpx.Client, url: str, x: np.ndarray) -> httpx.Response:
    return client.post(f"{url}/v2/models/tiny/infer", json=infer_body(x))


def _check_rest(url: str, x: np.ndarray, predicted, tls_files) -> None:
    probs, labels, _ = predicted
    trusted = ssl.create_default_context(cafile=str(tls_files.ca))
    with httpx.Client(verify=trusted) as client:
        resp = _infer(client, url, x[ROWS])
    assert resp.status_code == 200, resp.text
    out = resp.json()["outputs"]
    np.testing.assert_allclose(np.reshape(out[0]["data"], (len(ROWS), 10)), probs[ROWS],
                               atol=1e-6)
    assert out[1]["data"] == list(labels[ROWS])
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/v2/health/live")  # the system's CAs do not know this certificate
    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port: no answer
        httpx.get(url.replace("https://", "http://") + "/v2/health/live", timeout=10)


def _check_grpc(grpc_at: str, x: np.ndarray, predicted, tls_files) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url=grpc_at, ssl=True,
                                              root_certificates=str(tls_files.ca))
    try:
        inp = grpcclient.InferInput("input", [len(ROWS), 64], "FP32")
        inp.set_data_from_numpy(x[ROWS])
        result = client.infer("tiny", [inp])
        np.testing.assert_allclose(result.as_numpy("probabilities"), predicted[0][ROWS],
                                   atol=1e-6)
    finally:
        client.close()
    plain = grpcclient.InferenceServerClient(url=grpc_at)  # an insecure channel
    try:
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            plain.is_server_live(client_timeout=5)
    finally:
        plain.close()
    channel = grpc.secure_channel(grpc_at, grpc.ssl_channel_credentials())  # system CAs only
    try:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()


@pytest.mark.parametrize("replicas", [1, 2])
def test_rest_and_grpc_over_tls(trained, predicted, tls_files, replicas):
    root, x = trained
    args = ("--registry", str(root / "registry"), "--grpc-port", "0",
            "--replicas", str(replicas),
            "--ssl-certfile", str(tls_files.cert), "--ssl-keyfile", str(tls_files.key))
    trusted = ssl.create_default_context(cafile=str(tls_files.ca))
    with running_server(*args, cwd=root, verify=trusted) as (url, _, lines):
        assert url.startswith("https://127.0.0.1:")
        grpc_at = re.search(r"gRPC at (\S+?),? ", "".join(lines)).group(1)
        _check_rest(url, x, predicted, tls_files)
        _check_grpc(grpc_at, x, predicted, tls_files)
