"""Online serving: ``distml serve`` with and without dynamic batching, against a plain FastAPI
endpoint running the same model per request (bench/plain_server.py), in one run.

The model is the digits main job's mlp-wide candidate (standardize + MLP 64-256-256-10),
trained here for a few epochs. Each server runs alone in its own process on loopback. A
closed-loop load generator in this process (keep-alive HTTP/1.1 on asyncio streams, lean so
that the server is what is measured) keeps C requests in flight, one digits row each, for
REQUESTS requests or SECONDS seconds per level, whichever ends first, at C = 1, 8, 32, 64.
Reported per server and C: throughput (requests/s), p50/p99 latency (ms) and errors. The load
generator shares the machine's cores with the server, alike for every peer.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench.common import save

LEVELS = (1, 8, 32, 64)
REQUESTS, SECONDS, WARMUP = 2000, 12.0, 100
ROOT = Path(__file__).parents[1]


def _train(root: Path) -> tuple[Path, np.ndarray]:
    raw = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    raw["train"]["candidates"] = [c for c in raw["train"]["candidates"] if c["name"] == "mlp-wide"]
    raw["train"]["epochs"] = 5
    raw.update(output_dir=str(root / "runs"), registry=str(root / "registry"))
    (root / "digits.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run([sys.executable, "-m", "distml", "run", str(root / "digits.yaml"), "-q"],
                   check=True, cwd=root)
    from sklearn.datasets import load_digits

    return root / "registry" / "digits" / "v1", load_digits().data.astype(np.float32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/models/digits/infer").status_code:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {proc.stderr.read()}")
    raise RuntimeError(f"{cmd} did not start")


class _Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: the load generator's client,
    lean so that the server, not the client, is what is measured."""

    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def post(self, body: bytes) -> int:
        self.writer.write(f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          "Content-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def _load(port: int, path: str, rows: np.ndarray, concurrency: int) -> dict:
    bodies = [json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                      "data": r.tolist()}]}).encode() for r in rows]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    state = {"sent": 0}
    conns = [_Connection(port, path) for _ in range(concurrency)]
    await asyncio.gather(*[c.open() for c in conns])

    async def worker(conn: _Connection, stop_at: float, count: int, record: bool) -> None:
        while state["sent"] < count and time.perf_counter() < stop_at:
            i = state["sent"]
            state["sent"] += 1
            start = time.perf_counter()
            status = await conn.post(bodies[i % len(bodies)])
            if not record:
                continue
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    try:
        await asyncio.gather(*[worker(c, time.perf_counter() + 10, WARMUP, False)
                               for c in conns])
        state["sent"] = 0
        start = time.perf_counter()
        await asyncio.gather(*[worker(c, start + SECONDS, REQUESTS, True) for c in conns])
        elapsed = time.perf_counter() - start
    finally:
        for c in conns:
            c.close()
    lat = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "seconds": round(elapsed, 3),
            "throughput_rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "errors": errors}


def main() -> dict:
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        artifact, rows = _train(Path(tmp))
        servers = {
            "batched": ["--max-batch-size", "64", "--max-delay-ms", "2"],
            "unbatched": ["--no-batching"],
            "plain_fastapi": None,
        }
        results: dict[str, dict[str, dict]] = {}
        for name, flags in servers.items():
            port = _free_port()
            cmd = ([sys.executable, "-m", "bench.plain_server", str(artifact), str(port)]
                   if flags is None else
                   [sys.executable, "-m", "distml", "serve", str(artifact), "--port", str(port),
                    "--max-queue-rows", "100000", *flags])
            proc = _start(cmd, port)
            try:
                path = "/v2/models/digits/infer"
                results[name] = {f"c{c}": asyncio.run(_load(port, path, rows, c))
                                 for c in LEVELS}
            finally:
                proc.terminate()
                proc.wait(30)
            print(name, json.dumps(results[name]), flush=True)
    b, u, p = (results[k]["c32"] for k in ("batched", "unbatched", "plain_fastapi"))
    result = {
        "model": "digits mlp-wide (64-256-256-10, standardize)",
        "rows_per_request": 1, "levels": list(LEVELS), "cpu_count": os.cpu_count(),
        "batching_speedup_c32": round(b["throughput_rps"] / u["throughput_rps"], 2),
        "p99_ratio_c32": round(b["p99_ms"] / u["p99_ms"], 2),
        "ratio_vs_plain_fastapi_c32": round(b["throughput_rps"] / p["throughput_rps"], 2),
        "results": results,
    }
    save("serve", result)
    return result


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    res = r["results"]
    rows = [
        ("serve, c=32", "batching_speedup_c32",
         f"{r['batching_speedup_c32']:.2f} ({res['batched']['c32']['throughput_rps']:,.0f} vs "
         f"{res['unbatched']['c32']['throughput_rps']:,.0f} req/s)", ">= 3"),
        ("serve, c=32", "p99_ratio_c32",
         f"{r['p99_ratio_c32']:.2f} ({res['batched']['c32']['p99_ms']:.1f} vs "
         f"{res['unbatched']['c32']['p99_ms']:.1f} ms)", "<= 1.0"),
        ("serve, c=32", "ratio_vs_plain_fastapi_c32",
         f"{r['ratio_vs_plain_fastapi_c32']:.2f} (plain FastAPI "
         f"{res['plain_fastapi']['c32']['throughput_rps']:,.0f} req/s)", "reported"),
    ]
    for c in r["levels"]:
        cells = "; ".join(f"{k} {v[f'c{c}']['throughput_rps']:,.0f} req/s p50 "
                          f"{v[f'c{c}']['p50_ms']:.1f} p99 {v[f'c{c}']['p99_ms']:.1f} ms"
                          for k, v in res.items())
        rows.append((f"serve, c={c}", "throughput, latency", cells, "reported"))
    return rows


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
