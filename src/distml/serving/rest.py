"""The protocol's REST body: JSON, or with the binary tensor data extension (Triton's) a JSON
header followed by raw tensor bytes, the header's length in ``Inference-Header-Content-Length``.

Request: an input with ``"parameters": {"binary_data_size": n}`` has no ``data``; its n bytes
follow the header, in the order of the inputs. Response: an output is binary when the request
asks for it (``"binary_data": true`` in the output's parameters, or ``"binary_data_output":
true`` in the request's, which an output's ``"binary_data": false`` overrides); its bytes
follow the JSON header in the same way, its size in its ``binary_data_size`` parameter.
Every field is type-checked before use; a wrong one is a 400 that names it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson

from distml.serving.model import ServedModel
from distml.serving.protocol import (
    InferRequest,
    Tensor,
    bad,
    check_datatype,
    check_declared,
    check_shape,
    datatype_of,
    decode_json,
    decode_raw,
    encode_raw,
    json_values,
    model_input,
    requested_outputs,
)

HEADER_LENGTH = "inference-header-content-length"
# Parameters of other extensions (classification, shared memory) that this server does not
# implement: refused rather than silently ignored, since the answer would not be what was meant.
_UNSUPPORTED = ("classification", "shared_memory_region", "shared_memory_byte_size",
                "shared_memory_offset")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary part) of a request body."""
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise bad(f"Inference-Header-Content-Length: {header_length[:40]!r} must be the length "
                  f"in bytes of the JSON header at the start of the body ({len(body)} bytes)")
    n = int(header_length)
    return body[:n], body[n:]


def parse_body(body: bytes, header_length: str | None, model: ServedModel) -> InferRequest:
    header, binary = split_body(body, header_length)
    try:
        req = orjson.loads(header)  # ~8x the standard library's speed on numeric data
    except ValueError:
        req = _lenient_json(header)
    if not isinstance(req, dict):
        raise bad("the request body must be a JSON object with an 'inputs' list")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad(f"id: must be a string, not {type(rid).__name__}")
    params = parameters(req.get("parameters"), "parameters")
    binary_output = flag(params, "binary_data_output", "parameters")
    # No JSON boolean anywhere in the text (a string holding "true" only costs the fast path)
    numbers_only = b"true" not in header and b"false" not in header
    tensors = _inputs(req.get("inputs"), binary, model, numbers_only)
    wanted, binary_names = _outputs(req.get("outputs"), binary_output)
    names = requested_outputs(wanted, [o["name"] for o in model.outputs])
    if not wanted and binary_output:
        binary_names = set(names)
    x = model_input(tensors, model.input)
    model.check(x, tensors[0].where)
    return InferRequest(rid, x, names, binary_names)


def _lenient_json(header: bytes) -> Any:
    """The standard library's reading, for what orjson refuses: NaN and Infinity (Python's
    json writes them), then refused with the element named by the finiteness check."""
    try:
        return json.loads(header)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise bad(f"the request body is not valid JSON: {str(e)[:200]}") from None


def parameters(value: Any, where: str) -> dict[str, Any]:
    """A parameters object: string keys, values string, number or boolean."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{where}: must be an object of parameters, not {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(v, str | int | float | bool):
            raise bad(f"{where}.{k}: a parameter is a string, number or boolean, not "
                      f"{type(v).__name__}")
        if k in _UNSUPPORTED:
            raise bad(f"{where}.{k}: this server does not implement the extension that "
                      f"{k!r} belongs to")
    return value


def flag(params: dict[str, Any], key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad(f"{where}.{key}: must be true or false, not {value!r}")
    return value


def _inputs(inputs: Any, binary: bytes, model: ServedModel,
            numbers_only: bool = False) -> list[Tensor]:
    if not isinstance(inputs, list) or not inputs:
        schema = model.input
        raise bad("inputs: must be a non-empty list of tensors, e.g. [{\"name\": "
                  f"\"{schema['name']}\", \"shape\": [1, {schema['shape'][1]}], \"datatype\": "
                  f"\"{schema['datatype']}\", \"data\": [...]}}]")
    tensors, offset = [], 0
    for i, t in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise bad(f"{where}: each input is an object with name, shape, datatype and data")
        name = t.get("name")
        if not isinstance(name, str):
            raise bad(f"{where}.name: must be a string, not {type(name).__name__}")
        where = f"{where} ({name!r})"
        datatype = check_datatype(t.get("datatype"), where)
        shape = check_shape(t.get("shape"), where)
        check_declared(name, datatype, shape, where, model.input)
        size = parameters(t.get("parameters"), f"{where}.parameters").get("binary_data_size")
        if size is None:
            if "data" not in t:
                raise bad(f"{where}: has neither data nor a binary_data_size parameter")
            data = decode_json(t["data"], datatype, shape, where, numbers_only=numbers_only)
        else:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad(f"{where}.parameters.binary_data_size: {size!r} must be a "
                          "non-negative integer")
            if "data" in t:
                raise bad(f"{where}: has both data and binary_data_size; send one")
            if offset + size > len(binary):
                raise bad(f"{where}.parameters.binary_data_size: {size} bytes from offset "
                          f"{offset}, but the binary part of the body has {len(binary)} bytes "
                          "(is Inference-Header-Content-Length set?)")
            data = decode_raw(binary[offset:offset + size], datatype, shape, where)
            offset += size
        tensors.append(Tensor(name, datatype, shape, data, where))
    if offset != len(binary):
        raise bad(f"the body has {len(binary) - offset} bytes after the JSON header that no "
                  "input's binary_data_size accounts for")
    return tensors


def _outputs(outputs: Any, binary_output: bool | None) -> tuple[list[str], set[str]]:
    if outputs is None:
        return [], set()
    if not isinstance(outputs, list):
        raise bad(f"outputs: must be a list of objects like {{\"name\": ...}}, not "
                  f"{type(outputs).__name__}")
    names, binary = [], set()
    for i, o in enumerate(outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise bad(f"outputs[{i}]: must be an object with a string 'name'")
        params = parameters(o.get("parameters"), f"outputs[{i}].parameters")
        asked = flag(params, "binary_data", f"outputs[{i}].parameters")
        names.append(o["name"])
        if asked or (asked is None and binary_output):
            binary.add(o["name"])
    return names, binary


def response_body(model_name: str, version: str, req: InferRequest,
                  outputs: dict[str, np.ndarray]) -> tuple[list[bytes], int | None]:
    """(the body's parts, to be written in order without joining them; the JSON header's
    length when some output is binary, else None)."""
    head: dict[str, Any] = {"model_name": model_name, "model_version": version}
    if req.id is not None:
        head["id"] = req.id
    tensors, raw = [], []
    for n in req.outputs:
        a = outputs[n]
        t: dict[str, Any] = {"name": n, "datatype": datatype_of(a), "shape": list(a.shape)}
        if n in req.binary:
            raw.append(encode_raw(a))
            t["parameters"] = {"binary_data_size": len(raw[-1])}
        else:  # numeric arrays go to orjson as they are: no Python list in between
            t["data"] = a.reshape(-1) if a.dtype in _ORJSON_NUMPY else json_values(a)
        tensors.append(t)
    head["outputs"] = tensors
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    return [header, *raw], (len(header) if raw else None)


# The dtypes orjson writes straight from a (C-contiguous) array; others go through lists.
_ORJSON_NUMPY = {np.dtype(t) for t in (np.float64, np.float32, np.float16, np.int64, np.int32,
                                       np.int16, np.int8, np.uint64, np.uint32, np.uint16,
                                       np.uint8, np.bool_)}
