"""The protocol's gRPC form, ``inference.GRPCInferenceService`` (ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata, ModelInfer), on grpc.aio in the replica's event
loop, over the same ``Inference`` as REST: one batcher, deadline, idempotency key
(metadata ``idempotency-key``), bearer token (metadata ``authorization: Bearer ...``) and set
of metrics (route ``grpc:<Method>``).

The messages are the protocol's own ``.proto`` (proto/open_inference_grpc.proto), compiled by
grpcio-tools into proto/open_inference_grpc_pb2.py (``make proto``). Handlers are registered
by hand on raw bytes, not through a generated servicer, so that bytes that are not a valid
message are answered INVALID_ARGUMENT (grpcio's own deserializer would answer INTERNAL).
Inputs come in ``contents`` (the typed lists) or ``raw_input_contents`` (the binary layout);
outputs always go in ``raw_output_contents``, as Triton sends them.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from distml.serving.batching import DeadlineExceededError, OverloadedError
from distml.serving.inference import Inference
from distml.serving.model import ServedModel
from distml.serving.proto import open_inference_grpc_pb2 as pb
from distml.serving.protocol import (
    NUMERIC,
    InferRequest,
    ProtocolError,
    Tensor,
    bad,
    check_datatype,
    check_declared,
    check_shape,
    datatype_of,
    decode_raw,
    encode_raw,
    model_input,
    requested_outputs,
    server_metadata,
)
from distml.serving.transport import Tls

SERVICE = "inference.GRPCInferenceService"
_OPEN = ("ServerLive", "ServerReady")  # no token needed, as REST's health routes
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
           413: grpc.StatusCode.RESOURCE_EXHAUSTED}
# Which InferTensorContents field carries each datatype (FP16 has none: raw only).
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
             "BYTES": "bytes_contents"}
_UNSUPPORTED = ("classification", "shared_memory_region", "shared_memory_byte_size",
                "shared_memory_offset")


class AbortError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def to_request(msg: pb.ModelInferRequest, model: ServedModel) -> InferRequest:
    """A ModelInferRequest, checked field by field as REST's JSON is."""
    _check_parameters(msg.parameters, "parameters")
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise bad(f"raw_input_contents: {len(raw)} entries for {len(msg.inputs)} inputs; "
                  "give one per input, in order, or none")
    tensors = []
    for i, t in enumerate(msg.inputs):
        where = f"inputs[{i}] ({t.name!r})"
        _check_parameters(t.parameters, f"{where}.parameters")
        datatype = check_datatype(t.datatype, where)
        shape = check_shape(list(t.shape), where)
        check_declared(t.name, datatype, shape, where, model.input)
        if raw:
            if t.HasField("contents"):
                raise bad(f"{where}: has contents as well as raw_input_contents; send one")
            data = decode_raw(raw[i], datatype, shape, where)
        else:
            data = _from_contents(t, datatype, shape, where)
        tensors.append(Tensor(t.name, datatype, shape, data, where))
    names = []
    for i, o in enumerate(msg.outputs):
        _check_parameters(o.parameters, f"outputs[{i}].parameters")
        names.append(o.name)
    names = requested_outputs(names, [o["name"] for o in model.outputs])
    x = model_input(tensors, model.input)
    model.check(x, tensors[0].where)
    return InferRequest(msg.id or None, x, names)


def _check_parameters(params: Any, where: str) -> None:
    for key in params:
        if key in _UNSUPPORTED:
            raise bad(f"{where}.{key}: this server does not implement the extension that "
                      f"{key!r} belongs to")


def _from_contents(t: Any, datatype: str, shape: list[int], where: str) -> np.ndarray:
    field_name = _CONTENTS.get(datatype)
    if field_name is None:
        raise bad(f"{where}: {datatype} data has no contents field; send it in "
                  "raw_input_contents")
    values = getattr(t.contents, field_name)
    others = [f.name for f, _ in t.contents.ListFields() if f.name != field_name]
    if others:
        raise bad(f"{where}: {datatype} data goes in contents.{field_name}, not "
                  f"contents.{others[0]}")
    count = math.prod(shape)
    if len(values) != count:
        raise bad(f"{where}: {len(values)} elements in contents.{field_name}, but shape "
                  f"{shape} needs {count}")
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    try:
        return np.array(values, dtype=NUMERIC[datatype]).reshape(shape)
    except OverflowError:
        raise bad(f"{where}: a value is out of the range of {datatype}") from None


def to_response(result_name: str, version: str, req: InferRequest,
                outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=result_name, model_version=version, id=req.id or "")
    for n in req.outputs:
        a = outputs[n]
        resp.outputs.add(name=n, datatype=datatype_of(a), shape=list(a.shape))
        resp.raw_output_contents.append(encode_raw(a))
    return resp


class Service:
    """The RPCs; each takes the request's bytes and gives the response message."""

    def __init__(self, inference: Inference) -> None:
        self.inference = inference

    async def ServerLive(self, msg: bytes, context: Any) -> Any:  # noqa: N802 - the RPC's name
        _parse(pb.ServerLiveRequest, msg)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, msg: bytes, context: Any) -> Any:  # noqa: N802
        _parse(pb.ServerReadyRequest, msg)
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, msg: bytes, context: Any) -> Any:  # noqa: N802
        req = _parse(pb.ModelReadyRequest, msg)
        try:
            self.inference.slot_for(req.name, req.version or None)
        except ProtocolError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, msg: bytes, context: Any) -> Any:  # noqa: N802
        _parse(pb.ServerMetadataRequest, msg)
        return pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, msg: bytes, context: Any) -> Any:  # noqa: N802
        req = _parse(pb.ModelMetadataRequest, msg)
        meta = self.inference.slot_for(req.name, req.version or None).model.metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]])

    async def ModelInfer(self, msg: bytes, context: Any) -> Any:  # noqa: N802
        inference = self.inference
        req = _parse(pb.ModelInferRequest, msg)
        slot = inference.slot_for(req.model_name, req.model_version or None)
        remaining = context.time_remaining()
        timeout_s = inference.timeout_s(None if remaining is None else 1000 * remaining,
                                        "the call's deadline")
        infer_req = to_request(req, slot.model)
        key = dict(context.invocation_metadata()).get("idempotency-key")
        try:
            result = await inference.infer(slot, infer_req, timeout_s, key)
        except OverloadedError:
            raise AbortError(grpc.StatusCode.UNAVAILABLE, "the server is at capacity; retry "
                        "shortly") from None
        except DeadlineExceededError:
            raise AbortError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no result within the deadline "
                        f"of {1000 * timeout_s:g} ms; the request was dropped") from None
        return to_response(result.name, result.version, infer_req, result.outputs)


def _parse(message: Any, data: bytes) -> Any:
    try:
        return message.FromString(data)
    except DecodeError as e:
        raise AbortError(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid "
                    f"{message.DESCRIPTOR.full_name} message: {e}") from None


def _handler(name: str, rpc: Callable[[bytes, Any], Awaitable[Any]], inference: Inference,
             token: str | None) -> grpc.RpcMethodHandler:
    """One RPC with auth, error mapping and metrics around it."""
    metrics, route = inference.metrics, f"grpc:{name}"
    expected = f"Bearer {token}" if token else None

    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        start, code = time.perf_counter(), grpc.StatusCode.OK
        metrics.inflight.inc()
        try:
            if expected is not None and name not in _OPEN:
                given = dict(context.invocation_metadata()).get("authorization", "")
                if not isinstance(given, str) or not hmac.compare_digest(given, expected):
                    raise AbortError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer "
                                "token: send the metadata 'authorization: Bearer <token>'")
            return (await rpc(request, context)).SerializeToString()
        except ProtocolError as e:
            code = _STATUS.get(e.status, grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(code, e.message)
        except AbortError as e:
            code = e.code
            await context.abort(e.code, e.message)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            metrics.inflight.dec()
            metrics.requests.labels(route, code.name).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)

    # No (de)serializers: the handler takes bytes and gives bytes.
    return grpc.unary_unary_rpc_method_handler(handle)


async def start_grpc(inference: Inference, address: str, *, token: str | None,
                     tls: Tls | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the service at ``address`` (host:port, port 0 for a free one, or unix:path;
    with ``tls``, over TLS); returns the server and the bound port."""
    service = Service(inference)
    names = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
             "ModelInfer")
    handlers = {n: _handler(n, getattr(service, n), inference, token) for n in names}
    server = grpc.aio.server(options=server_options(inference.settings.max_body_bytes))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = add_port(server, address, tls)
    await server.start()
    return server, port


def add_port(server: grpc.aio.Server, address: str, tls: Tls | None) -> int:
    """Bind ``address`` (over TLS, given); the bound port."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, grpc.ssl_server_credentials([(tls.key, tls.cert)]))


def server_options(max_bytes: int) -> list[tuple[str, Any]]:
    """A gRPC server's options, the replica's service and the front's proxy alike."""
    # so_reuseport off: a port that is taken fails to bind instead of being shared unnoticed.
    return [("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", 256 * 2**20), ("grpc.so_reuseport", 0)]

