"""Hostile HTTP clients against a real ``distml serve`` with its default limits (4 MiB bodies,
64 KiB of request line and headers) and a short read deadline: JSON nested 100,000 deep,
shapes whose product is huge, millions of empty strings, bodies past the limit (declared,
streamed), giant headers, and connections that stall mid-request. Each gets its 4xx at once
(never a 5xx, never a hang) while the server's peak RSS (VmHWM, reset before each case
through /proc/PID/clear_refs) stays within MEMORY_BOUND_MIB of its idle RSS, and a stalled
connection neither delays a normal client nor outlives the deadline."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.serving import infer_body, running_server

READ_TIMEOUT_S = 2.0
MEMORY_BOUND_MIB = 200
LIMIT = 4 * 2**20  # serve.max_body_bytes's default
INFER = "/v2/models/tiny/infer"


@dataclass
class Server:
    url: str
    pid: int
    client: httpx.Client
    idle_mib: float
    x: np.ndarray
    peaks: dict[str, float] = field(default_factory=dict)  # case -> peak growth, MiB

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)


def _proc_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _reset_peak(pid: int) -> bool:
    try:  # "5" resets the peak RSS (VmHWM) to the current RSS
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(trained):
    root, x = trained
    with running_server("--registry", str(root / "registry"), "--read-timeout-s",
                        str(READ_TIMEOUT_S), cwd=root) as (url, proc, lines), \
            httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(3):  # warm: the first requests allocate what every request reuses
            assert _infer(client, x[:4]).status_code == 200
        s = Server(url, proc.pid, client, _proc_mib(proc.pid, "VmRSS"), x)
        yield s
        print(f"\nserver idle RSS {s.idle_mib:.0f} MiB; peak growth per case (MiB): "
              + ", ".join(f"{k} {v:.0f}" for k, v in s.peaks.items()))
        assert _infer(client, x[:4]).status_code == 200  # still serving after all of it
    log = "".join(lines)
    assert "Traceback" not in log
    assert "Exception in ASGI" not in log


def _infer(client: httpx.Client, rows: np.ndarray) -> httpx.Response:
    return client.post(INFER, json=infer_body(rows))


def _json_input(datatype: str, shape: str, data: str) -> bytes:
    """Built as text: a parser would refuse to build what these bodies describe."""
    return (f'{{"inputs":[{{"name":"input","datatype":"{datatype}","shape":{shape},'
            f'"data":{data}}}]}}').encode()


def _binary(datatype: str, shape: list[int], raw: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "input", "datatype": datatype, "shape": shape,
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def _many(item: str, n: int) -> str:
    return "[" + ",".join([item] * n) + "]"


# (case, body builder -> (body, headers), the status it gets)
CASES = [
    ("nested 100,000 deep", lambda: (b"[" * 100_000 + b"]" * 100_000, {}), 400),
    ("nested 100,000 deep in data",
     lambda: (_json_input("FP32", "[1,64]", "[" * 100_000 + "]" * 100_000), {}), 400),
    ("shape [1e5,1e5,1e5]", lambda: (_json_input("FP32", "[100000,100000,100000]", "[0.5]"), {}),
     400),
    ("shape [2^31-1,64], JSON", lambda: (_json_input("FP32", "[2147483647,64]", "[0.5]"), {}),
     400),
    ("shape [2^31-1,64], binary", lambda: _binary("FP32", [2**31 - 1, 64], bytes(256)), 400),
    ("shape [2^40,64]", lambda: (_json_input("FP32", "[1099511627776,64]", "[0.5]"), {}), 400),
    ("1.3M empty strings, JSON",
     lambda: (_json_input("BYTES", "[1300000]", _many('""', 1_300_000)), {}), 400),
    ("5M empty strings, JSON",
     lambda: (_json_input("BYTES", "[5000000]", _many('""', 5_000_000)), {}), 413),
    ("1M empty strings, binary", lambda: _binary("BYTES", [1_000_000], bytes(4_000_000)), 400),
    # the most Python objects per byte of JSON: ~25 bytes of memory per byte while parsed
    ("1.3M empty lists", lambda: (_json_input("FP32", "[1,64]", _many("[]", 1_300_000)), {}),
     400),
    ("1.3M empty objects", lambda: (_json_input("FP32", "[1,64]", _many("{}", 1_300_000)), {}),
     400),
    ("body of 2x the limit", lambda: (b" " * (2 * LIMIT), {}), 413),
    ("100 KiB of headers", lambda: (b"{}", {"X-Filler": "a" * 100 * 2**10}), 431),
]


def _measured(server: Server, case: str, send) -> float:
    """Runs ``send``; the server's peak RSS growth over idle during it, in MiB."""
    reset = _reset_peak(server.pid)
    send()
    peak = _proc_mib(server.pid, "VmHWM" if reset else "VmRSS") - server.idle_mib
    server.peaks[case] = peak
    assert peak < MEMORY_BOUND_MIB, f"{case}: the server grew {peak:.0f} MiB"
    return peak


@pytest.mark.parametrize(("case", "build", "status"), CASES, ids=[c[0] for c in CASES])
def test_hostile_bodies_get_a_4xx_fast_within_bounded_memory(server, case, build, status):
    body, headers = build()

    def send() -> None:
        start = time.perf_counter()
        resp = server.client.post(INFER, content=body, headers=headers)
        elapsed = time.perf_counter() - start
        assert resp.status_code == status, resp.text[:300]
        assert isinstance(resp.json()["error"], str)
        assert elapsed < 5, f"{case}: answered in {elapsed:.1f} s"

    _measured(server, case, send)


@pytest.mark.parametrize("depth", [500, 990, 3000])
def test_deep_nesting_in_any_field_is_a_4xx(server, depth):
    """Nesting just under and over the parser's recursion limit, wherever it may be echoed
    back in a message (a repr of it must not overflow either)."""
    nested = "[" * depth + "]" * depth
    fields = {"name": '"input"', "datatype": '"FP32"', "shape": "[1,64]",
              "data": "[" + ",".join(["0.5"] * 64) + "]"}
    for where in [*fields, "parameters", "outputs", "id"]:
        inner = {**fields, where: nested} if where in fields else fields
        tensor = "{" + ",".join(f'"{k}":{v}' for k, v in inner.items()) + "}"
        top = f'"{where}":{nested},' if where not in fields else ""
        resp = server.client.post(INFER, content=f'{{{top}"inputs":[{tensor}]}}'.encode())
        assert 400 <= resp.status_code < 500, (where, depth, resp.text[:200])


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_a_declared_huge_body_is_refused_before_it_is_sent(server):
    def send() -> None:
        with socket.create_connection(server.address) as sock:
            sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: 10737418240\r\n\r\n{\"inputs\":")
            start = time.perf_counter()
            sock.settimeout(5)
            head = sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 413"), head[:200]
            assert time.perf_counter() - start < 2
            # the rest of the 10 GiB is not waited for: the read deadline closes the
            # connection (answered already: no 408 after the 413)
            assert b"HTTP/1.1 408" not in _read_all(sock, READ_TIMEOUT_S + 5)
            assert time.perf_counter() - start < READ_TIMEOUT_S + 1

    _measured(server, "10 GiB declared", send)


def test_a_streamed_body_past_the_limit_is_refused(server):
    def chunks():
        for _ in range(64):  # 64 MiB, chunked: no Content-Length to refuse it by
            yield bytes(2**20)

    def send() -> None:
        resp = server.client.post(INFER, content=chunks())
        assert resp.status_code == 413, resp.text[:300]

    _measured(server, "64 MiB chunked", send)


def test_endless_headers_are_cut_off(server):
    def send() -> None:
        with socket.create_connection(server.address) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            start = time.perf_counter()
            sent = _send_until_refused(sock, 256 * 2**20)
            assert sent < 64 * 2**20  # the socket buffers' worth past the limit, no more
            assert time.perf_counter() - start < 5

    _measured(server, "endless header", send)


def _send_until_refused(sock: socket.socket, most: int) -> int:
    """Bytes sent (1 MiB at a time) until the server resets the connection, at most ``most``."""
    sent = 0
    try:
        while sent < most:
            sock.sendall(b"a" * 2**20)
            sent += 2**20
    except OSError:  # reset, or broken pipe: the server has closed
        pass
    return sent


def test_stalled_clients_neither_delay_others_nor_stay_open(server):
    partial = [
        b"",  # connects and says nothing
        b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Le",  # half a header
        b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: 1000\r\n\r\n{\"inputs\": [",  # 13 bytes of 1000
    ]
    socks = []
    try:
        opened = time.monotonic()
        for i in range(60):
            socks.append(socket.create_connection(server.address))
            socks[-1].sendall(partial[i % 3])
        latencies = []
        for _ in range(5):  # a normal client meanwhile
            start = time.perf_counter()
            assert _infer(server.client, server.x[:4]).status_code == 200
            latencies.append(time.perf_counter() - start)
        assert max(latencies) < 1.0, latencies
        answers = [_read_all(s, READ_TIMEOUT_S + 10) for s in socks]
        closed_after = time.monotonic() - opened
    finally:
        for s in socks:
            s.close()
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:40] for a in answers}
    assert READ_TIMEOUT_S - 0.5 < closed_after < READ_TIMEOUT_S + 4
    print(f"\n60 stalled connections: normal requests took {1000 * max(latencies):.0f} ms at "
          f"most; all got 408 and were closed {closed_after:.1f} s after opening")


def test_a_trickling_client_is_closed_at_the_deadline(server):
    with socket.create_connection(server.address) as sock:
        start = time.monotonic()
        request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 1000
        sock.settimeout(0.2)
        answer = b""
        for byte in request:  # a byte every 0.2 s, never finishing
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer or time.monotonic() - start > READ_TIMEOUT_S + 5:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert time.monotonic() - start < READ_TIMEOUT_S + 1
