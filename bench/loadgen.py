"""The serving benchmark's load generator, lean, so that the server, not the client, is what
is measured; the same for every server. Keep-alive HTTP/1.1 on asyncio streams, for a fixed
time per level after a warm-up:

- closed loop (``run_level``): C connections, each with one request in flight;
- open loop (``run_open``): requests arrive as a Poisson process at a given rate whatever the
  server's pace, each sent on the next idle one of a fixed set of connections (64: the same
  for every server), and its latency counts from its scheduled arrival, so a server that
  falls behind is charged for the queue it builds (no coordinated omission), as Ray Serve's
  and Triton's own load tools measure. ``client_lag_p99_ms``: how late the client's own loop
  started a request (large: the client, not the server, was behind, and the level's latency
  says little about the server; ``p99_less_client_lag_ms`` is the p99 counted from when the
  client started each request instead, its wait for a free connection included);
  ``send_lag_p99_ms``: how late it was sent (that, or every connection busy with the
  server): large only when the level is over capacity.

Both run on uvloop when it is there (uvicorn[standard] brings it): the client's cost per
request is about half asyncio's, the same for every server."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Coroutine
from typing import Any

import numpy as np

try:  # the client's own cost per request halves on uvloop (the same for every server)
    import uvloop

    _LOOP = uvloop.new_event_loop
except ImportError:  # pragma: no cover - uvicorn[standard] brings it
    _LOOP = None


def _run(main: Coroutine) -> Any:
    with asyncio.Runner(loop_factory=_LOOP) as runner:
        return runner.run(main)

_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


class Connection:
    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def post(self, body: bytes, headers: str) -> int:
        self.writer.write(f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        await self.reader.readexactly(int(_LENGTH.search(head).group(1)))
        return int(head[9:12])

    def close(self) -> None:
        self.writer.close()


async def _level(port: int, path: str, requests: list[tuple[bytes, str]], concurrency: int,
                 seconds: float, warmup_s: float) -> dict:
    conns = [Connection(port, path) for _ in range(concurrency)]
    await asyncio.gather(*[c.open() for c in conns])
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = [0]

    async def worker(conn: Connection, stop_at: float, record: bool) -> None:
        while time.perf_counter() < stop_at:
            body, headers = requests[counter[0] % len(requests)]
            counter[0] += 1
            start = time.perf_counter()
            # A server that stops answering fails the level instead of hanging the run.
            status = await asyncio.wait_for(conn.post(body, headers), 30)
            if not record:
                continue
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    try:
        warm_until = time.perf_counter() + warmup_s
        await asyncio.gather(*[worker(c, warm_until, False) for c in conns])
        start = time.perf_counter()
        await asyncio.gather(*[worker(c, start + seconds, True) for c in conns])
        elapsed = time.perf_counter() - start
    finally:
        for c in conns:
            c.close()
    lat = np.asarray(latencies or [np.nan]) * 1000
    return {"requests": len(latencies), "throughput_rps": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "errors": errors}


def run_level(port: int, path: str, requests: list[tuple[bytes, str]], concurrency: int, *,
              seconds: float = 5.0, warmup_s: float = 1.0) -> dict:
    """One measurement of ``seconds`` after ``warmup_s`` of the same load."""
    return _run(_level(port, path, requests, concurrency, seconds, warmup_s))


async def _open(port: int, path: str, requests: list[tuple[bytes, str]], rate: float,
                seconds: float, warmup_s: float, seed: int, connections: int) -> dict:
    rng = np.random.default_rng(seed)
    conns = [Connection(port, path) for _ in range(connections)]
    await asyncio.gather(*[c.open() for c in conns])
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for c in conns:
        idle.put_nowait(c)
    latencies: list[float] = []
    lags: list[float] = []  # how late a request was sent (the client's backlog or no idle
    client_lags: list[float] = []  # connection: all busy with the server); the first alone
    from_start: list[float] = []  # latency less the client's own lag (not the server's queue)
    errors: dict[str, int] = {}

    async def one(i: int, scheduled: float, record: bool) -> None:
        started = time.perf_counter()
        if record:  # the client's own backlog: its loop started this request late
            client_lags.append(started - scheduled)
        conn = await idle.get()  # none idle: it waits, and the wait counts in its latency
        body, headers = requests[i % len(requests)]
        if record:
            lags.append(time.perf_counter() - scheduled)
        status = await asyncio.wait_for(conn.post(body, headers), 30)
        idle.put_nowait(conn)
        if record and status == 200:
            latencies.append(time.perf_counter() - scheduled)
            from_start.append(time.perf_counter() - started)
        elif record:
            errors[str(status)] = errors.get(str(status), 0) + 1

    tasks = []
    begin = time.perf_counter()
    measure_from, end = begin + warmup_s, begin + warmup_s + seconds
    at, i = begin, 0
    try:
        while True:
            at += rng.exponential(1 / rate)
            if at >= end:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, at, at >= measure_from)))
            i += 1
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - measure_from
    finally:
        for c in conns:
            c.close()
    lat = np.asarray(latencies or [np.nan]) * 1000
    return {"offered_rps": rate, "requests": len(latencies),
            "throughput_rps": len(latencies) / max(elapsed, seconds),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "send_lag_p99_ms": float(np.percentile(np.asarray(lags or [np.nan]) * 1000, 99)),
            "client_lag_p99_ms": float(np.percentile(np.asarray(client_lags or [np.nan]) * 1000,
                                                     99)),
            "p99_less_client_lag_ms": float(np.percentile(
                np.asarray(from_start or [np.nan]) * 1000, 99)),
            "connections": connections, "errors": errors}


def run_open(port: int, path: str, requests: list[tuple[bytes, str]], rate: float, *,
             seconds: float = 5.0, warmup_s: float = 1.0, seed: int = 0,
             connections: int = 64) -> dict:
    """Open-loop Poisson arrivals at ``rate`` per second for ``seconds`` after ``warmup_s``,
    over ``connections`` keep-alive connections (as wrk2 and perf_analyzer bound theirs)."""
    return _run(_open(port, path, requests, rate, seconds, warmup_s, seed, connections))


def summarize(runs: list[dict]) -> dict:
    """The median of repeated runs of one level, and the spread of the throughput."""
    rps = [r["throughput_rps"] for r in runs]
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    out = {"throughput_rps": round(statistics.median(rps), 1),
           "throughput_min_max": [round(min(rps), 1), round(max(rps), 1)],
           "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
           "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
           "repeats": len(runs), "requests": sum(r["requests"] for r in runs),
           "errors": errors}
    for key in ("offered_rps", "send_lag_p99_ms", "client_lag_p99_ms",
                "p99_less_client_lag_ms"):  # open loop: the client's own backlog
        if key in runs[0]:
            out[key] = round(statistics.median(r[key] for r in runs), 3)
    if "cpu_us_per_request" in runs[0]:  # bench/serve.py: the server's and the client's
        out["cpu_us_per_request"] = {side: round(statistics.median(
            r["cpu_us_per_request"][side] for r in runs), 1) for side in ("server", "client")}
    return out
