"""What a connection may cost the server before it is a request: TLS, and limits on the
HTTP/1.1 connection itself.

TLS: one certificate and key (``serve.ssl_certfile`` / ``ssl_keyfile``) for the REST port
(uvicorn's ``ssl_certfile`` / ``ssl_keyfile``) and the gRPC port
(``grpc.ssl_server_credentials``). They are read and checked to be a matching pair before
the model loads, so that a wrong path fails at once with the flag and the file named.

Connection limits: uvicorn closes a keep-alive connection left idle after a response
(``timeout_keep_alive``, 5 s), but has no limit on a request that has begun and does not
finish: a client that opens a connection and sends nothing, half a request line, headers a
byte at a time or a body shorter than its Content-Length holds the connection (and the
partial request's memory) for ever, and with httptools no limit on the size of the request
line and headers either. ``GuardedProtocol`` is uvicorn's httptools protocol with both: the
whole request (line, headers, body) must arrive within ``read_timeout_s`` of its first byte
(or of the connection's opening), else 408 and the connection is closed; the request line
and headers may take at most ``max_header_bytes``, else 431 and the connection is closed.
Bodies are bounded by the app (``max_body_bytes``, 413), which reads them as they come.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from distml.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tls:
    certfile: Path
    keyfile: Path
    cert: bytes  # PEM, as gRPC wants them
    key: bytes


_FLAGS = {"ssl_certfile": "--ssl-certfile (serve.ssl_certfile)",
          "ssl_keyfile": "--ssl-keyfile (serve.ssl_keyfile)"}


def load_tls(settings: Any) -> Tls | None:
    """The certificate and key the settings name, read and checked; None without TLS.
    A ConfigError names the flag and the file when one is missing, unreadable or wrong."""
    paths = {name: getattr(settings, name) for name in _FLAGS}
    if all(p is None for p in paths.values()):
        return None
    given = [n for n, p in paths.items() if p is not None]
    if len(given) == 1:
        other = next(n for n in _FLAGS if n not in given)
        raise ConfigError(f"{_FLAGS[given[0]]} is {str(paths[given[0]])!r} but {_FLAGS[other]} "
                          "is not set; TLS needs both: the certificate (PEM, with its chain) "
                          "and its private key (PEM)")
    data = {}
    for name, path in paths.items():
        try:
            data[name] = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"{_FLAGS[name]} {str(path)!r}: cannot read it "
                              f"({e.strerror or e}); give a readable PEM file") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:  # a password callback that gives none: an encrypted key fails here, never prompts
        context.load_cert_chain(paths["ssl_certfile"], paths["ssl_keyfile"],
                                password=lambda: b"")
    except (ssl.SSLError, ValueError) as e:
        raise ConfigError(
            f"{_FLAGS['ssl_certfile']} {str(paths['ssl_certfile'])!r} and "
            f"{_FLAGS['ssl_keyfile']} {str(paths['ssl_keyfile'])!r} are not a PEM certificate "
            f"and its matching, unencrypted private key ({getattr(e, 'reason', None) or e})"
        ) from None
    return Tls(Path(paths["ssl_certfile"]), Path(paths["ssl_keyfile"]),
               data["ssl_certfile"], data["ssl_keyfile"])


def uvicorn_server(app: Any, settings: Any, tls: Tls | None = None,
                   **where: Any) -> uvicorn.Server:
    """uvicorn with distml's connection limits and, given, TLS; ``where``: uvicorn's
    ``uds`` (a replica's socket) or nothing (the caller passes the bound socket to run)."""
    if tls is not None:
        where.update(ssl_certfile=str(tls.certfile), ssl_keyfile=str(tls.keyfile))
    http = guarded_protocol(settings.read_timeout_s, settings.max_header_bytes)
    # proxy_headers off: no proxy is trusted to name the client (and its layer costs a
    # little on every request)
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                         timeout_graceful_shutdown=5, http=http,
                                         proxy_headers=False, **where))


def grpc_address(host: str, port: int) -> str:
    """gRPC's host:port (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _RefusedError(Exception):
    pass


def guarded_protocol(read_timeout_s: float, max_header_bytes: int) -> type[HttpToolsProtocol]:
    """uvicorn's ``http`` protocol class with these limits."""
    return type("GuardedProtocol", (GuardedProtocol,), {
        "read_timeout_s": read_timeout_s, "max_header_bytes": max_header_bytes})


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's arrival and a bound on
    its request line and headers (see the module's docstring)."""

    read_timeout_s = 30.0
    max_header_bytes = 64 * 2**10

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_done = False
        self._refusal: tuple[int, str] | None = None
        super().connection_made(transport)
        self._arm()  # a connection that sends nothing is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # httptools buffers a header's name and value until each is complete, so the bytes
        # are counted as they come: whatever arrived while the head was incomplete is head.
        if not self._head_done and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._answer(431, self._too_large())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._head_done = 0, False
        self._arm()

    def on_headers_complete(self) -> None:
        self._head_done = True
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self.max_header_bytes:  # arrived in one piece: never reaches the app
            self._refusal = (431, self._too_large())
            raise _RefusedError  # stops the parser; uvicorn answers through send_400_response
        super().on_headers_complete()

    def _too_large(self) -> str:
        return f"the request line and headers are over the limit of {self.max_header_bytes} bytes"

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a parser error (bytes that are not HTTP, or a refusal above):
        # the protocol's JSON error instead of its plain text
        status, msg = self._refusal or (400, msg)
        self._answer(status, msg)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle if self._head_done else None
        if cycle is not None and cycle.response_started:  # answered; the body never ended
            self.transport.close()
            return
        if cycle is not None:  # the app waits for the rest of the body: it is not coming
            cycle.disconnected = True
            cycle.message_event.set()
        logger.info("closing a connection from %s: no whole request within %g s",
                    self.client, self.read_timeout_s)
        self._answer(408, f"the request did not arrive whole within {self.read_timeout_s:g} "
                          "s; the connection is closed")

    def _answer(self, status: int, message: str) -> None:
        """An error response written directly, and the connection closed (the request
        never reached the app, or the app has stopped waiting for it)."""
        self._disarm()
        body = json.dumps({"error": message}).encode()
        self.transport.write(
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json"
            f"\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        self.transport.close()
