"""The serving benchmark's load generator: closed loop, C keep-alive HTTP/1.1 connections on
asyncio streams, each with one request in flight, for a fixed time per level after a warm-up.
Lean, so that the server, not the client, is what is measured; the same for every server."""

from __future__ import annotations

import asyncio
import re
import statistics
import time

import numpy as np

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
    return asyncio.run(_level(port, path, requests, concurrency, seconds, warmup_s))


def summarize(runs: list[dict]) -> dict:
    """The median of repeated runs of one level, and the spread of the throughput."""
    rps = [r["throughput_rps"] for r in runs]
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {"throughput_rps": round(statistics.median(rps), 1),
            "throughput_min_max": [round(min(rps), 1), round(max(rps), 1)],
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
            "repeats": len(runs), "requests": sum(r["requests"] for r in runs),
            "errors": errors}
