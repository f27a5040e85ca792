"""The Open Inference Protocol's tensors (KServe v2, Triton), whatever carried them: the
datatypes, decoding a tensor's data (JSON values or raw little-endian bytes, the binary tensor
data extension's and gRPC's ``raw_*_contents`` layout), matching a request's tensors against
the model's input schema, and encoding outputs.

Every problem with a request is a ``ProtocolError`` carrying the HTTP status and a message
that names the field, the value and what would work; nothing a client sends leads to a 500.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

import distml

# The protocol's datatypes as numpy types: little-endian, as the binary layout requires.
NUMERIC: dict[str, np.dtype] = {
    name: np.dtype(t).newbyteorder("<") for name, t in {
        "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
        "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
        "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    }.items()
}
DATATYPES = (*NUMERIC, "BYTES")
EXTENSIONS = ["binary_tensor_data", "model_repository"]
# The JSON value types each datatype's elements may have (bool is not a number here).
_JSON_TYPES = {"BOOL": {bool}, "BYTES": {str}, "FP16": {int, float}, "FP32": {int, float},
               "FP64": {int, float}}


class ProtocolError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def server_metadata() -> dict[str, Any]:
    """The server's metadata, the same over REST and gRPC (both answer with it)."""
    return {"name": "distml", "version": distml.__version__, "extensions": EXTENSIONS}


def bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


@dataclass
class Tensor:
    """An input tensor as the request declared it, its data decoded."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray  # numeric: that datatype; BYTES: object array of bytes
    where: str  # how the request names it, for messages: "inputs[0] ('input')"


@dataclass
class InferRequest:
    id: str | None
    x: np.ndarray  # (rows, columns), the model input's dtype
    outputs: list[str]  # requested output names, in order
    binary: set[str] = field(default_factory=set)  # outputs to send as raw bytes (REST)

    def digest(self) -> str:
        """What identifies the computation, whatever carried it: two requests with one
        Idempotency-Key must agree on it."""
        h = hashlib.sha256(f"{self.id!r}|{self.x.dtype}|{self.x.shape}|{self.outputs}".encode())
        h.update(np.ascontiguousarray(self.x).tobytes())
        return h.hexdigest()


# -- decoding ------------------------------------------------------------------------------

def check_shape(shape: Any, where: str) -> list[int]:
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape):
        raise bad(f"{where}.shape: {_show(shape)} must be a list of non-negative integers")
    return shape


def check_datatype(datatype: Any, where: str) -> str:
    if datatype not in DATATYPES:
        raise bad(f"{where}.datatype: {_show(datatype)} is not a datatype of the protocol; "
                  f"use one of {', '.join(DATATYPES)}")
    return datatype


def decode_json(data: Any, datatype: str, shape: list[int], where: str, *,
                numbers_only: bool = False) -> np.ndarray:
    """JSON ``data`` (row-major, flat or nested) -> an array of ``shape``. ``numbers_only``:
    the caller knows no JSON boolean can be among the values (its text has no ``true`` or
    ``false``), which lets a floating-point tensor take the fast path."""
    if not isinstance(data, list):
        raise bad(f"{where}.data must be a list, not {_json_type(data)}")
    if numbers_only and datatype in _FLOATS:
        fast = _float_array(data, datatype, shape)
        if fast is not None:
            return fast
    flat = data
    while flat and isinstance(flat[0], list):  # nested: flatten one level at a time
        if not all(isinstance(row, list) for row in flat):
            raise bad(f"{where}.data mixes lists and values at one level")
        flat = list(chain.from_iterable(flat))
    expected = math.prod(shape)
    if len(flat) != expected:
        raise bad(f"{where}: {len(flat)} elements in data, but shape {shape} needs {expected}")
    allowed = _JSON_TYPES.get(datatype, {int})
    if not set(map(type, flat)) <= allowed:
        first = next(v for v in flat if type(v) not in allowed)
        raise bad(f"{where}.data: element {_show(first)} is not a {datatype} value "
                  f"(expected {' or '.join(sorted(_JSON_NAMES[t] for t in allowed))})")
    if datatype == "BYTES":
        arr = np.empty(len(flat), dtype=object)
        arr[:] = [s.encode() for s in flat]
        return arr.reshape(shape)
    try:
        return np.array(flat, dtype=NUMERIC[datatype]).reshape(shape)
    except OverflowError:
        raise bad(f"{where}.data: a value is out of the range of {datatype}") from None


_FLOATS = ("FP16", "FP32", "FP64")


def _float_array(data: list, datatype: str, shape: list[int]) -> np.ndarray | None:
    """The nested lists of numbers converted in one pass of numpy's C code (about half the
    time of flattening, type-checking each element and converting: a 64-row request's JSON
    is decoded ~40 us sooner); None for anything else (ragged, strings, nulls, objects, ints
    beyond int64, the wrong count), which the element-wise checks then name. Booleans would
    pass as 1.0 and 0.0 here: the caller rules them out (``numbers_only``)."""
    try:
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None
    if arr.dtype.kind not in "fi" or arr.size != math.prod(shape):
        return None
    # float64 -> float32 rounds as Python float -> float32 does: the same values either way
    # (past FP16's range: inf, as there, without numpy's warning)
    with np.errstate(over="ignore"):
        return arr.astype(NUMERIC[datatype], copy=False).reshape(shape)


_JSON_NAMES = {bool: "true/false", str: "strings", int: "integers", float: "numbers"}


def decode_raw(raw: bytes, datatype: str, shape: list[int], where: str) -> np.ndarray:
    """Raw bytes (little-endian, row-major; BYTES: each element a 4-byte little-endian length
    and its bytes) -> an array of ``shape``."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return decode_bytes(raw, count, where).reshape(shape)
    dtype = NUMERIC[datatype]
    if len(raw) != count * dtype.itemsize:
        raise bad(f"{where}: {len(raw)} bytes of data, but shape {shape} of {datatype} needs "
                  f"{count * dtype.itemsize}")
    x = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and not np.isin(x.view(np.uint8), (0, 1)).all():
        raise bad(f"{where}: BOOL bytes must be 0 or 1")
    return x


def decode_bytes(raw: bytes | memoryview, count: int, where: str) -> np.ndarray:
    out, pos, raw = [], 0, memoryview(raw)
    for i in range(count):
        if pos + 4 > len(raw):
            raise bad(f"{where}: the BYTES data ends inside element {i} of {count}; each "
                      "element is a 4-byte little-endian length and that many bytes")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise bad(f"{where}: BYTES element {i} declares {n} bytes; only "
                      f"{len(raw) - pos - 4} are left")
        out.append(bytes(raw[pos + 4:pos + 4 + n]))
        pos += 4 + n
    if pos != len(raw):
        raise bad(f"{where}: {len(raw) - pos} bytes left after the {count} BYTES elements "
                  "the shape needs")
    arr = np.empty(count, dtype=object)
    arr[:] = out
    return arr


# -- the model's input ---------------------------------------------------------------------

@functools.cache
def accepted_datatypes(schema_datatype: str) -> list[str]:
    """The datatypes an input declared as ``schema_datatype`` takes: those whose every value
    it holds exactly (numpy's safe casting; e.g. FP32 takes UINT8 and INT16, not INT32)."""
    if schema_datatype == "BYTES":
        return ["BYTES"]
    target = NUMERIC[schema_datatype]
    return [d for d, t in NUMERIC.items() if np.can_cast(t, target, casting="safe")]


def check_declared(name: str, datatype: str, shape: list[int], where: str,
                   schema: dict[str, Any]) -> None:
    """An input's name, datatype and shape against the model's input, before its data is
    decoded (so that the message is about what is wrong, not about what follows from it)."""
    if name != schema["name"]:
        raise bad(f"{where}: unknown input {name!r}; this model's input is {schema['name']!r}")
    accepted = accepted_datatypes(schema["datatype"])
    if datatype not in accepted:
        raise bad(f"{where}.datatype: {datatype!r} is not accepted by this model's input "
                  f"({schema['datatype']}); send one of {', '.join(accepted)}")
    want = schema["shape"]
    if len(shape) != len(want) or any(w != -1 and g != w
                                      for g, w in zip(shape, want, strict=True)):
        raise bad(f"{where}.shape: {shape} does not match this model's {want} "
                  "(-1: any number of rows)")
    if shape[0] == 0:
        raise bad(f"{where}.shape: {shape} has no rows")


def model_input(tensors: list[Tensor], schema: dict[str, Any]) -> np.ndarray:
    """The one input the model takes (each tensor passed ``check_declared``), with finite
    values, converted to the model's dtype."""
    name = schema["name"]
    if not tensors:
        raise bad(f"inputs: must hold this model's input, e.g. {{\"name\": \"{name}\", "
                  f"\"shape\": [1, {schema['shape'][1]}], \"datatype\": "
                  f"\"{schema['datatype']}\", \"data\": [...]}}")
    if len(tensors) > 1:
        raise bad(f"{tensors[1].where}: input {name!r} is given twice")
    t = tensors[0]
    x = t.data.astype(NUMERIC[schema["datatype"]].newbyteorder("="), copy=False)
    if not x.flags.writeable:  # a view of the request's bytes: torch wants its own memory
        x = x.copy()
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        at = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
        raise bad(f"{t.where}: element {list(at)} is {x[at]}; values must be finite")
    return x


def requested_outputs(wanted: list[str], known: list[str]) -> list[str]:
    """The outputs to send: those asked for, in order (all when none is named)."""
    for i, n in enumerate(wanted):
        if n not in known:
            raise bad(f"outputs[{i}].name: unknown output {n!r}; this model's outputs are "
                      f"{known}")
        if n in wanted[:i]:
            raise bad(f"outputs[{i}].name: output {n!r} is asked for twice")
    return wanted or list(known)


# -- encoding ------------------------------------------------------------------------------

_NAMES = {v: k for k, v in NUMERIC.items()}


def datatype_of(a: np.ndarray) -> str:
    if a.dtype == object:
        return "BYTES"
    return _NAMES[a.dtype.newbyteorder("<")]


def encode_raw(a: np.ndarray) -> bytes:
    """An array as the binary layout has it (see ``decode_raw``)."""
    if a.dtype != object:
        return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
    items = [v if isinstance(v, bytes) else str(v).encode() for v in a.reshape(-1)]
    return b"".join(struct.pack("<I", len(v)) + v for v in items)


def json_values(a: np.ndarray) -> list[Any]:
    flat = a.reshape(-1)
    if a.dtype == object:
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                        type(value).__name__)


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:  # orjson reads nesting deeper than repr can write
        return f"a {_json_type(value).removeprefix('a ').removeprefix('an ')} nested too deep"
    return text if len(text) <= 60 else text[:57] + "..."
