"""The infer route as a pure ASGI handler in front of the app: the one route on every
request's path, so it skips FastAPI's routing, parameter binding and response classes (about a
third of a small request's server time). Everything the route does is kept: the early 503
when the queue is full, the body-size limit while the body streams in, deadlines,
idempotency, the protocol's errors. Every other path goes on to the app.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import orjson

from distml.serving.batching import DeadlineExceededError, OverloadedError
from distml.serving.inference import Inference
from distml.serving.protocol import ProtocolError
from distml.serving.rest import parse_body, response_body

_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
# The route templates the metrics label requests with (as FastAPI's routes would name them).
INFER_ROUTES = (SimpleNamespace(path="/v2/models/{name}/infer"),
           SimpleNamespace(path="/v2/models/{name}/versions/{version}/infer"))
_WANTED = {b"content-length", b"inference-header-content-length", b"x-request-timeout-ms",
           b"idempotency-key"}
_JSON = b"application/json"


class InferEndpoint:
    """``POST /v2/models/{name}[/versions/{version}]/infer``; anything else goes to ``app``."""

    def __init__(self, app: Any, inference: Inference) -> None:
        self.app = app
        self.inference = inference

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        match = (_PATH.fullmatch(scope["path"])
                 if scope["type"] == "http" and scope["method"] == "POST" else None)
        if match is None:
            return await self.app(scope, receive, send)
        name, version = match.groups()
        scope["route"] = INFER_ROUTES[version is not None]
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in _WANTED}
        try:
            status, parts, extra = await self.handle(receive, headers, name, version)
        except ProtocolError as e:
            status, parts, extra = e.status, [orjson.dumps({"error": e.message})], []
        except OverloadedError:
            status, parts, extra = _overloaded()
        kind = _JSON if status != 200 or not extra else b"application/octet-stream"
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", kind), (b"content-length", str(sum(map(len, parts))).encode()),
            *extra]})
        last = len(parts) - 1
        for i, part in enumerate(parts):  # the binary outputs follow the header unjoined
            await send({"type": "http.response.body", "body": part, "more_body": i < last})

    async def handle(self, receive: Any, headers: dict[str, str], name: str,
                     version: str | None) -> tuple[int, list[bytes], list]:
        inference = self.inference
        if inference.slot_for(name, version).batcher.full():  # before the body is read
            return _overloaded()
        inference.arriving += 1
        try:
            body = await read_body(receive, headers.get("content-length"),
                                   inference.settings.max_body_bytes)
            timeout_s = inference.timeout_s(headers.get("x-request-timeout-ms"),
                                            "X-Request-Timeout-Ms")
            slot = inference.slot_for(name, version)  # the version served now, after the read
            req = parse_body(body, headers.get("inference-header-content-length"), slot.model)
            del body  # not held while the request waits for its batch
        finally:
            inference.arriving -= 1
        try:
            result = await inference.infer(slot, req, timeout_s, headers.get("idempotency-key"))
        except DeadlineExceededError:
            raise ProtocolError(504, f"no result within the deadline of {1000 * timeout_s:g} "
                                     "ms; the request was dropped") from None
        parts, header_length = response_body(result.name, result.version, req, result.outputs)
        if header_length is None:
            return 200, parts, []
        return 200, parts, [(b"inference-header-content-length", str(header_length).encode())]


def _overloaded() -> tuple[int, list[bytes], list]:
    body = orjson.dumps({"error": "the server is at capacity; retry after the Retry-After "
                                  "seconds"})
    return 503, [body], [(b"retry-after", b"1")]


async def read_body(receive: Any, declared: str | None, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to be over ``limit``: from its
    Content-Length, else while it streams in (chunked), never holding more than the limit."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(413, f"the request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # gone, or cut off by the read deadline
            raise ProtocolError(408, "the client went away before its body arrived")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProtocolError(413, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
