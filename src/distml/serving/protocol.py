"""The Open Inference Protocol's JSON (KServe v2, Triton REST): parsing and validating an
inference request against the model's input schema, and building the response.

Every problem with a request is a ``ProtocolError`` carrying the HTTP status and a message
that names the field, the value and what would work; nothing a client sends leads to a 500.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# The protocol's datatypes that a JSON number or string can carry, as numpy types.
_NUMERIC = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


class ProtocolError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class InferRequest:
    id: str | None
    x: np.ndarray  # (rows, columns), the model input's dtype
    outputs: list[str]  # requested output names, in order


def _bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def _flatten(data: Any, where: str) -> list[Any]:
    """The protocol allows row-major nested lists or one flat list."""
    if not isinstance(data, list):
        raise _bad(f"{where}.data must be a list, not {type(data).__name__}")
    if data and isinstance(data[0], list):
        flat: list[Any] = []
        for row in data:
            flat.extend(_flatten(row, where) if isinstance(row, list) else [row])
        return flat
    return data


def parse_infer(body: bytes, schema: dict[str, Any], outputs: list[dict[str, Any]]
                ) -> InferRequest:
    """Validate a request body against the model's one input (name, datatype, shape, finite
    values) and its outputs; returns the input as an array."""
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise _bad("the request body must be a JSON object with an 'inputs' list")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("'inputs' must be a non-empty list of tensors, e.g. [{\"name\": "
                   f"\"{schema['name']}\", \"shape\": [1, {schema['shape'][1]}], \"datatype\": "
                   f"\"{schema['datatype']}\", \"data\": [...]}}]")
    by_name = {t.get("name"): t for t in inputs if isinstance(t, dict)}
    unknown = [n for n in by_name if n != schema["name"]]
    if unknown:
        raise _bad(f"unknown input {unknown[0]!r}; this model's input is {schema['name']!r}")
    if schema["name"] not in by_name:
        raise _bad(f"missing input {schema['name']!r} (each input is an object with name, "
                   "shape, datatype and data)")
    x = _tensor(by_name[schema["name"]], schema)
    known = [o["name"] for o in outputs]
    wanted = req.get("outputs") or [{"name": n} for n in known]
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise _bad("'outputs' must be a list of objects like {\"name\": ...}")
    names = [o.get("name") for o in wanted]
    for n in names:
        if n not in known:
            raise _bad(f"unknown output {n!r}; this model's outputs are {known}")
    rid = req.get("id")
    return InferRequest(None if rid is None else str(rid), x, names)


def _tensor(t: dict[str, Any], schema: dict[str, Any]) -> np.ndarray:
    where = f"input {schema['name']!r}"
    datatype, shape = t.get("datatype"), t.get("shape")
    if datatype != schema["datatype"]:
        raise _bad(f"{where}: datatype {datatype!r} is not this model's {schema['datatype']!r}")
    if (not isinstance(shape, list) or len(shape) != len(schema["shape"])
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in shape)):
        raise _bad(f"{where}: shape {shape!r} must be {len(schema['shape'])} non-negative "
                   f"integers, like {schema['shape']} with -1 the number of rows")
    for got, want in zip(shape, schema["shape"], strict=True):
        if want != -1 and got != want:
            raise _bad(f"{where}: shape {shape} does not match this model's {schema['shape']}")
    if shape[0] == 0:
        raise _bad(f"{where}: shape {shape} has no rows")
    flat = _flatten(t.get("data"), where)
    expected = math.prod(shape)
    if len(flat) != expected:
        raise _bad(f"{where}: {len(flat)} elements in data, but shape {shape} needs {expected}")
    try:
        x = np.asarray(flat)
    except ValueError as e:  # ragged nesting
        raise _bad(f"{where}: data is not a regular array: {e}") from None
    if x.dtype.kind not in "iuf":  # strings, null, objects: name the first offender
        bad = next(v for v in flat if not isinstance(v, int | float) or isinstance(v, bool))
        raise _bad(f"{where}: element {bad!r} is not a number ({datatype})")
    target = np.dtype(_NUMERIC[datatype])
    if target.kind in "iub" and x.dtype.kind == "f":
        raise _bad(f"{where}: {datatype} data holds fractional numbers")
    x = x.astype(target).reshape(shape)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        row, col = np.argwhere(~np.isfinite(x))[0]
        raise _bad(f"{where}: element [{row}, {col}] is {x[row, col]}; values must be finite")
    return x


def _datatype(a: np.ndarray) -> str:
    if a.dtype == object:
        return "BYTES"
    return next(k for k, v in _NUMERIC.items() if np.dtype(v) == a.dtype)


def infer_response(model_name: str, version: str, request_id: str | None,
                   outputs: dict[str, np.ndarray], names: list[str]) -> dict[str, Any]:
    resp: dict[str, Any] = {"model_name": model_name, "model_version": version}
    if request_id is not None:
        resp["id"] = request_id
    resp["outputs"] = [
        {"name": n, "datatype": _datatype(outputs[n]), "shape": list(outputs[n].shape),
         "data": outputs[n].reshape(-1).tolist()}
        for n in names
    ]
    return resp
