"""The HTTP/1.1 client to one replica over its Unix socket (the front's, and each replica's
to the others when they share the port), with what both forward and return: keep-alive
connections kept idle between requests, one request at a time on each. It replaces httpx on
the request path, whose connection pool under 32 concurrent requests held each for tens of
milliseconds (the front at half a core, the replicas idle, 300 req/s); this one costs a
write and two reads. The replica is distml's own uvicorn, so its responses are plain:
a Content-Length on every one that has a body.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

_NO_BODY = (204, 304)
FORWARDED = ("content-type", "authorization", "idempotency-key", "x-request-timeout-ms",
            "inference-header-content-length")
FORWARDED_BYTES = {k.encode() for k in (*FORWARDED, "content-length")}
INFER = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer")
RETURNED = ("content-type", "retry-after", "www-authenticate",
            "inference-header-content-length")
# To every replica: a repository load or unload; feedback labels (each replica monitors the
# requests it served, so each matches the labels of its own predictions).
BROADCAST = re.compile(r"^/v2/(repository/models/[^/]+/(load|unload)|models/[^/]+/feedback)$")
# Idle connections are reused for this long only: well within uvicorn's keep-alive timeout
# (5 s) on the replica's side, so that a connection never fails for having been closed idle,
# and a failure always means the replica went away.
_IDLE_S = 2.0


class UnreachableError(Exception):
    """The request never reached the replica (safe to send to another)."""


class BrokenError(Exception):
    """The replica went away with the request."""


class ReplicaClient:
    def __init__(self, path: str) -> None:
        self.path = path
        self.idle: list[tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], float]] = []

    async def request(self, method: str, target: str, headers: dict[str, str], body: bytes
                      ) -> tuple[int, list[tuple[str, str]], bytes]:
        """(status, headers with lower-case names, body)."""
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        message = (f"{method} {target} HTTP/1.1\r\nhost: replica\r\ncontent-length: "
                   f"{len(body)}\r\n{head}\r\n").encode() + body
        conn = None
        while self.idle and conn is None:
            conn, used = self.idle.pop()
            if time.monotonic() - used > _IDLE_S:  # the replica may be closing it now
                conn[1].close()
                conn = None
        if conn is None:
            try:
                conn = await asyncio.open_unix_connection(self.path)
            except OSError as e:
                raise UnreachableError(str(e)) from None
        try:
            return await self._exchange(conn, method, message)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as e:  # ValueError: a malformed status line or length
            self.close()  # the others led to the same process
            raise BrokenError(str(e) or type(e).__name__) from None

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                        method: str, message: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        reader, writer = conn
        try:
            writer.write(message)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = [(k.strip().lower(), v.strip()) for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)]
            found = dict(headers)
            length = 0 if method == "HEAD" or status in _NO_BODY else int(
                found.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
        except BaseException:
            writer.close()
            raise
        if found.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((conn, time.monotonic()))
        return status, headers, body

    def close(self) -> None:
        while self.idle:
            (_, writer), _ = self.idle.pop()
            writer.close()


async def exchange(replica: Any, method: str, target: str, headers: dict[str, str],
                    body: bytes) -> tuple[int, list[tuple[str, str]], bytes] | None:
    """(status, the headers returned to the client, body); None when the replica could not
    be reached (send to another); a 503 when it went away with the request."""
    replica.inflight += 1
    try:
        status, got, content = await replica.pool.request(method, target, headers, body)
    except UnreachableError:  # never reached it: safe to send to another
        replica.ready = False
        return None
    except BrokenError as e:  # it died with the request: that one fails
        replica.ready = False
        return 503, [("content-type", "application/json"), ("retry-after", "1")], json.dumps(
            {"error": f"replica {replica.index} stopped while handling this request ({e}); "
                      "retry"}).encode()
    finally:
        replica.inflight -= 1
    return status, [(k, v) for k, v in got if k in RETURNED], content


async def reply(send: Any, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        *((k.encode(), v.encode("latin-1")) for k, v in headers),
        (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
